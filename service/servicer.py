"""The Reranker RPCs: validate, tokenize off the event loop, hand the pairs to
the batcher, and turn scores into rankings.

One path for every call: `_prepare` (limits, then tokens) -> `_run` (a Job in
the batcher, awaited) -> a response built from the job's logits. Errors are
raised as service.errors exceptions; the interceptor maps them to statuses.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf.duration_pb2 import Duration

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from service.batcher import BATCH, INTERACTIVE, Batcher, Job
from service.errors import InvalidArgument, ServiceError
from service.settings import Settings
from service.tracing import Tracing
from workers.prompt import EncodedPair, PromptEncoder, PromptTooLong

log = structlog.get_logger("rpc")


@dataclass
class Prepared:
    """A request's pairs as token ids, with the clock readings its Timing needs."""

    encoded: list[EncodedPair]
    arrived: float
    tokenize_seconds: float


class RerankerServicer(reranker_pb2_grpc.RerankerServicer):
    def __init__(
        self,
        settings: Settings,
        encoder: PromptEncoder,
        batcher: Batcher,
        tokenizers: ThreadPoolExecutor,
        tracing: Tracing | None = None,
    ) -> None:
        self._settings = settings
        self._tracing = tracing
        self._encoder = encoder
        self._batcher = batcher
        self._tokenizers = tokenizers
        self.model_info = pb.ModelInfo()  # filled in by the server once the workers are ready

    # -- RPCs ------------------------------------------------------------------------------

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        return await self._rerank(request, _deadline(request, context), "Rerank")

    async def RerankStream(
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RerankStreamResponse]:
        prepared = await self._prepare(_rerank_pairs(request), request)
        job = self._submit(request, prepared, _deadline(request, context), stream=True)
        error = None
        try:
            while not (job.done and job.progress.empty()):
                indices = await job.progress.get()
                if indices:
                    yield pb.RerankStreamResponse(
                        scored=pb.ScoredDocuments(results=[self._result(job, prepared, i) for i in indices])
                    )
            job.future.result()  # raises how the job failed
            yield pb.RerankStreamResponse(final=self._ranking(request, prepared, job))
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._batcher.cancel(job)
            self._trace("RerankStream", request, prepared, job, error)

    async def RerankMany(
        self, request_iterator: AsyncIterator[pb.RerankRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RerankResponse]:
        answers: asyncio.Queue[pb.RerankResponse | None] = asyncio.Queue()
        running: dict[str, asyncio.Task] = {}
        room = asyncio.Semaphore(self._settings.max_requests_per_stream)

        async def answer(request: pb.RerankRequest) -> None:
            try:
                response = await self._rerank(request, _deadline(request, None), "RerankMany.request")
                log.info("rerank_many_request", code="OK")
            except ServiceError as exc:
                response = _failed(request, exc.code, exc.message)
            except Exception:
                log.exception("rerank_many_request_crashed", request_id=request.request_id)
                response = _failed(request, grpc.StatusCode.INTERNAL, "internal error; see the server log")
            answers.put_nowait(response)

        def finished(task: asyncio.Task, request: pb.RerankRequest) -> None:
            # A done-callback, not a `finally`: a task cancelled before it ever ran has no finally.
            running.pop(request.request_id, None)
            room.release()
            if task.cancelled():
                answers.put_nowait(_failed(request, grpc.StatusCode.CANCELLED, "cancelled by the client"))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    if request.cancel:
                        task = running.get(request.request_id)
                        if task is not None:
                            task.cancel()
                        continue
                    if request.request_id in running:
                        answers.put_nowait(
                            _failed(
                                request,
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id {request.request_id!r} is already in flight on this stream",
                            )
                        )
                        continue
                    await (
                        room.acquire()
                    )  # at most max_requests_per_stream at once: stop reading, and flow control pushes back
                    task = asyncio.create_task(answer(request))
                    running[request.request_id] = task
                    task.add_done_callback(lambda task, request=request: finished(task, request))
                await asyncio.gather(*running.values(), return_exceptions=True)
            finally:
                answers.put_nowait(None)  # also when the request stream broke: never leave the writer waiting

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader  # raises what broke the request stream, if anything did
        finally:
            reader.cancel()
            for task in list(running.values()):
                task.cancel()

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        if not request.pairs:
            raise InvalidArgument("pairs is empty: give at least one (query, document) pair")
        for position, pair in enumerate(request.pairs):
            if not pair.query.strip():
                raise InvalidArgument(f"pairs[{position}].query is empty")
        prepared = await self._prepare([(pair.query, pair.document) for pair in request.pairs], request)
        job = await self._run(request, prepared, _deadline(request, context), "Score")
        return pb.ScoreResponse(
            request_id=request.request_id,
            results=[self._result(job, prepared, i) for i in range(len(prepared.encoded))],
            usage=_usage(prepared),
            timing=_timing(prepared, job),
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self.model_info

    # -- the one path ---------------------------------------------------------------------

    async def _rerank(self, request: pb.RerankRequest, deadline: float | None, span: str) -> pb.RerankResponse:
        prepared = await self._prepare(_rerank_pairs(request), request)
        job = await self._run(request, prepared, deadline, span)
        return self._ranking(request, prepared, job)

    async def _prepare(self, pairs: list[tuple[str, str]], request) -> Prepared:
        """Check the limits, then tokenize in the thread pool."""
        arrived = time.perf_counter()
        s = self._settings
        count = len(pairs)
        if not count:
            raise InvalidArgument("no documents: give at least one")
        if count > s.max_documents_per_request:
            raise InvalidArgument(
                f"{count} documents is more than max_documents_per_request={s.max_documents_per_request}"
            )
        if len(request.instruction) > s.max_query_chars:
            raise InvalidArgument(
                f"instruction has {len(request.instruction)} characters, more than max_query_chars={s.max_query_chars}"
            )
        for position, (query, document) in enumerate(pairs):
            if len(query) > s.max_query_chars:
                raise InvalidArgument(
                    f"query has {len(query)} characters, more than max_query_chars={s.max_query_chars}"
                )
            if len(document) > s.max_document_chars:
                raise InvalidArgument(
                    f"document {position} has {len(document)} characters, more than max_document_chars={s.max_document_chars}"
                )
        structlog.contextvars.bind_contextvars(request_id=request.request_id, documents=count)
        truncate = request.truncation != pb.TRUNCATION_NONE
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._tokenizers, self._encoder.encode, pairs, request.instruction, truncate
            )
        except PromptTooLong as exc:
            raise InvalidArgument(str(exc)) from None
        return Prepared(encoded, arrived, time.perf_counter() - arrived)

    def _submit(self, request, prepared: Prepared, deadline: float | None, stream: bool = False) -> Job:
        job = Job(
            rows=[pair.ids for pair in prepared.encoded],
            shared=[pair.shared for pair in prepared.encoded],
            priority=BATCH if request.priority == pb.PRIORITY_BATCH else INTERACTIVE,
            deadline=deadline,
            stream=stream,
        )
        self._batcher.submit(job)
        return job

    async def _run(self, request, prepared: Prepared, deadline: float | None, span: str) -> Job:
        job = self._submit(request, prepared, deadline)
        error = None
        try:
            # Shielded: if this call is cancelled, the job must stay unresolved until
            # `cancel` has taken its pairs out of the queue.
            await asyncio.shield(job.future)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._batcher.cancel(job)  # a no-op once done; drops its queued pairs if we were cancelled
            self._trace(span, request, prepared, job, error)
        structlog.contextvars.bind_contextvars(
            tokens=job.tokens,
            truncated=sum(pair.truncated for pair in prepared.encoded),
            queue_ms=round(1000 * (job.started_at - job.admitted_at), 2),
            compute_ms=round(1000 * job.compute_seconds, 2),
        )
        return job

    def _trace(self, span: str, request, prepared: Prepared, job: Job, error: BaseException | None) -> None:
        if self._tracing is not None:
            self._tracing.record(span, request.request_id, prepared.arrived, prepared.tokenize_seconds, job, error)

    # -- responses --------------------------------------------------------------------------

    def _ranking(self, request: pb.RerankRequest, prepared: Prepared, job: Job) -> pb.RerankResponse:
        order = sorted(range(len(job.logits)), key=lambda i: -job.logits[i])  # stable: ties keep request order
        if request.top_n:
            order = order[: request.top_n]
        results = [self._result(job, prepared, i) for i in order]
        if request.return_documents:
            for result in results:
                result.document = request.documents[result.index]
        return pb.RerankResponse(
            request_id=request.request_id, results=results, usage=_usage(prepared), timing=_timing(prepared, job)
        )

    @staticmethod
    def _result(job: Job, prepared: Prepared, index: int) -> pb.ScoredDocument:
        logit = job.logits[index]
        pair = prepared.encoded[index]
        return pb.ScoredDocument(
            index=index, score=sigmoid(logit), logit=logit, truncated=pair.truncated, tokens=pair.length
        )


def _rerank_pairs(request: pb.RerankRequest) -> list[tuple[str, str]]:
    """A Rerank request's own checks, then its (query, document) pairs."""
    if request.cancel:
        raise InvalidArgument("cancel is only meaningful on RerankMany")
    if request.top_n < 0:
        raise InvalidArgument(f"top_n must be >= 0 (0 returns every document), got {request.top_n}")
    if not request.query.strip():
        raise InvalidArgument("query is empty")
    return [(request.query, document) for document in request.documents]


def sigmoid(x: float) -> float:
    """The recipe's softmax over (no, yes), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _deadline(request, context: grpc.aio.ServicerContext | None) -> float | None:
    """The earlier of the call's deadline and the request's own timeout, in loop time."""
    limits = []
    if context is not None and context.time_remaining() is not None:
        limits.append(context.time_remaining())
    if getattr(request, "timeout", None) is not None and request.HasField("timeout"):
        limits.append(request.timeout.ToTimedelta().total_seconds())
    return asyncio.get_running_loop().time() + min(limits) if limits else None


def _failed(request: pb.RerankRequest, code: grpc.StatusCode, message: str) -> pb.RerankResponse:
    log.info("rerank_many_request_failed", request_id=request.request_id, code=code.name)
    return pb.RerankResponse(request_id=request.request_id, error=pb.RequestError(code=code.value[0], message=message))


def _usage(prepared: Prepared) -> pb.Usage:
    return pb.Usage(
        documents=len(prepared.encoded),
        tokens=sum(pair.length for pair in prepared.encoded),
        truncated_documents=sum(pair.truncated for pair in prepared.encoded),
    )


def _timing(prepared: Prepared, job: Job) -> pb.Timing:
    def seconds(value: float) -> Duration:
        duration = Duration()
        duration.FromNanoseconds(int(max(0.0, value) * 1e9))
        return duration

    return pb.Timing(
        tokenize=seconds(prepared.tokenize_seconds),
        queue=seconds(job.started_at - job.admitted_at),
        compute=seconds(job.compute_seconds),
        total=seconds(time.perf_counter() - prepared.arrived),
    )
