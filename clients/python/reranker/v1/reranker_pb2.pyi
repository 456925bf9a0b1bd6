import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_END: _ClassVar[Truncation]
    TRUNCATION_NONE: _ClassVar[Truncation]
    TRUNCATION_CHUNK: _ClassVar[Truncation]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]
    PRECISION_INT8: _ClassVar[Precision]
    PRECISION_NF4: _ClassVar[Precision]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BATCH: Priority
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_END: Truncation
TRUNCATION_NONE: Truncation
TRUNCATION_CHUNK: Truncation
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_FP16: Precision
PRECISION_BF16: Precision
PRECISION_INT8: Precision
PRECISION_NF4: Precision

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "instruction", "top_n", "return_documents", "request_id", "priority", "truncation", "timeout", "cancel", "max_tokens_per_doc")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_DOC_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    instruction: str
    top_n: int
    return_documents: bool
    request_id: str
    priority: Priority
    truncation: Truncation
    timeout: _duration_pb2.Duration
    cancel: bool
    max_tokens_per_doc: int
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., instruction: _Optional[str] = ..., top_n: _Optional[int] = ..., return_documents: _Optional[bool] = ..., request_id: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cancel: _Optional[bool] = ..., max_tokens_per_doc: _Optional[int] = ...) -> None: ...

class ScoredDocument(_message.Message):
    __slots__ = ("index", "score", "logit", "document", "truncated", "tokens", "span", "windows")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    logit: float
    document: str
    truncated: bool
    tokens: int
    span: Span
    windows: int
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., logit: _Optional[float] = ..., document: _Optional[str] = ..., truncated: _Optional[bool] = ..., tokens: _Optional[int] = ..., span: _Optional[_Union[Span, _Mapping]] = ..., windows: _Optional[int] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("documents", "tokens", "truncated_documents", "cached_documents")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: int
    tokens: int
    truncated_documents: int
    cached_documents: int
    def __init__(self, documents: _Optional[int] = ..., tokens: _Optional[int] = ..., truncated_documents: _Optional[int] = ..., cached_documents: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("tokenize", "queue", "compute", "total")
    TOKENIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    tokenize: _duration_pb2.Duration
    queue: _duration_pb2.Duration
    compute: _duration_pb2.Duration
    total: _duration_pb2.Duration
    def __init__(self, tokenize: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., queue: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., compute: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., total: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("request_id", "results", "usage", "timing", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[ScoredDocument]
    usage: Usage
    timing: Timing
    error: RequestError
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ScoredDocument, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class ScoredDocuments(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoredDocument]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoredDocument, _Mapping]]] = ...) -> None: ...

class RerankStreamResponse(_message.Message):
    __slots__ = ("scored", "final")
    SCORED_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    scored: ScoredDocuments
    final: RerankResponse
    def __init__(self, scored: _Optional[_Union[ScoredDocuments, _Mapping]] = ..., final: _Optional[_Union[RerankResponse, _Mapping]] = ...) -> None: ...

class Pair(_message.Message):
    __slots__ = ("query", "document")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    query: str
    document: str
    def __init__(self, query: _Optional[str] = ..., document: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("pairs", "instruction", "request_id", "priority", "truncation", "max_tokens_per_doc")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_DOC_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[Pair]
    instruction: str
    request_id: str
    priority: Priority
    truncation: Truncation
    max_tokens_per_doc: int
    def __init__(self, pairs: _Optional[_Iterable[_Union[Pair, _Mapping]]] = ..., instruction: _Optional[str] = ..., request_id: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., max_tokens_per_doc: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "results", "usage", "timing")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[ScoredDocument]
    usage: Usage
    timing: Timing
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ScoredDocument, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_length", "max_documents_per_request", "max_query_chars", "max_document_chars", "max_message_bytes", "max_batch_tokens", "max_batch_size", "max_wait", "max_queue_pairs", "max_queue_tokens", "max_windows_per_document", "max_windows_per_request")
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_PAIRS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOWS_PER_DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOWS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    max_length: int
    max_documents_per_request: int
    max_query_chars: int
    max_document_chars: int
    max_message_bytes: int
    max_batch_tokens: int
    max_batch_size: int
    max_wait: _duration_pb2.Duration
    max_queue_pairs: int
    max_queue_tokens: int
    max_windows_per_document: int
    max_windows_per_request: int
    def __init__(self, max_length: _Optional[int] = ..., max_documents_per_request: _Optional[int] = ..., max_query_chars: _Optional[int] = ..., max_document_chars: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_queue_pairs: _Optional[int] = ..., max_queue_tokens: _Optional[int] = ..., max_windows_per_document: _Optional[int] = ..., max_windows_per_request: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "revision", "precision", "devices", "limits", "default_instruction", "server_version", "model_memory_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    precision: Precision
    devices: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    default_instruction: str
    server_version: str
    model_memory_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., precision: _Optional[_Union[Precision, str]] = ..., devices: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., default_instruction: _Optional[str] = ..., server_version: _Optional[str] = ..., model_memory_bytes: _Optional[int] = ...) -> None: ...
