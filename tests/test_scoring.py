"""Scores: equal to the model card's recipe, unchanged by padding, close in every precision."""

from __future__ import annotations

import functools
import math
from array import array

import pytest
import torch

from tests.doubles import out_of_memory_above
from tests.pairs import encode, run
from tests.reference import Recipe
from tests.shapes import ShapesMade
from tests.texts import DOCUMENTS, INSTRUCTIONS, QUERIES
from workers.layout import LAYOUTS
from workers.prompt import EncodedPair
from workers.protocol import ScoreBatch
from workers.scoring import load_scorer


@pytest.fixture(scope="module")
def fp32(tiny_model):
    return load_scorer(str(tiny_model), "cpu", "fp32")


@functools.cache
def recipe(model_dir, max_length):
    return Recipe(model_dir, max_length=max_length)


@functools.cache
def recipe_scores(model_dir, max_length, instruction, query):
    """The recipe's (probability, logit) per document of DOCUMENTS (slow: full logits)."""
    return recipe(model_dir, max_length).scores(instruction, query, DOCUMENTS)


@pytest.mark.parametrize("max_length", [8192, 200])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fp32_equals_the_recipe(tiny_model, max_length, attn):
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", attn)
    for instruction, query in zip(
        INSTRUCTIONS, QUERIES, strict=True
    ):  # default and custom instructions, three languages
        expected = recipe_scores(tiny_model, max_length, instruction, query)
        # one mixed-length batch, as the batcher would send
        logits = run(scorer, encode(tiny_model, [(query, d) for d in DOCUMENTS], instruction or "", max_length))
        for (probability, logit), ours in zip(expected, logits, strict=True):
            assert ours == pytest.approx(logit, abs=1e-4)
            assert 1 / (1 + math.exp(-ours)) == pytest.approx(probability, abs=1e-5)


def test_untied_head_equals_the_recipe(untied_model):
    recipe = Recipe(untied_model)
    scorer = load_scorer(str(untied_model), "cpu", "fp32")
    expected = [logit for _, logit in recipe.scores(None, QUERIES[0], DOCUMENTS)]
    assert run(scorer, encode(untied_model, [(QUERIES[0], d) for d in DOCUMENTS])) == pytest.approx(expected, abs=1e-4)


def test_padding_never_changes_a_score(tiny_model, fp32):
    pairs = [(QUERIES[0], d) for d in DOCUMENTS]
    encoded = encode(tiny_model, pairs)
    alone = [run(fp32, [pair])[0] for pair in encoded]
    together = run(fp32, encoded)
    reversed_batch = run(fp32, encoded[::-1])[::-1]
    shortest_with_longest = run(fp32, [encoded[-1], encoded[21]])  # ~300 tokens beside an empty document
    assert together == pytest.approx(alone, abs=1e-5)
    assert reversed_batch == pytest.approx(alone, abs=1e-5)
    assert shortest_with_longest == pytest.approx([alone[-1], alone[21]], abs=1e-5)


def mixed_batch(model_dir):
    """Two queries with many documents, one with a single document, and a pair
    that shares nothing, in an interleaved order."""
    encoded = encode(model_dir, [(QUERIES[0], d) for d in DOCUMENTS[:12]])
    encoded += encode(model_dir, [(QUERIES[1], d) for d in DOCUMENTS[12:20]], INSTRUCTIONS[1] or "")
    encoded += encode(model_dir, [(QUERIES[2], DOCUMENTS[20])])
    lone = encode(model_dir, [(QUERIES[2], DOCUMENTS[21])])[0]
    encoded.append(type(lone)(lone.ids, lone.truncated, 0))
    return encoded[::2] + encoded[1::2]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefixes_change_no_score(tiny_model, attn):
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", attn)
    encoded = mixed_batch(tiny_model)
    assert run(scorer, encoded, share=True) == pytest.approx(run(scorer, encoded, share=False), abs=1e-5)


def test_shared_prefixes_are_computed_once(tiny_model, fp32):
    encoded = mixed_batch(tiny_model)
    computed = []
    hook = fp32.backbone.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: computed.append(args[0].numel())
    )
    try:
        run(fp32, encoded, share=True)
    finally:
        hook.remove()
    groups = {}
    for pair in encoded:
        if pair.shared:
            groups.setdefault(bytes(pair.ids[: pair.shared]), []).append(pair)
    sharing = [pair for members in groups.values() if len(members) > 1 for pair in members]
    alone = [pair for pair in encoded if pair not in sharing]
    assert len(sharing) == 20 and len(alone) == 2
    # the two distinct prefixes once, then the rest of each sharing row, then the rows scored whole
    prefix = 2 * max(pair.shared for pair in sharing)
    rest = len(sharing) * max(pair.length - pair.shared for pair in sharing)
    assert computed == [prefix, rest, len(alone) * max(pair.length for pair in alone)]
    assert sum(computed) < 0.8 * len(encoded) * max(pair.length for pair in encoded)


def test_a_prefix_too_small_to_pay_is_not_shared(fp32):
    computed = []
    hook = fp32.backbone.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: computed.append(args[0].numel())
    )
    try:
        rows = [array("i", range(1000 + 100 * i, 1100 + 100 * i)) for i in range(2)]
        for row in rows:
            row[:2] = array("i", [7, 7])  # two shared tokens of 200: 1% skipped, below the 5% that pays
        fp32.score(ScoreBatch.from_pairs(0, [EncodedPair(row, False, 2) for row in rows]))
        for row in rows:
            row[:30] = array("i", [7] * 30)  # 15%: shared
        fp32.score(ScoreBatch.from_pairs(0, [EncodedPair(row, False, 30) for row in rows]))
    finally:
        hook.remove()
    assert computed == [200, 30, 140]


def test_bad_shared_lengths_are_refused(fp32):
    with pytest.raises(ValueError, match="shared length"):
        fp32.score(ScoreBatch.from_pairs(0, [EncodedPair(array("i", [5, 6, 7]), False, 3)]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_vocabulary_sized_logits(tiny_model, layout):
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", layout=layout)
    encoded = encode(tiny_model, [(QUERIES[0], d) for d in DOCUMENTS[:4]])  # shared heads: the layout runs
    with ShapesMade() as made:
        run(scorer, encoded)
    widest = max(shape[-1] for shape in made.shapes if shape)
    assert 0 < widest < scorer.vocab_size, "a vocabulary-wide tensor was computed"
    # the control: the recipe's forward does produce one
    recipe = Recipe(tiny_model)
    with ShapesMade() as control, torch.no_grad():
        recipe.model(**recipe.process_inputs(["x"]))
    assert max(shape[-1] for shape in control.shapes if shape) == scorer.vocab_size


def test_out_of_memory_splits_the_batch(tiny_model, fp32):
    encoded = encode(tiny_model, [(QUERIES[0], d) for d in DOCUMENTS])
    expected = run(fp32, encoded)
    scorer = out_of_memory_above(fp32, 2000)
    logits, budget = scorer.score(ScoreBatch.from_pairs(0, encoded))
    assert logits.tolist() == pytest.approx(expected, abs=1e-5)
    assert 0 < budget <= 2000
    assert scorer.refused and all(tokens > 2000 for tokens in scorer.refused)
    with pytest.raises(torch.OutOfMemoryError):
        out_of_memory_above(fp32, 10).score(ScoreBatch.from_pairs(0, encoded[:1]))


def test_ids_outside_the_vocabulary_are_refused(fp32):
    with pytest.raises(ValueError, match="token ids must lie in"):
        fp32.score(ScoreBatch.from_pairs(0, [EncodedPair(array("i", [5, fp32.vocab_size]), False)]))


def test_memory_footprint_is_reported(fp32):
    parameters = sum(p.numel() for p in fp32.backbone.parameters())
    assert fp32.memory_bytes >= parameters * 4
    assert fp32.precision == "fp32"


def test_unknown_precision_is_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        load_scorer(str(tiny_model), "cpu", "int4")
