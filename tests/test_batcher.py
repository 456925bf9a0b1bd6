"""Batch planning (token budget, row limit, length grouping, oldest-first,
priorities), then the Batcher itself with a real WorkerPool of thread workers
(tests.doubles), no transport: retries after a death, deadlines in the queue,
cancellation, out-of-memory splitting, each with its counts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import os
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from service.batcher import Batcher, PendingQueue
from service.errors import DeadlineExceeded, ServiceError, Unavailable
from service.inprocess import ThreadLauncher
from service.metrics import Metrics
from service.pool import WorkerPool
from service.work import BATCH, INTERACTIVE, Job, QueuedPair
from tests.apps import run, until
from tests.doubles import Load
from tests.reference import Recipe
from workers.process import WorkerSpec
from workers.prompt import EncodedPair, PromptEncoder

_seq = itertools.count()


def queue_of(
    lengths: list[int], priority: int = INTERACTIVE, queue: PendingQueue | None = None
) -> tuple[PendingQueue, Job]:
    queue = queue or PendingQueue()
    job = Job([EncodedPair(array("i", [1] * n), False) for n in lengths], priority=priority)
    for index in range(len(lengths)):
        item = QueuedPair(job, index, next(_seq), 0.0, lengths[index])
        job.items.append(item)
        queue.push(item)
    return queue, job


def test_budget_counts_padding():
    queue, _ = queue_of([100, 100, 100, 400])
    batch, full = queue.plan(max_tokens=400, max_rows=64)
    assert [item.length for item in batch] == [100, 100, 100]  # 4 x 100 would fit, but 4 x 400 would not
    assert full  # the 400-token pair waits for the next batch; waiting longer would not help


def test_padding_efficiency_bound_keeps_lengths_apart():
    lengths = [30, 500, 35, 480, 40, 490, 32, 470]  # one request's short and long documents
    queue, _ = queue_of(lengths)
    batch, full = queue.plan(max_tokens=100_000, max_rows=64, min_efficiency=0.9)
    assert sorted(item.length for item in batch) == [30, 32, 35]  # 40 would bring it to 137/160 < 0.9
    assert not full  # refused for padding, not for room: a later pair may fit
    batches = []
    while len(queue):
        batch, _ = queue.plan(max_tokens=100_000, max_rows=64, min_efficiency=0.9)
        for item in batch:
            queue.remove(item)
        batches.append(batch)
    for batch in batches:
        assert sum(item.length for item in batch) >= 0.9 * len(batch) * max(item.length for item in batch)
    assert sum(len(batch) for batch in batches) == len(lengths)
    # the control: with no bound, one batch mostly of padding
    queue, _ = queue_of(lengths)
    batch, _ = queue.plan(max_tokens=100_000, max_rows=64)
    assert len(batch) == len(lengths)


def test_row_limit_and_full_flag():
    queue, _ = queue_of([10] * 10)
    batch, full = queue.plan(max_tokens=10_000, max_rows=4)
    assert len(batch) == 4 and full
    queue2, _ = queue_of([10] * 3)
    batch, full = queue2.plan(max_tokens=10_000, max_rows=4)
    assert len(batch) == 3 and not full  # room left: worth waiting a little for more


def test_groups_similar_lengths_around_the_oldest():
    queue, _ = queue_of([50, 400, 52, 410, 49, 405, 51])
    batch, _ = queue.plan(max_tokens=100_000, max_rows=4)
    assert sorted(item.length for item in batch) == [49, 50, 51, 52]
    assert batch[0].length == 50  # the oldest anchors the batch


def test_oldest_goes_first_even_when_long():
    queue, _ = queue_of([900])
    queue_of([10] * 50, queue=queue)
    batch, full = queue.plan(max_tokens=1000, max_rows=64)
    assert [item.length for item in batch] == [900] and full  # no starvation of long pairs


def test_a_row_longer_than_the_budget_still_goes_alone():
    queue, _ = queue_of([5000, 10])
    batch, full = queue.plan(max_tokens=1000, max_rows=64)
    assert [item.length for item in batch] == [5000] and full


def test_interactive_before_batch():
    queue, _ = queue_of([10, 10], priority=BATCH)
    queue_of([300], priority=INTERACTIVE, queue=queue)
    batch, _ = queue.plan(max_tokens=300, max_rows=64)
    assert [item.job.priority for item in batch] == [INTERACTIVE]


def test_remove_and_counts():
    queue, job = queue_of([10, 20, 30])
    assert len(queue) == 3 and queue.tokens == 60
    queue.remove(job.items[1])
    queue.remove(job.items[1])  # twice is harmless
    assert len(queue) == 2 and queue.tokens == 40
    batch, _ = queue.plan(max_tokens=1000, max_rows=64)
    assert sorted(item.length for item in batch) == [10, 30]


def test_first_puts_a_retried_pair_at_the_front():
    queue, job = queue_of([10, 20])
    retried = job.items[1]
    queue.remove(retried)
    queue.push(retried, first=True)
    assert queue.oldest() is retried


@pytest.mark.parametrize("seed", range(5))
def test_plans_always_respect_the_limits(seed):
    import random

    rng = random.Random(seed)
    queue, _ = queue_of([rng.randint(1, 600) for _ in range(300)])
    taken = 0
    while len(queue):
        batch, _ = queue.plan(max_tokens=2048, max_rows=16)
        width = max(item.length for item in batch)
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * width <= 2048
        for item in batch:
            queue.remove(item)
        taken += len(batch)
    assert taken == 300 and queue.tokens == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 600), st.sampled_from([INTERACTIVE, BATCH])), min_size=1, max_size=60),
    st.integers(1, 2048),
    st.integers(1, 16),
    st.sampled_from([0.0, 0.5, 0.9]),
)
def test_planner_invariants(pairs, max_tokens, max_rows, min_efficiency):
    """Property: draining the queue, every batch holds the oldest waiting pair of
    the most urgent priority, keeps the row limit, the token budget (a pair over
    the budget goes alone) and the padding bound, and every pair is planned once."""
    queue, items = None, []
    for length, priority in pairs:
        queue, job = queue_of([length], priority, queue)  # one job per pair, arriving in order
        items += job.items
    planned = []
    while len(queue):
        waiting = [item for item in items if item.queued]
        oldest = min(waiting, key=lambda item: (item.job.priority, item.seq))
        batch, _ = queue.plan(max_tokens, max_rows, min_efficiency)
        assert batch[0] is oldest
        assert 1 <= len(batch) <= max_rows
        width = max(item.length for item in batch)
        if len(batch) > 1:
            assert len(batch) * width <= max_tokens
            assert sum(item.length for item in batch) >= min_efficiency * len(batch) * width
        for item in batch:
            queue.remove(item)
        planned += batch
    assert sorted(item.seq for item in planned) == sorted(item.seq for item in items)


def test_the_anchors_job_mates_come_first():
    """Pairs of one request share its prompt head, which a worker computes once
    per batch: a small batch takes them before other requests' pairs of closer length."""
    queue, first = queue_of([100, 130, 160, 190])
    queue_of([101, 102, 103, 104], queue=queue)
    batch, _ = queue.plan(max_tokens=800, max_rows=4, min_efficiency=0.5)
    assert [item.job for item in batch] == [first] * 4
    # the control: without job-mates the closest lengths win
    queue, _ = queue_of([100])
    queue_of([101, 102, 103, 104], queue=queue)
    batch, _ = queue.plan(max_tokens=800, max_rows=4, min_efficiency=0.5)
    assert sorted(item.length for item in batch) == [100, 101, 102, 103]


# -- the Batcher with a real pool of thread workers --------------------------------------------


@contextlib.asynccontextmanager
async def scheduler(model, load: Load, workers: int = 1, **batcher):
    """A started Batcher over a WorkerPool of `workers` thread workers (the tiny model) behind `load`."""
    spec = WorkerSpec(0, str(model), "cpu", "fp32", "sdpa", 512, 2048, 1, "json", "warning", os.getpid())
    metrics = Metrics()
    pool = WorkerPool(
        [dataclasses.replace(spec, worker_id=i) for i in range(workers)],
        metrics,
        batches_in_flight=2,
        batch_timeout_s=0.0,
        launcher=ThreadLauncher(load),
    )
    settings = dict(max_batch_size=4, min_padding_efficiency=0.0, max_wait_ms=1.0, max_queue_pairs=1000,
                    max_queue_tokens=1 << 20) | batcher  # fmt: skip
    batches = Batcher(pool, metrics, **settings)
    await pool.start(batches)
    batches.start()
    try:
        await pool.wait_ready()
        yield batches, metrics
    finally:
        for double in load.doubles.values():
            double.release.set()
            double.steps.release(1000)
        await batches.close(Unavailable("the test is over"))
        await pool.stop()


@functools.lru_cache(maxsize=2)
def encoder_of(model) -> PromptEncoder:
    return PromptEncoder(Tokenizer.from_file(str(model / "tokenizer.json")), 512)


def documents(count: int, tag: str) -> list[str]:
    return [f"document {i} of {tag}" for i in range(count)]


def job_of(model, count: int, tag: str) -> Job:
    return Job(encoder_of(model).encode([(tag, document) for document in documents(count, tag)]))


@functools.lru_cache(maxsize=2)
def recipe_of(model) -> Recipe:
    return Recipe(model, max_length=512)


def assert_recipe_scores(model, job: Job, tag: str) -> None:
    """The job's logits are the model card's, each pair's in its place."""
    expected = [logit for _, logit in recipe_of(model).scores(None, tag, documents(len(job.pairs), tag))]
    assert job.logits == pytest.approx(expected, abs=1e-4)


async def finished(job: Job, timeout: float = 60.0) -> ServiceError | None:
    """How `job` ended: None when scored, else its error."""
    over = asyncio.Event()
    job.watch(over.set)
    async with asyncio.timeout(timeout):
        await over.wait()
    return job.failure()


def outcomes(metrics: Metrics) -> dict[str, float]:
    names = ("scored", "discarded", "cancelled", "expired", "failed")
    return {name: metrics.registry.get_sample_value("reranker_pairs_total", {"outcome": name}) or 0.0 for name in names}


def counter(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_a_batch_whose_worker_dies_is_retried_on_the_other(tiny_model):
    async def scenario():
        async with scheduler(tiny_model, Load.misbehaving(0, die_on=frozenset({1})), workers=2) as (batches, metrics):
            job = job_of(tiny_model, 12, "q")
            async with batches.running(job):
                assert await finished(job) is None
            assert job.remaining == 0
            assert_recipe_scores(tiny_model, job, "q")
            assert counter(metrics, "reranker_batch_retries_total") >= 1  # each batch the dead worker held
            assert outcomes(metrics) == {"scored": 12, "discarded": 0, "cancelled": 0, "expired": 0, "failed": 0}

    run(scenario)


def test_a_deadline_that_passes_in_the_queue_ends_the_job_there(tiny_model):
    async def scenario():
        load = Load.misbehaving(0, stepped=True)
        async with scheduler(tiny_model, load) as (batches, metrics):
            first = job_of(tiny_model, 8, "first")  # two batches: the worker's both slots
            late = job_of(tiny_model, 4, "late")
            late.deadline = asyncio.get_running_loop().time() + 0.3
            async with batches.running(first), batches.running(late):
                error = await finished(late)  # its pairs never left the queue
                assert isinstance(error, DeadlineExceeded)
                load.doubles[0].steps.release(2)
                assert await finished(first) is None
            assert_recipe_scores(tiny_model, first, "first")
            assert outcomes(metrics) == {"scored": 8, "discarded": 0, "cancelled": 0, "expired": 4, "failed": 0}

    run(scenario)


def test_leaving_the_block_drops_the_queued_pairs_and_discards_the_rest(tiny_model):
    async def scenario():
        load = Load.misbehaving(0, stepped=True)
        async with scheduler(tiny_model, load) as (batches, metrics):
            job = job_of(tiny_model, 20, "q")  # 5 batches of 4: 2 on the worker, 3 queued
            async with batches.running(job):
                await until(lambda: load.doubles[0].received == 1, "the first batch to reach the worker")
            assert batches.queued_pairs == 0 and outcomes(metrics)["cancelled"] == 12
            load.doubles[0].steps.release(2)
            await until(lambda: outcomes(metrics)["discarded"] == 8, "the two batches on the worker to come back")
            assert outcomes(metrics) == {"scored": 0, "discarded": 8, "cancelled": 12, "expired": 0, "failed": 0}

    run(scenario)


def test_out_of_memory_splits_the_batch_and_lowers_the_budget(tiny_model):
    async def scenario():
        async with scheduler(tiny_model, Load(oom_above=120)) as (batches, metrics):
            job = job_of(tiny_model, 4, "q")
            async with batches.running(job):
                assert await finished(job) is None
            assert_recipe_scores(tiny_model, job, "q")
            budget = metrics.registry.get_sample_value("reranker_worker_token_budget", {"worker": "0"})
            assert budget is not None and budget <= 120
            assert outcomes(metrics)["scored"] == 4

    run(scenario)
