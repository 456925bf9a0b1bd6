"""The head cache (workers/heads.py): what it keeps and lets go, and that a
request scored in several batches computes its head once and gets the model
card's scores, in every layout that reads it."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from tests.doubles import out_of_memory_above
from tests.pairs import encode, run
from tests.reference import Recipe
from tests.texts import DOCUMENTS, INSTRUCTIONS, QUERIES
from workers.heads import Head, HeadCache
from workers.protocol import ScoreBatch
from workers.scoring import load_scorer

ROOM = 1 << 20  # far more than the tiny model's heads


def head(tokens: int, fill: float = 0.0) -> Head:
    """Two layers, one key/value head, dimension 4: 64 bytes a token."""
    return Head(torch.full((2, 1, tokens, 4), fill), torch.full((2, 1, tokens, 4), fill))


# -- the cache alone -------------------------------------------------------------------


def test_the_newest_heads_stay_within_the_byte_budget():
    cache = HeadCache(max_bytes=64 * 10)
    cache.put(b"a", head(4))
    cache.put(b"b", head(4))
    assert cache.bytes == 64 * 8 and len(cache) == 2
    assert cache.get(b"a") is not None  # now the most recently used
    cache.put(b"c", head(2))  # 64 * 10 in all: fits
    cache.put(b"d", head(3))  # room is made by letting go of the least recently used: b, then nothing more
    assert b"b" not in cache and all(key in cache for key in (b"a", b"c", b"d"))
    assert cache.bytes == 64 * 9
    cache.put(b"e", head(11))  # alone over the budget: not kept, and nothing let go for it
    assert b"e" not in cache and len(cache) == 3
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get(b"b") is None and (cache.hits, cache.misses) == (1, 1)
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_a_kept_head_is_a_copy_not_a_view_of_its_batch():
    batch = torch.zeros(2, 3, 1, 5, 4)  # (layers, groups, kv heads, tokens, dim): one batch's heads
    view = Head(batch[:, 1, :, :3], batch[:, 1, :, :3])
    cache = HeadCache(ROOM)
    cache.put(b"h", view)
    batch.fill_(7.0)
    kept = cache.get(b"h")
    assert kept is not None and kept.tokens == 3
    assert kept.keys.untyped_storage().nbytes() == kept.keys.numel() * 4  # its own storage, not the batch's
    assert float(kept.keys.abs().max()) == float(kept.values.abs().max()) == 0.0


def test_a_cache_of_no_bytes_keeps_nothing_and_a_negative_one_is_refused():
    cache = HeadCache(0)
    cache.put(b"a", head(1))
    assert len(cache) == 0 and cache.get(b"a") is None
    with pytest.raises(ValueError, match="a head cache holds 0 bytes or more, not -1"):
        HeadCache(-1)


# -- scoring with it -------------------------------------------------------------------


@functools.cache
def expected_logits(model_dir, instruction, query, documents, max_length=8192):
    return [logit for _, logit in Recipe(model_dir, max_length=max_length).scores(instruction, query, list(documents))]


class Computed:
    """How many tokens each forward pass of `scorer`'s body computed."""

    def __init__(self, scorer) -> None:
        self.passes: list[int] = []
        self._hook = scorer.embeddings.register_forward_hook(lambda _m, args, _o: self.passes.append(args[0].numel()))

    def __enter__(self) -> Computed:
        return self

    def __exit__(self, *_) -> None:
        self._hook.remove()


@pytest.mark.parametrize("layout", ["padded", "cascade"])
def test_a_request_in_several_batches_computes_its_head_once(tiny_model, layout):
    encoded = encode(tiny_model, [(QUERIES[0], d) for d in DOCUMENTS[:12]])
    expected = expected_logits(tiny_model, None, QUERIES[0], tuple(DOCUMENTS[:12]))
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", layout=layout, head_cache_bytes=ROOM)
    batches = [encoded[:5], encoded[5:9], encoded[9:]]
    with Computed(scorer) as computed:
        logits = [logit for batch in batches for logit in run(scorer, batch)]
    assert logits == pytest.approx(expected, abs=1e-4)
    shared = encoded[0].shared
    rests = [len(batch) * max(pair.length - shared for pair in batch) for batch in batches]
    # the head once, then only each batch's documents and suffixes
    assert computed.passes == [shared, *rests]
    assert (scorer.heads.hits, scorer.heads.misses) == (2, 1)

    without = load_scorer(str(tiny_model), "cpu", "fp32", layout=layout)
    with Computed(without) as computed:
        assert [logit for batch in batches for logit in run(without, batch)] == pytest.approx(logits, abs=1e-5)
    assert computed.passes == [p for rest in rests for p in (shared, rest)]  # the control: the head every batch
    assert len(without.heads) == 0 and without.heads.misses == 3


@pytest.mark.parametrize("layout", ["padded", "cascade"])
def test_kept_and_new_heads_mix_in_one_batch(tiny_model, layout):
    """A row alone whose head is kept shares it; a new head runs beside it;
    a pair that shares nothing runs whole."""
    first = encode(tiny_model, [(QUERIES[0], d) for d in DOCUMENTS[:3]])
    kept_alone = encode(tiny_model, [(QUERIES[0], DOCUMENTS[3])])
    other = encode(tiny_model, [(QUERIES[1], d) for d in DOCUMENTS[4:7]], INSTRUCTIONS[1] or "")
    lone = [dataclasses.replace(pair, shared=0) for pair in encode(tiny_model, [(QUERIES[2], DOCUMENTS[7])])]
    expected = (
        expected_logits(tiny_model, None, QUERIES[0], tuple(DOCUMENTS[3:4]))
        + expected_logits(tiny_model, INSTRUCTIONS[1], QUERIES[1], tuple(DOCUMENTS[4:7]))
        + expected_logits(tiny_model, None, QUERIES[2], tuple(DOCUMENTS[7:8]))
    )
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", layout=layout, head_cache_bytes=ROOM)
    run(scorer, first)
    batch = other[:1] + kept_alone + lone + other[1:]
    with Computed(scorer) as computed:
        logits = run(scorer, batch)
    assert [logits[i] for i in (1, 0, 3, 4, 2)] == pytest.approx(expected, abs=1e-4)
    rows = kept_alone + other
    rest = len(rows) * max(pair.length - pair.shared for pair in rows)
    assert computed.passes == [other[0].shared, rest, lone[0].length]  # only the new head; the lone row whole
    assert (scorer.heads.hits, scorer.heads.misses) == (1, 2)
    assert len(scorer.heads) == 2


@pytest.mark.parametrize("max_length", [8192, 160])
@pytest.mark.parametrize("layout", ["padded", "cascade"])
def test_kept_heads_give_the_recipes_scores_on_every_awkward_case(tiny_model, layout, max_length):
    """Three requests (default and custom instructions, three languages; empty
    documents, and at 160 tokens truncated ones), each batch holding rows of all
    three: the first batch computes the heads, the next two read them."""
    encoded, expected = [], []
    for instruction, query in zip(INSTRUCTIONS, QUERIES, strict=True):
        encoded += encode(tiny_model, [(query, d) for d in DOCUMENTS], instruction or "", max_length)
        expected += expected_logits(tiny_model, instruction, query, tuple(DOCUMENTS), max_length)
    assert any(pair.truncated for pair in encoded) == (max_length == 160)
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", layout=layout, head_cache_bytes=ROOM)
    logits = [0.0] * len(encoded)
    for start in range(3):
        rows = list(range(start, len(encoded), 3))
        for row, logit in zip(rows, run(scorer, [encoded[row] for row in rows]), strict=True):
            logits[row] = logit
    assert logits == pytest.approx(expected, abs=1e-4)
    assert (scorer.heads.hits, scorer.heads.misses) == (6, 3)


def test_the_packed_layout_neither_reads_nor_fills_the_cache(tiny_model):
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", layout="packed", head_cache_bytes=ROOM)
    encoded = encode(tiny_model, [(QUERIES[0], d) for d in DOCUMENTS[:6]])
    expected = expected_logits(tiny_model, None, QUERIES[0], tuple(DOCUMENTS[:6]))
    assert run(scorer, encoded[:3]) + run(scorer, encoded[3:]) == pytest.approx(expected, abs=1e-4)
    assert len(scorer.heads) == 0 and scorer.heads.hits == scorer.heads.misses == 0


def test_running_out_of_memory_lets_the_heads_go(tiny_model):
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", head_cache_bytes=ROOM)
    other = encode(tiny_model, [(QUERIES[1], d) for d in DOCUMENTS[:4]])
    run(scorer, other)
    assert len(scorer.heads) == 1
    encoded = encode(tiny_model, [(QUERIES[0], d) for d in DOCUMENTS])
    tight = out_of_memory_above(scorer, 2000)  # the same cache
    logits, budget = tight.score(ScoreBatch.from_pairs(0, encoded))
    assert 0 < budget <= 2000
    assert logits.tolist() == pytest.approx(run(load_scorer(str(tiny_model), "cpu", "fp32"), encoded), abs=1e-5)
    assert len(scorer.heads) == 1  # the halves' own head, computed once and read by the other halves
    misses = scorer.heads.misses
    run(scorer, other)
    assert scorer.heads.misses == misses + 1  # the other query's head went when memory ran out


def test_the_warm_up_leaves_the_cache_empty(tiny_model):
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", head_cache_bytes=ROOM)
    scorer.warm_up(512, 2048)
    assert len(scorer.heads) == 0 and scorer.heads.bytes == 0
