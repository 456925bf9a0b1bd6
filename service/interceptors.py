"""Server interceptors: the one place where errors become gRPC statuses, where
each call gets its log line and metrics, where the number of calls in progress
is bounded, and where bearer tokens are checked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import structlog

from service.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from service.limits import CallLimit
from service.memory import MemoryReleaser
from service.metrics import Metrics
from service.tokens import BearerTokens
from service.tracing import Tracing

log = structlog.get_logger("rpc")

_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Internal: grpc.StatusCode.INTERNAL,
}


def status_of(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status for a service error (INTERNAL for one not listed)."""
    return next((code for kind, code in _STATUS.items() if isinstance(error, kind)), grpc.StatusCode.INTERNAL)


_RERANKER = "/reranker.v1.Reranker/"
_HEALTH = "/grpc.health.v1.Health/"


def _rewrap(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable, bool], Callable],
    request_deserializer: Callable | None = None,
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped; `wrap(behaviour, streams_out)`."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attribute, make, streams_out in kinds:
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            return make(
                wrap(behaviour, streams_out),
                request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise ValueError("handler has no behaviour")


@dataclass(frozen=True, slots=True)
class _Received:
    """A request message as it arrived: parsed, or why it could not be (so that
    the call ends with INVALID_ARGUMENT instead of grpc's UNKNOWN), and its size
    on the wire, so that the heap is trimmed once the call that carried a large
    one is over and its objects are freed."""

    message: object
    error: Exception | None
    size: int


def _receiving(deserialize: Callable) -> Callable[[bytes], _Received]:
    def parse(data: bytes) -> _Received:
        try:
            return _Received(deserialize(data), None, len(data))
        except Exception as exc:  # DecodeError and its kin: bad bytes from the client
            return _Received(None, exc, len(data))

    return parse


def _check(received: _Received, call: _Call):
    call.received_bytes += received.size
    if received.error is not None:
        raise InvalidArgument(f"the request message could not be parsed: {received.error}")
    return received.message


async def _checked(requests, call: _Call):
    async for received in requests:
        yield _check(received, call)


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """The outermost: maps service errors to statuses (never leaking internals)
    and writes one log line and the request metrics per Reranker call, whoever
    refused it (the token check and the call limit run inside it)."""

    def __init__(
        self,
        metrics: Metrics,
        stopping: asyncio.Event,
        memory: MemoryReleaser,
        tracing: Tracing | None = None,
    ) -> None:
        self._metrics = metrics
        self._memory = memory
        self._stopping = stopping  # set once shutdown has cut calls short: they end UNAVAILABLE
        self._tracing = tracing

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(_RERANKER):
            return handler
        rpc = details.method.removeprefix(_RERANKER)
        check = _checked if handler.request_streaming else _check

        def wrap(behaviour, streams_out: bool):
            if streams_out:

                async def streaming(request, context):
                    call = _Call(self, rpc, context)
                    try:
                        try:
                            request = check(request, call)  # counted first, so a call refused at the limit is too
                            responses = behaviour(request, context)
                            del request  # only the call's own frames hold it (see _Call)
                            async for response in responses:
                                yield response
                        except (grpc.aio.AbortError, asyncio.CancelledError):
                            raise
                        except Exception as exc:
                            call.failed(exc)
                        await call.abort_if_failed()
                    except BaseException as exc:
                        call.ended_by(exc)
                        raise
                    finally:
                        call.record()

                return streaming

            async def unary(request, context):
                call = _Call(self, rpc, context)
                try:
                    try:
                        request = check(request, call)  # counted first, so a call refused at the limit is too
                        answer = behaviour(request, context)
                        del request  # only the call's own frames hold it (see _Call)
                        return await answer
                    except (grpc.aio.AbortError, asyncio.CancelledError):
                        raise
                    except Exception as exc:
                        call.failed(exc)
                    await call.abort_if_failed()
                except BaseException as exc:
                    call.ended_by(exc)
                    raise
                finally:
                    call.record()

            return unary

        return _rewrap(handler, wrap, _receiving(handler.request_deserializer))


class _Call:
    """One observed Reranker call: its status as sent, its log line and metrics.

    The status is sent by aborting outside any `except` block, so that the
    abort does not chain to the failure: the failure's traceback holds the
    request's frames, and a chain kept alive by a reference cycle would keep
    a refused 16 MB message in memory until the cycle collector runs.
    """

    def __init__(self, interceptor: ObservingInterceptor, rpc: str, context: grpc.aio.ServicerContext) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(rpc=rpc, transport="grpc")
        self._interceptor = interceptor
        self._rpc = rpc
        self._context = context
        self._start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.reason: str | None = None
        self.received_bytes = 0
        tracing = interceptor._tracing
        self._trace = tracing.attach(context.invocation_metadata()) if tracing else None

    def failed(self, error: Exception) -> None:
        if isinstance(error, ServiceError):
            self.code, self.reason = status_of(error), error.message
        else:
            self.code, self.reason = grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
            log.error("rpc_crashed", exc_info=error)

    async def abort_if_failed(self) -> None:
        if self.code is not grpc.StatusCode.OK:
            await self._context.abort(self.code, self.reason)

    def ended_by(self, error: BaseException) -> None:
        """How a call that raised ended, for the record."""
        if isinstance(error, grpc.aio.AbortError):
            if self.code is grpc.StatusCode.OK:  # aborted by the handler itself
                self.code = self._context.code() or grpc.StatusCode.UNKNOWN
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):
            remaining = self._context.time_remaining()
            if self._interceptor._stopping.is_set():
                self.code, self.reason = grpc.StatusCode.UNAVAILABLE, "the server stopped before the call finished"
            elif remaining is not None and remaining <= 0:
                self.code = grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                self.code = grpc.StatusCode.CANCELLED

    def record(self) -> None:
        interceptor = self._interceptor
        if interceptor._tracing is not None and self._trace is not None:
            interceptor._tracing.detach(self._trace)
        seconds = time.perf_counter() - self._start
        interceptor._metrics.call_finished("grpc", self._rpc, self.code.name, seconds)
        fields = {"code": self.code.name, "ms": round(1000 * seconds, 2)}
        if self.reason is not None:
            fields["reason"] = self.reason
        log.info("rpc", **fields)
        interceptor._memory.call_ended(self.received_bytes)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens (`authorization: Bearer <token>`), compared in constant time.
    Health checks are exempt so that orchestrators can probe."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = BearerTokens(tokens)

    def _accepts(self, metadata: Sequence[tuple[str, str]] | None) -> bool:
        return self._tokens.accepts(next((value for key, value in metadata or () if key == "authorization"), ""))

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_HEALTH) or self._accepts(details.invocation_metadata):
            return handler

        def wrap(behaviour, streams_out: bool) -> Callable[..., Awaitable]:
            async def refuse(request, context):
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or invalid bearer token (metadata authorization: Bearer <token>)",
                )

            if streams_out:

                async def refuse_streaming(request, context):
                    await refuse(request, context)
                    yield  # pragma: no cover - abort raised above

                return refuse_streaming
            return refuse

        return _rewrap(handler, wrap)


class CallLimitInterceptor(grpc.aio.ServerInterceptor):
    """The innermost: bounds the Reranker calls in progress. Inside the token check,
    so that a caller without a token is told so and takes no place; health checks
    are not calls, so probes always get an answer."""

    def __init__(self, limit: CallLimit) -> None:
        self._limit = limit

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(_RERANKER):
            return handler
        limit = self._limit

        def wrap(behaviour, streams_out: bool) -> Callable:
            if streams_out:

                async def streaming(request, context):
                    with limit.taken():
                        responses = behaviour(request, context)
                        del request  # only the call's own frames hold it
                        async for response in responses:
                            yield response

                return streaming

            async def unary(request, context):
                with limit.taken():
                    answer = behaviour(request, context)
                    del request
                    return await answer

            return unary

        return _rewrap(handler, wrap)
