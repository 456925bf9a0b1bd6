"""The HTTP/JSON shapes, field by field as the peers publish them.

- Cohere v2 and Jina / vLLM on `POST /v2/rerank`, `/v1/rerank` and `/rerank`
  (`RerankRequest` -> `RerankResponse`), with this service's extensions
  (`instruction`, `truncation`, `priority`, `timeout`, `stream`; `logit` in
  each result).
- text-embeddings-inference on `POST /rerank` when the body has `texts`
  (`TeiRerankRequest` -> a list of `TeiRank`).

The same models validate the requests and write the OpenAPI document, so the
two cannot drift. They check types only: every limit and range (documents per
request, characters, `top_n`, `max_tokens_per_doc`) is the core's
(service.ranking), as for gRPC. Unknown fields are ignored, because the
peers' clients send fields of their own (Cohere's `rank_fields`, say).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PlainValidator, Tag
from pydantic_core import PydanticCustomError


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextDocument(_Shape):
    text: str


def _document_text(value: object) -> str:
    """A document as Cohere v1, Jina and vLLM accept it: a string or {"text": string}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    raise PydanticCustomError("document", 'a document is a string or an object {"text": string}')


Document = Annotated[str, PlainValidator(_document_text, json_schema_input_type=str | TextDocument)]


class RerankRequest(_Shape):
    model: str | None = Field(None, description="The served model's id (GET /v1/models); omitted: the served model.")
    query: str
    documents: list[Document] = Field(description="Strings, or objects with a `text` field.")
    top_n: int | None = Field(None, description="Return the best `top_n` (omitted or 0: every document).")
    return_documents: bool = Field(False, description="Return each document's text with its result.")
    max_tokens_per_doc: int | None = Field(None, description="Keep at most this many tokens of each document.")
    instruction: str = Field("", description="Extension: the task instruction (empty: the model card's default).")
    truncation: Literal["end", "none", "chunk"] | None = Field(
        None,
        description="Extension: a document that does not fit is cut at its end (default), refused (`none`), or "
        "scored whole as overlapping windows, its score the best window's (`chunk`).",
    )
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="Extension: interactive calls go before batch calls in the queue."
    )
    timeout: float | None = Field(
        None, description="Extension: seconds this call may take (also the X-Request-Timeout header; the earlier wins)."
    )
    stream: bool = Field(
        False, description="Extension: answer as Server-Sent Events, one `scored` event per batch, then `final`."
    )


class TeiRerankRequest(_Shape):
    """text-embeddings-inference's `POST /rerank`."""

    query: str
    texts: list[str]
    raw_scores: bool = Field(False, description="`score` is the raw logit instead of the 0..1 score.")
    return_text: bool = Field(False, description="Return each text with its result.")
    truncate: bool | None = Field(
        None, description="true (or omitted): cut a text that does not fit at its end; false: refuse it."
    )
    truncation_direction: Literal["Right", "right"] = Field("Right", description="Only the end of a text is ever cut.")
    instruction: str = Field("", description="Extension: the task instruction (empty: the model card's default).")
    timeout: float | None = Field(None, description="Extension: seconds this call may take.")


def _shape(body: object) -> str:
    return "tei" if isinstance(body, dict) and "texts" in body else "cohere"


# POST /rerank takes either shape: a body with `texts` is text-embeddings-inference's.
AnyRerankRequest = Annotated[
    Annotated[RerankRequest, Tag("cohere")] | Annotated[TeiRerankRequest, Tag("tei")],
    Discriminator(_shape),
]
SHAPE_TAGS = ("cohere", "tei")


class Span(_Shape):
    start: int = Field(description="The first character's position (in Unicode code points).")
    end: int = Field(description="One past the last character read.")


class RerankResult(_Shape):
    index: int = Field(description="The document's position in the request.")
    relevance_score: float = Field(description="sigmoid(logit), in [0, 1]: the model card's score.")
    logit: float = Field(description='The raw logit("yes") - logit("no") at the last token.')
    document: TextDocument | None = Field(None, description="Only with return_documents.")
    span: Span = Field(description="Extension: the characters of the document that earned the score.")
    windows: int = Field(description="Extension: the windows scored (1 unless the document was chunked).")
    truncated: bool = Field(description="Extension: the document was cut to fit.")


class Usage(_Shape):
    total_tokens: int = Field(description="Tokens the model read for every pair, prompt included.")
    cached_documents: int = Field(description="Extension: documents answered from the score cache.")


class ApiVersion(_Shape):
    version: str


class Tokens(_Shape):
    input_tokens: int


class Meta(_Shape):
    api_version: ApiVersion
    tokens: Tokens


class RerankResponse(_Shape):
    id: str = Field(description="The X-Request-Id header's value, or a new id.")
    model: str
    results: list[RerankResult] = Field(description="Best first; at most top_n.")
    usage: Usage
    meta: Meta


class ScoredEvent(_Shape):
    """The data of one `scored` Server-Sent Event: the documents one batch scored."""

    results: list[RerankResult]


class TeiRank(_Shape):
    index: int
    score: float = Field(description="The 0..1 score, or the logit with raw_scores.")
    text: str | None = Field(None, description="Only with return_text.")


class ModelCard(_Shape):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When the server started (Unix seconds).")
    owned_by: str
    max_model_len: int = Field(description="Tokens per (query, document) pair, prompt included.")


class ModelList(_Shape):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Shape):
    message: str = Field(description="What was wrong, and which limit applies.")
    code: str = Field(description="The gRPC status name the same failure has on the gRPC port, e.g. INVALID_ARGUMENT.")


class Status(_Shape):
    status: str
