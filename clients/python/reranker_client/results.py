"""Typed results: plain frozen dataclasses built from the service's messages.

One function per message type turns a message into its typed object
(`ranking(pb.RerankResponse)`, `scores(pb.ScoreResponse)`, ...). Every object
keeps the message it was built from as `raw`, for fields a newer server may
add before this package knows them. Numbers are copied as they are, zeros
included: a result's `index` is 0 for the first document, never missing.
Durations become float seconds.

`raw` is keyword-only, left out of repr() and ==, and None for an object made
by hand.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2

from reranker.v1 import reranker_pb2 as pb

__all__ = [
    "Limits",
    "ModelInfo",
    "Precision",
    "Priority",
    "Ranking",
    "RequestFailed",
    "Scored",
    "ScoredDocument",
    "Scores",
    "Span",
    "StreamEvent",
    "Timing",
    "Truncation",
    "Usage",
    "limits",
    "model_info",
    "ranking",
    "request_failed",
    "rerank_answer",
    "scored",
    "scored_document",
    "scores",
    "seconds",
    "span",
    "status_code",
    "stream_event",
    "timing",
    "usage",
]


class Priority(enum.IntEnum):
    """Queue priority of a request (the proto's `Priority`): interactive work is batched first."""

    UNSPECIFIED = pb.PRIORITY_UNSPECIFIED  # treated as INTERACTIVE
    INTERACTIVE = pb.PRIORITY_INTERACTIVE
    BATCH = pb.PRIORITY_BATCH


class Truncation(enum.IntEnum):
    """What happens to a document longer than `max_length` (the proto's `Truncation`)."""

    UNSPECIFIED = pb.TRUNCATION_UNSPECIFIED  # treated as END
    END = pb.TRUNCATION_END  # cut the document's end and mark the result `truncated`
    NONE = pb.TRUNCATION_NONE  # refuse the request with INVALID_ARGUMENT
    CHUNK = pb.TRUNCATION_CHUNK  # score overlapping windows and keep the best (see ScoredDocument.span)


class Precision(enum.IntEnum):
    """The numeric format the server loaded the weights in (the proto's `Precision`)."""

    UNSPECIFIED = pb.PRECISION_UNSPECIFIED
    FP32 = pb.PRECISION_FP32
    FP16 = pb.PRECISION_FP16
    BF16 = pb.PRECISION_BF16
    INT8 = pb.PRECISION_INT8
    NF4 = pb.PRECISION_NF4


@dataclass(frozen=True)
class Span:
    """A part of a document: `document[start:end]`, in Python string positions
    (Unicode code points; not bytes, not UTF-16 units)."""

    start: int
    end: int
    raw: pb.Span | None = field(default=None, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class ScoredDocument:
    """One scored document (or pair)."""

    index: int  # the document's position in the request (the pair's, for score())
    score: float  # relevance in [0, 1]: sigmoid(logit)
    logit: float  # logit("yes") - logit("no") at the last token; the best window's when chunked
    document: str  # the text; "" unless return_documents was asked for
    truncated: bool  # the document was cut to fit max_length (or max_tokens_per_doc)
    tokens: int  # tokens the model read for this pair, every window's when chunked
    # The part that earned the score: the best window when chunked, the part read when cut,
    # else the whole document. None from a server older than this field.
    span: Span | None = None
    windows: int = 0  # windows the document was scored in: 1 unless Truncation.CHUNK split it
    raw: pb.ScoredDocument | None = field(default=None, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class Usage:
    """The work a request caused."""

    documents: int  # documents (or pairs) scored
    tokens: int  # tokens read, summed over the pairs, padding excluded
    truncated_documents: int
    # Answered without computing them for this request: from the server's score cache, or
    # computed once for a concurrent request with the same pair. Their tokens still count.
    cached_documents: int = 0
    raw: pb.Usage | None = field(default=None, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class Timing:
    """Where a request's time went, measured by the server, in seconds."""

    tokenize: float
    queue: float  # from admission until the request's last batch started computing
    compute: float  # summed over the batches that held its pairs: may exceed total
    total: float  # from arrival until the answer was ready
    raw: pb.Timing | None = field(default=None, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class Ranking:
    """A Rerank answer: results best first (at most top_n), ties in request order."""

    request_id: str
    results: list[ScoredDocument]
    usage: Usage
    timing: Timing
    raw: pb.RerankResponse | None = field(default=None, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class Scores:
    """A Score answer: one result per pair, in input order."""

    request_id: str
    results: list[ScoredDocument]
    usage: Usage
    timing: Timing
    raw: pb.ScoreResponse | None = field(default=None, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class Scored:
    """A stream's partial event: documents one batch scored, in no particular order,
    without `document` text. The stream ends with a Ranking."""

    results: list[ScoredDocument]
    raw: pb.ScoredDocuments | None = field(default=None, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class RequestFailed:
    """One request on a rerank_many stream failed; the stream goes on."""

    request_id: str
    code: grpc.StatusCode  # the code a unary call would have ended with
    message: str  # what was wrong, naming the limit
    raw: pb.RerankResponse | None = field(default=None, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class Limits:
    """What the server enforces; each breach is answered with a status naming the limit."""

    max_length: int  # tokens per pair: prompt + instruction + query + document
    max_documents_per_request: int  # documents per rerank, pairs per score
    max_query_chars: int  # per query, and per instruction
    max_document_chars: int
    max_message_bytes: int
    max_batch_tokens: int  # padded tokens per batch
    max_batch_size: int  # rows per batch
    max_wait: float  # seconds a partly filled batch waits for more work
    max_queue_pairs: int  # beyond it, RESOURCE_EXHAUSTED
    max_queue_tokens: int  # beyond it, RESOURCE_EXHAUSTED
    max_windows_per_document: int = 0  # Truncation.CHUNK: windows per document
    max_windows_per_request: int = 0  # Truncation.CHUNK: windows per request (a document that fits is one)
    raw: pb.Limits | None = field(default=None, repr=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model and the server's limits."""

    model_id: str  # a hub id or a local path
    revision: str  # the checkpoint's commit hash, or "" for a plain directory
    precision: Precision
    devices: list[str]  # one per worker process, e.g. "cuda:0" or "cpu"
    limits: Limits
    default_instruction: str
    server_version: str
    model_memory_bytes: int  # weights and buffers of one model copy
    raw: pb.ModelInfo | None = field(default=None, repr=False, compare=False, kw_only=True)


StreamEvent = Scored | Ranking  # what rerank_stream yields


# -- message -> typed object, one function per message type ----------------------------------


def seconds(duration: duration_pb2.Duration) -> float:
    """A google.protobuf.Duration as float seconds."""
    return duration.seconds + duration.nanos / 1e9


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """A google.rpc.Code number as a grpc.StatusCode; UNKNOWN for a number gRPC does not know."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


def span(message: pb.Span) -> Span:
    return Span(start=message.start, end=message.end, raw=message)


def scored_document(message: pb.ScoredDocument) -> ScoredDocument:
    return ScoredDocument(
        index=message.index,
        score=message.score,
        logit=message.logit,
        document=message.document,
        truncated=message.truncated,
        tokens=message.tokens,
        span=span(message.span) if message.HasField("span") else None,
        windows=message.windows,
        raw=message,
    )


def usage(message: pb.Usage) -> Usage:
    return Usage(
        documents=message.documents,
        tokens=message.tokens,
        truncated_documents=message.truncated_documents,
        cached_documents=message.cached_documents,
        raw=message,
    )


def timing(message: pb.Timing) -> Timing:
    return Timing(
        tokenize=seconds(message.tokenize),
        queue=seconds(message.queue),
        compute=seconds(message.compute),
        total=seconds(message.total),
        raw=message,
    )


def ranking(message: pb.RerankResponse) -> Ranking:
    """A RerankResponse as a Ranking (its `error` field is not looked at; see rerank_answer)."""
    return Ranking(
        request_id=message.request_id,
        results=[scored_document(result) for result in message.results],
        usage=usage(message.usage),
        timing=timing(message.timing),
        raw=message,
    )


def request_failed(message: pb.RerankResponse) -> RequestFailed:
    """A RerankResponse whose `error` is set, as a RequestFailed."""
    return RequestFailed(
        request_id=message.request_id,
        code=status_code(message.error.code),
        message=message.error.message,
        raw=message,
    )


def rerank_answer(message: pb.RerankResponse) -> Ranking | RequestFailed:
    """One answer of a RerankMany stream: a RequestFailed when `error` is set, else a Ranking."""
    return request_failed(message) if message.HasField("error") else ranking(message)


def scores(message: pb.ScoreResponse) -> Scores:
    return Scores(
        request_id=message.request_id,
        results=[scored_document(result) for result in message.results],
        usage=usage(message.usage),
        timing=timing(message.timing),
        raw=message,
    )


def scored(message: pb.ScoredDocuments) -> Scored:
    return Scored(results=[scored_document(result) for result in message.results], raw=message)


def stream_event(message: pb.RerankStreamResponse) -> Scored | Ranking:
    """One RerankStream message: Scored for a `scored` event, the Ranking for the `final` one."""
    event = message.WhichOneof("event")
    if event == "scored":
        return scored(message.scored)
    if event == "final":
        return ranking(message.final)
    raise ValueError(f"a RerankStream message with no known event (a newer server?): {message!r}")


def limits(message: pb.Limits) -> Limits:
    return Limits(
        max_length=message.max_length,
        max_documents_per_request=message.max_documents_per_request,
        max_query_chars=message.max_query_chars,
        max_document_chars=message.max_document_chars,
        max_message_bytes=message.max_message_bytes,
        max_batch_tokens=message.max_batch_tokens,
        max_batch_size=message.max_batch_size,
        max_wait=seconds(message.max_wait),
        max_queue_pairs=message.max_queue_pairs,
        max_queue_tokens=message.max_queue_tokens,
        max_windows_per_document=message.max_windows_per_document,
        max_windows_per_request=message.max_windows_per_request,
        raw=message,
    )


def _precision(value: int) -> Precision:
    try:
        return Precision(value)
    except ValueError:  # a precision added to the proto after this package was built
        return Precision.UNSPECIFIED


def model_info(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model_id=message.model_id,
        revision=message.revision,
        precision=_precision(message.precision),
        devices=list(message.devices),
        limits=limits(message.limits),
        default_instruction=message.default_instruction,
        server_version=message.server_version,
        model_memory_bytes=message.model_memory_bytes,
        raw=message,
    )
