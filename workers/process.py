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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from workers import protocol
from workers.logs import configure_logging

if TYPE_CHECKING:
    from workers.scoring import Scorer


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
    layout: str = "auto"  # workers.layout: how rows that share a head run; auto resolves per device
    compile_mode: str = "off"  # workers.layout.COMPILE_MODES
    head_cache_bytes: int = 0  # recent heads kept for later batches (workers/heads.py); 0: none


def run(sock: socket.socket, spec: WorkerSpec, load: Callable[[WorkerSpec], Loaded] | None = None) -> None:
    """The process's entry point: load (see `work`), warm up, say ready, serve until told to stop."""
    die_with_parent(spec.parent_pid)
    # Ctrl-C reaches the whole process group; the front end decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(spec.log_format, spec.log_level)
    if work(sock, spec, load) == "device error":
        # After an unexpected CUDA error the context may be poisoned: exit, and let the
        # supervisor start a clean process rather than serve wrong answers.
        sys.exit(3)


def work(sock: socket.socket, spec: WorkerSpec, load: Callable[[WorkerSpec], Loaded] | None = None) -> str:
    """A worker's life on its channel: load (with `load`, by default the
    checkpoint of `spec`), say ready or why not, then serve. Returns why it stopped."""
    log = structlog.get_logger("worker").bind(worker_id=spec.worker_id, device=spec.device)
    try:
        loaded = (load or load_checkpoint)(spec)
    except Exception as exc:  # anything: the front end must hear why, not see a silent exit
        log.exception("worker_load_failed")
        protocol.send(sock, protocol.WorkerLoadFailed(f"{type(exc).__name__}: {exc}"))
        return "load failed"
    scorer = loaded.scorer
    protocol.send(
        sock,
        protocol.WorkerReady(
            spec.device, scorer.precision, scorer.memory_bytes, loaded.seconds, loaded.budget, loaded.seconds_per_token
        ),
    )
    return serve(sock, scorer, log)


@dataclass(frozen=True)
class Loaded:
    scorer: Scorer
    budget: int  # padded tokens per batch that fitted the warm-up; 0: the configured budget
    seconds_per_token: float  # compute time per padded token in the warm-up
    seconds: float  # loading and warming up


def load_checkpoint(spec: WorkerSpec) -> Loaded:
    """The scorer for `spec`, loaded and warmed up."""
    import torch

    from workers.scoring import load_scorer

    if spec.device == "cpu" and spec.threads:
        torch.set_num_threads(spec.threads)
        torch.set_num_interop_threads(1)
    start = time.perf_counter()
    scorer = load_scorer(
        spec.model_path,
        spec.device,
        spec.precision,
        spec.attn_implementation,
        spec.layout,
        spec.compile_mode,
        spec.head_cache_bytes,
    )
    budget, seconds_per_token = scorer.warm_up(spec.max_length, spec.max_batch_tokens)
    return Loaded(scorer, budget, seconds_per_token, time.perf_counter() - start)


def serve(sock: socket.socket, scorer: Scorer, log: structlog.typing.FilteringBoundLogger) -> str:
    """Answer every ScoreBatch on `sock`, in order, until told to stop; returns why it stopped."""
    while True:
        message = protocol.receive(sock)
        if message is None or isinstance(message, protocol.Shutdown):
            reason = "shutdown" if message else "front end closed the channel"
            log.info("worker_stopping", reason=reason)
            return reason
        if not isinstance(message, protocol.ScoreBatch):  # the front end sends nothing else
            raise ValueError(f"a worker cannot take {type(message).__name__}")
        reply = score(scorer, message, log)
        try:
            protocol.send(sock, reply)
        except (BrokenPipeError, ConnectionResetError):
            log.info("worker_stopping", reason="front end closed the channel")
            return "front end closed the channel"
        if (
            isinstance(reply, protocol.BatchFailed)
            and reply.failure is protocol.Failure.INTERNAL
            and scorer.device.type == "cuda"
        ):
            log.error("worker_exiting_after_device_error", batch_id=reply.batch_id)
            return "device error"


def score(scorer: Scorer, batch: protocol.ScoreBatch, log) -> protocol.BatchScores | protocol.BatchFailed:
    """One batch's answer: its scores, or why it failed."""
    import torch

    start = time.perf_counter()
    hits, misses = scorer.heads.hits, scorer.heads.misses
    try:
        logits, budget = scorer.score(batch)
    except ValueError as exc:
        return _failed(log, batch, protocol.Failure.INVALID, exc)
    except torch.OutOfMemoryError as exc:
        return _failed(log, batch, protocol.Failure.OUT_OF_MEMORY, exc)
    except Exception as exc:
        return _failed(log, batch, protocol.Failure.INTERNAL, exc)
    return protocol.BatchScores(
        batch.batch_id,
        array("f", logits.tolist()),
        time.perf_counter() - start,
        budget,
        scorer.heads.hits - hits,
        scorer.heads.misses - misses,
    )


def _failed(log, batch: protocol.ScoreBatch, failure: protocol.Failure, exc: Exception) -> protocol.BatchFailed:
    log.error(
        "batch_failed",
        batch_id=batch.batch_id,
        rows=len(batch.lengths),
        failure=failure.name,
        error=f"{type(exc).__name__}: {exc}",
    )
    return protocol.BatchFailed(batch.batch_id, failure, f"{type(exc).__name__}: {exc}")


def die_with_parent(parent_pid: int) -> None:
    """Never outlive the front end, even when it is SIGKILLed."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
