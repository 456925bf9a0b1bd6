"""The Prometheus metrics of a fresh server after a known amount of traffic:
every counter moved by exactly what the traffic caused, the histograms agree
with the counters, the score cache counts its one repeat, the worker's head
cache its reuse, and the worker gauges describe the one worker."""

from __future__ import annotations

import pytest

from reranker_client import RerankerClient, RerankerError, Usage, rerank_request
from tests.texts import DOCUMENTS, QUERY

BATCH_ROWS = 4
CACHED = 3  # RerankMany's request "a" repeats the first call's first three pairs
PAIRS = 5 + 3 + 4 + 6 + 3 + 3 - CACHED  # the pairs the traffic below admits


def send_traffic(address: str) -> list[Usage]:
    """Every RPC once or more, one request refused before admission, and one
    answered from the score cache; the usage of every answer."""
    usages = []
    with RerankerClient(address, timeout=60) as client:
        usages.append(client.rerank(QUERY, DOCUMENTS[:5]).usage)
        usages.append(client.rerank("where is Tokyo?", DOCUMENTS[5:8]).usage)
        with pytest.raises(RerankerError):
            client.rerank("", ["refused before admission"])
        usages.append(client.score([(QUERY, document) for document in DOCUMENTS[8:12]]).usage)
        usages.append(list(client.rerank_stream(QUERY, DOCUMENTS[12:18]))[-1].usage)
        many = client.rerank_many(
            [rerank_request(QUERY, DOCUMENTS[:3], request_id="a"), rerank_request("q", DOCUMENTS[3:6], request_id="b")]
        )
        usages += [answer.usage for answer in many]
        client.model_info()
    return usages


def test_metrics_count_exactly_the_traffic(server_factory, tiny_model):
    server = server_factory(tiny_model, "--cpu-threads", "1", "--max-batch-size", str(BATCH_ROWS))
    usages = send_traffic(server.address)
    assert len(usages) == 6
    assert sorted(usage.cached_documents for usage in usages) == [0, 0, 0, 0, 0, CACHED]
    tokens = [usage.tokens for usage in usages if not usage.cached_documents]  # the answers that were computed
    m = server.metric
    exposition = server.metrics()

    # Calls, by RPC and status code (RerankMany counts its stream, not its requests).
    requests = {
        ("Rerank", "OK"): 2,
        ("Rerank", "INVALID_ARGUMENT"): 1,
        ("Score", "OK"): 1,
        ("RerankStream", "OK"): 1,
        ("RerankMany", "OK"): 1,
        ("GetModelInfo", "OK"): 1,
    }
    for (rpc, code), count in requests.items():
        assert m("reranker_requests_total", rpc=rpc, code=code) == count, (rpc, code)
    assert m("reranker_requests_total") == sum(requests.values())
    assert m("reranker_request_duration_seconds_count", rpc="Rerank") == 3
    assert m("reranker_request_duration_seconds_count") == sum(requests.values())

    # Pairs: the refused request never reached the queue; everything admitted was scored.
    assert m("reranker_pairs_admitted_total") == PAIRS
    assert m("reranker_pairs_total", outcome="scored") == PAIRS
    assert m("reranker_pairs_total") == PAIRS  # no other outcome
    assert m("reranker_tokens_scored_total") == sum(tokens) > 0
    assert m("reranker_rejected_total") == 0
    assert m("reranker_queue_pairs") == 0 and m("reranker_queue_tokens") == 0

    # The score cache: every distinct document looked up once, one request's worth found.
    assert m("reranker_score_cache_hits_total") == CACHED
    assert m("reranker_score_cache_misses_total") == m("reranker_score_cache_entries") == PAIRS
    assert m("reranker_score_cache_joins_total") == m("reranker_score_cache_evictions_total") == 0
    assert m("reranker_score_cache_bytes") == 512 * PAIRS

    # Batches: the histograms agree with the counters.
    batches = m("reranker_batches_total", worker="0")
    assert batches == m("reranker_batches_total")  # the only worker
    assert batches >= PAIRS / BATCH_ROWS
    assert m("reranker_batch_size_count") == batches
    assert m("reranker_batch_size_sum") == PAIRS  # every pair in exactly one batch
    assert exposition[f'reranker_batch_size_bucket{{le="{float(BATCH_ROWS)}"}}'] == batches  # none above max_batch_size
    assert m("reranker_batch_tokens_count") == batches
    assert m("reranker_batch_tokens_sum") == m("reranker_batch_padded_tokens_total") >= sum(tokens)
    assert m("reranker_batch_retries_total") == 0

    # The worker: ready, loaded, busy for a while, never restarted.
    assert exposition['reranker_worker_ready{device="cpu",worker="0"}'] == 1
    assert m("reranker_worker_ready") == 1
    assert m("reranker_model_load_seconds", worker="0") > 0
    assert m("reranker_worker_token_budget", worker="0") > 0
    assert m("reranker_worker_compute_seconds_total", worker="0") > 0
    assert m("reranker_worker_restarts_total") == 0

    # The head cache (on by default on a CPU): three queries, each head computed at most once, and the
    # first query's head read again by its later calls' batches.
    hits = m("reranker_worker_head_cache_lookups_total", worker="0", result="hit")
    misses = m("reranker_worker_head_cache_lookups_total", worker="0", result="miss")
    assert 1 <= misses <= 3 and hits >= 1
    assert hits + misses <= batches


def test_metrics_listen_where_they_are_told(server_factory, tiny_model):
    """--metrics-host: the endpoint has no authentication, so it can be kept off
    the address the gRPC port serves on."""
    import urllib.error
    import urllib.request

    server = server_factory(tiny_model, "--cpu-threads", "1", "--metrics-host", "127.0.0.2", wait=False)
    listening = server.wait_for_event("metrics_listening")[0]
    assert listening["host"] == "127.0.0.2"
    port = listening["port"]
    assert b"reranker_requests_total" in urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
