"""Batch planning: token budget, row limit, length grouping, oldest-first, priorities."""

from __future__ import annotations

import itertools
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.batcher import PendingQueue
from service.work import BATCH, INTERACTIVE, Job, QueuedPair
from workers.prompt import EncodedPair

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
