"""The units of work between a call, the batcher and the workers, and the two
narrow interfaces that join the batcher to whatever runs its batches.

A call builds a Job from its encoded pairs (no event loop needed); the batcher
admits it, queues each pair as a QueuedPair, groups them into Batches for the
worker that has room (`Workers`), and hears back through the `BatchSink` it
implements. The worker pool implements `Workers` over processes or, for tests
and benchmarks, threads in this process.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from service.errors import ServiceError
from workers.prompt import EncodedPair

INTERACTIVE, BATCH = 0, 1
_job_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """The scoring work of one request, and where its scores go.

    Built anywhere; `Batcher.running` admits it, and its scores arrive in
    `logits` (request order). `on_scored` hears the indices each batch
    scored, as batches complete; `watch` hears when the job is over.
    """

    pairs: Sequence[EncodedPair]
    priority: int = INTERACTIVE
    deadline: float | None = None  # loop time by which it must be answered
    on_scored: Callable[[list[int]], None] | None = None  # called on the loop, inside the batcher: no awaiting
    id: int = field(default_factory=lambda: next(_job_ids))
    logits: list[float] = field(init=False)
    remaining: int = field(init=False)
    tokens: int = field(init=False)
    admitted_at: float = 0.0  # loop times
    started_at: float = 0.0  # when its latest batch began computing
    compute_seconds: float = 0.0
    items: list[QueuedPair] = field(default_factory=list)
    batches: list[BatchRecord] = field(default_factory=list)  # the batches that held its pairs, for tracing
    _future: asyncio.Future[None] | None = None

    def __post_init__(self) -> None:
        self.logits = [0.0] * len(self.pairs)
        self.remaining = len(self.pairs)
        self.tokens = sum(pair.length for pair in self.pairs)

    def admit(self, now: float) -> None:
        """Called by the batcher, on the loop, when it takes the job."""
        self._future = asyncio.get_running_loop().create_future()
        self.admitted_at = self.started_at = now

    @property
    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def watch(self, on_done: Callable[[], object]) -> None:
        """Call `on_done` once the job is over (scored, failed or cancelled); see `failure`."""
        assert self._future is not None, "the job was not admitted"

        def over(future: asyncio.Future[None]) -> None:
            if not future.cancelled():
                future.exception()  # read here, so that a failure nobody asks about is not logged as lost
            on_done()

        self._future.add_done_callback(over)

    def failure(self) -> ServiceError | None:
        """The error the job failed with, once it has."""
        if self._future is None or not self._future.done() or self._future.cancelled():
            return None
        return cast(ServiceError | None, self._future.exception())

    def scored(self, indices: list[int]) -> None:
        if self.on_scored is not None and indices:
            self.on_scored(indices)
        if self.remaining == 0:
            self.finish()

    def finish(self, error: ServiceError | None = None, cancel: bool = False) -> None:
        """Resolve the job: scored, failed with `error`, or (`cancel`) cancelled,
        which nobody awaits any more and so must not carry an exception."""
        if self._future is None or self._future.done():
            return
        if cancel:
            self._future.cancel()
        elif error is None:
            self._future.set_result(None)
        else:
            self._future.set_exception(error)


@dataclass(eq=False, slots=True)
class QueuedPair:
    """One pair of a job, as the queue tracks it."""

    job: Job
    index: int  # in job.pairs
    seq: int  # arrival order
    enqueued_at: float
    length: int  # the pair's tokens, kept here: the planner reads it for every candidate
    queued: bool = False
    retried: bool = False

    @property
    def pair(self) -> EncodedPair:
        return self.job.pairs[self.index]


@dataclass(eq=False)
class Batch:
    """A batch on its way to, or on, a worker."""

    id: int
    items: list[QueuedPair]
    padded_tokens: int
    sent_at: float
    worker: str


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One batch as one job saw it (loop times)."""

    batch_id: int
    worker: str
    rows: int
    rows_of_job: int
    padded_tokens: int
    sent_at: float
    done_at: float
    compute_seconds: float


class WorkerSlot(Protocol):
    """A worker as the batcher sees it: a name, and how many padded tokens a batch may hold."""

    @property
    def name(self) -> str: ...

    @property
    def token_budget(self) -> int: ...


class Workers(Protocol):
    """What the batcher needs of whatever runs its batches."""

    @property
    def ready_count(self) -> int: ...

    @property
    def alive_count(self) -> int: ...

    def least_loaded(self) -> WorkerSlot | None:
        """A ready worker with room for another batch, or None."""

    def submit(self, worker: WorkerSlot, batch: Batch) -> None:
        """Start `batch` on `worker`; its outcome comes back through the BatchSink."""


class BatchSink(Protocol):
    """Where the workers report; the batcher implements it."""

    def scored(self, batch: Batch, logits: Sequence[float], compute_seconds: float) -> None: ...

    def failed(self, batch: Batch, error: ServiceError, retry: bool) -> None:
        """`retry`: the worker died with the batch, so each pair may try once more elsewhere."""

    def workers_changed(self) -> None:
        """A worker became ready, or died."""
