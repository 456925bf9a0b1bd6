"""The clients, sync and asyncio, against a running server: every RPC, typed
results, and RerankerError on bad input.

The server's address comes from RERANKER_TEST_TARGET ("host:port"); without it
these tests are skipped. Any model will do; RERANKER_TEST_MODEL_ID, when set,
is the model_id the server must report. The server repository's
tests/test_client.py starts a tiny model and runs this file against it, from
its own environment and from a fresh one that has only this package.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from reranker_client import (
    AsyncRerankerClient,
    Limits,
    ModelInfo,
    Precision,
    Ranking,
    RequestFailed,
    RerankerClient,
    RerankerError,
    Scored,
    Scores,
    Span,
    Truncation,
    rerank_request,
)

TARGET = os.environ.get("RERANKER_TEST_TARGET", "")
MODEL_ID = os.environ.get("RERANKER_TEST_MODEL_ID", "")

pytestmark = pytest.mark.skipif(not TARGET, reason="RERANKER_TEST_TARGET (host:port of a running server) is not set")

QUERY = "what is the capital of France?"
DOCS = [
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany.",
    "La capitale de la France est Paris, sur la Seine.",
    "Die Hauptstadt Frankreichs ist Paris.",
    "法国的首都是巴黎。",
    "フランスの首都はパリです。",
    "프랑스의 수도는 파리입니다.",
    "عاصمة فرنسا هي باريس.",
    "בירת צרפת היא פריז.",
    "फ्रांस की राजधानी पेरिस है।",
]


@pytest.fixture(scope="module")
def client():
    with RerankerClient(TARGET, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def ranking(client) -> Ranking:
    return client.rerank(QUERY, DOCS)


@pytest.fixture(scope="module")
def info(client) -> ModelInfo:
    return client.model_info()


def logits_by_index(results) -> dict[int, float]:
    return {result.index: result.logit for result in results}


def assert_same_ranking(results, reference, tolerance: float = 1e-5) -> None:
    """`results` rank what `reference` ranked: each logit equal to the reference's
    within `tolerance`, best first, and none left out that scored higher. Separate
    calls may be batched differently, so near-ties may swap (float noise)."""
    expected = logits_by_index(reference)
    got = [result.logit for result in results]
    assert got == sorted(got, reverse=True)
    assert got == pytest.approx([expected[result.index] for result in results], abs=tolerance)
    left_out = [logit for index, logit in expected.items() if index not in {r.index for r in results}]
    assert all(logit <= min(got) + tolerance for logit in left_out)


# -- the sync client ---------------------------------------------------------------------------


def test_rerank(client, ranking):
    assert isinstance(ranking, Ranking)
    assert sorted(result.index for result in ranking.results) == list(range(len(DOCS)))
    logits = [result.logit for result in ranking.results]
    assert logits == sorted(logits, reverse=True)
    assert all(0.0 <= result.score <= 1.0 for result in ranking.results)
    assert all(result.document == "" for result in ranking.results)  # not asked for
    assert ranking.usage.documents == len(DOCS)
    assert ranking.usage.tokens == sum(result.tokens for result in ranking.results)
    assert ranking.timing.total > 0 and ranking.timing.total >= ranking.timing.tokenize
    assert ranking.raw.usage.tokens == ranking.usage.tokens

    top = client.rerank(QUERY, DOCS, top_n=3, return_documents=True, request_id="top-3")
    assert top.request_id == "top-3"
    assert len(top.results) == 3
    assert_same_ranking(top.results, ranking.results)
    assert [result.document for result in top.results] == [DOCS[result.index] for result in top.results]


def test_rerank_stream(client, ranking):
    events = list(client.rerank_stream(QUERY, DOCS))
    partial, final = events[:-1], events[-1]
    assert all(isinstance(event, Scored) for event in partial)
    assert isinstance(final, Ranking)
    assert partial  # how many: batches that complete together share one event, so it depends on the load
    streamed = [result.index for event in partial for result in event.results]
    assert sorted(streamed) == list(range(len(DOCS)))
    expected = logits_by_index(ranking.results)
    for event in partial:
        for result in event.results:
            assert result.logit == pytest.approx(expected[result.index], abs=1e-5)
    assert_same_ranking(final.results, ranking.results)


def test_leaving_a_stream_early(client):
    for event in client.rerank_stream(QUERY, DOCS):
        assert isinstance(event, (Scored, Ranking))
        break  # cancels the call
    assert len(client.rerank(QUERY, DOCS[:2]).results) == 2  # and the client goes on


def test_rerank_many(client, ranking):
    requests = [
        rerank_request(QUERY, DOCS, request_id="same"),
        rerank_request("", DOCS, request_id="bad"),
        rerank_request("another query", DOCS[:3], request_id="other"),
    ]
    answers = {answer.request_id: answer for answer in client.rerank_many(requests)}
    assert sorted(answers) == ["bad", "other", "same"]
    assert isinstance(answers["same"], Ranking) and isinstance(answers["other"], Ranking)
    assert_same_ranking(answers["same"].results, ranking.results)
    assert len(answers["other"].results) == 3
    bad = answers["bad"]
    assert isinstance(bad, RequestFailed)
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "query is empty" in bad.message


def test_score(client, ranking):
    scores = client.score([(QUERY, document) for document in DOCS[:4]] + [("where is Tokyo?", DOCS[5])], request_id="s")
    assert isinstance(scores, Scores)
    assert scores.request_id == "s"
    assert [result.index for result in scores.results] == [0, 1, 2, 3, 4]
    expected = logits_by_index(ranking.results)
    assert [result.logit for result in scores.results[:4]] == pytest.approx([expected[i] for i in range(4)], abs=1e-5)
    assert scores.usage.documents == 5


def test_chunking_scores_a_long_document_whole(client, info):
    """A document of many max_tokens_per_doc windows: the best window's span, the
    window count, every window's tokens; the same document cut is a window of one."""
    long_document = " ".join(DOCS) * 4
    chunked = client.rerank(QUERY, [DOCS[0], long_document], truncation=Truncation.CHUNK, max_tokens_per_doc=32)
    result = {r.index: r for r in chunked.results}[1]
    assert info.limits.max_windows_per_document >= result.windows > 3
    assert isinstance(result.span, Span) and 0 <= result.span.start < result.span.end <= len(long_document)
    assert not result.truncated
    cut = client.rerank(QUERY, [long_document], max_tokens_per_doc=32).results[0]
    assert cut.truncated and cut.windows == 1 and cut.span.start == 0 and 0 < cut.span.end < len(long_document)
    assert result.tokens > 3 * cut.tokens
    assert chunked.usage.tokens == sum(r.tokens for r in chunked.results)


def test_model_info(info):
    assert isinstance(info, ModelInfo) and isinstance(info.limits, Limits)
    if MODEL_ID:
        assert info.model_id == MODEL_ID
    assert info.model_id
    assert isinstance(info.precision, Precision) and info.precision != Precision.UNSPECIFIED
    assert info.devices and all(isinstance(device, str) for device in info.devices)
    assert info.limits.max_batch_size > 0 and info.limits.max_length > 0 and info.limits.max_wait >= 0
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


# -- the asyncio client ------------------------------------------------------------------------


def test_async_client(ranking, info):
    async def scenario():
        async with AsyncRerankerClient(TARGET, timeout=60) as client:
            rerank = await client.rerank(QUERY, DOCS)
            stream = [event async for event in client.rerank_stream(QUERY, DOCS)]
            many = [
                answer
                async for answer in client.rerank_many(
                    [rerank_request(QUERY, DOCS, request_id="a"), rerank_request("", ["x"], request_id="b")]
                )
            ]
            score = await client.score([(QUERY, DOCS[0]), (QUERY, DOCS[1])])
            model = await client.model_info()
            with pytest.raises(RerankerError) as error:
                await client.rerank("", ["a"])
            with pytest.raises(RerankerError) as stream_error:
                [event async for event in client.rerank_stream("", ["a"])]
        return rerank, stream, many, score, model, error.value, stream_error.value

    rerank, stream, many, score, model, error, stream_error = asyncio.run(scenario())
    expected = logits_by_index(ranking.results)
    assert isinstance(rerank, Ranking)
    assert_same_ranking(rerank.results, ranking.results)
    assert isinstance(stream[-1], Ranking) and all(isinstance(event, Scored) for event in stream[:-1])
    assert len(stream) >= 2  # at least one scored event before the ranking
    assert sorted(r.index for event in stream[:-1] for r in event.results) == list(range(len(DOCS)))
    assert_same_ranking(stream[-1].results, ranking.results)
    answers = {answer.request_id: answer for answer in many}
    assert_same_ranking(answers["a"].results, ranking.results)
    assert isinstance(answers["b"], RequestFailed) and answers["b"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert [result.logit for result in score.results] == pytest.approx([expected[0], expected[1]], abs=1e-5)
    assert model.model_id == info.model_id and model.limits == info.limits
    assert (error.code, error.message) == (grpc.StatusCode.INVALID_ARGUMENT, "query is empty")
    assert stream_error.code == grpc.StatusCode.INVALID_ARGUMENT
