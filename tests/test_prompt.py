"""The prompt: token ids equal the model card's, truncation cuts only the document."""

import itertools

import pytest
from tokenizers import Tokenizer

from tests.reference import Recipe
from tests.texts import DOCUMENTS, INSTRUCTIONS, QUERIES, QUERY
from workers.prompt import (
    DEFAULT_INSTRUCTION,
    Chunking,
    PromptEncoder,
    PromptTooLong,
    TooManyWindows,
    WindowTooSmall,
    answer_token_ids,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


@pytest.mark.parametrize("max_length", [8192, 160])
def test_token_ids_equal_the_recipe(tiny_model, tokenizer, max_length):
    recipe = Recipe(tiny_model, max_length=max_length)
    encoder = PromptEncoder(tokenizer, max_length)
    for instruction in INSTRUCTIONS:
        for query in QUERIES:
            expected = recipe.token_ids(instruction, query, DOCUMENTS)
            encoded = encoder.encode([(query, doc) for doc in DOCUMENTS], instruction or "")
            assert [list(pair.ids) for pair in encoded] == expected
            assert all(pair.length <= max_length for pair in encoded)
    if max_length == 160:
        assert any(pair.truncated for pair in encoded)
        # the suffix survives truncation
        assert all(list(pair.ids[-len(encoder.suffix_ids) :]) == encoder.suffix_ids for pair in encoded)


def test_truncated_only_when_cut(tokenizer):
    encoder = PromptEncoder(tokenizer, 160)
    short, long = encoder.encode([("q", "short"), ("q", "word " * 500)])
    assert not short.truncated and long.truncated
    assert long.length == 160


def test_truncation_refused(tokenizer):
    encoder = PromptEncoder(tokenizer, 160)
    with pytest.raises(PromptTooLong, match=r"document 1 needs .* more than max_length 160"):
        encoder.encode([("q", "short"), ("q", "word " * 500)], truncate=False)


def test_query_that_fills_the_budget_is_an_error(tokenizer):
    encoder = PromptEncoder(tokenizer, 160)
    with pytest.raises(PromptTooLong, match=r"query and instruction take .* max_length 160"):
        encoder.encode([("word " * 200, "doc")])


def test_default_instruction_is_the_model_cards(tokenizer):
    encoder = PromptEncoder(tokenizer)
    assert list(encoder.encode([("q", "d")])[0].ids) == list(encoder.encode([("q", "d")], DEFAULT_INSTRUCTION)[0].ids)
    assert DEFAULT_INSTRUCTION == "Given a web search query, retrieve relevant passages that answer the query"


def test_answer_ids_come_from_the_tokenizer(tokenizer):
    yes, no = answer_token_ids(tokenizer)
    assert tokenizer.id_to_token(yes) == "yes" and tokenizer.id_to_token(no) == "no"


def test_max_length_must_leave_room(tokenizer):
    with pytest.raises(ValueError, match="leaves no room"):
        PromptEncoder(tokenizer, 40)


@pytest.mark.parametrize("max_length", [8192, 160])
def test_shared_prefix_is_what_every_document_of_a_query_starts_with(tokenizer, max_length):
    encoder = PromptEncoder(tokenizer, max_length)
    for instruction, query in zip(INSTRUCTIONS, QUERIES, strict=True):
        encoded = encoder.encode([(query, document) for document in DOCUMENTS], instruction or "")
        shared = {pair.shared for pair in encoded}
        assert len(shared) == 1, "every document of one query shares the same head"
        (length,) = shared
        head = tokenizer.encode(
            f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>:", add_special_tokens=False
        ).ids
        assert length == len(encoder.prefix_ids) + len(head)
        assert {bytes(pair.ids[:length]) for pair in encoded} == {bytes(encoded[0].ids[:length])}
        assert all(length < pair.length for pair in encoded)


# -- windows (TRUNCATION_CHUNK) -------------------------------------------------------------------

# Long text in many scripts, with emoji, CJK and combining marks, so that window boundaries land on
# characters of several tokens.
MIXED = " ".join(DOCUMENTS[:16]) + " " + " ".join(reversed(DOCUMENTS[:16]))


@pytest.mark.parametrize("cap", [12, 24, 64])
def test_windows_are_spans_encoded_like_documents(tiny_model, tokenizer, cap):
    """Each window is `document[start:end]` encoded as a document of its own, exactly
    as the recipe tokenizes that text; the windows cover the document in order, each
    within the cap, and no window cuts a character."""
    encoder = PromptEncoder(tokenizer, 8192)
    recipe = Recipe(tiny_model, max_length=8192)
    (windows,) = encoder.encode_windows([(QUERIES[2], MIXED)], "", True, cap, Chunking(overlap=4, max_windows=500))
    assert len(windows) > 3
    texts = [MIXED[window.start : window.end] for window in windows]
    assert [list(window.pair.ids) for window in windows] == recipe.token_ids(None, QUERIES[2], texts)
    head = len(recipe.token_ids(None, QUERIES[2], [""])[0]) - 1  # less the space that merges into a document
    assert all(head < window.pair.length <= head + cap for window in windows)
    assert not any(window.pair.truncated for window in windows)
    assert windows[0].start == 0 and windows[-1].end == len(MIXED)
    for before, after in itertools.pairwise(windows):
        assert before.start < after.start <= before.end + 1  # overlapping, or at most the prompt's space between
        assert MIXED[before.end : after.start].strip() == ""
    # Every cut is where a token of the whole document starts, on a character boundary.
    offsets = tokenizer.encode(MIXED, add_special_tokens=False).offsets
    starts = {after[0] for before, after in itertools.pairwise(offsets) if after[0] >= before[1]}
    for window in windows[1:]:
        assert window.start in starts or window.start - 1 in starts
    assert any(ord(MIXED[window.start]) > 0x2E80 or ord(MIXED[window.end - 1]) > 0x2E80 for window in windows)


def test_a_document_that_fits_is_one_window_in_every_mode(tokenizer):
    encoder = PromptEncoder(tokenizer, 160)
    pairs = [(QUERIES[0], document) for document in DOCUMENTS[:-1]]  # the last one does not fit in 160
    plain = encoder.encode(pairs)
    for truncate, chunking in [(True, None), (False, None), (True, Chunking(overlap=16, max_windows=8))]:
        grouped = encoder.encode_windows(pairs, "", truncate, None, chunking)
        assert [len(windows) for windows in grouped] == [1] * len(pairs)
        assert [list(windows[0].pair.ids) for windows in grouped] == [list(pair.ids) for pair in plain]
        assert [(windows[0].start, windows[0].end) for windows in grouped] == [(0, len(d)) for _, d in pairs]


def test_a_cut_document_spans_what_was_read(tiny_model, tokenizer):
    """TRUNCATION_END: the span ends at the first character not read in full, and the
    recipe reading that much of the document reads the same tokens, emoji included."""
    encoder = PromptEncoder(tokenizer, 8192)
    recipe = Recipe(tiny_model, max_length=8192)
    for cap in range(1, 40):
        ((window,),) = encoder.encode_windows([(QUERY, MIXED)], "", True, cap)
        assert window.pair.truncated and window.start == 0
        read = recipe.token_ids(None, QUERY, [MIXED[: window.end]])[0]
        assert len(read) <= window.pair.length and read[:-9] == list(window.pair.ids[: len(read) - 9])


def test_window_limits(tokenizer):
    encoder = PromptEncoder(tokenizer, 8192)
    with pytest.raises(TooManyWindows) as many:
        encoder.encode_windows([(QUERY, "short"), (QUERY, MIXED)], "", True, 16, Chunking(overlap=4, max_windows=3))
    assert many.value.position == 1 and many.value.limit == 3
    with pytest.raises(WindowTooSmall) as small:
        encoder.encode_windows([(QUERY, "🀄" * 20)], "", True, 1, Chunking(overlap=0, max_windows=100))
    assert small.value.position == 0
