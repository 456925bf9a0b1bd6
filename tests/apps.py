"""The whole service in the test's own process and event loop: the real
settings, batcher, pool, core, interceptors and gRPC server on a loopback
port, with workers as threads (service.inprocess) whose scorers may
misbehave (tests.doubles). Scheduling and fault cases run here in seconds,
without processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from service.app import App, build
from service.inprocess import ThreadLauncher
from service.settings import Settings
from tests.doubles import Load

OUTCOMES = ("scored", "discarded", "cancelled", "expired", "failed")


@contextlib.asynccontextmanager
async def running(model, load: Load | None = None, **settings) -> AsyncIterator[App]:
    """A ready App with `settings` (Settings' field names) on 127.0.0.1; stopped at exit. HTTP is
    off unless a test gives `http_port` (bench.server.free_port())."""
    defaults = dict(
        host="127.0.0.1", port=0, http_port=0, metrics_port=0, device="cpu", cpu_threads=1, log_format="json"
    )
    app = build(Settings(model=str(model), **{**defaults, **settings}), ThreadLauncher(load or Load()))
    await app.start()
    try:
        await app.ready()
        yield app
    finally:
        force = asyncio.Event()
        force.set()
        await app.shutdown(force)
        for double in load.doubles.values() if load else ():
            double.release.set()  # let hung worker threads end
            double.steps.release(1000)


def run(scenario: Callable[[], object]) -> object:
    """Run an async test body to the end (pytest runs plain functions)."""
    return asyncio.run(scenario())


def stub(app: App) -> tuple[grpc.aio.Channel, reranker_pb2_grpc.RerankerStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, reranker_pb2_grpc.RerankerStub(channel)


def rerank_request(documents: int, tag: str = "q", words: int = 0, **fields) -> pb.RerankRequest:
    """`documents` distinct documents (`words` more words each) for the query `tag`."""
    return pb.RerankRequest(
        query=tag, documents=[f"doc {i} of {tag}" + " word" * words for i in range(documents)], **fields
    )


async def outcome(call) -> object:
    """The response, or the error the call ended with."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return error


def metric(app: App, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for family in app.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def settled(app: App) -> bool:
    """Every admitted pair has one outcome and nothing waits: no leaked entry."""
    admitted = metric(app, "reranker_pairs_admitted_total")
    accounted = sum(metric(app, "reranker_pairs_total", outcome=o) for o in OUTCOMES)
    return metric(app, "reranker_queue_pairs") == 0 and admitted == accounted


async def until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> object:
    """Wait on the loop until `condition()` is true; fail naming `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := condition()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value
