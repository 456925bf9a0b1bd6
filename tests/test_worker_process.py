"""A worker process, started the way the pool starts it, scores batches, reports
a bad batch as that batch's error and keeps serving, and stops cleanly."""

from __future__ import annotations

import multiprocessing
import os
import socket
from array import array

import pytest

from tests.pairs import encode, run
from tests.texts import DOCUMENTS, QUERIES
from workers import protocol
from workers.process import WorkerSpec
from workers.process import run as worker_main
from workers.prompt import EncodedPair
from workers.scoring import load_scorer


def spec(model, **changes) -> WorkerSpec:
    base = dict(
        worker_id=0,
        model_path=str(model),
        device="cpu",
        precision="fp32",
        attn_implementation="sdpa",
        max_length=8192,
        max_batch_tokens=16384,
        threads=1,
        log_format="json",
        log_level="warning",
        parent_pid=os.getpid(),
    )
    return WorkerSpec(**{**base, **changes})


def start(worker_spec: WorkerSpec):
    ours, theirs = socket.socketpair()
    process = multiprocessing.get_context("spawn").Process(target=worker_main, args=(theirs, worker_spec), daemon=True)
    process.start()
    theirs.close()
    ours.settimeout(120)
    return process, ours


def test_scores_batches_then_stops_cleanly(tiny_model):
    process, channel = start(spec(tiny_model))
    try:
        ready = protocol.receive(channel)
        assert isinstance(ready, protocol.WorkerReady)
        assert (ready.device, ready.precision) == ("cpu", "fp32") and ready.memory_bytes > 0

        encoded = encode(tiny_model, [(QUERIES[0], d) for d in DOCUMENTS])
        expected = run(load_scorer(str(tiny_model), "cpu", "fp32"), encoded)
        protocol.send(channel, protocol.ScoreBatch.from_pairs(1, encoded[:10]))
        protocol.send(channel, protocol.ScoreBatch.from_pairs(2, encoded[10:]))
        first, second = protocol.receive(channel), protocol.receive(channel)
        assert (first.batch_id, second.batch_id) == (1, 2)
        assert list(first.logits) + list(second.logits) == pytest.approx(expected, abs=1e-5)

        # a batch that raises inside the worker is that batch's error only
        protocol.send(channel, protocol.ScoreBatch.from_pairs(3, [EncodedPair(array("i", [1, 2, 10**7]), False)]))
        failed = protocol.receive(channel)
        assert isinstance(failed, protocol.BatchFailed)
        assert failed.batch_id == 3 and failed.failure is protocol.Failure.INVALID
        assert "token ids must lie in" in failed.message

        protocol.send(channel, protocol.ScoreBatch.from_pairs(4, encoded[:1]))
        again = protocol.receive(channel)
        assert again.batch_id == 4 and again.logits[0] == pytest.approx(expected[0], abs=1e-5)

        protocol.send(channel, protocol.Shutdown())
        process.join(30)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()


def test_a_model_that_cannot_load_says_why(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    process, channel = start(spec(tmp_path))
    try:
        message = protocol.receive(channel)
        assert isinstance(message, protocol.WorkerLoadFailed)
        assert message.message  # the exception's type and text
        process.join(30)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()


def test_worker_exits_when_the_front_end_goes_away(tiny_model):
    process, channel = start(spec(tiny_model))
    assert isinstance(protocol.receive(channel), protocol.WorkerReady)
    channel.close()
    process.join(30)
    assert process.exitcode == 0


def test_wire_format_round_trips():
    batch = protocol.ScoreBatch.from_pairs(
        9, [EncodedPair(array("i", [1, 2, 3]), False, 2), EncodedPair(array("i", [4]), False)]
    )
    assert protocol.decode(batch.encode()) == batch
    assert list(protocol.decode(batch.encode()).shared) == [2, 0]
    scores = protocol.BatchScores(9, array("f", [0.5, -1.25]), 0.125, 4096, 3, 1)
    assert protocol.decode(scores.encode()) == scores
    failed = protocol.BatchFailed(9, protocol.Failure.OUT_OF_MEMORY, "no room ✓")
    assert protocol.decode(failed.encode()) == failed
    ready = protocol.WorkerReady("cuda:0", "bf16", 123, 1.5, 8192, 2.5e-6)
    assert protocol.decode(ready.encode()) == ready
    assert isinstance(protocol.decode(protocol.Shutdown().encode()), protocol.Shutdown)
    with pytest.raises(ValueError, match="lengths sum to 4, but 3 ids"):
        protocol.ScoreBatch.decode(
            protocol.ScoreBatch(1, array("i", [4]), array("i", [0]), array("i", [1, 2, 3])).encode()
        )
