"""The worker process: owns one device, loads the model once, scores batches.

Started by the front end's pool with the spawn start method, one or more per
device. It receives ScoreBatch frames on a socket and answers each with
BatchScores or BatchFailed, in order. Batching decisions are not made here:
the front end's batcher chose the rows of every batch; the worker only pads,
computes shared prefixes once, runs, and splits a batch in halves if the
device runs out of memory.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
from array import array
from dataclasses import dataclass

from workers import protocol


@dataclass(frozen=True)
class Faults:
    """Testing only (RERANKER_FAULTS="delay_ms=200,oom_above_tokens=512"):
    make a worker slow, or make it run out of memory, on purpose."""

    delay_ms: int = 0
    oom_above_tokens: int = 0

    @classmethod
    def parse(cls, text: str) -> Faults:
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            if name not in cls.__dataclass_fields__:
                raise ValueError(
                    f"unknown fault {name!r} in RERANKER_FAULTS; known: {', '.join(cls.__dataclass_fields__)}"
                )
            values[name] = int(value)
        return cls(**values)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs; small and picklable (it crosses the spawn)."""

    worker_id: int
    model_path: str
    device: str
    precision: str
    attn_implementation: str
    max_length: int
    max_batch_tokens: int
    threads: int  # torch threads for a CPU worker; 0 leaves torch's default
    log_format: str
    log_level: str
    parent_pid: int
    faults: str = ""


def run(sock: socket.socket, spec: WorkerSpec) -> None:
    """The process's entry point: load, warm up, say ready, serve until told to stop."""
    _die_with_parent(spec.parent_pid)
    # Ctrl-C reaches the whole process group; the front end decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from service.logs import configure_logging

    configure_logging(spec.log_format, spec.log_level)
    import structlog

    log = structlog.get_logger("worker").bind(worker_id=spec.worker_id, device=spec.device)
    try:
        faults = Faults.parse(spec.faults)
        scorer, budget, load_seconds = _load(spec, faults)
    except Exception as exc:  # anything: the front end must hear why, not see a silent exit
        log.exception("worker_load_failed")
        protocol.send(sock, protocol.WorkerLoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    protocol.send(
        sock,
        protocol.WorkerReady(spec.device, scorer.precision, scorer.memory_bytes, load_seconds, budget),
    )
    while True:
        message = protocol.receive(sock)
        if message is None or isinstance(message, protocol.Shutdown):
            log.info("worker_stopping", reason="shutdown" if message else "front end closed the channel")
            return
        reply = _score(scorer, message, faults, log)
        try:
            protocol.send(sock, reply)
        except (BrokenPipeError, ConnectionResetError):
            log.info("worker_stopping", reason="front end closed the channel")
            return
        if (
            isinstance(reply, protocol.BatchFailed)
            and reply.failure is protocol.Failure.INTERNAL
            and scorer.device.type == "cuda"
        ):
            # After an unexpected CUDA error the context may be poisoned: exit, and let the
            # supervisor start a clean process rather than serve wrong answers.
            log.error("worker_exiting_after_device_error", batch_id=reply.batch_id)
            sys.exit(3)


def _load(spec: WorkerSpec, faults: Faults):
    import torch

    from workers.scoring import load_scorer

    if spec.device == "cpu" and spec.threads:
        torch.set_num_threads(spec.threads)
        torch.set_num_interop_threads(1)
    start = time.perf_counter()
    scorer = load_scorer(spec.model_path, spec.device, spec.precision, spec.attn_implementation)
    scorer.oom_above_tokens = faults.oom_above_tokens
    budget = scorer.warm_up(spec.max_length, spec.max_batch_tokens)
    return scorer, budget, time.perf_counter() - start


def _score(scorer, batch: protocol.ScoreBatch, faults: Faults, log) -> protocol.BatchScores | protocol.BatchFailed:
    import torch

    start = time.perf_counter()
    try:
        if faults.delay_ms:
            time.sleep(faults.delay_ms / 1000)
        ids = torch.frombuffer(batch.ids, dtype=torch.int32) if len(batch.ids) else torch.zeros(0, dtype=torch.int32)
        logits, budget = scorer.score(batch.lengths, ids, batch.shared)
    except ValueError as exc:
        return _failed(log, batch, protocol.Failure.INVALID, exc)
    except torch.OutOfMemoryError as exc:
        return _failed(log, batch, protocol.Failure.OUT_OF_MEMORY, exc)
    except Exception as exc:
        return _failed(log, batch, protocol.Failure.INTERNAL, exc)
    return protocol.BatchScores(batch.batch_id, array("f", logits.tolist()), time.perf_counter() - start, budget)


def _failed(log, batch: protocol.ScoreBatch, failure: protocol.Failure, exc: Exception) -> protocol.BatchFailed:
    log.error(
        "batch_failed",
        batch_id=batch.batch_id,
        rows=len(batch.lengths),
        failure=failure.name,
        error=f"{type(exc).__name__}: {exc}",
    )
    return protocol.BatchFailed(batch.batch_id, failure, f"{type(exc).__name__}: {exc}")


def _die_with_parent(parent_pid: int) -> None:
    """Never outlive the front end, even when it is SIGKILLed."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
