"""Workers that misbehave on purpose, behind the real worker interface.

Each double is a real Scorer (the tiny model) wrapped so that it runs out of
memory, answers late, hangs, or dies; the worker loop, the channel, the pool
and the batcher around it are the production ones. `Load` builds a worker's
scorer for a launcher: service.inprocess.ThreadLauncher in one-process tests,
service.pool.ProcessLauncher (it is picklable) in end-to-end ones.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time

import torch

from workers.process import Loaded, WorkerSpec, load_checkpoint
from workers.protocol import ScoreBatch
from workers.scoring import Scorer


@dataclasses.dataclass
class OutOfMemoryAbove(Scorer):
    """Runs out of memory, as a GPU would, on any forward pass above `limit` padded tokens."""

    limit: int = 0
    refused: list[int] = dataclasses.field(default_factory=list)

    def _forward(self, rows):
        padded = len(rows) * max(len(row.tokens) for row in rows)
        if padded > self.limit:
            self.refused.append(padded)
            raise torch.OutOfMemoryError(f"(test double) {padded} padded tokens > {self.limit}")
        return super()._forward(rows)


def out_of_memory_above(scorer: Scorer, limit: int) -> OutOfMemoryAbove:
    fields = {f.name: getattr(scorer, f.name) for f in dataclasses.fields(Scorer) if f.init}
    return OutOfMemoryAbove(**fields, limit=limit)


class WorkerDied(BaseException):
    """Not an Exception: the worker loop does not catch it, so the worker ends
    mid-batch with its channel closed, as a crashed process would."""


class Misbehaving:
    """A real scorer that first sleeps `delay_s` per batch; hangs (blocks until
    `release` is set) on the batches whose number is in `hang_on`; or dies on
    the batches whose number is in `die_on`. Batches are numbered from 1 in the
    order this worker receives them. `stepped`: every batch waits for a
    `steps.release()`, so that a test decides when each one is answered."""

    def __init__(
        self,
        scorer: Scorer,
        delay_s: float = 0.0,
        hang_on: frozenset[int] = frozenset(),
        die_on: frozenset[int] = frozenset(),
        stepped: bool = False,
    ) -> None:
        self._scorer = scorer
        self._delay_s = delay_s
        self._hang_on = hang_on
        self._die_on = die_on
        self._stepped = stepped
        self.received = 0
        self.release = threading.Event()
        self.steps = threading.Semaphore(0)

    def __getattr__(self, name: str):
        return getattr(self._scorer, name)  # precision, memory_bytes, device, ...

    def score(self, batch: ScoreBatch):
        self.received += 1
        if self.received in self._die_on:
            raise WorkerDied(f"(test double) died on batch {batch.batch_id}")
        if self.received in self._hang_on:
            self.release.wait(600)
        if self._stepped:
            self.steps.acquire(timeout=600)
        if self._delay_s:
            time.sleep(self._delay_s)
        return self._scorer.score(batch)


@functools.lru_cache(maxsize=8)
def _checkpoint(spec: WorkerSpec) -> Loaded:
    """One real scorer per worker spec, loaded once per test process."""
    return load_checkpoint(spec)


@dataclasses.dataclass(frozen=True)
class Load:
    """How a worker gets its scorer: the spec's checkpoint, made to misbehave.
    `delay_s` slows every worker; `per_worker` maps a worker id to its own
    Misbehaving arguments, for its first life only (a restarted worker
    behaves); `oom_above` makes every worker run out of memory above that
    many padded tokens. Picklable, so that worker processes can use it too."""

    delay_s: float = 0.0
    oom_above: int = 0
    per_worker: tuple[tuple[int, tuple[tuple[str, object], ...]], ...] = ()
    doubles: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # worker id -> latest double

    def __call__(self, spec: WorkerSpec) -> Loaded:
        loaded = _checkpoint(dataclasses.replace(spec, parent_pid=0, threads=0))  # threads: torch's, shared
        scorer = loaded.scorer
        if self.oom_above:
            scorer = out_of_memory_above(scorer, self.oom_above)
        first_life = spec.worker_id not in self.doubles
        arguments = dict(dict(self.per_worker).get(spec.worker_id, ())) if first_life else {}
        double = Misbehaving(scorer, delay_s=arguments.pop("delay_s", self.delay_s), **arguments)
        self.doubles[spec.worker_id] = double
        return dataclasses.replace(loaded, scorer=double)

    @classmethod
    def misbehaving(cls, worker_id: int, **arguments) -> Load:
        """Worker `worker_id` misbehaves as told (Misbehaving's arguments); others behave."""
        return cls(per_worker=((worker_id, tuple(arguments.items())),))
