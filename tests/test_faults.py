"""The fault suite: overload, deadlines, cancellation, worker crashes, out of
memory, bad bytes on the wire. Every call ends with one status, no queue entry
leaks, and the pool heals. Slowness is injected with RERANKER_FAULTS (the
worker sleeps per batch), never with sleeps in the test."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from tests.serving import alive, start_server, wait_until

OUTCOMES = ("scored", "discarded", "cancelled", "expired", "failed")


def settled(server) -> bool:
    """Every admitted pair has an outcome and nothing waits: no leaked entry."""
    admitted = server.metric("reranker_pairs_admitted_total")
    accounted = sum(server.metric("reranker_pairs_total", outcome=o) for o in OUTCOMES)
    return (
        server.metric("reranker_queue_pairs") == 0
        and server.metric("reranker_queue_tokens") == 0
        and admitted == accounted
    )


@pytest.fixture(scope="module")
def slow(tiny_model):
    """One worker that sleeps 100 ms per batch of at most 8 rows; a 200-pair queue."""
    server = start_server(
        tiny_model,
        "--workers-per-device",
        "1",
        "--cpu-threads",
        "1",
        "--max-batch-size",
        "8",
        "--max-queue-pairs",
        "200",
        "--max-documents-per-request",
        "100",
        env={"RERANKER_FAULTS": "delay_ms=100"},
    )
    yield server
    assert server.stop() == 0, server.log_text()


async def _rerank(stub, documents: int, timeout: float = 60, tag: str = "q"):
    return await stub.Rerank(
        pb.RerankRequest(query=tag, documents=[f"doc {i}" for i in range(documents)]), timeout=timeout
    )


async def _outcome(call):
    """The response, or the error the call ended with."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return error


def test_cancelling_a_stream_drops_its_queued_work(slow):
    cancelled_before = slow.metric("reranker_pairs_total", outcome="cancelled")
    with slow.channel() as channel:
        stream = reranker_pb2_grpc.RerankerStub(channel).RerankStream(
            pb.RerankRequest(query="q", documents=[f"doc {i}" for i in range(80)]), timeout=60
        )
        first = next(stream)
        assert first.WhichOneof("event") == "scored" and len(first.scored.results) <= 8
        stream.cancel()
    wait_until(lambda: settled(slow), "the queue to empty after the cancel", 30)
    # 80 pairs, 8 per batch, at most two batches on the worker: most never ran
    assert slow.metric("reranker_pairs_total", outcome="cancelled") - cancelled_before >= 80 - 4 * 8


def test_cancel_100_calls_mid_flight(slow):
    before = {o: slow.metric("reranker_pairs_total", outcome=o) for o in OUTCOMES}
    admitted_before = slow.metric("reranker_pairs_admitted_total")

    async def scenario():
        async with grpc.aio.insecure_channel(slow.address) as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)
            filler = asyncio.ensure_future(_rerank(stub, 80))  # about 1 s of work ahead of the others
            await asyncio.to_thread(
                wait_until, lambda: slow.metric("reranker_queue_pairs") > 0, "the filler queued", 30
            )
            calls = [asyncio.ensure_future(_rerank(stub, 1, tag=f"c{i}")) for i in range(100)]
            await asyncio.to_thread(
                wait_until, lambda: slow.metric("reranker_queue_pairs") >= 100, "the calls queued", 30
            )
            for call in calls:
                call.cancel()
            return await asyncio.gather(*calls, return_exceptions=True), await filler

    results, filler = asyncio.run(scenario())
    assert len(results) == 100 and len(filler.results) == 80
    assert all(isinstance(r, (asyncio.CancelledError, pb.RerankResponse)) for r in results)
    wait_until(lambda: settled(slow), "the queue to empty", 30)
    moved = {o: slow.metric("reranker_pairs_total", outcome=o) - before[o] for o in OUTCOMES}
    admitted = slow.metric("reranker_pairs_admitted_total") - admitted_before
    # a call cancelled before the server admitted it never counts; every admitted pair has one outcome
    assert 100 <= admitted <= 180 and sum(moved.values()) == admitted
    assert moved["cancelled"] > 50  # dropped from the queue, never sent to the worker
    assert moved["failed"] == moved["expired"] == 0


def test_deadline_expires_while_queued(slow):
    expired_before = slow.metric("reranker_pairs_total", outcome="expired")
    cancelled_before = slow.metric("reranker_pairs_total", outcome="cancelled")

    async def scenario():
        async with grpc.aio.insecure_channel(slow.address) as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)
            filler = asyncio.ensure_future(_rerank(stub, 96))  # 12 batches, about 1.2 s of work
            await asyncio.to_thread(wait_until, lambda: slow.metric("reranker_queue_pairs") > 0, "a queue", 30)
            start = time.monotonic()
            try:
                await _rerank(stub, 2, timeout=0.3, tag="late")
            except grpc.aio.AioRpcError as error:
                late = (error.code(), time.monotonic() - start)
            return await filler, late

    filler, (code, seconds) = asyncio.run(scenario())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(filler.results) == 96  # the work ahead of it was untouched
    wait_until(lambda: settled(slow), "the queue to empty", 30)
    dropped = slow.metric("reranker_pairs_total", outcome="expired") - expired_before
    dropped += slow.metric("reranker_pairs_total", outcome="cancelled") - cancelled_before
    assert dropped == 2  # both pairs left the queue without reaching the worker


def test_rerank_many_per_request_timeout_and_cancel(slow):
    def requests():
        yield pb.RerankRequest(query="q", documents=[f"d{i}" for i in range(64)], request_id="big")
        timeout = pb.RerankRequest(query="q", documents=["x"], request_id="hurried")
        timeout.timeout.FromMilliseconds(100)
        yield timeout
        yield pb.RerankRequest(query="q", documents=[f"e{i}" for i in range(64)], request_id="unwanted")
        yield pb.RerankRequest(request_id="unwanted", cancel=True)

    with slow.channel() as channel:
        answers = {a.request_id: a for a in reranker_pb2_grpc.RerankerStub(channel).RerankMany(requests(), timeout=60)}
    assert len(answers["big"].results) == 64 and not answers["big"].HasField("error")
    assert answers["hurried"].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert answers["unwanted"].error.code == grpc.StatusCode.CANCELLED.value[0]
    wait_until(lambda: settled(slow), "the queue to empty", 30)


def test_burst_beyond_the_queue_bound(slow):
    """60 concurrent requests of 10 pairs against a 200-pair queue: the excess is
    refused at once with RESOURCE_EXHAUSTED naming the bound; the rest is right."""
    with slow.channel() as channel:
        reference = reranker_pb2_grpc.RerankerStub(channel).Rerank(
            pb.RerankRequest(query="q", documents=[f"doc {i}" for i in range(10)]), timeout=60
        )

    async def scenario():
        async with grpc.aio.insecure_channel(slow.address) as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)

            async def one():
                start = time.monotonic()
                return await _outcome(_rerank(stub, 10)), time.monotonic() - start

            return await asyncio.gather(*(one() for _ in range(60)))

    outcomes = asyncio.run(scenario())
    served = [(r, s) for r, s in outcomes if isinstance(r, pb.RerankResponse)]
    refused = [(r, s) for r, s in outcomes if not isinstance(r, pb.RerankResponse)]
    assert len(served) + len(refused) == 60
    assert len(served) > 0 and len(refused) >= 60 - 200 // 10 - 8  # at most the bound plus what left for the worker
    for error, seconds in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_pairs=200" in error.details()
    # refused fast: sooner than the slowest served request, which had to wait its turn
    assert max(s for _, s in refused) < max(s for _, s in served)
    for response, _ in served:
        assert [r.logit for r in response.results] == pytest.approx([r.logit for r in reference.results], abs=1e-5)
    wait_until(lambda: settled(slow), "the queue to empty", 30)


def test_bad_bytes_on_the_wire(slow):
    with slow.channel() as channel:
        raw = channel.unary_unary("/reranker.v1.Reranker/Rerank", request_serializer=None, response_deserializer=None)
        invalid_utf8 = b"\x0a\x03\xff\xfe\xfd"  # field 1 (query), 3 bytes that are not UTF-8
        with pytest.raises(grpc.RpcError) as error:
            raw(invalid_utf8, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be parsed" in error.value.details() and "UTF-8" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            raw(b"\xff" * 64, timeout=10)  # not a protobuf message at all
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        many = channel.stream_stream(
            "/reranker.v1.Reranker/RerankMany", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as error:
            list(many(iter([invalid_utf8]), timeout=10))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        too_big = pb.RerankRequest(query="q", documents=["x" * 100_000] * 170).SerializeToString()  # 17 MB
        with pytest.raises(grpc.RpcError) as error:
            raw(too_big, timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert slow.health() == health_pb2.HealthCheckResponse.SERVING


def test_very_long_document_is_cut_not_refused(slow):
    with slow.channel() as channel:
        response = reranker_pb2_grpc.RerankerStub(channel).Rerank(
            pb.RerankRequest(query="q", documents=["Paris " * 21845 + "P"]),
            timeout=60,  # 131,071 characters
        )
    assert response.results[0].truncated and response.results[0].tokens == 8192


def test_worker_killed_mid_batch_under_load(tiny_model, server_factory):
    server = server_factory(
        tiny_model,
        "--workers-per-device",
        "2",
        "--cpu-threads",
        "1",
        "--max-batch-size",
        "4",
        env={"RERANKER_FAULTS": "delay_ms=200"},
    )

    async def scenario():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)

            calls = [asyncio.ensure_future(_outcome(_rerank(stub, 6, timeout=30, tag=f"k{i}"))) for i in range(20)]
            await asyncio.to_thread(
                wait_until, lambda: server.metric("reranker_batches_total", worker="0") > 0, "a batch on worker 0", 30
            )
            victim = sorted(server.worker_pids())[0]
            os.kill(victim, signal.SIGKILL)
            start = time.monotonic()
            results = await asyncio.gather(*calls)
            return results, time.monotonic() - start

    results, seconds = asyncio.run(scenario())
    assert len(results) == 20 and seconds < 30
    for result in results:
        if not isinstance(result, pb.RerankResponse):
            assert result.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), result.details()
    assert (
        sum(isinstance(r, pb.RerankResponse) for r in results) >= 10
    )  # the other worker carried on, batches were retried
    assert server.metric("reranker_batch_retries_total") >= 1
    wait_until(lambda: server.metric("reranker_worker_ready") == 2, "the pool back at full strength", 60)
    assert server.metric("reranker_worker_restarts_total") == 1
    assert len(server.worker_pids()) == 2
    assert len(asyncio.run(_stub_call(server)).results) == 3
    wait_until(lambda: settled(server), "no leaked queue entries", 30)


async def _stub_call(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await _rerank(reranker_pb2_grpc.RerankerStub(channel), 3)


def test_no_worker_alive_means_not_serving(tiny_model, server_factory):
    server = server_factory(tiny_model, "--workers-per-device", "1", "--cpu-threads", "1")
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: server.health() == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING", 30)
    with server.channel() as channel, pytest.raises(grpc.RpcError) as error:
        reranker_pb2_grpc.RerankerStub(channel).Rerank(pb.RerankRequest(query="q", documents=["a"]), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_until(lambda: server.health() == health_pb2.HealthCheckResponse.SERVING, "SERVING again", 60)
    assert len(asyncio.run(_stub_call(server)).results) == 3


def test_out_of_memory_splits_and_lowers_the_budget(tiny_model, server_factory):
    server = server_factory(
        tiny_model, "--workers-per-device", "1", "--cpu-threads", "1", env={"RERANKER_FAULTS": "oom_above_tokens=600"}
    )
    with server.channel() as channel:
        stub = reranker_pb2_grpc.RerankerStub(channel)
        response = stub.Rerank(
            pb.RerankRequest(query="q", documents=[f"document {i} " + "w " * 10 for i in range(20)]), timeout=60
        )
        assert len(response.results) == 20
        assert 0 < server.metric("reranker_worker_token_budget") <= 600
        with pytest.raises(grpc.RpcError) as error:
            stub.Rerank(pb.RerankRequest(query="q", documents=["word " * 700]), timeout=60)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "does not fit in the memory" in error.value.details()
    assert server.health() == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_under_load_drains_and_leaves_no_process(tiny_model, server_factory):
    server = server_factory(
        tiny_model,
        "--workers-per-device",
        "2",
        "--cpu-threads",
        "1",
        "--max-batch-size",
        "4",
        env={"RERANKER_FAULTS": "delay_ms=150"},
    )
    workers = server.worker_pids()

    async def scenario():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)
            calls = [asyncio.ensure_future(_rerank(stub, 8, timeout=60, tag=f"t{i}")) for i in range(10)]
            await asyncio.to_thread(
                wait_until, lambda: server.metric("reranker_pairs_admitted_total") == 80, "all ten admitted", 30
            )
            server.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.wait_for_event, "shutting_down")
            try:
                await _rerank(stub, 1, timeout=10, tag="late")
                late = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                late = error.code()
            return await asyncio.gather(*calls, return_exceptions=True), late

    results, late = asyncio.run(scenario())
    assert all(isinstance(r, pb.RerankResponse) and len(r.results) == 8 for r in results), results
    assert late == grpc.StatusCode.UNAVAILABLE
    assert server.process.wait(60) == 0
    wait_until(lambda: not any(alive(pid) for pid in workers), "the workers to exit", 10)


def test_grace_expiry_ends_every_call(tiny_model, server_factory):
    server = server_factory(
        tiny_model,
        "--workers-per-device",
        "1",
        "--cpu-threads",
        "1",
        "--max-batch-size",
        "2",
        "--grace-period-s",
        "0.5",
        env={"RERANKER_FAULTS": "delay_ms=300"},
    )

    async def scenario():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)
            calls = [asyncio.ensure_future(_rerank(stub, 10, timeout=60, tag=f"g{i}")) for i in range(4)]
            await asyncio.to_thread(
                wait_until, lambda: server.metric("reranker_batches_total") > 0, "work in flight", 30
            )
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(scenario())
    assert len(results) == 4
    for result in results:  # 40 pairs need about 6 s; the grace is 0.5 s
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert server.process.wait(30) == 0


def test_workers_die_with_a_killed_server(tiny_model, server_factory):
    server = server_factory(tiny_model, "--workers-per-device", "2", "--cpu-threads", "1")
    workers = server.worker_pids()
    assert len(workers) == 2
    server.process.kill()
    server.process.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in workers), "orphaned workers to exit", 10)


def test_concurrent_call_cap(tiny_model, server_factory):
    server = server_factory(
        tiny_model,
        "--workers-per-device",
        "1",
        "--cpu-threads",
        "1",
        "--max-concurrent-rpcs",
        "3",
        env={"RERANKER_FAULTS": "delay_ms=300"},
    )

    async def scenario():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)

            return await asyncio.gather(*(_outcome(_rerank(stub, 1, tag=f"cap{i}")) for i in range(8)))

    results = asyncio.run(scenario())
    refused = [r for r in results if not isinstance(r, pb.RerankResponse)]
    assert 1 <= len(refused) <= 5 and len(results) - len(refused) >= 3
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
