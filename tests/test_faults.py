"""The fault suite, in one process: overload, deadlines, cancellation, worker
deaths and hangs, out of memory, bad bytes, drain. The real service runs in
the test's event loop (tests.apps) with thread workers whose scorers misbehave
on purpose (tests.doubles). Every call ends with one status, every admitted
pair has one outcome (no queue entry leaks), and the pool heals. What only
processes show (SIGKILL, orphans, signals) is in tests/test_processes.py."""

from __future__ import annotations

import asyncio
import functools

import grpc
import httpx
import pytest
import structlog.testing
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.server import free_port
from reranker.v1 import reranker_pb2 as pb
from service import servicer
from service.errors import DeadlineExceeded
from service.interceptors import status_of
from tests.apps import OUTCOMES, metric, outcome, rerank_request, run, running, settled, stub, until
from tests.doubles import Load

# One worker that sleeps 100 ms per batch of at most 8 rows; a 200-pair queue.
SLOW = dict(workers_per_device=1, max_batch_size=8, max_queue_pairs=200, max_documents_per_request=100)


def outcomes(app) -> dict[str, float]:
    return {o: metric(app, "reranker_pairs_total", outcome=o) for o in OUTCOMES}


def test_cancelling_a_stream_drops_its_queued_work(tiny_model):
    async def scenario():
        async with running(tiny_model, Load(delay_s=0.1), **SLOW) as app:
            channel, reranker = stub(app)
            async with channel:
                stream = reranker.RerankStream(rerank_request(80), timeout=60)
                first = await stream.read()
                assert first.WhichOneof("event") == "scored" and len(first.scored.results) <= 8
                stream.cancel()
                await until(lambda: settled(app), "the queue to empty after the cancel")
            # 80 pairs, 8 per batch, at most two batches on the worker: most never ran
            assert outcomes(app)["cancelled"] >= 80 - 4 * 8

    run(scenario)


def test_a_stream_sends_each_batch_as_it_completes(tiny_model):
    """One `scored` event per batch, as the worker answers it (the test lets one
    batch through at a time), then the ranking."""

    async def scenario():
        load = Load.misbehaving(0, stepped=True)
        async with running(tiny_model, load, **SLOW) as app:
            channel, reranker = stub(app)
            async with channel:
                stream = reranker.RerankStream(rerank_request(24, words=3), timeout=60)
                seen = []
                for _ in range(3):  # 24 pairs, 8 per batch
                    load.doubles[0].steps.release()
                    event = await stream.read()
                    assert event.WhichOneof("event") == "scored" and len(event.scored.results) == 8
                    seen += [result.index for result in event.scored.results]
                final = await stream.read()
                assert final.WhichOneof("event") == "final" and len(final.final.results) == 24
                assert sorted(seen) == list(range(24)) and await stream.read() is grpc.aio.EOF
            assert outcomes(app)["scored"] == 24

    run(scenario)


def test_cancel_100_calls_mid_flight(tiny_model):
    async def scenario():
        async with running(tiny_model, Load(delay_s=0.3), **SLOW) as app:
            channel, reranker = stub(app)
            async with channel:
                filler = asyncio.ensure_future(reranker.Rerank(rerank_request(80, "filler"), timeout=60))
                await until(lambda: metric(app, "reranker_queue_pairs") > 0, "the filler queued")
                # longer than the filler's: batched apart from it, so they wait behind it (about 3 s)
                calls = [
                    asyncio.ensure_future(reranker.Rerank(rerank_request(1, f"c{i}", words=40), timeout=60))
                    for i in range(100)
                ]
                await until(lambda: metric(app, "reranker_pairs_admitted_total") == 180, "the calls queued")
                for call in calls:
                    call.cancel()
                results = await asyncio.gather(*calls, return_exceptions=True)
                assert len((await filler).results) == 80
                await until(lambda: settled(app), "the queue to empty")
            assert all(isinstance(r, asyncio.CancelledError | pb.RerankResponse) for r in results)
            moved = outcomes(app)
            assert sum(moved.values()) == 180  # every admitted pair has one outcome
            assert moved["cancelled"] >= 90, moved  # dropped from the queue, never sent to the worker
            assert moved["failed"] == moved["expired"] == 0

    run(scenario)


def test_deadline_expires_while_queued(tiny_model):
    async def scenario():
        async with running(tiny_model, Load(delay_s=0.1), **SLOW) as app:
            channel, reranker = stub(app)
            async with channel:
                filler = asyncio.ensure_future(reranker.Rerank(rerank_request(96, "filler"), timeout=60))
                await until(lambda: metric(app, "reranker_queue_pairs") > 0, "a queue")
                late = await outcome(reranker.Rerank(rerank_request(2, "late"), timeout=0.3))
                assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert len((await filler).results) == 96  # the work ahead of it was untouched
                await until(lambda: settled(app), "the queue to empty")
            moved = outcomes(app)
            assert moved["expired"] + moved["cancelled"] == 2  # both left the queue without reaching the worker

    run(scenario)


@pytest.mark.parametrize("rpc", ["Rerank", "Score"])
def test_a_call_read_after_its_deadline_is_deadline_exceeded(rpc):
    """A large message on a busy machine can reach the handler after its caller's
    deadline: that is DEADLINE_EXCEEDED, not a bad `timeout` (INVALID_ARGUMENT)."""
    if rpc == "Rerank":
        make = functools.partial(servicer._rerank_call, pb.RerankRequest(query="q", documents=["d"]))
    else:
        make = functools.partial(servicer._options, pb.ScoreRequest(), has_timeout=False)
    with pytest.raises(DeadlineExceeded, match="deadline passed before the server could read the request"):
        make(-0.01)
    with pytest.raises(DeadlineExceeded):
        make(0.0)
    assert make(None) is not None and make(0.5) is not None
    assert status_of(DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_rerank_many_per_request_timeout_and_cancel(tiny_model):
    async def requests():
        yield rerank_request(64, "big", request_id="big")
        hurried = rerank_request(1, "hurried", request_id="hurried")
        hurried.timeout.FromMilliseconds(100)
        yield hurried
        yield rerank_request(64, "unwanted", request_id="unwanted")
        yield pb.RerankRequest(request_id="unwanted", cancel=True)

    async def scenario():
        async with running(tiny_model, Load(delay_s=0.1), **SLOW) as app:
            channel, reranker = stub(app)
            async with channel:
                answers = {a.request_id: a async for a in reranker.RerankMany(requests(), timeout=60)}
                await until(lambda: settled(app), "the queue to empty")
        assert len(answers["big"].results) == 64 and not answers["big"].HasField("error")
        assert answers["hurried"].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert answers["unwanted"].error.code == grpc.StatusCode.CANCELLED.value[0]

    run(scenario)


def test_burst_beyond_the_queue_bound(tiny_model):
    """60 concurrent requests of 10 pairs against a 200-pair queue: the excess is
    refused at once with RESOURCE_EXHAUSTED naming the bound; the rest is served."""

    async def scenario():
        async with running(tiny_model, Load(delay_s=0.1), **SLOW) as app:
            channel, reranker = stub(app)
            async with channel:
                await reranker.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)  # connected before the burst
                results = await asyncio.gather(
                    *(outcome(reranker.Rerank(rerank_request(10, f"burst{i}"), timeout=60)) for i in range(60))
                )
                await until(lambda: settled(app), "the queue to empty")
            served = [r for r in results if isinstance(r, pb.RerankResponse)]
            refused = [r for r in results if not isinstance(r, pb.RerankResponse)]
            assert len(served) >= 200 // 10 and len(refused) >= 60 - 200 // 10 - 8
            for error in refused:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_queue_pairs=200" in error.details()
            for response in served:
                logits = [r.logit for r in response.results]
                assert len(logits) == 10 and logits == sorted(logits, reverse=True)
            assert metric(app, "reranker_rejected_total", reason="queue_pairs") == len(refused)

    run(scenario)


def test_bad_bytes_on_the_wire(tiny_model):
    async def scenario():
        async with running(tiny_model) as app:
            channel, _ = stub(app)
            async with channel:
                raw = channel.unary_unary("/reranker.v1.Reranker/Rerank")
                invalid_utf8 = b"\x0a\x03\xff\xfe\xfd"  # field 1 (query), 3 bytes that are not UTF-8
                error = await outcome(raw(invalid_utf8, timeout=10))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "could not be parsed" in error.details() and "UTF-8" in error.details()
                error = await outcome(raw(b"\xff" * 64, timeout=10))  # not a protobuf message at all
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                many = channel.stream_stream("/reranker.v1.Reranker/RerankMany")
                call = many(timeout=10)
                await call.write(invalid_utf8)
                await call.done_writing()
                error = await outcome(call.read())
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                too_big = pb.RerankRequest(query="q", documents=["x" * 100_000] * 170).SerializeToString()  # 17 MB
                error = await outcome(raw(too_big, timeout=30))
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(scenario)


def test_very_long_document_is_cut_not_refused(tiny_model):
    async def scenario():
        async with running(tiny_model) as app:
            channel, reranker = stub(app)
            async with channel:
                request = pb.RerankRequest(query="q", documents=["Paris " * 21845 + "P"])  # 131,071 characters
                response = await reranker.Rerank(request, timeout=60)
        assert response.results[0].truncated and response.results[0].tokens == 8192

    run(scenario)


def test_a_worker_that_dies_mid_batch_has_its_batches_retried(tiny_model):
    async def scenario():
        load = Load(delay_s=0.05, per_worker=((0, (("die_on", frozenset({2})),)),))
        async with running(tiny_model, load, workers_per_device=2, max_batch_size=4) as app:
            channel, reranker = stub(app)
            async with channel:
                calls = [outcome(reranker.Rerank(rerank_request(6, f"k{i}"), timeout=60)) for i in range(20)]
                results = await asyncio.gather(*calls)
                assert all(isinstance(r, pb.RerankResponse) and len(r.results) == 6 for r in results)
                assert 1 <= metric(app, "reranker_batch_retries_total") <= 2  # the batches it held
                await until(lambda: metric(app, "reranker_worker_ready") == 2, "the pool back at full strength")
                assert metric(app, "reranker_worker_restarts_total", worker="0") == 1
                assert settled(app) and outcomes(app)["failed"] == 0

    run(scenario)


def test_a_hung_worker_is_killed_and_its_batches_retried(tiny_model):
    async def scenario():
        load = Load.misbehaving(0, hang_on=frozenset({1}))
        async with running(tiny_model, load, workers_per_device=2, max_batch_size=4, batch_timeout_s=1.0) as app:
            channel, reranker = stub(app)
            async with channel:
                loop = asyncio.get_running_loop()
                start = loop.time()
                results = await asyncio.gather(
                    *(outcome(reranker.Rerank(rerank_request(4, f"h{i}"), timeout=20)) for i in range(6))
                )
                assert all(isinstance(r, pb.RerankResponse) for r in results), results
                assert loop.time() - start < 10  # the hang was seen after ~1 s, not at the call deadlines
                assert metric(app, "reranker_batch_retries_total") >= 1
                await until(lambda: metric(app, "reranker_worker_restarts_total", worker="0") == 1, "a restart")
                assert settled(app)

    run(scenario)


def test_out_of_memory_splits_and_lowers_the_budget(tiny_model):
    async def scenario():
        async with running(tiny_model, Load(oom_above=600), workers_per_device=1, http_port=free_port()) as app:
            channel, reranker = stub(app)
            async with channel, httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", timeout=60) as http:
                documents = [f"document {i} " + "w " * 10 for i in range(20)]
                response = await reranker.Rerank(pb.RerankRequest(query="q", documents=documents), timeout=60)
                assert len(response.results) == 20
                assert 0 < metric(app, "reranker_worker_token_budget") <= 600
                error = await outcome(
                    reranker.Rerank(pb.RerankRequest(query="q", documents=["word " * 700]), timeout=60)
                )
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "does not fit in the memory" in error.details()
                # over HTTP: 413, and no Retry-After, since retrying cannot help (a full queue's 429 has one)
                answer = await http.post("/v2/rerank", json={"query": "q2", "documents": ["word " * 700]})
                assert answer.status_code == 413, answer.text
                assert answer.json()["code"] == "RESOURCE_EXHAUSTED" and "does not fit" in answer.json()["message"]
                assert "retry-after" not in answer.headers
                health = health_pb2_grpc.HealthStub(channel)
                status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
                assert status == health_pb2.HealthCheckResponse.SERVING

    run(scenario)


def test_concurrent_call_cap_and_health_still_answers(tiny_model):
    async def scenario():
        async with running(tiny_model, Load(delay_s=0.3), workers_per_device=1, max_concurrent_rpcs=3) as app:
            channel, reranker = stub(app)
            async with channel:
                results = await asyncio.gather(
                    *(outcome(reranker.Rerank(rerank_request(1, f"cap{i}"), timeout=60)) for i in range(8))
                )
                refused = [r for r in results if not isinstance(r, pb.RerankResponse)]
                assert 1 <= len(refused) <= 5 and len(results) - len(refused) >= 3
                assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
                assert "max_concurrent_rpcs=3" in refused[0].details()
                # three idle streams hold every slot: calls are refused, health is not
                streams = [reranker.RerankMany(timeout=60) for _ in range(3)]
                await until(lambda: _calls_in_progress(app) == 3, "the streams to start")
                error = await outcome(reranker.Rerank(rerank_request(1), timeout=10))
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                health = health_pb2_grpc.HealthStub(channel)
                status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                for stream in streams:
                    stream.cancel()

    run(scenario)


def test_at_the_call_limit_a_caller_without_a_token_is_told_so(tiny_model):
    """The token is checked before a place is taken, on both transports: a caller
    without one gets UNAUTHENTICATED / 401 (not RESOURCE_EXHAUSTED / 429) and
    takes no place; a caller with one is refused at the limit."""
    token = [("authorization", "Bearer right")]

    async def scenario():
        limits = dict(max_concurrent_rpcs=2, auth_tokens=("right",), http_port=free_port())
        async with running(tiny_model, Load(), workers_per_device=1, **limits) as app:
            channel, reranker = stub(app)
            async with channel, httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", timeout=30) as http:
                streams = [reranker.RerankMany(timeout=60, metadata=token) for _ in range(2)]
                await until(lambda: _calls_in_progress(app) == 2, "the streams to hold every place")
                error = await outcome(reranker.Rerank(rerank_request(1), timeout=10))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
                answer = await http.post("/v2/rerank", json={"query": "q", "documents": ["a"]})
                assert answer.status_code == 401, answer.text
                assert _calls_in_progress(app) == 2
                error = await outcome(reranker.Rerank(rerank_request(1), timeout=10, metadata=token))
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                answer = await http.post("/v2/rerank", json={"query": "q", "documents": ["a"]}, headers=dict(token))
                assert answer.status_code == 429 and answer.headers["retry-after"] == "1", answer.text
                assert metric(app, "reranker_requests_total", code="UNAUTHENTICATED") == 2
                for stream in streams:
                    stream.cancel()

    run(scenario)


def _calls_in_progress(app) -> int:
    return int(metric(app, "reranker_calls_in_progress"))


def test_drain_lets_calls_in_flight_finish_and_refuses_new_ones(tiny_model):
    async def scenario():
        async with running(tiny_model, Load(delay_s=0.15), workers_per_device=2, max_batch_size=4) as app:
            channel, reranker = stub(app)
            async with channel:
                calls = [
                    asyncio.ensure_future(reranker.Rerank(rerank_request(8, f"t{i}"), timeout=60)) for i in range(10)
                ]
                await until(lambda: metric(app, "reranker_pairs_admitted_total") == 80, "all ten admitted")
                draining = asyncio.ensure_future(app.shutdown(asyncio.Event()))
                await until(lambda: app.batcher.closed, "new work refused")
                late = await outcome(reranker.Rerank(rerank_request(1, "late"), timeout=10))
                results = await asyncio.gather(*calls)
                await draining
            assert all(len(r.results) == 8 for r in results)
            assert late.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario)


def test_grace_expiry_ends_every_call_and_records_what_was_sent(tiny_model):
    async def scenario():
        load = Load(delay_s=0.3)
        async with running(tiny_model, load, workers_per_device=1, max_batch_size=2, grace_period_s=0.5) as app:
            channel, reranker = stub(app)
            async with channel:
                calls = [outcome(reranker.Rerank(rerank_request(10, f"g{i}"), timeout=60)) for i in range(4)]
                pending = asyncio.ensure_future(asyncio.gather(*calls))
                # all four admitted (a busy machine may still be sending some), work in flight
                await until(lambda: metric(app, "reranker_pairs_admitted_total") == 40, "all four calls admitted")
                await until(lambda: metric(app, "reranker_batches_total") > 0, "work in flight")
                with structlog.testing.capture_logs() as logs:
                    await app.shutdown(asyncio.Event())
                    results = await pending
            for result in results:  # 40 pairs need about 6 s; the grace is 0.5 s
                assert isinstance(result, grpc.aio.AioRpcError)
                assert result.code() == grpc.StatusCode.UNAVAILABLE
            assert metric(app, "reranker_requests_total", rpc="Rerank", code="UNAVAILABLE") == 4
            assert metric(app, "reranker_requests_total", rpc="Rerank", code="CANCELLED") == 0
            # each log line says what its client was sent, and why
            lines = [line for line in logs if line["event"] == "rpc"]
            assert [line["code"] for line in lines] == ["UNAVAILABLE"] * 4
            assert sorted(line["reason"] for line in lines) == sorted(result.details() for result in results)

    run(scenario)


def test_a_huge_request_does_not_hold_up_small_ones(tiny_model):
    """A 15 MB request whose caller waits is tokenized a chunk at a time, so small
    calls behind it are answered while it is still being tokenized."""

    async def scenario():
        async with running(tiny_model, workers_per_device=1, tokenizer_processes=1) as app:
            channel, reranker = stub(app)
            async with channel:
                huge = pb.RerankRequest(query="q", documents=[f"{i} " + "lorem ipsum " * 1300 for i in range(1000)])
                big = asyncio.ensure_future(outcome(reranker.Rerank(huge, timeout=300)))
                await until(lambda: _calls_in_progress(app) == 1, "the huge call to arrive")
                for i in range(3):
                    small = await reranker.Rerank(rerank_request(2, f"small {i}"), timeout=10)
                    assert len(small.results) == 2
                assert not big.done(), "the huge call was over before the small ones: nothing was tested"
                await big  # whatever it ends with (its 4M tokens are more than the queue holds)

    run(scenario)


@pytest.mark.parametrize("closing", ["client goes away", "deadline"])
def test_tokenizing_stops_for_calls_that_are_gone(tiny_model, closing):
    """A huge request whose caller gave up stops being tokenized: small calls
    behind it are answered in time."""

    async def scenario():
        async with running(tiny_model, workers_per_device=1, tokenizer_processes=1) as app:
            channel, reranker = stub(app)
            async with channel:
                huge = pb.RerankRequest(query="q", documents=[f"{i} " + "lorem ipsum " * 1300 for i in range(1000)])
                if closing == "deadline":
                    # the request's own timeout runs from its arrival: sending 16 MB on a busy
                    # machine must not use it up before the server starts tokenizing
                    huge.timeout.FromMilliseconds(500)
                big = asyncio.ensure_future(outcome(reranker.Rerank(huge, timeout=60)))
                # arrived: in progress, or (its timeout is short) already over
                await until(lambda: _calls_in_progress(app) == 1 or big.done(), "the huge call to arrive")
                if closing == "client goes away":
                    big.cancel()
                small = await reranker.Rerank(rerank_request(2, "small"), timeout=5)
                assert len(small.results) == 2
                if closing == "deadline":
                    assert (await big).code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await until(lambda: big.done(), "the huge call to end")
                await until(lambda: metric(app, "reranker_tokenizer_chunks_waiting") == 0, "the tokenizers to idle")
            assert metric(app, "reranker_pairs_admitted_total") == 2  # the huge one never reached the queue
            # 1,000 documents of 15,600 characters are 62 chunks of 256 KiB; a call that is gone
            # sends no more (tokenizing it whole would take 5-10 s of this machine's CPU)
            assert metric(app, "reranker_tokenizer_chunks_total") < 31

    run(scenario)
