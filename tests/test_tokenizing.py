"""The tokenizer processes: their messages carry exactly what the encoder made,
refusals cross as themselves, and the pool outlives a process that dies."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from tokenizers import Tokenizer

from bench.server import alive
from service.errors import Unavailable
from service.metrics import Metrics
from service.tokenizing import TokenizerPool, TokenizerStartError
from tests.apps import run, until
from tests.texts import DOCUMENTS, QUERIES
from workers.prompt import Chunking, PromptEncoder, PromptTooLong, TooManyWindows, WindowTooSmall
from workers.tokenizer import NotText, Refused, Tokenize, Tokenized, answer, decode_answer

# A prompt of 160 tokens leaves about 80 for a document: the long ones are cut, or chunked.
MAX_LENGTH = 160
LONG = "Paris est la capitale de la France. 🇫🇷 パリはフランスの首都です。 " * 30
CASES = [
    ("", True, None, None),
    ("Juzga si el documento responde a la pregunta", True, 20, None),
    ("", True, None, Chunking(overlap=16, max_windows=64)),
    ("", True, 30, Chunking(overlap=8, max_windows=64)),
]


@pytest.fixture(scope="module")
def encoder(tiny_model) -> PromptEncoder:
    return PromptEncoder(Tokenizer.from_file(str(tiny_model / "tokenizer.json")), MAX_LENGTH)


def pairs() -> list[tuple[str, str]]:
    return [(query, document) for query in QUERIES for document in [*DOCUMENTS, LONG]]


def as_lists(windows) -> list[list[tuple]]:
    return [[(list(w.pair.ids), w.pair.truncated, w.pair.shared, w.start, w.end) for w in doc] for doc in windows]


@pytest.mark.parametrize("instruction, truncate, cap, chunking", CASES)
def test_a_request_and_its_answer_cross_unchanged(encoder, instruction, truncate, cap, chunking):
    request = Tokenize(7, pairs(), instruction, truncate, cap, chunking)
    assert Tokenize.decode(request.encode()) == request
    expected = encoder.encode_windows(pairs(), instruction, truncate, cap, chunking)
    crossed = decode_answer(answer(encoder, Tokenize.decode(request.encode())).encode())
    assert isinstance(crossed, Tokenized) and crossed.request_id == 7
    assert as_lists(crossed.windows) == as_lists(expected)
    if chunking is not None:
        assert max(len(document) for document in expected) > 1  # the long document was chunked


@pytest.mark.parametrize(
    "request_, error",
    [
        (Tokenize(1, [("q", "short"), ("q", LONG)], "", False, None, None), PromptTooLong),
        (Tokenize(2, [("word " * 200, "doc")], "", True, None, None), PromptTooLong),
        (Tokenize(3, [("q", LONG)], "", True, None, Chunking(overlap=0, max_windows=2)), TooManyWindows),
        (Tokenize(4, [("q", "🇫🇷" * 40)], "", True, 1, Chunking(overlap=0, max_windows=64)), WindowTooSmall),
    ],
)
def test_refusals_cross_as_themselves(encoder, request_, error):
    with pytest.raises(error) as raised:
        encoder.encode_windows(request_.pairs, request_.instruction, request_.truncate,
                               request_.max_document_tokens, request_.chunking)  # fmt: skip
    crossed = decode_answer(answer(encoder, request_).encode())
    assert isinstance(crossed, Refused) and crossed.request_id == request_.request_id
    assert type(crossed.error) is error and str(crossed.error) == str(raised.value)
    assert vars(crossed.error) == vars(raised.value)


def test_a_lone_surrogate_is_named_before_anything_is_sent():
    for pairs_, instruction, where in [
        ([("q", "fine"), ("q", "bad \ud800 text")], "", "the document of pair 1"),
        ([("bad \udfff", "fine")], "", "the query of pair 0"),
        ([("q", "fine")], "\ud800", "the instruction"),
    ]:
        with pytest.raises(NotText, match=where):
            Tokenize(1, pairs_, instruction, True, None, None).encode()


def test_the_pool_answers_as_the_encoder_does(tiny_model, encoder):
    async def scenario():
        pool = TokenizerPool(str(tiny_model / "tokenizer.json"), MAX_LENGTH, 2, Metrics())
        await pool.start()
        try:
            assert len(set(pool.pids)) == 2
            for instruction, truncate, cap, chunking in CASES:
                # several at once: they spread over both processes and each gets its own answer
                answers = await asyncio.gather(
                    *(pool.encode_windows(pairs()[i::5], instruction, truncate, cap, chunking) for i in range(5))
                )
                for i, windows in enumerate(answers):
                    expected = encoder.encode_windows(pairs()[i::5], instruction, truncate, cap, chunking)
                    assert as_lists(windows) == as_lists(expected)
            with pytest.raises(PromptTooLong, match="document 1 needs"):
                await pool.encode_windows([("q", "short"), ("q", LONG)], "", False, None, None)
        finally:
            await pool.stop()
        return pool.pids

    for pid in run(scenario):
        assert not alive(pid)


def test_a_tokenizer_that_dies_is_replaced_and_its_chunk_tried_again(tiny_model, encoder):
    async def scenario():
        metrics = Metrics()
        pool = TokenizerPool(str(tiny_model / "tokenizer.json"), MAX_LENGTH, 1, metrics)
        await pool.start()
        try:
            (victim,) = pool.pids
            # about 750 KB to tokenize: long enough to be killed while it works
            chunk = [("q", f"{i} " + LONG * 3) for i in range(100)]
            expected = as_lists(encoder.encode_windows(chunk, "", True, None, None))
            call = asyncio.ensure_future(pool.encode_windows(chunk, "", True, None, None))
            await until(lambda: pool._processes[0].waiting, "the chunk to reach the process")
            os.kill(victim, signal.SIGKILL)
            assert as_lists(await call) == expected
            assert restarts(metrics) == 1
            assert pool.pids != [victim] and not alive(victim)

            # a chunk whose second process dies too fails its call, and the pool goes on
            killed = [victim]
            call = asyncio.ensure_future(pool.encode_windows(chunk, "", True, None, None))
            for _ in range(2):
                await until(lambda: holding(pool, killed), "the chunk to reach a process not yet killed")
                killed.append(pool.pids[0])
                os.kill(killed[-1], signal.SIGKILL)
            with pytest.raises(Unavailable, match="two tokenizer processes died"):
                await call
            assert restarts(metrics) == 3
            assert as_lists(await pool.encode_windows(chunk[:2], "", True, None, None)) == as_lists(
                encoder.encode_windows(chunk[:2], "", True, None, None)
            )
        finally:
            await pool.stop()

    run(scenario)


def restarts(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("reranker_tokenizer_restarts_total")


def holding(pool: TokenizerPool, killed: list[int]) -> bool:
    """The one process is ready, not one already killed, and holds a chunk."""
    (process,) = pool._processes
    return process.ready and bool(process.waiting) and pool.pids[0] not in killed


def test_a_tokenizer_that_cannot_start_fails_the_start(tmp_path):
    async def scenario():
        pool = TokenizerPool(str(tmp_path / "missing-tokenizer.json"), MAX_LENGTH, 2, Metrics())
        try:
            with pytest.raises(TokenizerStartError, match=r"tokenizer process . could not load .*missing-tokenizer"):
                await pool.start()
        finally:
            await pool.stop()

    run(scenario)
