"""A Reranker server that fails on purpose, for retry tests: a grpc.aio server
on 127.0.0.1 with the Flaky servicer, on an event loop of its own thread, so
that sync clients, asyncio clients and other processes (the Node.js client's
tests in the server's repository load this file) can all call it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Iterator

import grpc
import grpc.aio

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc


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
