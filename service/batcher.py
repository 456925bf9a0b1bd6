"""The asyncio dynamic batcher: every batching decision is made here.

Requests arrive as Jobs (their pairs already tokenized). The batcher keeps
their pairs in one PendingQueue and, whenever a worker has room, plans a batch
for it: the oldest waiting pair (interactive work first) plus the pairs of
closest length, as many as fit the worker's token budget (rows x longest row,
since rows are padded) and the row limit. A batch that is not full waits at
most `max_wait_ms` for more work. Results come back through `scored` /
`failed` (called by the pool) and are routed to their jobs.

Everything here runs on the event loop thread; nothing blocks.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence

from service.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from service.metrics import Metrics
from service.work import Batch, BatchRecord, Job, QueuedPair, Workers, WorkerSlot


class PendingQueue:
    """Waiting pairs, by length (to group similar lengths), by length within each
    job (whose pairs share a prompt head), and by arrival per priority (so that
    the oldest interactive pair anchors the next batch)."""

    def __init__(self) -> None:
        self._by_length: list[tuple[int, int]] = []
        self._by_job: dict[int, list[tuple[int, int]]] = {}
        self._items: dict[int, QueuedPair] = {}
        self._arrivals: tuple[OrderedDict[int, None], ...] = (OrderedDict(), OrderedDict())
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: QueuedPair, first: bool = False) -> None:
        bisect.insort(self._by_length, (item.length, item.seq))
        bisect.insort(self._by_job.setdefault(item.job.id, []), (item.length, item.seq))
        self._items[item.seq] = item
        arrivals = self._arrivals[item.job.priority]
        arrivals[item.seq] = None
        if first:
            arrivals.move_to_end(item.seq, last=False)
        item.queued = True
        self.tokens += item.length

    def remove(self, item: QueuedPair) -> None:
        if not item.queued:
            return
        key = (item.length, item.seq)
        del self._by_length[bisect.bisect_left(self._by_length, key)]
        mates = self._by_job[item.job.id]
        del mates[bisect.bisect_left(mates, key)]
        if not mates:
            del self._by_job[item.job.id]
        del self._items[item.seq]
        del self._arrivals[item.job.priority][item.seq]
        item.queued = False
        self.tokens -= item.length

    def oldest(self) -> QueuedPair | None:
        for arrivals in self._arrivals:
            if arrivals:
                return self._items[next(iter(arrivals))]
        return None

    def plan(self, max_tokens: int, max_rows: int, min_efficiency: float = 0.0) -> tuple[list[QueuedPair], bool]:
        """The next batch: the oldest pair, then the closest lengths that fit,
        its own job's pairs first.

        A pair fits when the batch stays within `max_tokens` padded tokens (rows
        x longest row) and `max_rows`, and its real tokens stay at least
        `min_efficiency` of the padded ones: a token budget alone would let one
        request's 30- and 500-token documents share a batch, mostly padding.
        The anchor's job-mates come first because they share its prompt head,
        which a worker computes once per batch: on the CPU's small batches,
        mixing four requests' pairs by length left almost nothing to share.
        The second value says whether the batch is full: at the row limit, or a
        waiting pair did not fit the budget (waiting longer would not help; a
        pair refused for padding may yet find company). Nothing is taken from
        the queue; `remove` does that.
        """
        anchor = self.oldest()
        if anchor is None:
            return [], False
        batch = _Planned(anchor, max_tokens, max_rows, min_efficiency)
        batch.fill(self._by_job[anchor.job.id], self._items)
        batch.fill(self._by_length, self._items)
        return batch.chosen, batch.full or len(batch.chosen) >= max_rows


class _Planned:
    """A batch being planned around its anchor (see PendingQueue.plan)."""

    def __init__(self, anchor: QueuedPair, max_tokens: int, max_rows: int, min_efficiency: float) -> None:
        self.anchor = anchor
        self.chosen = [anchor]
        self.full = False  # a pair did not fit the budget
        self._taken = {anchor.seq}
        self._width = self._real = anchor.length
        self._max_tokens, self._max_rows, self._min_efficiency = max_tokens, max_rows, min_efficiency

    def fill(self, by_length: list[tuple[int, int]], items: dict[int, QueuedPair]) -> None:
        """Add pairs of `by_length` (sorted (length, seq)), closest to the anchor's
        length first, while they fit."""
        length = self.anchor.length
        at = bisect.bisect_left(by_length, (length, self.anchor.seq))
        left, right = at - 1, at  # the next candidates; -1 or len() once a side is closed
        while len(self.chosen) < self._max_rows:
            has_left, has_right = left >= 0, right < len(by_length)
            if not (has_left or has_right):
                return
            take_left = has_left and (not has_right or length - by_length[left][0] <= by_length[right][0] - length)
            candidate, seq = by_length[left if take_left else right]
            if take_left:
                left -= 1
            else:
                right += 1
            if seq in self._taken:
                continue
            padded = (len(self.chosen) + 1) * max(self._width, candidate)
            if padded > self._max_tokens or self._real + candidate < self._min_efficiency * padded:
                # Farther pairs on this side would do no better: close it.
                self.full = self.full or padded > self._max_tokens
                left, right = (-1, right) if take_left else (left, len(by_length))
                continue
            self.chosen.append(items[seq])
            self._taken.add(seq)
            self._width, self._real = max(self._width, candidate), self._real + candidate


class Batcher:
    """Admits jobs, plans batches, and routes results (it is the workers' BatchSink)."""

    def __init__(
        self,
        workers: Workers,
        metrics: Metrics,
        *,
        max_batch_size: int,
        min_padding_efficiency: float,
        max_wait_ms: float,
        max_queue_pairs: int,
        max_queue_tokens: int,
    ) -> None:
        self._workers = workers
        self._metrics = metrics
        self._max_rows = max_batch_size
        self._min_efficiency = min_padding_efficiency
        self._max_wait = max_wait_ms / 1000
        self._max_queue_pairs = max_queue_pairs
        self._max_queue_tokens = max_queue_tokens
        self._queue = PendingQueue()
        self._seq = itertools.count()
        self._batch_ids = itertools.count(1)
        self._deadlines: list[tuple[float, int, Job]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False  # no new jobs
        self._stopped = False  # no more batches either
        self._batch_seconds = 0.0  # running mean of batch compute time, for "can it still finish?"
        self.jobs: dict[int, Job] = {}

    # -- requests ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self, job: Job) -> AsyncIterator[Job]:
        """Admit `job` (or refuse it at once) for the block's duration. However the
        block ends (done, failed, cancelled), the job's pairs still queued then
        are dropped; a finished job is left as it is."""
        self.submit(job)
        try:
            yield job
        finally:
            self.cancel(job)

    def submit(self, job: Job) -> None:
        """Admit a job or refuse it at once; it resolves when it is done. Prefer
        `running`, which also drops the job's work when its caller goes away."""
        self.check_open()
        if not self._workers.ready_count:
            raise Unavailable("no worker is ready (the model is loading or a worker is restarting); retry shortly")
        if job.tokens > self._max_queue_tokens:
            raise InvalidArgument(
                f"the request has {job.tokens} tokens, more than the whole queue holds "
                f"(max_queue_tokens={self._max_queue_tokens})"
            )
        if len(job.pairs) > self._max_queue_pairs:
            raise InvalidArgument(
                f"the request has {len(job.pairs)} pairs to score, more than the whole queue holds "
                f"(max_queue_pairs={self._max_queue_pairs})"
            )
        if len(self._queue) + len(job.pairs) > self._max_queue_pairs:
            self._metrics.rejected.labels("queue_pairs").inc()
            raise ResourceExhausted(
                f"queue full: {len(self._queue)} pairs waiting + {len(job.pairs)} in this request "
                f"> max_queue_pairs={self._max_queue_pairs}; retry later"
            )
        if self._queue.tokens + job.tokens > self._max_queue_tokens:
            self._metrics.rejected.labels("queue_tokens").inc()
            raise ResourceExhausted(
                f"queue full: {self._queue.tokens} tokens waiting + {job.tokens} in this request "
                f"> max_queue_tokens={self._max_queue_tokens}; retry later"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        if job.deadline is not None:
            if job.deadline <= now:
                raise DeadlineExceeded("the deadline passed before the request was queued")
            heapq.heappush(self._deadlines, (job.deadline, job.id, job))
        job.admit(now)
        self.jobs[job.id] = job
        self._metrics.pairs_admitted.inc(len(job.pairs))
        job.watch(lambda: self.jobs.pop(job.id, None))
        for index, pair in enumerate(job.pairs):
            item = QueuedPair(job, index, next(self._seq), now, pair.length)
            job.items.append(item)
            self._queue.push(item)
        self._queue_changed()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job's queued pairs at once; pairs already
        on a worker finish and are discarded. A no-op for a finished job."""
        self._end(job, None, "cancelled")

    def _end(self, job: Job, error: ServiceError | None, outcome: str) -> None:
        """Finish a job with `error` (None: cancelled), counting its still-queued
        pairs under `outcome`."""
        if job.done:
            return
        dropped = [item for item in job.items if item.queued]
        for item in dropped:
            self._queue.remove(item)
        self._metrics.pairs.labels(outcome).inc(len(dropped))
        job.finish(error, cancel=error is None)
        self._queue_changed()

    # -- the loop ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self, error: ServiceError) -> None:
        """Refuse new work, stop dispatching, and end every open job with `error`."""
        # A flag rather than Task.cancel(): on Python 3.11, asyncio.wait_for can
        # swallow a cancellation that races with its inner wait, which left
        # this loop (and so shutdown) waiting forever.
        self._closed = self._stopped = True
        self._wakeup.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)  # a crashed loop must not stop shutdown
        for job in list(self.jobs.values()):
            self._end(job, error, "failed")

    def check_open(self) -> None:
        """Refuse a new call once shutdown has begun, even one the score cache could answer."""
        if self._closed:
            raise Unavailable("the server is shutting down; retry on another replica")

    def refuse_new_work(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        """New jobs are refused (the server is shutting down)."""
        return self._closed

    async def _run(self) -> None:
        while not self._stopped:
            self._wakeup.clear()
            self._drop_hopeless()
            delay = self._dispatch()
            if delay is None:
                await self._wakeup.wait()
            elif delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass

    def _dispatch(self) -> float | None:
        """Send every batch that is ready; return how long until one may be."""
        loop = asyncio.get_running_loop()
        while len(self._queue):
            worker = self._workers.least_loaded()
            if worker is None:
                break
            items, full = self._queue.plan(worker.token_budget, self._max_rows, self._min_efficiency)
            waited = loop.time() - items[0].enqueued_at
            if not full and waited < self._max_wait:
                return self._next_deadline_in(self._max_wait - waited)
            self._send(worker, items)
        return self._next_deadline_in(None)

    def _send(self, worker: WorkerSlot, items: list[QueuedPair]) -> None:
        for item in items:
            self._queue.remove(item)
        width = max(item.length for item in items)
        batch = Batch(next(self._batch_ids), items, len(items) * width, asyncio.get_running_loop().time(), worker.name)
        m = self._metrics
        m.batches.labels(worker.name).inc()
        m.batch_size.observe(len(items))
        m.batch_tokens.observe(batch.padded_tokens)
        m.padded_tokens.inc(batch.padded_tokens)
        self._queue_changed()
        self._workers.submit(worker, batch)

    # -- deadlines -------------------------------------------------------------------

    def _drop_hopeless(self) -> None:
        """End jobs whose deadline has passed, and queued jobs whose deadline is
        closer than one batch takes: they could not finish in time."""
        now = asyncio.get_running_loop().time()
        while self._deadlines:
            deadline, _, job = self._deadlines[0]
            if not job.done and self._expiry(job, deadline) > now:
                return
            heapq.heappop(self._deadlines)
            self._end(
                job,
                DeadlineExceeded(
                    "the deadline passed before the request was answered"
                    if deadline <= now
                    else f"the deadline is {1000 * (deadline - now):.0f} ms away and a batch takes about "
                    f"{1000 * self._batch_seconds:.0f} ms: it cannot finish in time"
                ),
                "expired",
            )

    def _expiry(self, job: Job, deadline: float) -> float:
        waiting = any(item.queued for item in job.items)
        return deadline - self._batch_seconds if waiting else deadline

    def _next_deadline_in(self, delay: float | None) -> float | None:
        if not self._deadlines:
            return delay
        deadline, _, job = self._deadlines[0]
        until = self._expiry(job, deadline) - asyncio.get_running_loop().time()
        return until if delay is None else min(delay, until)

    # -- results (called by the pool) ------------------------------------------------

    def scored(self, batch: Batch, logits: Sequence[float], compute_seconds: float) -> None:
        now = asyncio.get_running_loop().time()
        self._batch_seconds = (
            compute_seconds if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * compute_seconds
        )
        progress: dict[Job, list[int]] = {}
        discarded = 0
        for item, logit in zip(batch.items, logits, strict=True):
            job = item.job
            if job.done:
                discarded += 1
                continue
            job.logits[item.index] = logit
            job.remaining -= 1
            progress.setdefault(job, []).append(item.index)
        for job, indices in progress.items():
            job.batches.append(
                BatchRecord(
                    batch.id,
                    batch.worker,
                    len(batch.items),
                    len(indices),
                    batch.padded_tokens,
                    batch.sent_at,
                    now,
                    compute_seconds,
                )
            )
            job.compute_seconds += compute_seconds
            job.started_at = max(job.started_at, now - compute_seconds)
            job.scored(indices)
        scored = len(batch.items) - discarded
        self._metrics.pairs.labels("scored").inc(scored)
        self._metrics.pairs.labels("discarded").inc(discarded)
        self._metrics.tokens_scored.inc(sum(item.length for item in batch.items))
        self._wakeup.set()

    def failed(self, batch: Batch, error: ServiceError, retry: bool) -> None:
        """A batch came back failed. With `retry` (its worker died) each pair gets one
        more try on another worker; otherwise, or on a second failure, its job fails."""
        if retry:
            self._metrics.batch_retries.inc()
        for item in reversed(batch.items):
            job = item.job
            if retry and not item.retried and not job.done:
                item.retried = True
                item.enqueued_at = 0.0  # overdue: dispatched as soon as a worker is free
                self._queue.push(item, first=True)
            else:
                self._metrics.pairs.labels("failed").inc()
                self._end(job, error, "failed")
        self._queue_changed()

    def workers_changed(self) -> None:
        """With no worker left alive, nothing waiting can be served: fail it now."""
        if not self._workers.alive_count:
            for job in list(self.jobs.values()):
                self._end(
                    job, Unavailable("every worker has died; the pool is restarting them, retry shortly"), "failed"
                )
        self._wakeup.set()

    def _queue_changed(self) -> None:
        self._metrics.queue_pairs.set(len(self._queue))
        self._metrics.queue_tokens.set(self._queue.tokens)
        self._wakeup.set()

    @property
    def queued_pairs(self) -> int:
        return len(self._queue)
