"""The HTTP/JSON transport: the rerank APIs the RAG ecosystem already speaks,
over the same core (service.ranking) as gRPC, in the same event loop.

Routes (shapes in service.http_schema):

    POST /v2/rerank, /v1/rerank, /rerank   Cohere v2 / Jina / vLLM; `stream: true` answers as Server-Sent Events
    POST /rerank with `texts`              text-embeddings-inference
    GET  /v1/models                        the served model, OpenAI-style
    GET  /health, /ready                   live; ready to serve (no token needed)
    GET  /openapi.json, /docs, /redoc      the OpenAPI document and its pages, from local assets

`_Front`, an ASGI middleware, is the one place where an HTTP call is counted,
logged, bounded (the shared CallLimit), authenticated, size-checked, cancelled
when its client goes away, and where every error becomes a status and a JSON
body `{"message", "code"}`. `code` is the gRPC status name the same failure
has on the gRPC port (service.interceptors.status_of), so that metrics, logs
and alerts read the same for both transports; the HTTP status is derived from
it (`_HTTP_STATUS`).

FastAPI (on Starlette, served by uvicorn with httptools): the OpenAPI document
comes from the same pydantic models that validate the requests, and pydantic's
validation runs in Rust; the middleware and handlers are plain ASGI and
asyncio, so the rest of the cost is uvicorn's (BENCHMARKS.md compares it with
gRPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import service
from service.calls import Answer, CallOptions, RerankCall, Scored, Truncation
from service.errors import InvalidArgument, NotFound, ServiceError, TooLarge
from service.interceptors import status_of
from service.limits import CallLimit
from service.memory import MemoryReleaser
from service.metrics import Metrics
from service.ranking import Ranker
from service.tokens import BearerTokens
from service.tracing import Tracing
from service.work import BATCH, INTERACTIVE

from service.http_schema import (  # isort: skip
    SHAPE_TAGS, AnyRerankRequest, ErrorBody, ModelList, RerankRequest, RerankResponse, Status, TeiRank,
    TeiRerankRequest,
)  # fmt: skip

log = structlog.get_logger("rpc")

# The calls: counted, logged, bounded and authenticated like the Reranker RPCs.
# Health, readiness and the documentation pages are not calls, and need no token.
_CALLS = frozenset({"/v2/rerank", "/v1/rerank", "/rerank", "/v1/models"})
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "UNIMPLEMENTED": 405,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,  # the client went away; nobody reads it
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# Worth retrying: say when.
_RETRY_AFTER_SECONDS = {429: "1", 503: "1"}
_TIMEOUT_HEADER = "x-request-timeout"
_REQUEST_ID_HEADER = "x-request-id"
_CALL = "reranker.call"  # the scope key of a call's _Call
_JSON = "application/json"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "Invalid input: the message names the field and the limit."),
        (401, "Missing or wrong bearer token."),
        (404, "The request names a model this server does not serve."),
        (413, "The body is larger than max_message_bytes, or a document does not fit in a worker's memory."),
        (429, "The queue is full, or too many calls are in progress; retry after Retry-After seconds."),
        (503, "No worker is ready, or the server is draining; retry after Retry-After seconds."),
        (504, "The deadline passed."),
    )
}


class _Refusal(HTTPException):
    """An error that is the transport's own (a token, a size, a route), with its status and code.
    An HTTPException, so that FastAPI lets it through while reading the body."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.code = code
        self.message = message


@dataclass
class _Call:
    rpc: str
    status: int = 0
    code: str = ""
    reason: str | None = None
    responded: bool = False  # the last byte of the answer is on its way
    client_gone: bool = False


def make_app(
    ranker: Ranker,
    *,
    model_id: str,
    max_length: int,
    metrics: Metrics,
    calls: CallLimit,
    stopping: asyncio.Event,
    tokens: BearerTokens | None,
    tracing: Tracing | None,
    max_body_bytes: int,
    default_timeout_s: float,
    ready: Callable[[], bool],
    memory: MemoryReleaser,
) -> FastAPI:
    """The ASGI application of the HTTP port."""
    started = int(time.time())
    app = FastAPIOffline(
        title="Qwen3 reranker",
        version=service.__version__,
        summary="Cohere-, Jina- and text-embeddings-inference-shaped rerank APIs over the same batcher as gRPC.",
        strict_content_type=False,  # a body without a Content-Type is read as JSON (curl -d sends a form's)
        # The service's own metrics, log line and spans (service.tracing) cover every call, on both ports.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_middleware(
        _Front,
        metrics=metrics,
        calls=calls,
        stopping=stopping,
        tokens=tokens,
        tracing=tracing,
        max_body_bytes=max_body_bytes,
        memory=memory,
    )
    # (Starlette types a handler for any Exception; these take the one they are registered for.)
    app.add_exception_handler(RequestValidationError, cast(Any, _invalid))
    app.add_exception_handler(HTTPException, cast(Any, _refused))

    def options(
        request: Request, body: RerankRequest | TeiRerankRequest, truncation: Truncation, **more
    ) -> CallOptions:
        """The fields every call has; the deadline is the earlier of the body's `timeout` and the
        X-Request-Timeout header, else the server's default."""
        limits = [seconds for seconds in (body.timeout, _header_timeout(request)) if seconds is not None]
        return CallOptions(
            instruction=body.instruction,
            request_id=request.headers.get(_REQUEST_ID_HEADER, ""),
            truncation=truncation,
            timeout=min(limits) if limits else default_timeout_s or None,
            **more,
        )

    async def cohere(body: RerankRequest, request: Request) -> Response:
        if body.model is not None and body.model != model_id:
            raise NotFound(f"the model asked for is not served here; this server serves {model_id!r} (GET /v1/models)")
        call = RerankCall(
            query=body.query,
            documents=body.documents,
            top_n=body.top_n or 0,
            return_documents=body.return_documents,
            options=options(
                request,
                body,
                Truncation(body.truncation or "end"),
                priority=BATCH if body.priority == "batch" else INTERACTIVE,
                max_tokens_per_doc=body.max_tokens_per_doc,
            ),
        )
        answer_id = call.options.request_id or uuid.uuid4().hex
        if body.stream:
            return await _event_stream(
                request, ranker.rerank_stream(call, _span(request) + ":stream"), model_id, answer_id
            )
        answer = await ranker.rerank(call, _span(request))
        return _json(_cohere_answer(answer, model_id, answer_id))

    async def tei(body: TeiRerankRequest, request: Request) -> Response:
        call = RerankCall(
            query=body.query,
            documents=body.texts,
            return_documents=body.return_text,
            options=options(request, body, Truncation.NONE if body.truncate is False else Truncation.END),
        )
        answer = await ranker.rerank(call, _span(request))
        ranks = []
        for result in answer.results:
            score = result.logit if body.raw_scores else result.score
            rank: dict[str, object] = {"index": result.index, "score": score}
            if result.document is not None:
                rank["text"] = result.document
            ranks.append(rank)
        return _json(ranks)

    reranks: dict[int | str, dict[str, Any]] = {
        200: {
            "model": RerankResponse,
            "description": "The ranking, best first; with `stream: true`, Server-Sent Events (text/event-stream): "
            "`scored` events ({results}) as batches complete, then one `final` event (the ranking), or an "
            "`error` event ({message, code}).",
        },
        **_ERRORS,
    }

    @app.post("/v2/rerank", summary="Rerank (Cohere v2)", responses=reranks)
    async def rerank_v2(body: RerankRequest, request: Request) -> Response:
        return await cohere(body, request)

    @app.post("/v1/rerank", summary="Rerank (Jina, vLLM; stream: true for Server-Sent Events)", responses=reranks)
    async def rerank_v1(body: RerankRequest, request: Request) -> Response:
        return await cohere(body, request)

    @app.post(
        "/rerank",
        summary="Rerank (Cohere/Jina shape; text-embeddings-inference's when the body has `texts`)",
        responses={
            200: {
                "model": RerankResponse | list[TeiRank],
                "description": "The Cohere-shaped answer, or text-embeddings-inference's list, best first.",
            },
            **_ERRORS,
        },
    )
    async def rerank_any(body: AnyRerankRequest, request: Request) -> Response:
        if isinstance(body, TeiRerankRequest):
            return await tei(body, request)
        return await cohere(body, request)

    @app.get("/v1/models", summary="The served model", responses={200: {"model": ModelList}, 401: _ERRORS[401]})
    async def models() -> Response:
        card = {
            "id": model_id,
            "object": "model",
            "created": started,
            "owned_by": "reranker",
            "max_model_len": max_length,
        }
        return _json({"object": "list", "data": [card]})

    @app.get("/health", summary="200 while the process is live", responses={200: {"model": Status}})
    async def health() -> Response:
        return _json({"status": "live"})

    @app.get(
        "/ready",
        summary="200 while at least one worker is ready and the server is not draining; 503 otherwise",
        responses={200: {"model": Status}, 503: _ERRORS[503]},
    )
    async def readiness() -> Response:
        if not ready():
            raise _Refusal(503, "UNAVAILABLE", "not ready: the model is loading, no worker is ready, or draining")
        return _json({"status": "ready"})

    app.openapi_schema = _without_validation_errors(app.openapi())
    return app


def _span(request: Request) -> str:
    return f"POST {request.url.path}"


def _header_timeout(request: Request) -> float | None:
    text = request.headers.get(_TIMEOUT_HEADER)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument("the X-Request-Timeout header is not a number of seconds") from None


def _json(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # allow_nan=False: a non-finite score is a defect, never a silent `NaN` in the body.
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return Response(body, status, headers, media_type=_JSON)


def _result(result: Scored) -> dict:
    item: dict[str, object] = {"index": result.index, "relevance_score": result.score, "logit": result.logit}
    item |= {"span": {"start": result.start, "end": result.end}, "windows": result.windows}
    item["truncated"] = result.truncated
    if result.document is not None:
        item["document"] = {"text": result.document}
    return item


def _cohere_answer(answer: Answer, model_id: str, answer_id: str) -> dict:
    tokens = answer.usage.tokens
    return {
        "id": answer_id,
        "model": model_id,
        "results": [_result(result) for result in answer.results],
        "usage": {"total_tokens": tokens, "cached_documents": answer.usage.cached_documents},
        "meta": {"api_version": {"version": "2"}, "tokens": {"input_tokens": tokens}},
    }


def _event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n".encode()


async def _event_stream(
    request: Request, events: AsyncGenerator[list[Scored] | Answer, None], model_id: str, answer_id: str
) -> Response:
    """Server-Sent Events, like RerankStream. The first event is awaited here, so that a
    call refused at once (invalid, queue full, deadline) gets its HTTP status."""
    call: _Call = request.scope[_CALL]
    call.rpc += ":stream"
    structlog.contextvars.bind_contextvars(rpc=call.rpc)
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    return _EventStream(first, events, model_id, answer_id, call)


class _EventStream(StreamingResponse):
    """Written in the call's own task: a client that goes away cancels it (see _Front), and
    closing `events` drops whatever is still queued."""

    def __init__(
        self, first, events: AsyncGenerator[list[Scored] | Answer, None], model_id: str, answer_id: str, call: _Call
    ):
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        super().__init__((), headers=headers, media_type="text/event-stream")
        self._first, self._events = first, events
        self._model_id, self._answer_id, self._call = model_id, answer_id, call

    def _encode(self, event: list[Scored] | Answer) -> bytes:
        if isinstance(event, Answer):
            return _event("final", _cohere_answer(event, self._model_id, self._answer_id))
        return _event("scored", {"results": [_result(result) for result in event]})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            await send({"type": "http.response.body", "body": self._encode(self._first), "more_body": True})
            async for event in self._events:
                await send({"type": "http.response.body", "body": self._encode(event), "more_body": True})
            last = b""
        except ServiceError as exc:  # after the 200: the error travels as an event
            self._call.code, self._call.reason = status_of(exc).name, exc.message
            last = _event("error", {"message": exc.message, "code": self._call.code})
        finally:
            await self._events.aclose()
        await send({"type": "http.response.body", "body": last, "more_body": False})


async def _invalid(request: Request, error: RequestValidationError) -> Response:
    """pydantic's errors as one 400 naming the field (422 never); the input is not echoed."""
    first = error.errors()[0]
    location = [part for part in first["loc"][1:] if part not in SHAPE_TAGS]
    if first["type"] == "json_invalid":
        raise InvalidArgument(f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})")
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    if not field:
        raise InvalidArgument("the body must be a JSON object, sent with Content-Type: application/json")
    raise InvalidArgument(f"{field}: {first['msg']}")


async def _refused(request: Request, error: HTTPException) -> Response:
    if isinstance(error, _Refusal):
        raise error
    if error.status_code == 404:
        raise _Refusal(404, "NOT_FOUND", "no such route: the routes are listed at /docs") from None
    if error.status_code == 405:
        raise _Refusal(405, "UNIMPLEMENTED", f"this route does not take {request.method}", error.headers) from None
    raise _Refusal(error.status_code, "INVALID_ARGUMENT", str(error.detail)) from None


def _without_validation_errors(schema: dict) -> dict:
    """FastAPI documents a 422 on every route; this server answers 400 instead (see _invalid)."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


class _Front:
    """Every HTTP request passes here first. A call (`_CALLS`) is timed and counted, takes a
    place in the shared CallLimit, needs a bearer token when tokens are configured, has its
    body size capped, is cancelled when its client disconnects, and ends with one `rpc` log
    line; every request's errors become a status and a JSON body."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        calls: CallLimit,
        stopping: asyncio.Event,
        tokens: BearerTokens | None,
        tracing: Tracing | None,
        max_body_bytes: int,
        memory: MemoryReleaser,
    ) -> None:
        self.app = app
        self._memory = memory
        self._metrics = metrics
        self._calls = calls
        self._stopping = stopping  # set once shutdown has cut calls short: they end UNAVAILABLE
        self._tokens = tokens
        self._tracing = tracing
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] not in _CALLS:
            await self._answer(scope, receive, send, _Call(scope["path"]))
            return
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(rpc=scope["path"], transport="http")
        call = scope[_CALL] = _Call(scope["path"])
        start = time.perf_counter()
        headers = [(key.decode("latin-1"), value.decode("latin-1")) for key, value in scope["headers"]]
        trace = self._tracing.attach(headers) if self._tracing else None
        watcher: asyncio.Task | None = None
        task = asyncio.current_task()
        assert task is not None  # an ASGI call runs in a task

        async def receive_watched() -> Message:
            nonlocal watcher
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body") and watcher is None:
                watcher = asyncio.create_task(self._watch(receive, call, task))
            return message

        try:
            self._check(dict(headers))  # a caller without a token takes no place
            with self._calls.taken():
                await self._answer(scope, receive_watched, send, call)
        except (ServiceError, _Refusal) as exc:  # refused before the call began
            await self._refuse(send, call, exc)
        except asyncio.CancelledError:
            if not call.client_gone:
                call.code = "UNAVAILABLE" if self._stopping.is_set() else "CANCELLED"
                call.reason = "the server stopped before the call finished" if self._stopping.is_set() else None
                raise
            call.code, call.status = "CANCELLED", _HTTP_STATUS["CANCELLED"]
            if uncancel := getattr(task, "uncancel", None):  # Python 3.11+: the cancellation was ours
                uncancel()
        finally:
            if watcher is not None:
                watcher.cancel()
            if self._tracing is not None and trace is not None:
                self._tracing.detach(trace)
            seconds = time.perf_counter() - start
            code = call.code or ("OK" if call.status < 400 else "UNKNOWN")
            self._metrics.call_finished("http", call.rpc, code, seconds)
            fields = {"code": code, "status": call.status, "ms": round(1000 * seconds, 2)}
            log.info("rpc", **fields, **({"reason": call.reason} if call.reason else {}))

    def _check(self, headers: dict[str, str]) -> None:
        """The token, then the declared size: both before a byte of the body is read."""
        if self._tokens is not None and not self._tokens.accepts(headers.get("authorization", "")):
            raise _Refusal(
                401, "UNAUTHENTICATED", "missing or invalid bearer token (header Authorization: Bearer <token>)"
            )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body_bytes:
            raise _Refusal(413, "RESOURCE_EXHAUSTED", self._too_large(int(declared)))

    def _too_large(self, size: int | None = None) -> str:
        got = f"{size} bytes" if size is not None else "more"
        return f"the request body has {got}, more than max_message_bytes={self._max_body_bytes}"

    async def _answer(self, scope: Scope, receive: Receive, send: Send, call: _Call) -> None:
        """Run the application with the body capped; its errors become JSON."""
        received = 0

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self._max_body_bytes:
                raise _Refusal(413, "RESOURCE_EXHAUSTED", self._too_large())
            return message

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                call.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                call.responded = True
            await send(message)

        try:
            await self.app(scope, receive_capped, send_observed)
        except (ServiceError, _Refusal) as exc:
            await self._refuse(send, call, exc)
        except Exception:
            log.exception("rpc_crashed")
            await self._error(send, call, "INTERNAL", "internal error; the server log has the details")
        finally:
            self._memory.call_ended(received)

    async def _refuse(self, send: Send, call: _Call, error: ServiceError | _Refusal) -> None:
        if isinstance(error, _Refusal):
            await self._error(send, call, error.code, error.message, error.status_code, error.headers)
        else:
            # a part that cannot fit is not worth retrying later, unlike a full queue (also RESOURCE_EXHAUSTED)
            status = 413 if isinstance(error, TooLarge) else None
            await self._error(send, call, status_of(error).name, error.message, status)

    async def _error(
        self,
        send: Send,
        call: _Call,
        code: str,
        message: str,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        call.code, call.reason = code, message
        if call.status:  # the answer had begun: nothing more can be said
            return
        call.status = status or _HTTP_STATUS.get(code, 500)
        headers = dict(headers or {})
        if retry := _RETRY_AFTER_SECONDS.get(call.status):
            headers["retry-after"] = retry
        response = _json({"message": message, "code": code}, call.status, headers)
        await response({"type": "http"}, _never, send)

    @staticmethod
    async def _watch(receive: Receive, call: _Call, task: asyncio.Task) -> None:
        """Once the body is read, the next message is a disconnect: the client is gone, so its
        call is cancelled (its queued pairs dropped), unless the answer was already sent."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not call.responded:
            call.client_gone = True
            task.cancel()


async def _never() -> Message:
    raise RuntimeError("an error response reads nothing")


class _Server(uvicorn.Server):
    """uvicorn in the service's own event loop: the service handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The HTTP port: a socket bound by build(), served by uvicorn from App.start to App.shutdown."""

    def __init__(self, app: FastAPI, listener: socket.socket, ssl: dict, flush_seconds: float) -> None:
        """Raises ssl.SSLError or OSError when the certificate and key are not usable."""
        self.listener = listener
        self.port: int = listener.getsockname()[1]
        config = uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,  # each call has its own `rpc` line
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=max(1, round(flush_seconds)),
            **ssl,
        )
        config.load()
        # uvicorn's lifecycle lines repeat the service's own (http_listening, shutting_down).
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self.listener]))

    async def stop(self) -> None:
        """Stop accepting; calls still running get the flush time, then are cancelled."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self.listener.close()
