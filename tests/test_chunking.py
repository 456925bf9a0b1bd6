"""TRUNCATION_CHUNK through the whole service in one process (tests.apps): a long
document scored as windows, its score the best window's, checked against the
card's recipe over the same windows' texts; spans on multilingual text and
emoji; window counts, limits, streaming and cancellation."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from tokenizers import Tokenizer

from bench.server import free_port
from reranker.v1 import reranker_pb2 as pb
from tests.apps import metric, outcome, run, running, settled, stub, until
from tests.doubles import Load
from tests.reference import Recipe
from tests.texts import DOCUMENTS, QUERIES, QUERY
from workers.prompt import Chunking, PromptEncoder, Window

# Many scripts, emoji, CJK, Thai and Arabic: window boundaries land next to characters of several tokens.
MIXED = " ".join(DOCUMENTS[:16]) + " " + " ".join(reversed(DOCUMENTS[:16]))
LONG = "The Eiffel Tower is in Paris. " * 30 + MIXED
INSTRUCTION = "Given a question, retrieve passages that answer it"
CAP = 24  # max_tokens_per_doc: windows of at most 24 document tokens


@pytest.fixture(scope="module")
def recipe(tiny_model):
    return Recipe(tiny_model, max_length=8192)


def windows(model, app, query: str, document: str, cap: int | None, instruction: str = "") -> list[Window]:
    """The windows the service plans for `document`, with the app's settings."""
    encoder = PromptEncoder(Tokenizer.from_file(str(model / "tokenizer.json")), app.settings.max_length)
    chunking = Chunking(app.settings.chunk_overlap_tokens, app.settings.max_windows_per_document)
    (found,) = encoder.encode_windows([(query, document)], instruction, True, cap, chunking)
    return found


def test_a_chunked_document_scores_its_best_window(tiny_model, recipe):
    """The logit is the highest of the recipe's logits over the windows' texts
    (document[start:end] scored as a document), the span is that window's, the
    tokens are every window's; the windows' boundaries fall on multi-byte text."""

    async def scenario():
        async with running(tiny_model) as app:
            channel, reranker = stub(app)
            async with channel:
                request = pb.RerankRequest(
                    query=QUERIES[2],
                    documents=["short", LONG, MIXED],
                    instruction=INSTRUCTION,
                    truncation=pb.TRUNCATION_CHUNK,
                    max_tokens_per_doc=CAP,
                )
                response = await reranker.Rerank(request, timeout=120)
                planned = {
                    i: windows(tiny_model, app, QUERIES[2], text, CAP, INSTRUCTION)
                    for i, text in [(1, LONG), (2, MIXED)]
                }
                return response, planned

    response, planned = run(scenario)
    by_index = {result.index: result for result in response.results}
    assert by_index[0].windows == 1 and (by_index[0].span.start, by_index[0].span.end) == (0, 5)
    for index, text in [(1, LONG), (2, MIXED)]:
        result, found = by_index[index], planned[index]
        assert result.windows == len(found) > 5
        assert not result.truncated
        assert result.tokens == sum(window.pair.length for window in found)
        texts = [text[window.start : window.end] for window in found]
        expected = [logit for _, logit in recipe.scores(INSTRUCTION, QUERIES[2], texts)]
        assert result.logit == pytest.approx(max(expected), abs=1e-4)
        best = [(w.start, w.end) for w, logit in zip(found, expected, strict=True) if logit >= max(expected) - 1e-4]
        assert (result.span.start, result.span.end) in best
        assert any(ord(text[w.start]) > 0x2E80 or ord(text[w.end - 1]) > 0x2E80 for w in found)
    assert response.usage.tokens == sum(result.tokens for result in response.results)
    assert response.usage.truncated_documents == 0


def test_a_document_that_fits_scores_the_same_in_every_mode(tiny_model, recipe):
    documents = DOCUMENTS[:8]

    async def scenario():
        async with running(tiny_model) as app:
            channel, reranker = stub(app)
            async with channel:
                answers = {}
                for mode in (pb.TRUNCATION_END, pb.TRUNCATION_NONE, pb.TRUNCATION_CHUNK):
                    request = pb.RerankRequest(query=QUERY, documents=documents, truncation=mode)
                    answers[mode] = await reranker.Rerank(request, timeout=60)
                return answers

    answers = run(scenario)
    expected = [logit for _, logit in recipe.scores(None, QUERY, documents)]
    results = {mode: {r.index: r for r in answer.results} for mode, answer in answers.items()}
    for index, document in enumerate(documents):
        logits = {mode: results[mode][index].logit for mode in results}
        assert len(set(logits.values())) == 1, logits  # the same pair, the same tokens, the same score
        assert logits[pb.TRUNCATION_CHUNK] == pytest.approx(expected[index], abs=1e-4)
        for mode in results:
            result = results[mode][index]
            assert (result.windows, result.span.start, result.span.end) == (1, 0, len(document))


def test_score_chunks_pairs_too(tiny_model, recipe):
    async def scenario():
        async with running(tiny_model, max_length=160) as app:
            channel, reranker = stub(app)
            async with channel:
                pairs = [pb.Pair(query=QUERY, document=MIXED), pb.Pair(query=QUERIES[1], document=DOCUMENTS[4])]
                request = pb.ScoreRequest(pairs=pairs, truncation=pb.TRUNCATION_CHUNK)
                return await reranker.Score(request, timeout=60), windows(tiny_model, app, QUERY, MIXED, None)

    response, found = run(scenario)
    chunked, plain = response.results
    assert chunked.windows == len(found) > 1 and plain.windows == 1
    assert all(window.pair.length <= 160 for window in found)
    expected = [logit for _, logit in recipe.scores(None, QUERY, [MIXED[w.start : w.end] for w in found])]
    assert chunked.logit == pytest.approx(max(expected), abs=1e-4)


def test_streaming_reports_a_chunked_document_once_all_its_windows_are_scored(tiny_model):
    """Two rows per batch, so that a document's windows are spread over many batches:
    it is reported once, with its final (best) score."""

    async def scenario():
        async with running(tiny_model, max_batch_size=2) as app:
            channel, reranker = stub(app)
            async with channel:
                request = pb.RerankRequest(
                    query=QUERY,
                    documents=[LONG, "short one", MIXED, "another short one"],
                    truncation=pb.TRUNCATION_CHUNK,
                    max_tokens_per_doc=64,
                )
                messages = [message async for message in reranker.RerankStream(request, timeout=120)]
                batches = metric(app, "reranker_batches_total")
                return messages, batches

    messages, batches = run(scenario)
    *partial, final = messages
    reported = [result for message in partial for result in message.scored.results]
    assert sorted(result.index for result in reported) == [0, 1, 2, 3]  # each document once
    windows = {result.index: result.windows for result in final.final.results}
    assert windows[0] > 2 and windows[2] > 2 and windows[1] == windows[3] == 1
    assert batches >= sum(windows.values()) / 2
    best = {result.index: (result.logit, result.windows, result.span.start) for result in final.final.results}
    assert {r.index: (r.logit, r.windows, r.span.start) for r in reported} == best


@pytest.mark.parametrize(
    "documents, message",
    [
        ([LONG], "document 0 needs more than max_windows_per_document=8 windows"),
        (["short", MIXED[:250], MIXED[250:350]], "more than max_windows_per_request=10 windows"),  # 1 + 5 + 5
    ],
)
def test_window_limits_are_invalid_argument(tiny_model, documents, message):
    async def scenario():
        async with running(
            tiny_model, max_windows_per_document=8, max_windows_per_request=10, max_documents_per_request=10
        ) as app:
            channel, reranker = stub(app)
            async with channel:
                request = pb.RerankRequest(
                    query=QUERY, documents=documents, truncation=pb.TRUNCATION_CHUNK, max_tokens_per_doc=CAP
                )
                error = await outcome(reranker.Rerank(request, timeout=60))
                info = await reranker.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
                return error, info, metric(app, "reranker_pairs_admitted_total")

    error, info, admitted = run(scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert admitted == 0  # refused before anything was queued
    assert (info.limits.max_windows_per_document, info.limits.max_windows_per_request) == (8, 10)


@pytest.mark.parametrize("how", ["Rerank", "RerankStream", "HTTP stream"])
def test_cancelling_drops_the_remaining_windows(tiny_model, how):
    async def scenario():
        load = Load(delay_s=0.1)
        async with running(tiny_model, load, workers_per_device=1, max_batch_size=2, http_port=free_port()) as app:
            channel, reranker = stub(app)
            async with channel, httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", timeout=120) as http:
                request = pb.RerankRequest(
                    query=QUERY, documents=[LONG], truncation=pb.TRUNCATION_CHUNK, max_tokens_per_doc=CAP
                )
                body = {"query": QUERY, "documents": [LONG], "truncation": "chunk", "max_tokens_per_doc": CAP}

                async def http_stream() -> None:
                    async with http.stream("POST", "/v1/rerank", json={**body, "stream": True}) as answer:
                        await answer.aread()

                if how == "RerankStream":
                    stream = reranker.RerankStream(request, timeout=120)
                    leave = stream.cancel
                else:
                    call = asyncio.ensure_future(
                        reranker.Rerank(request, timeout=120) if how == "Rerank" else http_stream()
                    )
                    leave = call.cancel  # for HTTP, the connection is closed
                await until(lambda: metric(app, "reranker_pairs_total", outcome="scored") >= 2, "a batch scored")
                leave()
                await until(lambda: settled(app), "the queue to empty after the cancel")
                moved = {
                    o: metric(app, "reranker_pairs_total", outcome=o) for o in ("scored", "discarded", "cancelled")
                }
                await until(
                    lambda: metric(app, "reranker_requests_total", code="CANCELLED") == 1,
                    "the call to be counted CANCELLED",
                )
                return moved, metric(app, "reranker_pairs_admitted_total")

    moved, admitted = run(scenario)
    assert admitted > 20  # the document's windows
    assert sum(moved.values()) == admitted
    # Two batches of two rows at most were on the worker when the call went: the rest never ran.
    assert moved["discarded"] <= 4 and moved["cancelled"] >= admitted / 2, moved
