"""The Reranker RPCs: a thin gRPC transport over the core (service.ranking).

Each RPC turns its message into a call (range-checking every field the core
does not know about: enums, durations, the RerankMany-only `cancel`), awaits
the Ranker, and turns the Answer back into a message. Errors are raised as
service.errors exceptions; the interceptor maps them to statuses.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence

import grpc
import structlog
from google.protobuf.duration_pb2 import Duration

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from service.calls import Answer, CallOptions, ModelInfo, RerankCall, ScoreCall, Scored, Timing, Truncation
from service.errors import DeadlineExceeded, InvalidArgument, ServiceError
from service.interceptors import status_of
from service.ranking import Ranker, check_request_id
from service.work import BATCH, INTERACTIVE

log = structlog.get_logger("rpc")

_PRIORITIES = {pb.PRIORITY_UNSPECIFIED: INTERACTIVE, pb.PRIORITY_INTERACTIVE: INTERACTIVE, pb.PRIORITY_BATCH: BATCH}
_TRUNCATIONS = {
    pb.TRUNCATION_UNSPECIFIED: Truncation.END,
    pb.TRUNCATION_END: Truncation.END,
    pb.TRUNCATION_NONE: Truncation.NONE,
    pb.TRUNCATION_CHUNK: Truncation.CHUNK,
}
# google.protobuf.Duration's own range (duration.proto).
_MAX_DURATION_SECONDS = 315_576_000_000


class RerankerServicer(reranker_pb2_grpc.RerankerServicer):
    def __init__(self, ranker: Ranker, max_requests_per_stream: int) -> None:
        self._ranker = ranker
        self._max_requests_per_stream = max_requests_per_stream

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        answer = await self._ranker.rerank(_rerank_call(request, context.time_remaining()), "Rerank")
        return _rerank_response(answer)

    async def RerankStream(
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RerankStreamResponse]:
        call = _rerank_call(request, context.time_remaining())
        async for event in self._ranker.rerank_stream(call, "RerankStream"):
            if isinstance(event, Answer):
                yield pb.RerankStreamResponse(final=_rerank_response(event))
            else:
                yield pb.RerankStreamResponse(scored=pb.ScoredDocuments(results=[_scored(r) for r in event]))

    async def RerankMany(
        self, request_iterator: AsyncIterator[pb.RerankRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RerankResponse]:
        answers: asyncio.Queue[pb.RerankResponse | None] = asyncio.Queue()
        running: dict[str, asyncio.Task] = {}
        room = asyncio.Semaphore(self._max_requests_per_stream)

        async def answer(request: pb.RerankRequest) -> None:
            try:
                response = _rerank_response(
                    await self._ranker.rerank(_rerank_call(request, None), "RerankMany.request")
                )
                log.info("rerank_many_request", code="OK")
            except ServiceError as exc:
                response = _failed(request, status_of(exc), exc.message)
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
                    try:
                        check_request_id(request.request_id)
                    except InvalidArgument as exc:
                        answers.put_nowait(_failed(pb.RerankRequest(), status_of(exc), exc.message))
                        continue
                    if request.cancel:
                        task = running.get(request.request_id)
                        if task is not None:
                            task.cancel()
                        continue
                    if request.request_id in running:
                        message = f"request_id {request.request_id!r} is already in flight on this stream"
                        answers.put_nowait(_failed(request, grpc.StatusCode.INVALID_ARGUMENT, message))
                        continue
                    # At most max_requests_per_stream at once: stop reading, and flow control pushes back.
                    await room.acquire()
                    task = asyncio.create_task(answer(request))
                    running[request.request_id] = task
                    task.add_done_callback(functools.partial(finished, request=request))
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
        # The count first: the core refuses too many before `pairs` is read.
        pairs = _LazyPairs(request.pairs)
        answer = await self._ranker.score(
            ScoreCall(pairs, _options(request, context.time_remaining(), has_timeout=False)), "Score"
        )
        return pb.ScoreResponse(
            request_id=answer.request_id,
            results=[_scored(result) for result in answer.results],
            usage=_usage(answer),
            timing=_timing(answer.timing),
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return _model_info(self._ranker.model_info())


class _LazyPairs(Sequence[tuple[str, str]]):
    """A ScoreRequest's pairs as (query, document) tuples, read only when asked."""

    def __init__(self, pairs) -> None:
        self._pairs = pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index):  # (Sequence's signature; the core reads one pair at a time)
        pair = self._pairs[index]
        return pair.query, pair.document


def _rerank_call(request: pb.RerankRequest, time_remaining: float | None) -> RerankCall:
    if request.cancel:
        raise InvalidArgument("cancel is only meaningful on RerankMany")
    return RerankCall(
        query=request.query,
        documents=request.documents,  # the repeated field itself: the core counts before it reads
        top_n=request.top_n,
        return_documents=request.return_documents,
        options=_options(request, time_remaining, has_timeout=True),
    )


def _options(request, time_remaining: float | None, has_timeout: bool) -> CallOptions:
    """The fields every call has, range-checked; the timeout is the earlier of
    the call's deadline and the request's own `timeout`."""
    if time_remaining is not None and time_remaining <= 0:
        # a large message on a busy machine can arrive after its caller's deadline
        raise DeadlineExceeded("the call's deadline passed before the server could read the request")
    if request.priority not in _PRIORITIES:
        raise InvalidArgument(
            f"priority {request.priority} is not a Priority; use PRIORITY_INTERACTIVE or PRIORITY_BATCH"
        )
    if request.truncation not in _TRUNCATIONS:
        raise InvalidArgument(
            f"truncation {request.truncation} is not a Truncation; "
            "use TRUNCATION_END, TRUNCATION_NONE or TRUNCATION_CHUNK"
        )
    limits = [] if time_remaining is None else [time_remaining]
    if has_timeout and request.HasField("timeout"):
        limits.append(_seconds(request.timeout))
    return CallOptions(
        instruction=request.instruction,
        request_id=request.request_id,
        priority=_PRIORITIES[request.priority],
        truncation=_TRUNCATIONS[request.truncation],
        timeout=min(limits) if limits else None,
        max_tokens_per_doc=request.max_tokens_per_doc or None,
    )


def _seconds(duration: Duration) -> float:
    """A request's timeout in seconds, from a valid Duration (the core requires it positive)."""
    seconds, nanos = duration.seconds, duration.nanos
    valid = (
        abs(seconds) <= _MAX_DURATION_SECONDS
        and abs(nanos) < 1_000_000_000
        and not (seconds > 0 > nanos or seconds < 0 < nanos)
    )
    if not valid:
        raise InvalidArgument(
            f"timeout is not a valid Duration (seconds {seconds}, nanos {nanos}): "
            f"|seconds| <= {_MAX_DURATION_SECONDS}, |nanos| < 1e9, both of one sign"
        )
    return seconds + nanos / 1e9


def _scored(result: Scored) -> pb.ScoredDocument:
    return pb.ScoredDocument(
        index=result.index,
        score=result.score,
        logit=result.logit,
        truncated=result.truncated,
        tokens=result.tokens,
        document=result.document or "",
        span=pb.Span(start=result.start, end=result.end),
        windows=result.windows,
    )


def _rerank_response(answer: Answer) -> pb.RerankResponse:
    return pb.RerankResponse(
        request_id=answer.request_id,
        results=[_scored(result) for result in answer.results],
        usage=_usage(answer),
        timing=_timing(answer.timing),
    )


def _failed(request: pb.RerankRequest, code: grpc.StatusCode, message: str) -> pb.RerankResponse:
    log.info("rerank_many_request_failed", request_id=request.request_id, code=code.name, reason=message)
    return pb.RerankResponse(request_id=request.request_id, error=pb.RequestError(code=code.value[0], message=message))


def _usage(answer: Answer) -> pb.Usage:
    usage = answer.usage
    return pb.Usage(
        documents=usage.documents,
        tokens=usage.tokens,
        truncated_documents=usage.truncated_documents,
        cached_documents=usage.cached_documents,
    )


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return duration


def _timing(timing: Timing) -> pb.Timing:
    return pb.Timing(
        tokenize=_duration(timing.tokenize),
        queue=_duration(timing.queue),
        compute=_duration(timing.compute),
        total=_duration(timing.total),
    )


def _model_info(info: ModelInfo) -> pb.ModelInfo:
    limits = info.limits
    message = pb.ModelInfo(
        model_id=info.model_id,
        revision=info.revision,
        precision=pb.Precision.Value("PRECISION_" + info.precision.upper()),
        devices=info.devices,
        default_instruction=info.default_instruction,
        server_version=info.server_version,
        model_memory_bytes=info.model_memory_bytes,
        limits=pb.Limits(
            max_length=limits.max_length,
            max_documents_per_request=limits.max_documents_per_request,
            max_query_chars=limits.max_query_chars,
            max_document_chars=limits.max_document_chars,
            max_message_bytes=limits.max_message_bytes,
            max_batch_tokens=limits.max_batch_tokens,
            max_batch_size=limits.max_batch_size,
            max_queue_pairs=limits.max_queue_pairs,
            max_queue_tokens=limits.max_queue_tokens,
            max_wait=_duration(limits.max_wait_ms / 1000),
            max_windows_per_document=limits.max_windows_per_document,
            max_windows_per_request=limits.max_windows_per_request,
        ),
    )
    return message
