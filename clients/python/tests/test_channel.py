"""The channel's retry policy, the bearer token and the deadline, seen by a small
in-test grpc.aio server that fails on purpose (no model, no running service
needed): attempts are counted by the server, and the metadata and deadline
that reach it are recorded. (tests/flaky.py in the server's repository is the
same server, for the Node.js client's tests.)"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from reranker_client import AsyncRerankerClient, RerankerClient, RerankerError


class Flaky(reranker_pb2_grpc.RerankerServicer):
    """Rerank fails the first N attempts of each request with a status, then answers.
    The plan travels in the query, "CODE:N"; attempts are counted per request_id."""

    def __init__(self) -> None:
        self.attempts: collections.Counter[str] = collections.Counter()
        self.metadata: dict[str, dict[str, str]] = {}
        self.time_remaining: dict[str, float | None] = {}

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        key = request.request_id
        self.attempts[key] += 1
        self.metadata[key] = dict(context.invocation_metadata())
        self.time_remaining[key] = context.time_remaining()
        code, _, failures = request.query.partition(":")
        if self.attempts[key] <= int(failures):
            await context.abort(grpc.StatusCode[code], f"attempt {self.attempts[key]} fails on purpose")
        return pb.RerankResponse(request_id=key, results=[pb.ScoredDocument(index=0, score=0.5)])


@contextlib.contextmanager
def flaky_server() -> Iterator[tuple[Flaky, str]]:
    """The Flaky servicer on a grpc.aio server, on an event loop of its own thread,
    so that sync and asyncio clients can both call it."""
    servicer = Flaky()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        reranker_pb2_grpc.add_RerankerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = on_loop(start())
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        on_loop(server.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.fixture(scope="module")
def flaky():
    with flaky_server() as (servicer, address):
        yield servicer, address


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED"])
def test_retryable_codes_are_retried(flaky, code):
    servicer, address = flaky
    key = f"sync-{code}"
    with RerankerClient(address, max_attempts=3, timeout=30) as client:
        ranking = client.rerank(f"{code}:2", ["a"], request_id=key)
    assert ranking.request_id == key and [result.index for result in ranking.results] == [0]
    assert servicer.attempts[key] == 3


def test_async_client_retries(flaky):
    servicer, address = flaky

    async def call():
        async with AsyncRerankerClient(address, max_attempts=3, timeout=30) as client:
            return await client.rerank("UNAVAILABLE:2", ["a"], request_id="async")

    assert asyncio.run(call()).request_id == "async"
    assert servicer.attempts["async"] == 3


@pytest.mark.parametrize(
    "max_attempts, query, code, attempts",
    [
        (1, "UNAVAILABLE:2", grpc.StatusCode.UNAVAILABLE, 1),  # retries off
        (3, "UNAVAILABLE:5", grpc.StatusCode.UNAVAILABLE, 3),  # retries stop at max_attempts
        (3, "INVALID_ARGUMENT:5", grpc.StatusCode.INVALID_ARGUMENT, 1),  # other codes are not retried
    ],
)
def test_retries_end_with_the_status(flaky, max_attempts, query, code, attempts):
    servicer, address = flaky
    with (
        RerankerClient(address, max_attempts=max_attempts, timeout=30) as client,
        pytest.raises(RerankerError) as error,
    ):
        client.rerank(query, ["a"], request_id=query)
    assert error.value.code == code
    assert error.value.message == f"attempt {attempts} fails on purpose"
    assert servicer.attempts[query] == attempts


def test_token_and_deadline_reach_the_server(flaky):
    servicer, address = flaky
    with RerankerClient(address, token="s3cret", timeout=7) as client:
        client.rerank("OK:0", ["a"], request_id="with-token")
        client.rerank("OK:0", ["a"], request_id="own-timeout", timeout=2)
    with RerankerClient(address) as client:
        client.rerank("OK:0", ["a"], request_id="no-token")
    assert servicer.metadata["with-token"]["authorization"] == "Bearer s3cret"
    assert "authorization" not in servicer.metadata["no-token"]
    # Each call carries its deadline: the client's 7 s, the call's own 2 s, the default 30 s.
    # (gRPC rounds a deadline up a little on the wire; hence the + 0.5.)
    remaining = servicer.time_remaining
    assert 0 < remaining["own-timeout"] <= 2.5 < remaining["with-token"] <= 7.5 < remaining["no-token"] <= 30.5
