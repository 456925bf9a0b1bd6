"""Layouts: every way a worker lays out rows gives the model card's scores.

The packed layout (workers/packing.py) is checked three ways: its masks, token
by token, against what a pair scored alone may see; its scores against the
card's recipe and the padded layout on every awkward case (truncated and
empty documents, mixed instructions, one-document requests, rows that mix
requests); and its FlexAttention block mask against its dense mask. The
cascade layout (workers/cascade.py) gives the same scores on the same cases,
and no row ever holds its head's keys.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.pairs import encode, run
from tests.reference import Recipe
from tests.shapes import ShapesMade
from tests.texts import DOCUMENTS, INSTRUCTIONS, QUERIES
from workers.layout import LAYOUTS, resolve_layout
from workers.packing import Segment, pack
from workers.scoring import load_scorer

NOTHING = torch.zeros(0, dtype=torch.long)


def tokens(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# -- the masks, by hand ---------------------------------------------------------------


def test_a_document_sees_its_head_and_itself_and_positions_continue_from_the_head():
    # one segment: head [1 2 3], documents [4 5] and [6 7 8]
    packed = pack([Segment(tokens(1, 2, 3), [tokens(4, 5), tokens(6, 7, 8)], [0, 1])], row_tokens=100)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    h, d1, d2 = [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 1, 1, 1]
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        h,
        [1, 1, 1, 1, 0, 0, 0, 0],
        d1,
        [1, 1, 1, 0, 0, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 1, 0],
        d2,
    ]
    assert packed.visible()[0].int().tolist() == expected
    assert packed.read_rows.tolist() == [0, 0] and packed.read_positions.tolist() == [4, 7]


def test_segments_of_different_requests_never_see_each_other_and_padding_sees_only_padding():
    packed = pack([Segment(tokens(1, 2), [tokens(3)], [1]), Segment(NOTHING, [tokens(9, 9, 9)], [0])], row_tokens=100)
    assert packed.input_ids.tolist() == [[1, 2, 3, 9, 9, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]  # a row scored whole starts at 0
    visible = packed.visible()[0].int().tolist()
    assert [row[:3] for row in visible[3:]] == [[0, 0, 0]] * 3  # the second request sees nothing of the first
    assert [row[3:] for row in visible[:3]] == [[0, 0, 0]] * 3
    # batch rows come back in batch order: row 0 is the second segment's document
    assert packed.read_positions.tolist() == [5, 2]

    two_rows = pack([Segment(tokens(1, 2), [tokens(3), tokens(4, 5, 6)], [0, 1])], row_tokens=3)
    assert two_rows.input_ids.tolist() == [[1, 2, 3, 0, 0], [1, 2, 4, 5, 6]]
    visible = two_rows.visible()[0].int().tolist()
    assert [row[3:] for row in visible[3:]] == [[1, 0], [1, 1]]  # padding: itself and earlier padding
    assert [row[:3] for row in visible[3:]] == [[0, 0, 0]] * 2
    assert all(row.any() for row in two_rows.visible().reshape(-1, 5))  # no empty mask row: no NaN


def test_a_segment_that_does_not_fit_continues_behind_a_copy_of_its_head():
    head = tokens(1, 2, 3)
    documents = [tokens(10 + i, 10 + i) for i in range(5)]
    packed = pack([Segment(head, documents, list(range(5)))], row_tokens=7)
    assert packed.input_ids.tolist() == [[1, 2, 3, 10, 10, 11, 11], [1, 2, 3, 12, 12, 13, 13], [1, 2, 3, 14, 14, 0, 0]]
    assert packed.read_rows.tolist() == [0, 0, 1, 1, 2]
    # a head + document longer than the row limit makes the limit
    long = pack([Segment(head, [tokens(*range(20, 30))], [0]), Segment(NOTHING, [tokens(5), tokens(6)], [1, 2])], 4)
    assert long.input_ids.shape == (2, 13)
    assert long.read_rows.tolist() == [0, 1, 1] and long.read_positions.tolist() == [12, 0, 1]


def test_rows_pad_to_a_width_multiple_as_padding_that_sees_only_padding():
    packed = pack([Segment(tokens(1, 2), [tokens(3), tokens(4, 5)], [0, 1])], row_tokens=100, width_multiple=8)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert packed.part[0, 5:].tolist() == [-1] * 3 and not packed.head[0, 5:].any()
    assert packed.visible()[0, 5:, :5].sum() == 0


def test_the_dense_mask_is_additive_float_in_the_model_dtype():
    packed = pack([Segment(tokens(1, 2), [tokens(3), tokens(4)], [0, 1])], row_tokens=100)
    for dtype in (torch.float32, torch.bfloat16):
        mask = packed.dense_mask(dtype)
        assert mask.dtype == dtype and mask.shape == (1, 1, 4, 4)
        assert set(mask.unique().tolist()) == {0.0, float("-inf")}
        assert torch.equal(mask[0, 0] == 0, packed.visible()[0])


@st.composite
def segments(draw):
    """Up to five segments of up to five documents, heads possibly empty; batch rows shuffled."""
    count = draw(st.integers(1, 5))
    drawn, rows = [], []
    for _ in range(count):
        head = draw(st.integers(0, 6))
        documents = draw(st.lists(st.integers(1, 9), min_size=1, max_size=5))
        drawn.append((head, documents))
        rows += [len(rows) + i for i in range(len(documents))]
    order = draw(st.permutations(rows))
    result, used = [], 0
    for head, documents in drawn:
        ids = order[used : used + len(documents)]
        used += len(documents)
        result.append(
            Segment(
                torch.arange(1000 * (len(result) + 1), 1000 * (len(result) + 1) + head),
                [torch.full((n,), 100 * i + 7) for i, n in zip(ids, documents, strict=True)],
                list(ids),
            )
        )
    return result


@settings(max_examples=200, deadline=None)
@given(segments(), st.integers(1, 30))
def test_every_document_sees_exactly_its_own_pair(drawn, row_tokens):
    """Property: the keys each document token sees, with their positions, are
    exactly those of its pair (head + document) laid out alone; each row stays
    within the limit (or one pair, if longer); every batch row is read once, at
    its document's last token."""
    packed = pack(drawn, row_tokens)
    limit = max([row_tokens] + [len(s.head) + len(d) for s in drawn for d in s.documents])
    assert packed.input_ids.shape[1] <= limit
    visible = packed.visible()
    rows = sorted(index for s in drawn for index in s.rows)
    assert len(packed.read_rows) == len(rows) == len(set(rows))
    for segment in drawn:
        for document, index in zip(segment.documents, segment.rows, strict=True):
            row, last = int(packed.read_rows[index]), int(packed.read_positions[index])
            pair = torch.cat([segment.head, document])
            assert packed.input_ids[row, last - len(document) + 1 : last + 1].tolist() == document.tolist()
            for offset in range(len(document)):
                q = last - len(document) + 1 + offset
                seen = visible[row, q].nonzero().flatten()
                assert packed.input_ids[row, seen].tolist() == pair[: len(segment.head) + offset + 1].tolist()
                assert packed.position_ids[row, seen].tolist() == list(range(len(segment.head) + offset + 1))


def test_the_block_mask_equals_the_dense_mask():
    """FlexAttention (run unfused, as it runs without torch.compile) with the
    block mask gives what SDPA gives with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    generator = torch.Generator().manual_seed(0)
    packed = pack(
        [
            Segment(tokens(*range(5)), [tokens(1, 2, 3), tokens(*range(7)), tokens(4)], [0, 2, 4]),
            Segment(NOTHING, [tokens(*range(9))], [1]),
            Segment(tokens(8, 8, 8, 8), [tokens(1, 1), tokens(*range(6))], [3, 5]),
        ],
        row_tokens=16,
    )
    rows, width = packed.input_ids.shape
    assert rows == 3  # segments split across rows, and a row that mixes requests
    q, k, v = (torch.randn(rows, 2, width, 8, generator=generator) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        flex = flex_attention(q, k, v, block_mask=packed.block_mask(torch.device("cpu")))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=packed.dense_mask(torch.float32))
    assert (flex - dense).abs().max().item() < 1e-5


# -- scores ----------------------------------------------------------------------------


@functools.cache
def recipe(model_dir, max_length):
    return Recipe(model_dir, max_length=max_length)


@functools.cache
def expected_logits(model_dir, max_length, instruction, query, documents):
    return [logit for _, logit in recipe(model_dir, max_length).scores(instruction, query, list(documents))]


def awkward_batch(model_dir, max_length):
    """Every document under three queries with three instructions, a request of
    one document, and a pair that shares nothing, interleaved; with the card's
    logit for each."""
    encoded, expected = [], []
    for instruction, query in zip(INSTRUCTIONS, QUERIES, strict=True):
        encoded += encode(model_dir, [(query, d) for d in DOCUMENTS], instruction or "", max_length)
        expected += expected_logits(model_dir, max_length, instruction, query, tuple(DOCUMENTS))
    encoded += encode(model_dir, [("one document", DOCUMENTS[0])], "", max_length)
    expected += expected_logits(model_dir, max_length, None, "one document", (DOCUMENTS[0],))
    lone = encode(model_dir, [(QUERIES[1], DOCUMENTS[3])], "", max_length)[0]
    encoded.append(dataclasses.replace(lone, shared=0))
    expected += expected_logits(model_dir, max_length, None, QUERIES[1], (DOCUMENTS[3],))
    order = list(range(0, len(encoded), 2)) + list(range(1, len(encoded), 2))
    return [encoded[i] for i in order], [expected[i] for i in order]


@pytest.mark.parametrize("max_length", [8192, 160])
@pytest.mark.parametrize(
    "layout, attn",
    [(layout, attn) for layout in LAYOUTS for attn in ("sdpa", "eager") if (layout, attn) != ("cascade", "eager")],
)
def test_every_layout_gives_the_recipes_scores(tiny_model, layout, attn, max_length):
    encoded, expected = awkward_batch(tiny_model, max_length)
    assert any(pair.truncated for pair in encoded) == (max_length == 160)
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", attn, layout)
    padded = run(load_scorer(str(tiny_model), "cpu", "fp32", attn, "padded"), encoded)
    for row_tokens in (1024, 96):  # one row for many requests; requests split over many rows
        scorer.packed_row_tokens = row_tokens
        logits = run(scorer, encoded)
        assert logits == pytest.approx(expected, abs=1e-4)
        assert logits == pytest.approx(padded, abs=1e-5)
    assert run(scorer, encoded[:1]) == pytest.approx(expected[:1], abs=1e-4)  # a batch of one


def test_packed_rows_compute_each_head_once_per_row(tiny_model):
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", layout="packed")
    encoded = encode(tiny_model, [(QUERIES[0], d) for d in DOCUMENTS[:12]])
    computed = []
    hook = scorer.backbone.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: computed.append(args[0].shape)
    )
    try:
        run(scorer, encoded)
    finally:
        hook.remove()
    shared = encoded[0].shared
    # one forward pass, one row: the head once, then every document and suffix
    assert computed == [torch.Size([1, shared + sum(pair.length - shared for pair in encoded)])]


@pytest.mark.parametrize("layout", ["cascade", "padded"])
def test_the_cascade_layout_never_copies_a_head_into_rows(tiny_model, layout):
    """Rows' keys and values hold their own tokens only; the padded layout, the control,
    copies the head into every row."""
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", layout=layout)
    encoded = encode(tiny_model, [(QUERIES[0], d) for d in DOCUMENTS[:6]])
    rest = max(pair.length - pair.shared for pair in encoded)
    per_row = (len(encoded), scorer.backbone.config.num_key_value_heads)
    with ShapesMade() as made:
        run(scorer, encoded)
    # keys and values: (rows, kv heads, tokens, head dim)
    widest = max(shape[2] for shape in made.shapes if len(shape) == 4 and shape[:2] == per_row)
    assert (widest <= rest) == (layout == "cascade"), (widest, rest, encoded[0].shared)


@pytest.mark.slow  # compiling takes 30-45 s per path on a 2-core CPU
@pytest.mark.parametrize("layout", ["padded", "packed"])  # cascade's FlexAttention does not compile on the CPU
def test_compiled_bodies_give_the_same_scores(tiny_model, layout):
    encoded, expected = awkward_batch(tiny_model, 8192)
    scorer = load_scorer(str(tiny_model), "cpu", "fp32", layout=layout, compile_mode="default")
    assert scorer.width_multiple == 64
    assert run(scorer, encoded) == pytest.approx(expected, abs=1e-4)  # shared heads: the layout
    assert run(scorer, encoded, share=False) == pytest.approx(expected, abs=1e-4)  # rows whole


def test_options_a_cpu_cannot_run_are_refused_by_name(tiny_model):
    with pytest.raises(ValueError, match=r"fp8 needs a CUDA GPU of compute capability 8\.9"):
        load_scorer(str(tiny_model), "cpu", "fp8")
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        load_scorer(str(tiny_model), "cpu", "fp32", compile_mode="fast")


def test_layouts_per_device_and_flex_attention_only_on_cuda(tiny_model):
    assert resolve_layout("auto", "cpu") == "padded" and resolve_layout("auto", "cuda:1") == "padded"
    assert resolve_layout("packed", "cpu") == "packed"
    with pytest.raises(ValueError, match="unknown layout 'tree'"):
        resolve_layout("tree", "cpu")
    with pytest.raises(ValueError, match="flex_attention needs a CUDA device"):
        load_scorer(str(tiny_model), "cpu", "fp32", "flex_attention", "packed")
