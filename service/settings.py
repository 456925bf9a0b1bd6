"""Every setting of the server, in one frozen dataclass.

Each field is a command-line flag (`--max-batch-tokens`) and an environment
variable (`RERANKER_MAX_BATCH_TOKENS`); a flag wins over the variable, the
variable over the default. Nothing is read at import time: `main` builds one
Settings and passes it down.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workers.layout import COMPILE_MODES, LAYOUTS
from workers.logs import LOG_FORMATS
from workers.precision import PRECISIONS

ENV_PREFIX = "RERANKER_"
# max_batch_tokens 0 (the default) picks these per device. On this project's
# 2-core CPU, in process, 2,048-token batches scored 1.2-1.3x as fast as
# 4,096-token ones (issue 11; BENCHMARKS.md, "Batch budgets"); GPUs want large
# batches, and 32,768 is what every GPU figure so far was measured with.
CPU_BATCH_TOKENS = 2048
CUDA_BATCH_TOKENS = 32768
# head_cache_bytes -1 (the default) picks these per device. On this project's
# 2-core CPU, in process, workload a, keeping heads scored 1.10x the pairs/s of
# computing each batch's heads (median of 5 rounds; BENCHMARKS.md, "The head
# cache"); 256 MiB holds 17 heads of 66 tokens of the 0.6B in fp32. Never
# measured on a GPU: off there until it is.
CPU_HEAD_CACHE_BYTES = 256 * 1024 * 1024
CUDA_HEAD_CACHE_BYTES = 0


def _setting(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    # The model
    model: str = _setting("", "a checkpoint directory, or a hub id already in the local Hugging Face cache (required)")
    revision: str = _setting("", "the hub revision to look up in the cache (default: the cache's main)")
    device: str = _setting("auto", "auto (every visible GPU, else the CPU), cpu, cuda, or a list such as cuda:0,cuda:1")
    workers_per_device: int = _setting(1, "worker processes (model copies) per device")
    dtype: str = _setting(
        "auto", "auto (bf16 on CUDA, fp32 on CPU) or one of " + ", ".join(PRECISIONS), choices=("auto", *PRECISIONS)
    )
    attn_implementation: str = _setting(
        "sdpa",
        "attention kernels; flex_attention (FlexAttention, CUDA only) is untested on GPUs so far",
        choices=("sdpa", "eager", "flex_attention"),
    )
    layout: str = _setting(
        "auto",
        "how the documents of one query run: padded (the query's keys and values copied to each document's row), "
        "packed (documents back to back behind one copy of the query) or cascade (the query's keys and values "
        "used in place, never copied; FlexAttention, for CUDA, with attn_implementation sdpa); auto: the layout "
        "measured fastest on the device (padded on CPU and CUDA so far)",
        choices=("auto", *LAYOUTS),
    )
    torch_compile: str = _setting(
        "off",
        "run the model through torch.compile: off, default, or reduce-overhead (CUDA graphs); untested on GPUs so far",
        choices=COMPILE_MODES,
    )
    cpu_threads: int = _setting(0, "torch threads per CPU worker (0: the machine's cores shared among the CPU workers)")
    max_length: int = _setting(8192, "tokens per pair, prompt included; longer documents are cut at their end")
    # The network
    host: str = _setting("0.0.0.0", "address to listen on")
    port: int = _setting(50051, "gRPC port (0 picks a free one and logs it)")
    http_port: int = _setting(
        8080, "HTTP/JSON port: the Cohere-, Jina- and TEI-shaped rerank APIs, /health, /ready, /docs (0 turns it off)"
    )
    http_default_timeout_s: float = _setting(
        0.0,
        "deadline of an HTTP call that sets none (no `timeout` field, no X-Request-Timeout header); "
        "0: none, as for a gRPC call without a deadline",
    )
    metrics_port: int = _setting(9400, "Prometheus metrics port (0 turns the endpoint off)")
    metrics_host: str = _setting(
        "", "address the metrics endpoint listens on (empty: the same as --host); it has no authentication"
    )
    max_message_bytes: int = _setting(16 * 1024 * 1024, "largest request message (gRPC) or body (HTTP)")
    max_concurrent_rpcs: int = _setting(
        1024, "calls served at once; more are refused with RESOURCE_EXHAUSTED (health checks are never refused)"
    )
    max_concurrent_streams: int = _setting(256, "HTTP/2 streams per client connection")
    max_requests_per_stream: int = _setting(256, "RerankMany requests in progress per stream; more wait (flow control)")
    # Batching
    max_batch_tokens: int = _setting(
        0,
        "padded tokens (rows x longest row) per batch; 0: per device, "
        f"{CPU_BATCH_TOKENS:,} on a CPU (a longer pair runs alone) and {CUDA_BATCH_TOKENS:,} on CUDA "
        "(at least max_length)",
    )
    max_batch_size: int = _setting(256, "rows per batch")
    min_padding_efficiency: float = _setting(
        0.9,
        "real tokens over padded tokens a batch must keep; pairs of very different lengths go to different batches "
        "(0: no bound)",
    )
    max_wait_ms: float = _setting(2.0, "longest a partly filled batch waits for more work while a worker is free")
    batches_in_flight: int = _setting(2, "batches queued on each worker, so that it never idles between batches")
    # Admission
    max_queue_pairs: int = _setting(16384, "pairs waiting for a worker; beyond it new requests get RESOURCE_EXHAUSTED")
    max_queue_tokens: int = _setting(
        2_097_152, "tokens waiting for a worker; beyond it new requests get RESOURCE_EXHAUSTED"
    )
    max_documents_per_request: int = _setting(1000, "documents per Rerank request, pairs per Score request")
    max_query_chars: int = _setting(32768, "characters per query, and per instruction")
    max_document_chars: int = _setting(131072, "characters per document")
    max_windows_per_document: int = _setting(
        64, "TRUNCATION_CHUNK: windows one document may be split into; more is INVALID_ARGUMENT"
    )
    max_windows_per_request: int = _setting(
        4096,
        "TRUNCATION_CHUNK: windows one request may score (a document that fits is one); more is INVALID_ARGUMENT",
    )
    tokenizer_processes: int = _setting(
        0,
        "processes beside the front end that tokenize requests (0: one per two of the machine's cores, 1 to 8)",
    )
    # Long documents and repeated work
    chunk_overlap_tokens: int = _setting(
        128,
        "TRUNCATION_CHUNK: tokens each window repeats from the one before, so that a passage up to that long "
        "that straddles a cut is whole in one window (at most a quarter of a window)",
    )
    score_cache_bytes: int = _setting(
        64 * 1024 * 1024,
        "memory for cached results, least recently used dropped first (about 512 bytes a document, whatever its "
        "length); 0 turns the cache and single flight off",
    )
    head_cache_bytes: int = _setting(
        -1,
        "memory per worker for the keys and values of recent queries (system prompt, instruction and query), so "
        "that a request scored in several batches computes its query once; -1: per device, "
        f"{CPU_HEAD_CACHE_BYTES // 2**20} MiB on a CPU and off on CUDA (not yet measured there); 0: off",
    )
    # Lifecycle
    grace_period_s: float = _setting(30.0, "on SIGTERM, how long calls in flight may take to finish")
    batch_timeout_s: float = _setting(
        0.0,
        "a worker that holds a batch longer than this is hung: it is killed and restarted, its batches retried "
        "(0: 10x the batch's expected compute time as that worker measured it, at least 10 s)",
    )
    # Security
    tls_cert: str = _setting("", "server certificate chain (PEM) to serve TLS")
    tls_key: str = _setting("", "the certificate's private key (PEM)")
    tls_client_ca: str = _setting("", "CA bundle (PEM) to require and verify client certificates (mutual TLS)")
    auth_tokens_file: str = _setting(
        "", "file of accepted bearer tokens, one per line (RERANKER_AUTH_TOKENS may list them too)"
    )
    auth_tokens: tuple[str, ...] = _setting(
        (), "accepted bearer tokens, comma-separated (environment only)", env_only=True
    )
    # Tracing
    otlp_endpoint: str = _setting(
        "",
        "OpenTelemetry: send a trace per request over OTLP/gRPC to this endpoint, e.g. http://otel-collector:4317 "
        "(empty: off)",
    )
    # Logging
    log_format: str = _setting("auto", "json, console, or auto (console on a terminal)", choices=LOG_FORMATS)
    log_level: str = _setting("info", "debug, info, warning or error", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    def _problems(self):
        if not self.model:
            yield "model is required (--model or RERANKER_MODEL)"
        for name in (
            "workers_per_device",
            "max_length",
            "max_batch_size",
            "batches_in_flight",
            "max_queue_pairs",
            "max_queue_tokens",
            "max_documents_per_request",
            "max_query_chars",
            "max_document_chars",
            "max_message_bytes",
            "max_concurrent_rpcs",
            "max_concurrent_streams",
            "max_requests_per_stream",
            "max_windows_per_document",
            "max_windows_per_request",
        ):
            if getattr(self, name) < 1:
                yield f"{name} must be at least 1, got {getattr(self, name)}"
        for name in ("port", "http_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                yield f"{name} must be a port number (0..65535), got {getattr(self, name)}"
        if self.max_batch_tokens < 0:
            yield f"max_batch_tokens must be 0 (per device) or at least max_length, got {self.max_batch_tokens}"
        elif 0 < self.max_batch_tokens < self.max_length:
            yield f"max_batch_tokens ({self.max_batch_tokens}) must hold one pair of max_length ({self.max_length})"
        if self.max_queue_pairs < self.max_documents_per_request:
            yield (
                f"max_queue_pairs ({self.max_queue_pairs}) must hold one full request "
                f"({self.max_documents_per_request} documents)"
            )
        if self.max_windows_per_request < self.max_documents_per_request:
            yield (
                f"max_windows_per_request ({self.max_windows_per_request}) must hold one window per document "
                f"of a full request ({self.max_documents_per_request} documents)"
            )
        if self.tokenizer_processes < 0:
            yield f"tokenizer_processes must be 0 (one per two cores) or more, got {self.tokenizer_processes}"
        if self.chunk_overlap_tokens < 0:
            yield f"chunk_overlap_tokens must be >= 0, got {self.chunk_overlap_tokens}"
        if self.score_cache_bytes and self.score_cache_bytes < 1024:
            yield f"score_cache_bytes must be 0 (off) or at least 1024 (two entries), got {self.score_cache_bytes}"
        if self.head_cache_bytes < -1:
            yield f"head_cache_bytes must be -1 (per device), 0 (off) or a byte count, got {self.head_cache_bytes}"
        if not 0 <= self.min_padding_efficiency <= 1:
            yield f"min_padding_efficiency must lie in [0, 1], got {self.min_padding_efficiency}"
        for name in ("max_wait_ms", "grace_period_s", "batch_timeout_s", "http_default_timeout_s"):
            if not getattr(self, name) >= 0:
                yield f"{name} must be >= 0, got {getattr(self, name)}"
        if self.layout == "cascade" and self.attn_implementation != "sdpa":
            yield f"layout cascade runs with attn_implementation sdpa, not {self.attn_implementation}"
        if bool(self.tls_cert) != bool(self.tls_key):
            yield "tls_cert and tls_key go together"
        if self.tls_client_ca and not self.tls_cert:
            yield "tls_client_ca (mutual TLS) needs tls_cert and tls_key"

    def batch_tokens(self, device: str) -> int:
        """The padded-token budget of a worker on `device`: max_batch_tokens, or
        when that is 0 the device's default. On CUDA the default holds at least
        one pair of max_length (the warm-up sizes its memory check from it); on a
        CPU a longer pair is a batch of its own."""
        if self.max_batch_tokens:
            return self.max_batch_tokens
        if device.startswith("cuda"):
            return max(CUDA_BATCH_TOKENS, self.max_length)
        return CPU_BATCH_TOKENS

    def head_cache(self, device: str) -> int:
        """The bytes of heads a worker on `device` keeps: head_cache_bytes, or
        when that is -1 the device's default."""
        if self.head_cache_bytes >= 0:
            return self.head_cache_bytes
        return CUDA_HEAD_CACHE_BYTES if device.startswith("cuda") else CPU_HEAD_CACHE_BYTES

    def tokenizers(self) -> int:
        """How many tokenizer processes: tokenizer_processes, or when that is 0 one
        per two of the cores this process may run on (at least 1, at most 8),
        leaving the other half to the front end and the workers. A container's CPU
        quota is not counted: set it there (deploy/kubernetes/configmap.yaml does)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return self.tokenizer_processes or min(8, max(1, cores // 2))

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def accepted_tokens(self) -> tuple[str, ...]:
        """Bearer tokens from the environment and the tokens file; none turns auth off.

        The file holds one token per line. Each line is stripped of surrounding
        whitespace first; then blank lines and lines starting with `#` are
        skipped. Raises OSError when the file cannot be read and ValueError when
        it names no token or a line holds whitespace inside it (a file given
        must turn auth on, never silently leave it off).
        """
        tokens = list(self.auth_tokens)
        if self.auth_tokens_file:
            found = []
            with open(self.auth_tokens_file, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    token = line.strip()
                    if not token or token.startswith("#"):
                        continue
                    if any(character.isspace() for character in token):
                        raise ValueError(
                            f"auth_tokens_file {self.auth_tokens_file}, line {number}: a token cannot hold whitespace"
                        )
                    found.append(token)
            if not found:
                raise ValueError(
                    f"auth_tokens_file {self.auth_tokens_file} holds no token (only blank lines and # comments); "
                    "refusing to start with authentication off"
                )
            tokens += found
        return tuple(tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag per setting (absent flags stay absent, so the environment can fill them)."""
    for spec in dataclasses.fields(Settings):
        if spec.metadata.get("env_only"):
            continue
        flag = "--" + spec.name.replace("_", "-")
        env = ENV_PREFIX + spec.name.upper()
        kind = type(spec.default)
        parser.add_argument(
            flag,
            type=kind,
            default=argparse.SUPPRESS,
            choices=spec.metadata.get("choices"),
            help=f"{spec.metadata['help']} [env {env}; default {spec.default!r}]",
        )


def build_settings(arguments: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags over RERANKER_* variables over defaults. Raises ValueError naming every bad value."""
    environ = os.environ if environ is None else environ
    flags = vars(arguments) if arguments is not None else {}
    values = {}
    for spec in dataclasses.fields(Settings):
        env = ENV_PREFIX + spec.name.upper()
        if spec.name in flags:
            values[spec.name] = flags[spec.name]
        elif env in environ:
            values[spec.name] = _from_env(spec, environ[env])
    return Settings(**values)


def _from_env(spec: dataclasses.Field, text: str):
    kind: Any = type(spec.default)
    if kind is tuple:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{spec.name.upper()}={text!r} is not a valid {kind.__name__}") from None
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{ENV_PREFIX}{spec.name.upper()}={text!r}; choose one of {', '.join(choices)}")
    return value


def parse_devices(device: str, cuda_count: int) -> list[str]:
    """`auto`, `cpu`, `cuda` or a comma-separated list, given the visible GPU count."""
    if device == "auto":
        return [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    if device == "cuda":
        if not cuda_count:
            raise ValueError("device cuda was asked for, but no GPU is visible")
        return [f"cuda:{i}" for i in range(cuda_count)]
    devices = [item.strip() for item in device.split(",") if item.strip()]
    for item in devices:
        if item == "cpu":
            continue
        index = item.removeprefix("cuda:")
        if not item.startswith("cuda:") or not index.isdigit():
            raise ValueError(f"device {item!r} is not cpu, cuda or cuda:N")
        if int(index) >= cuda_count:
            raise ValueError(f"device {item} was asked for, but {cuda_count} GPU(s) are visible")
    return devices


def summary(settings: Settings) -> dict[str, object]:
    """Settings for the start-up log line, without secrets."""
    hidden = {"auth_tokens"}
    return {
        spec.name: getattr(settings, spec.name) for spec in dataclasses.fields(Settings) if spec.name not in hidden
    } | {"auth": bool(settings.auth_tokens or settings.auth_tokens_file)}
