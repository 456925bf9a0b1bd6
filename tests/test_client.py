"""The Python client (service/client.py), sync and asyncio.

Against a live server: every RPC, and RerankerError on bad input. Against a
small in-test grpc.aio server that fails on purpose: the channel's retry policy
(attempts counted by the server), the bearer token and the deadline that reach
the server. Against a live server whose worker sleeps 1.5 s per batch: a short
client deadline ends the call without waiting for the batch.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from bench.server import start_server
from reranker.v1 import reranker_pb2 as pb
from service.client import AsyncRerankerClient, RerankerClient, RerankerError, rerank_request
from tests.flaky import flaky_server
from tests.texts import DOCUMENTS, QUERY

DOCS = DOCUMENTS[:10]


@pytest.fixture(scope="module")
def server(tiny_model):
    """One worker, at most 4 rows per batch (so that streams have several parts)."""
    srv = start_server(tiny_model, "--cpu-threads", "1", "--max-batch-size", "4")
    yield srv
    assert srv.stop() == 0, srv.log_text()


@pytest.fixture(scope="module")
def client(server):
    with RerankerClient(server.address, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def ranking(client):
    return client.rerank(QUERY, DOCS)


def logits_by_index(results) -> dict[int, float]:
    return {result.index: result.logit for result in results}


# -- the sync client against a live server ----------------------------------------------------


def test_rerank(client, ranking):
    assert sorted(result.index for result in ranking.results) == list(range(len(DOCS)))
    logits = [result.logit for result in ranking.results]
    assert logits == sorted(logits, reverse=True)
    assert ranking.usage.documents == len(DOCS)
    assert ranking.usage.tokens == sum(result.tokens for result in ranking.results)

    top = client.rerank(QUERY, DOCS, top_n=3, return_documents=True, request_id="top-3")
    assert top.request_id == "top-3"
    assert [result.index for result in top.results] == [result.index for result in ranking.results[:3]]
    assert [result.document for result in top.results] == [DOCS[result.index] for result in top.results]


def test_rerank_stream(client, ranking):
    messages = list(client.rerank_stream(QUERY, DOCS))
    partial, final = messages[:-1], messages[-1]
    assert len(partial) >= 3  # 10 documents, at most 4 per batch
    assert all(message.WhichOneof("event") == "scored" for message in partial)
    assert final.WhichOneof("event") == "final"
    streamed = [result.index for message in partial for result in message.scored.results]
    assert sorted(streamed) == list(range(len(DOCS)))
    expected = logits_by_index(ranking.results)
    for message in partial:
        for result in message.scored.results:
            assert result.logit == pytest.approx(expected[result.index], abs=1e-5)
    assert [result.index for result in final.final.results] == [result.index for result in ranking.results]


def test_rerank_many(client, ranking):
    requests = [
        rerank_request(QUERY, DOCS, request_id="same"),
        rerank_request("", DOCS, request_id="bad"),
        rerank_request("another query", DOCS[:3], request_id="other"),
    ]
    answers = {answer.request_id: answer for answer in client.rerank_many(requests)}
    assert sorted(answers) == ["bad", "other", "same"]
    assert [result.index for result in answers["same"].results] == [result.index for result in ranking.results]
    assert not answers["same"].HasField("error") and not answers["other"].HasField("error")
    assert len(answers["other"].results) == 3
    assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "query is empty" in answers["bad"].error.message and not answers["bad"].results


def test_score(client, ranking):
    response = client.score(
        [(QUERY, document) for document in DOCS[:4]] + [("where is Tokyo?", DOCS[5])], request_id="s"
    )
    assert response.request_id == "s"
    assert [result.index for result in response.results] == [0, 1, 2, 3, 4]
    expected = logits_by_index(ranking.results)
    assert [result.logit for result in response.results[:4]] == pytest.approx([expected[i] for i in range(4)], abs=1e-5)
    assert response.usage.documents == 5


def test_model_info(client, tiny_model):
    info = client.model_info()
    assert info.model_id == str(tiny_model)
    assert info.precision == pb.PRECISION_FP32
    assert list(info.devices) == ["cpu"]
    assert info.limits.max_batch_size == 4
    assert info.default_instruction and info.server_version and info.model_memory_bytes > 0


def test_errors_carry_code_and_message(client):
    with pytest.raises(RerankerError) as unary:
        client.rerank("", ["a"])
    assert unary.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert unary.value.message == "query is empty"
    assert str(unary.value) == "INVALID_ARGUMENT: query is empty"

    with pytest.raises(RerankerError) as streamed:
        list(client.rerank_stream(QUERY, ["a"], top_n=-1))
    assert streamed.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_n must be >= 0" in streamed.value.message

    with pytest.raises(RerankerError) as scored:
        client.score([])
    assert scored.value.code == grpc.StatusCode.INVALID_ARGUMENT


# -- the asyncio client against the same server ------------------------------------------------


def test_async_client(server, ranking, tiny_model):
    async def scenario():
        async with AsyncRerankerClient(server.address, timeout=60) as client:
            rerank = await client.rerank(QUERY, DOCS)
            stream = [message async for message in client.rerank_stream(QUERY, DOCS)]
            many = [
                answer
                async for answer in client.rerank_many(
                    [rerank_request(QUERY, DOCS, request_id="a"), rerank_request("", ["x"], request_id="b")]
                )
            ]
            score = await client.score([(QUERY, DOCS[0]), (QUERY, DOCS[1])])
            info = await client.model_info()
            with pytest.raises(RerankerError) as error:
                await client.rerank("", ["a"])
            with pytest.raises(RerankerError) as stream_error:
                [message async for message in client.rerank_stream("", ["a"])]
        return rerank, stream, many, score, info, error.value, stream_error.value

    rerank, stream, many, score, info, error, stream_error = asyncio.run(scenario())
    expected_order = [result.index for result in ranking.results]
    expected = logits_by_index(ranking.results)
    assert [result.index for result in rerank.results] == expected_order
    assert [result.logit for result in rerank.results] == pytest.approx([expected[i] for i in expected_order], abs=1e-5)
    assert [message.WhichOneof("event") for message in stream][-1] == "final"
    assert {message.WhichOneof("event") for message in stream[:-1]} == {"scored"} and len(stream) >= 4
    assert [result.index for result in stream[-1].final.results] == expected_order
    answers = {answer.request_id: answer for answer in many}
    assert [result.index for result in answers["a"].results] == expected_order
    assert answers["b"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [result.logit for result in score.results] == pytest.approx([expected[0], expected[1]], abs=1e-5)
    assert info.model_id == str(tiny_model)
    assert (error.code, error.message) == (grpc.StatusCode.INVALID_ARGUMENT, "query is empty")
    assert stream_error.code == grpc.StatusCode.INVALID_ARGUMENT


# -- retries, token and deadline, seen by a server that fails on purpose ----------------------


@pytest.fixture(scope="module")
def flaky():
    with flaky_server() as (servicer, address):
        yield servicer, address


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED"])
def test_retryable_codes_are_retried(flaky, code):
    servicer, address = flaky
    key = f"sync-{code}"
    with RerankerClient(address, max_attempts=3, timeout=30) as client:
        response = client.rerank(f"{code}:2", ["a"], request_id=key)
    assert response.request_id == key and len(response.results) == 1
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
    with RerankerClient(address, max_attempts=max_attempts, timeout=30) as client:
        with pytest.raises(RerankerError) as error:
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


# -- a deadline against a slow live server -----------------------------------------------------


def test_deadline_ends_the_call_without_waiting_for_the_batch(server_factory, tiny_model):
    """The worker sleeps 1.5 s per batch; a 0.3 s deadline must not wait for it.
    The bound below only says "did not wait for the batch"."""
    slow = server_factory(tiny_model, "--cpu-threads", "1", env={"RERANKER_FAULTS": "delay_ms=1500"})
    with RerankerClient(slow.address, timeout=0.3) as client:
        start = time.monotonic()
        with pytest.raises(RerankerError) as error:
            client.rerank(QUERY, ["a", "b"])
        elapsed = time.monotonic() - start
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.4

    async def call():
        async with AsyncRerankerClient(slow.address) as client:
            start = time.monotonic()
            with pytest.raises(RerankerError) as error:
                await client.rerank(QUERY, ["c"], timeout=0.3)
            return error.value, time.monotonic() - start

    error, elapsed = asyncio.run(call())
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.4

    # The server is not stuck: a call with room for the batch succeeds.
    with RerankerClient(slow.address, timeout=60) as client:
        assert len(client.rerank(QUERY, ["d", "e"]).results) == 2
