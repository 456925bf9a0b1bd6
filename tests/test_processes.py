"""What only processes show: a worker killed or stopped with a signal, workers
that must not outlive a killed server, and a SIGTERM while work is in flight.
The real server runs as a subprocess; where work must be in flight long enough
to be interrupted, its workers are slowed (tests.slow_server)."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc

from bench.server import alive, wait_until
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from tests.apps import outcome, rerank_request


def slow_server(server_factory, model, delay_ms: int, *args: str):
    entry = ("tests.slow_server", "--worker-delay-ms", str(delay_ms))
    return server_factory(model, "--cpu-threads", "1", *args, entry=entry)


def test_worker_killed_mid_batch_under_load(tiny_model, server_factory):
    server = slow_server(server_factory, tiny_model, 200, "--workers-per-device", "2", "--max-batch-size", "4")
    try:

        async def scenario():
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = reranker_pb2_grpc.RerankerStub(channel)
                calls = [
                    asyncio.ensure_future(outcome(stub.Rerank(rerank_request(6, f"k{i}"), timeout=30)))
                    for i in range(20)
                ]
                await asyncio.to_thread(
                    wait_until,
                    lambda: server.metric("reranker_batches_total", worker="0") > 0,
                    "a batch on worker 0",
                    30,
                )
                os.kill(sorted(server.worker_pids())[0], signal.SIGKILL)
                return await asyncio.gather(*calls)

        results = asyncio.run(scenario())
        # the other worker carried on and the killed worker's batches were retried: every call answered
        assert all(isinstance(r, pb.RerankResponse) and len(r.results) == 6 for r in results), results
        assert server.metric("reranker_batch_retries_total") >= 1
        wait_until(lambda: server.metric("reranker_worker_ready") == 2, "the pool back at full strength", 60)
        assert server.metric("reranker_worker_restarts_total") == 1
        assert len(server.worker_pids()) == 2
        died = server.events("worker_died")
        assert died and died[0]["reason"] == "killed by SIGKILL"
    finally:
        assert server.stop() == 0, server.log_text()


def test_a_stopped_worker_is_declared_hung_and_replaced(tiny_model, server_factory):
    """SIGSTOP: alive but not answering. With the default (automatic) batch
    timeout it is killed within seconds, and its calls finish on the other worker."""
    server = slow_server(server_factory, tiny_model, 50, "--workers-per-device", "2", "--max-batch-size", "4")
    try:
        victim = sorted(server.worker_pids())[0]

        async def scenario():
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = reranker_pb2_grpc.RerankerStub(channel)
                calls = [
                    asyncio.ensure_future(outcome(stub.Rerank(rerank_request(8, f"s{i}"), timeout=40)))
                    for i in range(12)
                ]
                await asyncio.to_thread(
                    wait_until,
                    lambda: server.metric("reranker_batches_total", worker="0") > 0,
                    "a batch on worker 0",
                    30,
                )
                os.kill(victim, signal.SIGSTOP)
                return await asyncio.gather(*calls)

        results = asyncio.run(scenario())
        assert all(isinstance(r, pb.RerankResponse) and len(r.results) == 8 for r in results), results
        died = server.wait_for_event("worker_died", timeout=30)
        assert "hung" in died[0]["reason"] and died[0]["worker_id"] == 0
        wait_until(lambda: not alive(victim), "the stopped worker to be killed", 10)
        wait_until(lambda: server.metric("reranker_worker_ready") == 2, "a replacement", 60)
    finally:
        assert server.stop() == 0, server.log_text()


def test_sigterm_under_load_drains_and_leaves_no_process(tiny_model, server_factory):
    server = slow_server(
        server_factory,
        tiny_model,
        150,
        "--workers-per-device",
        "2",
        "--max-batch-size",
        "4",
        "--tokenizer-processes",
        "1",
    )
    workers = server.worker_pids() + server.tokenizer_pids()
    assert len(workers) == 2 + 1, workers  # the tokenizer process too

    async def scenario():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)
            calls = [
                asyncio.ensure_future(outcome(stub.Rerank(rerank_request(8, f"t{i}"), timeout=60))) for i in range(10)
            ]
            await asyncio.to_thread(
                wait_until, lambda: server.metric("reranker_pairs_admitted_total") == 80, "all ten admitted", 30
            )
            server.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.wait_for_event, "shutting_down")
            late = await outcome(stub.Rerank(rerank_request(1, "late"), timeout=10))
            return await asyncio.gather(*calls), late

    results, late = asyncio.run(scenario())
    assert all(isinstance(r, pb.RerankResponse) and len(r.results) == 8 for r in results), results
    assert isinstance(late, grpc.aio.AioRpcError) and late.code() == grpc.StatusCode.UNAVAILABLE
    assert server.process.wait(60) == 0
    wait_until(lambda: not any(alive(pid) for pid in workers), "the workers and the tokenizer to exit", 10)


def test_workers_and_tokenizers_die_with_a_killed_server(tiny_model, server_factory):
    server = server_factory(tiny_model, "--workers-per-device", "2", "--cpu-threads", "1", "--tokenizer-processes", "2")
    workers, tokenizers = server.worker_pids(), server.tokenizer_pids()
    assert (len(workers), len(tokenizers)) == (2, 2)
    server.process.kill()
    server.process.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in workers + tokenizers), "orphaned processes to exit", 10)
