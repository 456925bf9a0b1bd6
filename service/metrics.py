"""Prometheus metrics: names and labels follow Prometheus conventions (base
units, `_total` counters, `_seconds` durations). docs/operating.md's Metrics section
lists them with what to watch."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = tuple(2**i for i in range(6, 18))  # 64 .. 131072
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per server, so that tests can run several in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "reranker_requests_total",
            "Calls finished, by transport (grpc, http), RPC or HTTP route, and gRPC status code name.",
            ["transport", "rpc", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "reranker_request_duration_seconds",
            "Time from arrival to answer, by transport and RPC or HTTP route.",
            ["transport", "rpc"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.calls_in_progress = Gauge(
            "reranker_calls_in_progress", "Calls being served (bounded by max_concurrent_rpcs).", registry=r
        )
        self.queue_pairs = Gauge("reranker_queue_pairs", "Pairs waiting for a worker.", registry=r)
        self.queue_tokens = Gauge("reranker_queue_tokens", "Tokens waiting for a worker.", registry=r)
        self.rejected = Counter(
            "reranker_rejected_total", "Requests refused at admission, by reason.", ["reason"], registry=r
        )
        self.pairs_admitted = Counter("reranker_pairs_admitted_total", "Pairs admitted to the queue.", registry=r)
        self.pairs = Counter(
            "reranker_pairs_total",
            "Pairs by outcome: scored, cancelled (dropped from the queue), discarded (scored after their call ended), "
            "expired (deadline passed before dispatch), failed.",
            ["outcome"],
            registry=r,
        )
        self.tokens_scored = Counter("reranker_tokens_scored_total", "Real (unpadded) tokens scored.", registry=r)
        self.padded_tokens = Counter(
            "reranker_batch_padded_tokens_total", "Tokens computed, padding included (rows x longest row).", registry=r
        )
        self.batches = Counter("reranker_batches_total", "Batches sent, by worker.", ["worker"], registry=r)
        self.batch_size = Histogram("reranker_batch_size", "Rows per batch.", buckets=_ROW_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "reranker_batch_tokens", "Padded tokens per batch.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_retries = Counter(
            "reranker_batch_retries_total", "Batches re-queued after their worker died.", registry=r
        )
        self.compute_seconds = Counter(
            "reranker_worker_compute_seconds_total",
            "Seconds a worker spent computing; its rate is the busy fraction.",
            ["worker"],
            registry=r,
        )
        self.head_cache_lookups = Counter(
            "reranker_worker_head_cache_lookups_total",
            "A batch's query heads read from the worker's head cache (result=hit) or computed (result=miss).",
            ["worker", "result"],
            registry=r,
        )
        self.worker_ready = Gauge(
            "reranker_worker_ready",
            "1 when the worker has loaded and warmed up, else 0.",
            ["worker", "device"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "reranker_worker_restarts_total", "Worker processes restarted after dying.", ["worker"], registry=r
        )
        self.tokenizer_restarts = Counter(
            "reranker_tokenizer_restarts_total",
            "Times the tokenizer processes were started afresh after one of them died.",
            registry=r,
        )
        self.tokenizer_chunks = Counter(
            "reranker_tokenizer_chunks_total",
            "Chunks of calls' texts the tokenizer processes answered (at most 64 pairs or 256 KiB each).",
            registry=r,
        )
        self.tokenizer_chunks_waiting = Gauge(
            "reranker_tokenizer_chunks_waiting",
            "Chunks sent to the tokenizer processes and not yet answered: above their number, they are the bottleneck.",
            registry=r,
        )
        self.worker_token_budget = Gauge(
            "reranker_worker_token_budget",
            "Padded tokens per batch the worker is given (lowered after out-of-memory).",
            ["worker"],
            registry=r,
        )
        self.cache_hits = Counter(
            "reranker_score_cache_hits_total", "Documents answered from the score cache.", registry=r
        )
        self.cache_joins = Counter(
            "reranker_score_cache_joins_total",
            "Documents answered by waiting for another call computing the same pair (single flight).",
            registry=r,
        )
        self.cache_misses = Counter(
            "reranker_score_cache_misses_total",
            "Documents neither cached nor in flight: computed by the call that asked.",
            registry=r,
        )
        self.cache_evictions = Counter(
            "reranker_score_cache_evictions_total", "Entries dropped to keep within score_cache_bytes.", registry=r
        )
        self.cache_entries = Gauge("reranker_score_cache_entries", "Results held by the score cache.", registry=r)
        self.cache_bytes = Gauge(
            "reranker_score_cache_bytes", "Memory the score cache's entries take (entries x their size).", registry=r
        )
        self.model_load_seconds = Gauge(
            "reranker_model_load_seconds",
            "Seconds the worker took to load and warm up its model.",
            ["worker"],
            registry=r,
        )

    def call_finished(self, transport: str, rpc: str, code: str, seconds: float) -> None:
        """Count one finished call: the same series for every transport."""
        self.requests.labels(transport, rpc, code).inc()
        self.request_seconds.labels(transport, rpc).observe(seconds)

    def serve(self, port: int, host: str) -> int:
        """Expose /metrics over HTTP from a background thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
