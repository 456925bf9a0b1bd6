"""Putting the service together, running it, and shutting it down cleanly.

Start: resolve the checkpoint and tokenizer (no torch here), spawn the worker
processes, then start the gRPC server with health NOT_SERVING; once every
worker has loaded and warmed up, health turns SERVING.

Stop (SIGTERM or SIGINT): health NOT_SERVING at once, new work refused with
UNAVAILABLE, calls in flight get `grace_period_s` to finish, then the batcher
and the workers stop and the process exits 0. A second signal cuts the grace
short. Signal handlers only set events.
"""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import service
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from service.batcher import Batcher
from service.errors import Unavailable
from service.interceptors import ObservingInterceptor, TokenAuthInterceptor
from service.logs import configure_logging
from service.metrics import Metrics
from service.pool import WorkerLoadError, WorkerPool, count_gpus, worker_specs
from service.servicer import RerankerServicer
from service.settings import Settings, parse_devices, summary
from service.tracing import Tracing
from workers.checkpoint import CheckpointNotFound, resolve_checkpoint
from workers.precision import resolve_precision
from workers.process import WorkerSpec
from workers.prompt import DEFAULT_INSTRUCTION, PromptEncoder

log = structlog.get_logger("server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reranker"].full_name


def run(settings: Settings) -> int:
    """Serve until told to stop; the process's exit code (0 after a clean stop,
    1 when the workers could not load, 2 when the configuration is unusable)."""
    configure_logging(settings.log_format, settings.log_level)
    try:
        return asyncio.run(_serve(settings))
    except (CheckpointNotFound, ValueError) as exc:
        log.error("startup_failed", error=str(exc))
        return 2


async def _serve(settings: Settings) -> int:
    log.info("starting", version=service.__version__, settings=summary(settings))
    checkpoint = resolve_checkpoint(settings.model, settings.revision or None)
    if settings.max_length > checkpoint.max_positions:
        raise ValueError(
            f"max_length {settings.max_length} exceeds the model's context of {checkpoint.max_positions} tokens"
        )
    encoder = PromptEncoder(checkpoint.load_tokenizer(), settings.max_length)
    needs_probe = settings.device == "auto" or "cuda" in settings.device
    devices = parse_devices(settings.device, count_gpus() if needs_probe else 0)
    resolve_precision(settings.dtype, devices[0])  # fail on a bad name before spawning anything

    metrics = Metrics()
    tracing = Tracing(settings.otlp_endpoint, service.__version__) if settings.otlp_endpoint else None
    if settings.metrics_port:
        log.info("metrics_listening", port=metrics.serve(settings.metrics_port, settings.host))
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
        faults=settings.faults,
    )
    pool = WorkerPool(
        worker_specs(base, devices, settings.workers_per_device, settings.cpu_threads),
        metrics,
        batches_in_flight=settings.batches_in_flight,
        batch_timeout_s=settings.batch_timeout_s,
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
    health_servicer = health.aio.HealthServicer()
    serving = _HealthTracker(health_servicer, pool)
    # Workers are spawned before the gRPC server starts its threads.
    await pool.start(batcher, on_change=serving.update)
    batcher.start()

    tokenizers = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
    servicer = RerankerServicer(settings, encoder, batcher, tokenizers, tracing)
    server = _grpc_server(settings, metrics, tracing, servicer, health_servicer)
    port = _bind(server, settings)
    await server.start()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.info("serving", port=port, host=settings.host, tls=settings.tls, mutual_tls=bool(settings.tls_client_ca))

    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: force.set() if stop.is_set() else stop.set())

    exit_code = 0
    ready = asyncio.create_task(pool.wait_ready())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        try:
            ready.result()
            servicer.model_info = _model_info(settings, checkpoint, pool, encoder)
            serving.started = True
            serving.update()
            log.info("ready", workers=len(pool.workers))
            await stopping
        except WorkerLoadError as exc:
            log.error("startup_failed", error=str(exc))
            exit_code = 1
    else:
        ready.cancel()

    log.info("shutting_down", grace_seconds=settings.grace_period_s)
    serving.started = False
    await health_servicer.enter_graceful_shutdown()
    batcher.refuse_new_work()
    graceful = asyncio.create_task(server.stop(settings.grace_period_s))
    forced = asyncio.create_task(force.wait())
    await asyncio.wait([graceful, forced], return_when=asyncio.FIRST_COMPLETED)
    if not graceful.done():
        log.warning("shutdown_forced")
        await server.stop(0)
    forced.cancel()
    await batcher.close(Unavailable("the server shut down before this request finished; retry on another replica"))
    await pool.stop()
    tokenizers.shutdown(wait=False, cancel_futures=True)
    if tracing is not None:
        tracing.shutdown()
    log.info("stopped", exit_code=exit_code)
    return exit_code


def _grpc_server(
    settings: Settings, metrics: Metrics, tracing: Tracing | None, servicer: RerankerServicer, health_servicer
) -> grpc.aio.Server:
    interceptors = [ObservingInterceptor(metrics, tracing)]
    tokens = settings.accepted_tokens()
    if tokens:
        interceptors.append(TokenAuthInterceptor(tokens))
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Responses may carry every document back (return_documents).
            ("grpc.max_send_message_length", settings.max_message_bytes + (1 << 20)),
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
            # Accept client keepalive pings no more often than every 10 s; answer abuse with GOAWAY.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    reranker_pb2_grpc.add_RerankerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    return server


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    address = f"{settings.host}:{settings.port}"
    if not settings.tls:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None,
        require_client_auth=bool(settings.tls_client_ca),
    )
    return server.add_secure_port(address, credentials)


async def _set_health(health_servicer, status) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


class _HealthTracker:
    """SERVING once every worker has loaded, and afterwards while at least one
    worker is ready; NOT_SERVING while none is (all crashed and restarting)."""

    def __init__(self, health_servicer, pool: WorkerPool) -> None:
        self._health = health_servicer
        self._pool = pool
        self.started = False
        self._serving = False  # the server starts NOT_SERVING

    def update(self) -> None:
        serving = self.started and self._pool.ready_count > 0
        if serving != self._serving:
            self._serving = serving
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            # Kept, so that the task is not collected before it runs.
            self._task = asyncio.get_running_loop().create_task(_set_health(self._health, status))
            log.info("health", serving=serving, ready_workers=self._pool.ready_count)


def _model_info(settings: Settings, checkpoint, pool: WorkerPool, encoder: PromptEncoder) -> pb.ModelInfo:
    first = pool.workers[0].info
    info = pb.ModelInfo(
        model_id=checkpoint.model_id,
        revision=checkpoint.revision,
        precision=pb.Precision.Value("PRECISION_" + first.precision.upper()),
        devices=[worker.spec.device for worker in pool.workers],
        default_instruction=DEFAULT_INSTRUCTION,
        server_version=service.__version__,
        model_memory_bytes=first.memory_bytes,
        limits=pb.Limits(
            max_length=encoder.max_length,
            max_documents_per_request=settings.max_documents_per_request,
            max_query_chars=settings.max_query_chars,
            max_document_chars=settings.max_document_chars,
            max_message_bytes=settings.max_message_bytes,
            max_batch_tokens=min(worker.token_budget for worker in pool.workers),
            max_batch_size=settings.max_batch_size,
            max_queue_pairs=settings.max_queue_pairs,
            max_queue_tokens=settings.max_queue_tokens,
        ),
    )
    info.limits.max_wait.FromNanoseconds(int(settings.max_wait_ms * 1e6))
    return info
