"""The workers: starting them, talking to them, watching them, restarting them.

Each worker is started by a Launcher (a spawned process in production, a thread
of this process in tests and benchmarks) and joined to the front end by a
socket pair that carries workers.protocol frames. One supervisor task per
worker reads its answers and hands them to the batcher (the BatchSink). When a
worker dies, or holds a batch far longer than batches have taken (a hang), it
is killed, its batches go back to the batcher for one more try elsewhere, and
a new one is started with backoff. The pool makes no batching decisions; it
only says which worker has room (it implements service.work.Workers).
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
from typing import Protocol

import structlog

from service.errors import Internal, ServiceError, TooLarge, Unavailable
from service.metrics import Metrics
from service.work import Batch, BatchSink, WorkerSlot
from workers import process, protocol
from workers.process import WorkerSpec

log = structlog.get_logger("pool")

_RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
_STABLE_SECONDS = 60.0  # a worker up this long has its backoff reset
# With batch_timeout_s = 0 (auto), a worker is declared hung when it holds a
# batch longer than _HANG_FACTOR times the batch's expected compute time (its
# padded tokens times the seconds per padded token that worker has measured,
# starting from its warm-up), and never sooner than _HANG_FLOOR_S.
_HANG_FACTOR = 10.0
_HANG_FLOOR_S = 10.0


class WorkerLoadError(RuntimeError):
    """A worker could not load its model at start-up (the server cannot serve)."""


class WorkerHandle(Protocol):
    """One started worker, as its launcher hands it over."""

    sock: socket.socket  # the front end's end of the channel

    def kill(self) -> None:
        """Stop it now, whatever it is doing."""

    async def ended(self, timeout: float) -> str | None:
        """Wait up to `timeout` seconds for it to end; how it ended, or None if it has not."""


class Launcher(Protocol):
    def launch(self, spec: WorkerSpec) -> WorkerHandle: ...


class ProcessLauncher:
    """Workers as spawned processes (never forked: CUDA and gRPC threads do not
    survive a fork). `target` is the process's entry point."""

    def __init__(self, target: Callable[[socket.socket, WorkerSpec], None] = process.run) -> None:
        self._target = target
        self._context = multiprocessing.get_context("spawn")

    def launch(self, spec: WorkerSpec) -> WorkerHandle:
        ours, theirs = socket.socketpair()
        child = self._context.Process(
            target=self._target, args=(theirs, spec), name=f"reranker-worker-{spec.worker_id}", daemon=True
        )
        child.start()
        theirs.close()
        return _ProcessHandle(ours, child)


@dataclass
class _ProcessHandle:
    sock: socket.socket
    process: multiprocessing.process.BaseProcess

    def kill(self) -> None:
        self.process.kill()

    async def ended(self, timeout: float) -> str | None:
        await asyncio.to_thread(self.process.join, timeout)
        code = self.process.exitcode
        if code is None:
            return None
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


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
    handle: WorkerHandle | None = None
    writer: asyncio.StreamWriter | None = None
    in_flight: dict[int, Batch] = field(default_factory=dict)  # in the order sent, which is the order answered
    info: protocol.WorkerReady | None = None
    restarts: int = 0
    seconds_per_token: float = 0.0  # measured compute time per padded token, for hang detection
    busy_since: float = 0.0  # loop time at which it began its oldest batch in flight
    watchdog: asyncio.Timeout | None = None

    @property
    def name(self) -> str:
        return str(self.spec.worker_id)

    @property
    def load(self) -> int:
        return sum(batch.padded_tokens for batch in self.in_flight.values())


class WorkerPool:
    def __init__(
        self,
        specs: list[WorkerSpec],
        metrics: Metrics,
        *,
        batches_in_flight: int,
        batch_timeout_s: float,
        launcher: Launcher | None = None,
    ) -> None:
        self.workers = [Worker(spec, spec.max_batch_tokens) for spec in specs]
        self._metrics = metrics
        self._batches_in_flight = batches_in_flight
        self._batch_timeout = batch_timeout_s
        self._launcher = launcher or ProcessLauncher()
        self._sink: BatchSink  # set by start()
        self._first_load: asyncio.Future[None]  # set by start()
        self._on_change: Callable[[], None] = lambda: None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

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

    def submit(self, worker: WorkerSlot, batch: Batch) -> None:
        assert isinstance(worker, Worker), "a worker this pool gave out"
        if not worker.in_flight:
            worker.busy_since = asyncio.get_running_loop().time()
        worker.in_flight[batch.id] = batch
        assert worker.writer is not None, "a ready worker has a channel"
        worker.writer.write(protocol.frame(protocol.ScoreBatch.from_pairs(batch.id, (i.pair for i in batch.items))))
        self._rearm(worker)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, sink: BatchSink, on_change: Callable[[], None] = lambda: None) -> None:
        """Start every worker; returns at once (`wait_ready` waits for the models).
        Results go to `sink`; `on_change` is called whenever a worker becomes ready or dies."""
        self._sink = sink
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
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            try:
                reason = await self._run_once(worker)
            except Exception as exc:  # a bug here must not leave this worker's batches hanging
                log.exception("worker_supervision_failed", worker_id=worker.spec.worker_id)
                if worker.handle is not None:
                    worker.handle.kill()
                reason = f"supervision failed: {type(exc).__name__}"
            if self._stopping:
                return
            self._worker_died(worker, reason)
            if loop.time() - started > _STABLE_SECONDS:
                attempt = 0
            delay = _RESTART_BACKOFF[min(attempt, len(_RESTART_BACKOFF) - 1)]
            attempt += 1
            log.warning("worker_restarting", worker_id=worker.spec.worker_id, in_seconds=delay, reason=reason)
            await asyncio.sleep(delay)
            worker.restarts += 1
            self._metrics.worker_restarts.labels(worker.name).inc()

    async def _run_once(self, worker: Worker) -> str:
        """Start the worker and serve its channel until it ends; returns why it ended."""
        worker.state = State.STARTING
        worker.handle = self._launcher.launch(worker.spec)
        reader, worker.writer = await asyncio.open_unix_connection(sock=worker.handle.sock)
        try:
            async with asyncio.timeout(None) as worker.watchdog:  # armed while a batch is in flight
                while True:
                    header = await reader.readexactly(protocol.FRAME_HEADER.size)
                    payload = await reader.readexactly(protocol.FRAME_HEADER.unpack(header)[0])
                    problem = self._handle(worker, protocol.decode(payload))
                    if problem:
                        return problem
        except (asyncio.IncompleteReadError, ConnectionError):
            # EOF, or a reset seen first by a write to the dead worker
            return await worker.handle.ended(5) or "closed its channel"
        except TimeoutError:
            worker.handle.kill()
            allowed = self._allowed(worker, next(iter(worker.in_flight.values())))
            return f"held a batch for {allowed:.1f} s without answering (hung); killed"
        finally:
            worker.watchdog = None
            worker.writer.close()

    def _rearm(self, worker: Worker) -> None:
        """Point the worker's watchdog at the time its oldest batch must be answered by."""
        if worker.watchdog is None:
            return
        if not worker.in_flight:
            worker.watchdog.reschedule(None)
            return
        oldest = next(iter(worker.in_flight.values()))
        worker.watchdog.reschedule(worker.busy_since + self._allowed(worker, oldest))

    def _allowed(self, worker: Worker, batch: Batch) -> float:
        """How long `worker` may take over `batch` before it counts as hung."""
        if self._batch_timeout > 0:
            return self._batch_timeout
        return max(_HANG_FLOOR_S, _HANG_FACTOR * worker.seconds_per_token * batch.padded_tokens)

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
        elif isinstance(message, protocol.BatchScores | protocol.BatchFailed):
            batch = worker.in_flight.pop(message.batch_id)
            worker.busy_since = asyncio.get_running_loop().time()
            self._rearm(worker)
            if isinstance(message, protocol.BatchScores):
                self._scored(worker, batch, message)
            else:
                self._sink.failed(batch, self._error_for(worker, message), retry=False)
        return None

    def _scored(self, worker: Worker, batch: Batch, message: protocol.BatchScores) -> None:
        self._metrics.compute_seconds.labels(worker.name).inc(message.compute_seconds)
        self._metrics.head_cache_lookups.labels(worker.name, "hit").inc(message.head_hits)
        self._metrics.head_cache_lookups.labels(worker.name, "miss").inc(message.head_misses)
        if message.token_budget:
            self._lower_budget(worker, message.token_budget)
        measured = message.compute_seconds / max(1, batch.padded_tokens)
        worker.seconds_per_token = 0.7 * worker.seconds_per_token + 0.3 * measured
        if len(message.logits) != len(batch.items):
            error = Internal(f"worker {worker.name} returned {len(message.logits)} scores for {len(batch.items)} rows")
            self._sink.failed(batch, error, retry=False)
        else:
            self._sink.scored(batch, message.logits, message.compute_seconds)

    def _ready(self, worker: Worker, message: protocol.WorkerReady) -> None:
        worker.state, worker.info = State.READY, message
        worker.seconds_per_token = message.seconds_per_token
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
            head_cache_bytes=worker.spec.head_cache_bytes,
        )
        if self.ready_count == len(self.workers) and not self._first_load.done():
            self._first_load.set_result(None)
        self._sink.workers_changed()
        self._on_change()

    def _lower_budget(self, worker: Worker, fitted: int) -> None:
        worker.token_budget = min(worker.token_budget, fitted)
        self._metrics.worker_token_budget.labels(worker.name).set(worker.token_budget)
        log.warning("worker_budget_lowered", worker_id=worker.spec.worker_id, max_batch_tokens=worker.token_budget)

    def _error_for(self, worker: Worker, message: protocol.BatchFailed) -> ServiceError:
        where = f"worker {worker.name} ({worker.spec.device})"
        if message.failure is protocol.Failure.OUT_OF_MEMORY:
            return TooLarge(
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
            self._sink.failed(
                batch, Unavailable(f"worker {worker.name} died while scoring this request, twice; retry"), retry=True
            )
        self._sink.workers_changed()
        self._on_change()

    async def _reap(self, worker: Worker, timeout: float) -> None:
        if worker.handle is None:
            return
        if await worker.handle.ended(timeout) is None:
            log.warning("worker_killed_at_stop", worker_id=worker.spec.worker_id)
            worker.handle.kill()
            await worker.handle.ended(5)
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
    specs: list[WorkerSpec] = []
    for device in devices:
        for _ in range(per_device):
            specs.append(replace(base, worker_id=len(specs), device=device, threads=threads if device == "cpu" else 0))
    return specs
