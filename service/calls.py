"""A call and its answer as the core sees them, whatever transport carried them.

Each transport turns its messages into a RerankCall or a ScoreCall and its
answer back from an Answer; nothing here knows gRPC or HTTP.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.work import INTERACTIVE


class Truncation(enum.Enum):
    END = "end"  # cut the document's end, as the model card does
    NONE = "none"  # refuse a pair that does not fit
    CHUNK = "chunk"  # score overlapping windows of a document that does not fit; keep the best


@dataclass(frozen=True)
class CallOptions:
    instruction: str = ""  # empty: the model's default
    request_id: str = ""
    priority: int = INTERACTIVE
    truncation: Truncation = Truncation.END
    timeout: float | None = None  # seconds from arrival; None: no limit of its own
    # Document tokens per pair (Cohere's name): kept when cutting, per window when chunking;
    # None: as many as max_length allows.
    max_tokens_per_doc: int | None = None


@dataclass(frozen=True)
class RerankCall:
    """Rank `documents` for `query`. `documents` may be a lazy sequence (a
    message's repeated field): the core checks its length before reading it."""

    query: str
    documents: Sequence[str]
    top_n: int = 0  # 0: all
    return_documents: bool = False
    options: CallOptions = field(default_factory=CallOptions)


@dataclass(frozen=True)
class ScoreCall:
    """Score explicit (query, document) pairs, in input order."""

    pairs: Sequence[tuple[str, str]]
    options: CallOptions = field(default_factory=CallOptions)


@dataclass(frozen=True, slots=True)
class DocumentScore:
    """What scoring one document for one query, under one call's options, gives:
    what a result carries besides its position, and what the score cache keeps."""

    logit: float  # the best window's logit("yes") - logit("no"), a float32 as the worker computed it
    truncated: bool  # the end was cut (TRUNCATION_END): not every character was read
    tokens: int  # every window's pair as the model reads it, prompt included
    start: int  # the best window's span: document[start:end], in Python string positions (code points)
    end: int
    windows: int  # pairs the document was scored in: 1 unless chunked


@dataclass(frozen=True, slots=True)
class Scored:
    index: int  # the document's (or pair's) position in the call
    logit: float  # logit("yes") - logit("no") at the last token; the best window's when chunked
    truncated: bool
    tokens: int  # the pairs as the model reads them, prompt included; every window's when chunked
    document: str | None = None  # only when the call asked for documents back
    start: int = 0  # the part of the document that earned the score: document[start:end]
    end: int = 0
    windows: int = 1

    @property
    def score(self) -> float:
        return sigmoid(self.logit)


@dataclass(frozen=True)
class Usage:
    documents: int
    # Tokens of every pair as the model reads it, summed over the call's
    # documents (every window of a chunked one): a duplicate counts though it
    # is computed once, and a cached document though it is not computed.
    tokens: int
    truncated_documents: int
    # Documents answered without computing them for this call: from the score
    # cache, or computed once for another call scoring the same pair at the same time.
    cached_documents: int = 0


@dataclass(frozen=True)
class Timing:
    """Seconds. `compute` is summed over batches, which may run at once on
    several workers, so it can exceed `total`."""

    tokenize: float
    queue: float
    compute: float
    total: float


@dataclass(frozen=True)
class Answer:
    request_id: str
    results: list[Scored]  # best first for a rerank (at most top_n), input order for a score call
    usage: Usage
    timing: Timing


@dataclass(frozen=True)
class Limits:
    max_length: int
    max_documents_per_request: int
    max_query_chars: int
    max_document_chars: int
    max_message_bytes: int
    max_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float
    max_queue_pairs: int
    max_queue_tokens: int
    max_windows_per_document: int
    max_windows_per_request: int


@dataclass(frozen=True)
class ModelInfo:
    model_id: str  # as the server was started with it
    revision: str  # the Hugging Face cache's commit hash; "" for a directory
    precision: str  # fp32, fp16, bf16, int8 or nf4
    devices: list[str]
    default_instruction: str
    server_version: str
    model_memory_bytes: int
    limits: Limits


def sigmoid(x: float) -> float:
    """The recipe's softmax over (no, yes), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
