"""The score cache and single flight, through the whole service in one process
(tests.apps): a hit is bitwise the computed result and never reaches the
batcher; results are kept apart by instruction, truncation mode, cap and
precision; concurrent identical pairs are computed once, also when the call
computing them goes away; the cache stays within its bytes."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import struct
import tracemalloc

import grpc
import pytest

from reranker.v1 import reranker_pb2 as pb
from service import cache
from service.cache import ENTRY_BYTES, ScoreCache
from service.calls import DocumentScore
from service.metrics import Metrics
from tests.apps import metric, outcome, run, running, settled, stub, until
from tests.doubles import Load
from tests.reference import Recipe
from tests.texts import DOCUMENTS, QUERIES, QUERY

DOCS = DOCUMENTS[:6]


def cache_counts(app) -> dict[str, float]:
    return {
        name: metric(app, f"reranker_score_cache_{name}_total") for name in ("hits", "joins", "misses", "evictions")
    }


def float32(value: float) -> bytes:
    return struct.pack("<f", value)


def test_a_hit_is_bitwise_the_computed_result_and_never_reaches_the_batcher(tiny_model):
    async def scenario():
        async with running(tiny_model) as app:
            channel, reranker = stub(app)
            async with channel:
                request = pb.RerankRequest(query=QUERY, documents=[*DOCS, DOCS[0]], return_documents=True)
                computed = await reranker.Rerank(request, timeout=60)
                queued = metric(app, "reranker_pairs_admitted_total"), metric(app, "reranker_batches_total")
                counts = cache_counts(app)
                cached = await reranker.Rerank(request, timeout=60)
                scored = await reranker.Score(
                    pb.ScoreRequest(pairs=[pb.Pair(query=QUERY, document=d) for d in DOCS]), timeout=60
                )
                after = metric(app, "reranker_pairs_admitted_total"), metric(app, "reranker_batches_total")
                return computed, cached, scored, queued, after, counts, cache_counts(app)

    computed, cached, scored, queued, after, counts, later = run(scenario)
    assert counts == {"hits": 0, "joins": 0, "misses": 6, "evictions": 0}  # the duplicate is scored once anyway
    assert later["hits"] == 12 and later["misses"] == 6  # Rerank and Score share entries
    assert after == queued  # nothing reached the batcher
    assert [r.index for r in cached.results] == [r.index for r in computed.results]
    for fresh, kept in zip(computed.results, cached.results, strict=True):
        assert float32(kept.logit) == float32(fresh.logit)
        assert (kept.tokens, kept.windows, kept.span, kept.document) == (
            fresh.tokens,
            fresh.windows,
            fresh.span,
            fresh.document,
        )
    by_index = {r.index: r.logit for r in computed.results}
    assert [float32(r.logit) for r in scored.results] == [float32(by_index[i]) for i in range(len(DOCS))]
    assert computed.usage.cached_documents == 0 and cached.usage.cached_documents == 7
    assert cached.usage.tokens == computed.usage.tokens
    assert cached.timing.compute.ToNanoseconds() == 0


def test_results_are_kept_apart_by_instruction_truncation_cap_and_precision(tiny_model):
    """The same texts under other options are computed afresh, never answered with
    another option's result; a refusal (TRUNCATION_NONE) is not answered from a cut."""
    long = " ".join(DOCUMENTS[:12])
    instruction = "Given a question, retrieve passages that answer it"

    async def scenario():
        async with running(tiny_model, max_length=160) as app:
            channel, reranker = stub(app)
            async with channel:

                async def rerank(**fields):
                    request = pb.RerankRequest(query=QUERY, documents=["short", long], **fields)
                    before = cache_counts(app)
                    answer = await outcome(reranker.Rerank(request, timeout=60))
                    after = cache_counts(app)
                    return answer, {name: after[name] - before[name] for name in after}

                found = {"base": await rerank()}
                found["instruction"] = await rerank(instruction=instruction)
                found["chunk"] = await rerank(truncation=pb.TRUNCATION_CHUNK)
                found["none"] = await rerank(truncation=pb.TRUNCATION_NONE)
                found["cap"] = await rerank(max_tokens_per_doc=8)
                loaded = app.ranker.info
                app.ranker.info = dataclasses.replace(loaded, precision="bf16")  # as if loaded in another precision
                found["precision"] = await rerank()
                app.ranker.info = loaded
                found["again"] = await rerank()
                return found

    found = run(scenario)
    for name in ("base", "instruction", "chunk", "none", "cap", "precision"):
        assert found[name][1] == {"hits": 0, "joins": 0, "misses": 2, "evictions": 0}, name
    assert found["again"][1]["hits"] == 2

    def logits(name):
        return {r.index: r.logit for r in found[name][0].results}

    recipe = Recipe(tiny_model, max_length=160)
    assert logits("instruction")[0] == pytest.approx(recipe.scores(instruction, QUERY, ["short"])[0][1], abs=1e-4)
    assert logits("instruction")[0] != logits("base")[0]
    chunked = {r.index: r for r in found["chunk"][0].results}
    assert chunked[1].windows > 1 and not chunked[1].truncated
    refused = found["none"][0]
    assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    cut = {r.index: r for r in found["cap"][0].results}
    assert cut[1].truncated and cut[1].tokens < {r.index: r for r in found["base"][0].results}[1].tokens
    assert logits("again") == logits("base")


def test_concurrent_identical_pairs_are_computed_once(tiny_model):
    """The first call's batch hangs on the worker; seven more calls ask for the same
    pairs (one in another order, with one new document): they wait for it, and every
    call gets the same bits."""

    async def scenario():
        load = Load.misbehaving(0, hang_on=frozenset({1}))
        async with running(tiny_model, load, workers_per_device=1, batch_timeout_s=60) as app:
            channel, reranker = stub(app)
            async with channel:
                first = asyncio.ensure_future(
                    reranker.Rerank(pb.RerankRequest(query=QUERY, documents=DOCS), timeout=60)
                )
                await until(lambda: metric(app, "reranker_batches_total") == 1, "the first batch on the worker")
                requests = [pb.RerankRequest(query=QUERY, documents=DOCS) for _ in range(6)]
                requests.append(pb.RerankRequest(query=QUERY, documents=[*reversed(DOCS), "a new document"]))
                others = [asyncio.ensure_future(reranker.Rerank(request, timeout=60)) for request in requests]
                await until(lambda: cache_counts(app)["joins"] == 7 * len(DOCS), "every later call to wait")
                load.doubles[0].release.set()
                answers = await asyncio.gather(first, *others)
                await until(lambda: settled(app), "the queue to empty")
                return answers, cache_counts(app), metric(app, "reranker_pairs_admitted_total")

    answers, counts, admitted = run(scenario)
    assert admitted == len(DOCS) + 1  # each distinct pair once
    assert counts == {"hits": 0, "joins": 7 * len(DOCS), "misses": len(DOCS) + 1, "evictions": 0}
    expected = {DOCS[r.index]: float32(r.logit) for r in answers[0].results}
    for answer, request_documents in zip(answers[1:], [DOCS] * 6 + [[*reversed(DOCS), "a new document"]], strict=True):
        got = {request_documents[r.index]: float32(r.logit) for r in answer.results}
        assert {document: got[document] for document in DOCS} == expected
        assert answer.usage.cached_documents == len(DOCS)
    assert answers[0].usage.cached_documents == 0


@pytest.mark.parametrize("leaving", ["cancelled", "deadline"])
def test_a_call_that_goes_away_hands_its_pairs_to_the_calls_waiting_for_them(tiny_model, leaving):
    """The first call's batch hangs; two calls wait for its pairs; the first call is
    cancelled (or its deadline passes): one of the waiting calls computes the pairs,
    the other waits for it, and both are answered with the recipe's scores."""

    async def scenario():
        load = Load.misbehaving(0, hang_on=frozenset({1}))
        async with running(tiny_model, load, workers_per_device=1, batch_timeout_s=60) as app:
            channel, reranker = stub(app)
            async with channel:
                request = pb.RerankRequest(query=QUERY, documents=DOCS)
                owner = asyncio.ensure_future(
                    outcome(reranker.Rerank(request, timeout=60 if leaving == "cancelled" else 1.0))
                )
                await until(lambda: metric(app, "reranker_batches_total") == 1, "the owner's batch on the worker")
                waiting = [asyncio.ensure_future(reranker.Rerank(request, timeout=60)) for _ in range(2)]
                await until(lambda: cache_counts(app)["joins"] == 2 * len(DOCS), "both calls to wait")
                if leaving == "cancelled":
                    owner.cancel()
                await until(lambda: cache_counts(app)["misses"] == 2 * len(DOCS), "a waiting call to take over")
                load.doubles[0].release.set()
                answers = await asyncio.gather(*waiting)
                gone = await asyncio.gather(owner, return_exceptions=True)
                await until(lambda: settled(app), "the queue to empty")
                moved = {o: metric(app, "reranker_pairs_total", outcome=o) for o in ("scored", "discarded")}
                return answers, gone[0], cache_counts(app), moved

    answers, gone, counts, moved = run(scenario)
    if leaving == "deadline":
        assert gone.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert counts["joins"] == 3 * len(DOCS)  # both waited for the owner, then one for the other
    assert moved == {"scored": len(DOCS), "discarded": len(DOCS)}  # the owner's batch finished for nobody
    expected = [logit for _, logit in Recipe(tiny_model).scores(None, QUERY, DOCS)]
    for answer in answers:
        assert sorted(r.index for r in answer.results) == list(range(len(DOCS)))
        assert [r.logit for r in answer.results] == pytest.approx([expected[r.index] for r in answer.results], abs=1e-4)
    assert [float32(r.logit) for r in answers[0].results] == [float32(r.logit) for r in answers[1].results]


def test_the_cache_stays_within_its_bytes(tiny_model):
    """Ten entries' worth of bytes: the least recently used goes first."""

    async def scenario():
        async with running(tiny_model, score_cache_bytes=10 * ENTRY_BYTES) as app:
            channel, reranker = stub(app)
            async with channel:

                async def ask(number: int) -> int:
                    answer = await reranker.Rerank(
                        pb.RerankRequest(query=QUERY, documents=[f"doc {number}"]), timeout=60
                    )
                    return answer.usage.cached_documents

                for number in range(15):
                    await ask(number)
                held = metric(app, "reranker_score_cache_entries"), metric(app, "reranker_score_cache_bytes")
                evicted = cache_counts(app)["evictions"]
                hits = [await ask(5), await ask(15), await ask(5), await ask(6)]  # 15 pushes out 6, not 5
                return held, evicted, hits, cache_counts(app)["evictions"]

    held, evicted, hits, evicted_later = run(scenario)
    assert held == (10, 10 * ENTRY_BYTES)
    assert evicted == 5 and evicted_later == 7
    assert hits == [1, 0, 1, 0]


def test_with_the_cache_off_every_call_computes(tiny_model):
    async def scenario():
        async with running(tiny_model, score_cache_bytes=0) as app:
            channel, reranker = stub(app)
            async with channel:
                request = pb.RerankRequest(query=QUERY, documents=[*DOCS, DOCS[1]])
                answers = [await reranker.Rerank(request, timeout=60) for _ in range(2)]
                return answers, metric(app, "reranker_pairs_admitted_total"), cache_counts(app)

    answers, admitted, counts = run(scenario)
    assert admitted == 2 * len(DOCS)  # a duplicate within a request is still scored once
    assert set(counts.values()) == {0}
    assert all(answer.usage.cached_documents == 0 for answer in answers)


# -- the cache alone -----------------------------------------------------------------------------------


def test_keys_tell_every_field_apart():
    base = ("model", "rev", "fp32", 8192, "instruction", "end", None, None)
    variants = [base]
    for position, other in enumerate(["other", "rev2", "bf16", 4096, "instruction2", "chunk", 64, 128]):
        variants.append((*base[:position], other, *base[position + 1 :]))
    found = {cache.keys(cache.scope(*fields), [(QUERY, "document")])[0] for fields in variants}
    assert len(found) == len(variants)
    shared = cache.scope(*base)
    pairs = [("ab", "c"), ("a", "bc"), ("a", "b\ud800c"), (QUERIES[1], "document")]  # a lone surrogate hashes too
    assert len(set(cache.keys(shared, pairs))) == len(pairs)
    assert cache.keys(shared, pairs) == cache.keys(cache.scope(*base), pairs)


def test_an_entry_takes_at_most_entry_bytes():
    """ENTRY_BYTES, which sizes the cache, covers what an entry really holds."""
    chosen = random.Random(0)
    for count in (20_000, 45_000):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        scores = ScoreCache(count * ENTRY_BYTES * 2, Metrics())
        for key in cache.keys(cache.scope("m"), [(QUERY, f"document {i}") for i in range(count)]):
            scores.claim(key, print)
            scores.finish(
                key,
                DocumentScore(
                    chosen.uniform(-9, 9), False, chosen.randint(300, 9000), chosen.randint(300, 90_000), 99_999, 3
                ),
            )
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert len(scores) == count
        assert used / count <= ENTRY_BYTES, used / count
