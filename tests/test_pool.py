"""The worker pool and the batcher's handling of what workers report, in one
process (thread workers, tests.doubles): a model that cannot load, a worker
that answers with the wrong number of scores, a pair whose worker dies twice,
the budget a worker lowers, and the state the pool reports."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker.v1 import reranker_pb2 as pb
from service.app import build
from service.inprocess import ThreadLauncher
from service.pool import WorkerLoadError
from service.settings import Settings
from tests.apps import metric, outcome, rerank_request, run, running, settled, stub, until
from tests.doubles import Load, Misbehaving


def test_a_model_that_cannot_load_fails_the_start(tiny_model):
    def broken(spec):
        raise OSError("(test double) the weights are unreadable")

    async def scenario():
        settings = Settings(model=str(tiny_model), host="127.0.0.1", port=0, http_port=0, metrics_port=0, device="cpu")
        app = build(settings, ThreadLauncher(broken))
        await app.start()
        try:
            with pytest.raises(WorkerLoadError, match="worker 0 \\(cpu\\) could not load the model: OSError: \\(test"):
                await app.ready()
        finally:
            force = asyncio.Event()
            force.set()
            await app.shutdown(force)

    run(scenario)


class FewerScores(Misbehaving):
    """Answers every batch with one score too few."""

    def score(self, batch):
        logits, budget = super().score(batch)
        return logits[:-1], budget


@dataclasses.dataclass(frozen=True)
class LoadFewer(Load):
    def __call__(self, spec):
        loaded = super().__call__(spec)
        return dataclasses.replace(loaded, scorer=FewerScores(loaded.scorer))


def test_a_wrong_number_of_scores_fails_that_call_only(tiny_model):
    async def scenario():
        async with running(tiny_model, LoadFewer(), workers_per_device=1) as app:
            channel, reranker = stub(app)
            async with channel:
                error = await outcome(reranker.Rerank(rerank_request(3), timeout=30))
                assert error.code() == grpc.StatusCode.INTERNAL
                assert "returned 2 scores for 3 rows" in error.details()
                await until_settled(app)
            assert metric(app, "reranker_pairs_total", outcome="failed") == 3
            assert metric(app, "reranker_worker_ready") == 1  # the worker is not blamed for more

    run(scenario)


async def until_settled(app) -> None:
    await until(lambda: settled(app), "every pair accounted for")


def test_a_pair_whose_worker_dies_twice_fails_with_unavailable(tiny_model):
    async def scenario():
        load = Load(per_worker=tuple((worker, (("die_on", frozenset({1})),)) for worker in (0, 1)))
        async with running(tiny_model, load, workers_per_device=2) as app:
            channel, reranker = stub(app)
            async with channel:
                error = await outcome(reranker.Rerank(rerank_request(2), timeout=60))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "died while scoring this request, twice" in error.details()
                await until_settled(app)
                assert metric(app, "reranker_batch_retries_total") == 2
                # both restarted and behave: the next call is served
                await _until_ready(app, 2)
                served = await reranker.Rerank(rerank_request(2, "after"), timeout=60)
                assert len(served.results) == 2

    run(scenario)


async def _until_ready(app, workers: int) -> None:
    await until(lambda: metric(app, "reranker_worker_ready") == workers, f"{workers} workers ready", timeout=60)


def test_every_worker_dead_fails_what_waits(tiny_model):
    async def scenario():
        load = Load(delay_s=0.2, per_worker=((0, (("die_on", frozenset({1})),)),))
        async with running(tiny_model, load, workers_per_device=1, max_batch_size=2) as app:
            channel, reranker = stub(app)
            async with channel:
                # health, as a load balancer watches it: SERVING, NOT_SERVING while no worker is alive, SERVING
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
                seen = [(await watch.read()).status]
                error = await outcome(reranker.Rerank(rerank_request(6), timeout=60))
                # the only worker died: the retry has nowhere to go until it is back
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                await until_settled(app)
                await _until_ready(app, 1)
                while seen[-1] != health_pb2.HealthCheckResponse.SERVING or len(seen) < 3:
                    seen.append((await watch.read()).status)
                watch.cancel()
                serving, not_serving = (
                    health_pb2.HealthCheckResponse.SERVING,
                    health_pb2.HealthCheckResponse.NOT_SERVING,
                )
                assert seen == [serving, not_serving, serving]
                assert len((await reranker.Rerank(rerank_request(2, "after"), timeout=60)).results) == 2

    run(scenario)


def test_batch_work_waits_while_interactive_work_is_queued(tiny_model):

    async def scenario():
        async with running(
            tiny_model, Load(delay_s=0.3), workers_per_device=1, max_batch_tokens=8192, max_batch_size=4
        ) as app:
            channel, reranker = stub(app)
            async with channel:
                offline = asyncio.ensure_future(
                    reranker.Rerank(rerank_request(12, "offline", priority=pb.PRIORITY_BATCH), timeout=60)
                )
                await until(lambda: metric(app, "reranker_queue_pairs") > 0, "batch work queued")
                interactive = await reranker.Rerank(rerank_request(4, "now"), timeout=60)
                assert not offline.done()  # interactive work went first
                assert len(interactive.results) == 4 and len((await offline).results) == 12
            histogram = metric(app, "reranker_batch_size_count")
            assert histogram >= 4 and metric(app, "reranker_batch_size_sum") == 16

    run(scenario)
