"""The service's objects wired together, started, and shut down in order.

`build(settings)` does everything that can fail for a reason the operator can
fix (files, the checkpoint, the tokenizer, ports), before any worker is
started: a StartupError then names the file, port or setting and nothing is
left running. `App.start()` starts the workers and the servers; `App.ready()`
waits for the models; `App.shutdown()` drains:

    health NOT_SERVING -> new work refused (UNAVAILABLE) -> calls in flight get
    grace_period_s -> what is left ends UNAVAILABLE -> servers, batcher and
    workers stop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import service
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from service.batcher import Batcher
from service.cache import ScoreCache
from service.calls import Limits, ModelInfo
from service.errors import Unavailable
from service.http import HttpServer, make_app
from service.interceptors import CallLimitInterceptor, ObservingInterceptor, TokenAuthInterceptor
from service.limits import CallLimit
from service.memory import MemoryReleaser
from service.metrics import Metrics
from service.pool import Launcher, WorkerLoadError, WorkerPool, count_gpus, worker_specs
from service.ranking import CallLimits, Ranker
from service.servicer import RerankerServicer
from service.settings import Settings, parse_devices
from service.tokenizing import TokenizerPool, TokenizerStartError
from service.tokens import BearerTokens
from service.tracing import Tracing
from workers.checkpoint import Checkpoint, CheckpointNotFound, resolve_checkpoint
from workers.precision import resolve_precision
from workers.process import WorkerSpec
from workers.prompt import DEFAULT_INSTRUCTION, PromptEncoder

log = structlog.get_logger("server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reranker"].full_name
_HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


# After the grace period: how long calls that were just failed get to send their status.
_FLUSH_SECONDS = 1.0


class StartupError(Exception):
    """The server cannot start as configured; the message says what to fix."""


@dataclass(eq=False)
class App:
    settings: Settings
    checkpoint: Checkpoint
    encoder: PromptEncoder
    metrics: Metrics
    pool: WorkerPool
    batcher: Batcher
    ranker: Ranker
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    tokenizers: TokenizerPool
    calls: CallLimit
    memory: MemoryReleaser
    tracing: Tracing | None
    port: int  # the bound gRPC port
    metrics_port: int  # the bound metrics port; 0 when off
    stopping: asyncio.Event  # set once shutdown cuts calls short
    http: HttpServer | None = None  # the HTTP/JSON port; None when off
    _stopped: bool = field(default=False, repr=False)
    _serving: bool = field(default=False, repr=False)
    _health_task: asyncio.Task | None = field(default=None, repr=False)
    _memory_task: asyncio.Task | None = field(default=None, repr=False)
    _tokenizers_task: asyncio.Task | None = field(default=None, repr=False)

    async def start(self) -> None:
        """Start the workers and the tokenizer processes, then the servers (health
        NOT_SERVING until `ready`)."""
        await self.pool.start(self.batcher, on_change=self._update_health)
        self._tokenizers_task = asyncio.create_task(self.tokenizers.start(), name="tokenizers-start")
        self.batcher.start()
        self._memory_task = asyncio.create_task(self.memory.run(), name="memory")
        await _set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        s = self.settings
        if self.http is not None:
            self.http.start()
            log.info("http_listening", port=self.http.port, host=s.host, tls=s.tls, mutual_tls=bool(s.tls_client_ca))
        # Last: a launcher that waits for `listening` then knows every port.
        log.info("listening", port=self.port, host=s.host, tls=s.tls, mutual_tls=bool(s.tls_client_ca))

    @property
    def serving(self) -> bool:
        """What health says (SERVING), and what GET /ready answers 200 to: a worker is ready, not draining."""
        return self._serving and not self._stopped

    async def ready(self) -> None:
        """Wait for every worker to load and the tokenizer processes to start; then
        serve. Raises WorkerLoadError."""
        await self.pool.wait_ready()
        assert self._tokenizers_task is not None, "start() ran first"
        try:
            await self._tokenizers_task
        except TokenizerStartError as exc:
            raise WorkerLoadError(str(exc)) from None
        log.info("tokenizers_ready", processes=len(self.tokenizers.pids))
        self.ranker.info = _model_info(self.settings, self.checkpoint, self.pool, self.encoder)
        self._update_health()
        log.info("ready", workers=len(self.pool.workers), port=self.port)

    def _update_health(self) -> None:
        """SERVING once every worker has loaded, and afterwards while at least one
        worker is ready; NOT_SERVING while none is (all crashed and restarting)."""
        serving = self.ranker.info is not None and not self.stopping.is_set() and self.pool.ready_count > 0
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        # Kept, so that the task is not collected before it runs.
        self._health_task = asyncio.get_running_loop().create_task(_set_health(self.health, status))
        log.info("health", serving=serving, ready_workers=self.pool.ready_count)

    async def shutdown(self, force: asyncio.Event) -> None:
        """Drain and stop everything; `force` set cuts the grace period short. Once only."""
        if self._stopped:
            return
        self._stopped = True
        log.info("shutting_down", grace_seconds=self.settings.grace_period_s)
        await self.health.enter_graceful_shutdown()
        self.batcher.refuse_new_work()
        idle = asyncio.create_task(self.calls.idle())
        forced = asyncio.create_task(force.wait())
        await asyncio.wait([idle, forced], timeout=self.settings.grace_period_s, return_when=asyncio.FIRST_COMPLETED)
        if not idle.done():
            log.warning("shutdown_forced", calls_in_progress=self.calls.in_progress)
        idle.cancel()
        forced.cancel()
        # Whatever is left ends UNAVAILABLE, and is recorded so: the calls waiting
        # on the batcher fail now, and have a moment to send that; the server then
        # cancels what remains (calls still being read or tokenized).
        self.stopping.set()
        await self.batcher.close(
            Unavailable("the server shut down before this request finished; retry on another replica")
        )
        await asyncio.gather(self.server.stop(_FLUSH_SECONDS), *([self.http.stop()] if self.http else []))
        await self.pool.stop()
        if self._memory_task is not None:
            self._memory_task.cancel()
        if self._tokenizers_task is not None:
            self._tokenizers_task.cancel()  # stopped while they were starting (a no-op once started)
            await asyncio.gather(self._tokenizers_task, return_exceptions=True)
        await self.tokenizers.stop()
        if self.tracing is not None:
            self.tracing.shutdown()


def build(settings: Settings, launcher: Launcher | None = None) -> App:
    """Check everything the operator configured and bind the ports; start nothing.
    Raises StartupError naming what is wrong. `launcher` starts the workers
    (default: processes)."""
    checkpoint = _checkpoint(settings)
    encoder = PromptEncoder(_tokenizer(checkpoint), settings.max_length)
    needs_probe = settings.device == "auto" or "cuda" in settings.device
    try:
        devices = parse_devices(settings.device, count_gpus() if needs_probe else 0)
        resolve_precision(settings.dtype, devices[0])
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    tokens = _accepted_tokens(settings)
    credentials = _server_credentials(settings)

    metrics = Metrics()
    tracing = Tracing(settings.otlp_endpoint, service.__version__) if settings.otlp_endpoint else None
    base = WorkerSpec(
        worker_id=0,
        model_path=str(checkpoint.path),
        device="cpu",
        precision=settings.dtype,
        attn_implementation=settings.attn_implementation,
        max_length=settings.max_length,
        max_batch_tokens=settings.max_batch_tokens,
        threads=0,
        log_format=settings.log_format,
        log_level=settings.log_level,
        parent_pid=os.getpid(),
        layout=settings.layout,
        compile_mode=settings.torch_compile,
    )
    specs = worker_specs(base, devices, settings.workers_per_device, settings.cpu_threads)
    pool = WorkerPool(
        [
            replace(
                spec,
                max_batch_tokens=settings.batch_tokens(spec.device),
                head_cache_bytes=settings.head_cache(spec.device),
            )
            for spec in specs
        ],
        metrics,
        batches_in_flight=settings.batches_in_flight,
        batch_timeout_s=settings.batch_timeout_s,
        launcher=launcher,
    )
    batcher = Batcher(
        pool,
        metrics,
        max_batch_size=settings.max_batch_size,
        min_padding_efficiency=settings.min_padding_efficiency,
        max_wait_ms=settings.max_wait_ms,
        max_queue_pairs=settings.max_queue_pairs,
        max_queue_tokens=settings.max_queue_tokens,
    )
    tokenizers = TokenizerPool(str(checkpoint.tokenizer_file), settings.max_length, settings.tokenizers(), metrics)
    limits = CallLimits(
        settings.max_documents_per_request,
        settings.max_query_chars,
        settings.max_document_chars,
        settings.max_windows_per_document,
        settings.max_windows_per_request,
    )
    score_cache = ScoreCache(settings.score_cache_bytes, metrics) if settings.score_cache_bytes else None
    ranker = Ranker(
        limits,
        settings.max_length,
        batcher,
        tokenizers,
        tracing,
        score_cache=score_cache,
        chunk_overlap_tokens=settings.chunk_overlap_tokens,
    )
    health_servicer = health.aio.HealthServicer()
    stopping = asyncio.Event()
    calls = CallLimit(settings.max_concurrent_rpcs, metrics.calls_in_progress)
    memory = MemoryReleaser()
    # Outermost first: every call is observed; the token is checked before a place is taken.
    interceptors: list[grpc.aio.ServerInterceptor] = [ObservingInterceptor(metrics, stopping, memory, tracing)]
    if tokens:
        interceptors.append(TokenAuthInterceptor(tokens))
    interceptors.append(CallLimitInterceptor(calls))
    server = _grpc_server(settings, interceptors)
    reranker_pb2_grpc.add_RerankerServicer_to_server(RerankerServicer(ranker, settings.max_requests_per_stream), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, _HEALTH_NAME, reflection.SERVICE_NAME], server)
    port = _bind(server, settings, credentials)
    listener = _listen_http(settings) if settings.http_port else None
    try:
        metrics_port = _serve_metrics(metrics, settings) if settings.metrics_port else 0
        app = App(
            settings, checkpoint, encoder, metrics, pool, batcher, ranker, server, health_servicer, tokenizers, calls,
            memory, tracing, port, metrics_port, stopping,
        )  # fmt: skip
        if listener is not None:
            http_app = make_app(
                ranker,
                model_id=checkpoint.model_id,
                max_length=settings.max_length,
                metrics=metrics,
                calls=calls,
                stopping=stopping,
                tokens=BearerTokens(tokens) if tokens else None,
                tracing=tracing,
                max_body_bytes=settings.max_message_bytes,
                default_timeout_s=settings.http_default_timeout_s,
                ready=lambda: app.serving,
                memory=memory,
            )
            app.http = _http_server(http_app, listener, settings)
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    return app


# -- start-up checks, each failing with one clear message ----------------------------------


def _checkpoint(settings: Settings) -> Checkpoint:
    try:
        checkpoint = resolve_checkpoint(settings.model, settings.revision or None)
    except CheckpointNotFound as exc:
        raise StartupError(str(exc)) from None
    if settings.max_length > checkpoint.max_positions:
        raise StartupError(
            f"max_length {settings.max_length} exceeds the model's context of {checkpoint.max_positions} tokens "
            f"({checkpoint.path / 'config.json'})"
        )
    return checkpoint


def _tokenizer(checkpoint: Checkpoint):
    try:
        return checkpoint.load_tokenizer()
    except Exception as exc:  # the tokenizers library raises plain Exceptions for a corrupt file
        raise StartupError(f"{checkpoint.tokenizer_file} is not a usable tokenizer: {exc}") from None


def _accepted_tokens(settings: Settings) -> tuple[str, ...]:
    try:
        return settings.accepted_tokens()
    except OSError as exc:
        raise StartupError(f"auth_tokens_file {settings.auth_tokens_file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise StartupError(f"auth_tokens_file {settings.auth_tokens_file} is not UTF-8 text") from None
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls:
        return None
    pem = {}
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(settings, name)
        if path:
            try:
                pem[name] = Path(path).read_bytes()
            except OSError as exc:
                raise StartupError(f"{name} {path}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(pem["tls_key"], pem["tls_cert"])],
        root_certificates=pem.get("tls_client_ca"),
        require_client_auth="tls_client_ca" in pem,
    )


def _grpc_server(settings: Settings, interceptors: list) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Responses may carry every document back (return_documents).
            ("grpc.max_send_message_length", settings.max_message_bytes + (1 << 20)),
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
            # Accept client keepalive pings no more often than every 10 s; answer abuse with GOAWAY.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # A second server on a port in use must fail, not silently share it.
            ("grpc.so_reuseport", 0),
        ],
    )


def _bind(server: grpc.aio.Server, settings: Settings, credentials: grpc.ServerCredentials | None) -> int:
    address = f"{settings.host}:{settings.port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        raise StartupError(
            f"cannot listen on {address} (--host/--port): the port is in use or the address is not this machine's"
        ) from None


def _listen_http(settings: Settings) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        return socket.create_server((settings.host, settings.http_port), family=family, backlog=2048)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {settings.host}:{settings.http_port} (--host/--http-port): {exc.strerror}"
        ) from None


def _http_server(http_app, listener: socket.socket, settings: Settings) -> HttpServer:
    """uvicorn on the bound socket, with the gRPC port's certificate, key and client CA."""
    tls: dict[str, object] = {}
    if settings.tls:
        tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
        if settings.tls_client_ca:
            tls |= {"ssl_ca_certs": settings.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    try:
        return HttpServer(http_app, listener, tls, _FLUSH_SECONDS)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"tls_cert / tls_key: not a usable certificate and key for HTTPS: {exc}") from None


def _serve_metrics(metrics: Metrics, settings: Settings) -> int:
    host = settings.metrics_host or settings.host
    try:
        port = metrics.serve(settings.metrics_port, host)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {host}:{settings.metrics_port} (--metrics-host/--metrics-port): {exc.strerror}"
        ) from None
    log.info("metrics_listening", port=port, host=host)
    return port


async def _set_health(health_servicer: health.aio.HealthServicer, status) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


def _model_info(settings: Settings, checkpoint: Checkpoint, pool: WorkerPool, encoder: PromptEncoder) -> ModelInfo:
    first = pool.workers[0].info
    assert first is not None, "the workers are ready"
    return ModelInfo(
        model_id=checkpoint.model_id,
        revision=checkpoint.revision,
        precision=first.precision,
        devices=[worker.spec.device for worker in pool.workers],
        default_instruction=DEFAULT_INSTRUCTION,
        server_version=service.__version__,
        model_memory_bytes=first.memory_bytes,
        limits=Limits(
            max_length=encoder.max_length,
            max_documents_per_request=settings.max_documents_per_request,
            max_query_chars=settings.max_query_chars,
            max_document_chars=settings.max_document_chars,
            max_message_bytes=settings.max_message_bytes,
            max_batch_tokens=min(worker.token_budget for worker in pool.workers),
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_pairs=settings.max_queue_pairs,
            max_queue_tokens=settings.max_queue_tokens,
            max_windows_per_document=settings.max_windows_per_document,
            max_windows_per_request=settings.max_windows_per_request,
        ),
    )
