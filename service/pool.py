"""The worker processes: starting them, talking to them, and restarting them.

Each worker is a spawned process (workers.process.run) joined to the front end
by a socket pair. One supervisor task per worker reads its answers, hands them
to the batcher, and when the process dies fails its batches over (one retry
each, decided by the batcher) and starts a new process with backoff. The pool
makes no batching decisions; it only says which worker has room.
"""

from __future__ import annotations

import asyncio
import enum
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import structlog

from service.errors import Internal, ResourceExhausted, Unavailable
from service.metrics import Metrics
from workers import protocol
from workers.process import WorkerSpec, run

if TYPE_CHECKING:
    from service.batcher import Batch, Batcher

log = structlog.get_logger("pool")

_RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
_STABLE_SECONDS = 60.0  # a worker up this long has its backoff reset


class WorkerLoadError(RuntimeError):
    """A worker could not load its model at start-up (the server cannot serve)."""


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    STOPPED = "stopped"


@dataclass(eq=False)
class Worker:
    spec: WorkerSpec
    token_budget: int
    state: State = State.STARTING
    process: multiprocessing.process.BaseProcess | None = None
    writer: asyncio.StreamWriter | None = None
    in_flight: dict[int, Batch] = field(default_factory=dict)
    info: protocol.WorkerReady | None = None
    restarts: int = 0

    @property
    def name(self) -> str:
        return str(self.spec.worker_id)

    @property
    def load(self) -> int:
        return sum(batch.padded_tokens for batch in self.in_flight.values())


class WorkerPool:
    def __init__(
        self, specs: list[WorkerSpec], metrics: Metrics, *, batches_in_flight: int, batch_timeout_s: float
    ) -> None:
        self.workers = [Worker(spec, spec.max_batch_tokens) for spec in specs]
        self._metrics = metrics
        self._batches_in_flight = batches_in_flight
        self._batch_timeout = batch_timeout_s
        self._batcher: Batcher | None = None
        self._on_change: Callable[[], None] = lambda: None
        self._tasks: list[asyncio.Task] = []
        self._first_load: asyncio.Future[None] | None = None
        self._stopping = False
        self._context = multiprocessing.get_context("spawn")

    # -- what the batcher sees ---------------------------------------------------------

    @property
    def ready_count(self) -> int:
        return sum(worker.state is State.READY for worker in self.workers)

    @property
    def alive_count(self) -> int:
        return sum(worker.state in (State.STARTING, State.READY) for worker in self.workers)

    def least_loaded(self) -> Worker | None:
        """The ready worker with a free slot and the fewest tokens in flight."""
        free = [w for w in self.workers if w.state is State.READY and len(w.in_flight) < self._batches_in_flight]
        return min(free, key=lambda w: (w.load, len(w.in_flight)), default=None)

    def submit(self, worker: Worker, batch: Batch) -> None:
        worker.in_flight[batch.id] = batch
        worker.writer.write(protocol.frame(protocol.ScoreBatch.from_rows(batch.id, batch.rows, batch.shared)))

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, batcher: Batcher, on_change: Callable[[], None] = lambda: None) -> None:
        """Spawn every worker; returns at once. `wait_ready` waits for the models.
        `on_change` is called whenever a worker becomes ready or dies."""
        self._batcher = batcher
        self._on_change = on_change
        self._first_load = asyncio.get_running_loop().create_future()
        for worker in self.workers:
            self._tasks.append(asyncio.create_task(self._supervise(worker), name=f"worker-{worker.name}"))

    async def wait_ready(self) -> None:
        """Wait until every worker has loaded and warmed up; raises WorkerLoadError
        if one fails to load (a bad checkpoint, or a budget that does not fit)."""
        await self._first_load

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask every worker to exit, kill those that do not within `timeout`, wait for all."""
        self._stopping = True
        for worker in self.workers:
            if worker.writer is not None and not worker.writer.is_closing():
                worker.writer.write(protocol.frame(protocol.Shutdown()))
        await asyncio.gather(*(self._reap(worker, timeout) for worker in self.workers))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one worker ----------------------------------------------------------------------

    async def _supervise(self, worker: Worker) -> None:
        attempt = 0
        while not self._stopping:
            started = asyncio.get_running_loop().time()
            try:
                reason = await self._run_once(worker)
            except Exception as exc:  # a bug here must not leave this worker's batches hanging
                log.exception("worker_supervision_failed", worker_id=worker.spec.worker_id)
                worker.process.kill()
                reason = f"supervision failed: {type(exc).__name__}"
            if self._stopping:
                return
            self._worker_died(worker, reason)
            if asyncio.get_running_loop().time() - started > _STABLE_SECONDS:
                attempt = 0
            delay = _RESTART_BACKOFF[min(attempt, len(_RESTART_BACKOFF) - 1)]
            attempt += 1
            log.warning("worker_restarting", worker_id=worker.spec.worker_id, in_seconds=delay, reason=reason)
            await asyncio.sleep(delay)
            worker.restarts += 1
            self._metrics.worker_restarts.labels(worker.name).inc()

    async def _run_once(self, worker: Worker) -> str:
        """Start the process and serve its channel until it ends; returns why it ended."""
        worker.state = State.STARTING
        ours, theirs = socket.socketpair()
        worker.process = self._context.Process(
            target=run, args=(theirs, worker.spec), name=f"reranker-worker-{worker.name}", daemon=True
        )
        worker.process.start()
        theirs.close()
        reader, worker.writer = await asyncio.open_unix_connection(sock=ours)
        try:
            while True:
                timeout = self._batch_timeout if worker.in_flight else None
                try:
                    async with asyncio.timeout(timeout):  # not wait_for: see Batcher.close
                        header = await reader.readexactly(protocol.FRAME_HEADER.size)
                    payload = await reader.readexactly(protocol.FRAME_HEADER.unpack(header)[0])
                except (asyncio.IncompleteReadError, ConnectionError):
                    # EOF, or a reset seen first by a write to the dead process
                    return await self._exit_reason(worker)
                except TimeoutError:
                    worker.process.kill()
                    return f"no answer for {self._batch_timeout:.0f} s with a batch in flight (batch_timeout_s); killed"
                problem = self._handle(worker, protocol.decode(payload))
                if problem:
                    return problem
        finally:
            worker.writer.close()

    def _handle(self, worker: Worker, message: protocol.Message) -> str | None:
        if isinstance(message, protocol.WorkerReady):
            self._ready(worker, message)
        elif isinstance(message, protocol.WorkerLoadFailed):
            if not self._first_load.done():
                self._first_load.set_exception(
                    WorkerLoadError(
                        f"worker {worker.name} ({worker.spec.device}) could not load the model: {message.message}"
                    )
                )
            return f"load failed: {message.message}"
        elif isinstance(message, protocol.BatchScores):
            batch = worker.in_flight.pop(message.batch_id)
            self._metrics.compute_seconds.labels(worker.name).inc(message.compute_seconds)
            if message.token_budget:
                self._lower_budget(worker, message.token_budget)
            if len(message.logits) != len(batch.items):
                self._batcher.failed(
                    batch,
                    Internal(f"worker {worker.name} returned {len(message.logits)} scores for {len(batch.items)} rows"),
                    retry=False,
                )
            else:
                self._batcher.scored(batch, message.logits, message.compute_seconds)
        elif isinstance(message, protocol.BatchFailed):
            batch = worker.in_flight.pop(message.batch_id)
            self._batcher.failed(batch, self._error_for(worker, message), retry=False)
        return None

    def _ready(self, worker: Worker, message: protocol.WorkerReady) -> None:
        worker.state, worker.info = State.READY, message
        if message.token_budget:
            self._lower_budget(worker, message.token_budget)
        self._metrics.worker_ready.labels(worker.name, worker.spec.device).set(1)
        self._metrics.worker_token_budget.labels(worker.name).set(worker.token_budget)
        self._metrics.model_load_seconds.labels(worker.name).set(message.load_seconds)
        log.info(
            "worker_ready",
            worker_id=worker.spec.worker_id,
            device=message.device,
            precision=message.precision,
            memory_bytes=message.memory_bytes,
            load_seconds=round(message.load_seconds, 2),
            max_batch_tokens=worker.token_budget,
        )
        if self.ready_count == len(self.workers) and not self._first_load.done():
            self._first_load.set_result(None)
        self._batcher.workers_changed()
        self._on_change()

    def _lower_budget(self, worker: Worker, fitted: int) -> None:
        worker.token_budget = min(worker.token_budget, fitted)
        self._metrics.worker_token_budget.labels(worker.name).set(worker.token_budget)
        log.warning("worker_budget_lowered", worker_id=worker.spec.worker_id, max_batch_tokens=worker.token_budget)

    def _error_for(self, worker: Worker, message: protocol.BatchFailed):
        where = f"worker {worker.name} ({worker.spec.device})"
        if message.failure is protocol.Failure.OUT_OF_MEMORY:
            return ResourceExhausted(
                f"a single document does not fit in the memory of {where}; send shorter documents or lower max_length"
            )
        return Internal(f"{where} failed to score a batch ({message.failure.name.lower()}); see the server log")

    def _worker_died(self, worker: Worker, reason: str) -> None:
        worker.state = State.DEAD
        self._metrics.worker_ready.labels(worker.name, worker.spec.device).set(0)
        log.error(
            "worker_died",
            worker_id=worker.spec.worker_id,
            device=worker.spec.device,
            reason=reason,
            batches_in_flight=len(worker.in_flight),
        )
        batches, worker.in_flight = list(worker.in_flight.values()), {}
        for batch in batches:
            self._batcher.failed(
                batch, Unavailable(f"worker {worker.name} died while scoring this request, twice; retry"), retry=True
            )
        self._batcher.workers_changed()
        self._on_change()

    async def _exit_reason(self, worker: Worker) -> str:
        await asyncio.to_thread(worker.process.join, 5)
        code = worker.process.exitcode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    async def _reap(self, worker: Worker, timeout: float) -> None:
        process = worker.process
        if process is None:
            return
        await asyncio.to_thread(process.join, timeout)
        if process.is_alive():
            log.warning("worker_killed_at_stop", worker_id=worker.spec.worker_id)
            process.kill()
            await asyncio.to_thread(process.join, 5)
        worker.state = State.STOPPED
        self._metrics.worker_ready.labels(worker.name, worker.spec.device).set(0)


def count_gpus() -> int:
    """Visible CUDA devices, asked of a short-lived child so that this process
    never initialises CUDA."""
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def worker_specs(base: WorkerSpec, devices: list[str], per_device: int, cpu_threads: int) -> list[WorkerSpec]:
    """One spec per worker; CPU workers share the machine's cores between them."""
    cpu_workers = per_device * devices.count("cpu")
    threads = cpu_threads or max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    specs = []
    for device in devices:
        for _ in range(per_device):
            specs.append(replace(base, worker_id=len(specs), device=device, threads=threads if device == "cpu" else 0))
    return specs
