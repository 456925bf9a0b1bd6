"""The prompt: token ids equal the model card's, truncation cuts only the document."""

import pytest
from tokenizers import Tokenizer

from tests.reference import Recipe
from tests.texts import DOCUMENTS, INSTRUCTIONS, QUERIES
from workers.prompt import DEFAULT_INSTRUCTION, PromptEncoder, PromptTooLong, answer_token_ids


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
    with pytest.raises(PromptTooLong, match="document 1 needs .* more than max_length 160"):
        encoder.encode([("q", "short"), ("q", "word " * 500)], truncate=False)


def test_query_that_fills_the_budget_is_an_error(tokenizer):
    encoder = PromptEncoder(tokenizer, 160)
    with pytest.raises(PromptTooLong, match="query and instruction take .* max_length 160"):
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
    for instruction, query in zip(INSTRUCTIONS, QUERIES):
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
