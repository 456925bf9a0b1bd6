"""A typed Python client for the Qwen3-Reranker gRPC service, sync and asyncio.

    from reranker_client import RerankerClient

    with RerankerClient("localhost:50051") as client:
        ranking = client.rerank("what is the capital of France?", ["Paris is...", "Berlin is..."])
        for result in ranking.results:
            print(result.index, result.score)

Needs grpcio and protobuf only. The generated stubs are the `reranker` package
of the same distribution (reranker.v1.reranker_pb2, reranker_pb2_grpc).
"""

from reranker_client.client import (
    AsyncRerankerClient,
    ChannelOptions,
    RerankerClient,
    RerankerError,
    rerank_request,
    score_request,
)
from reranker_client.results import (
    Limits,
    ModelInfo,
    Precision,
    Priority,
    Ranking,
    RequestFailed,
    Scored,
    ScoredDocument,
    Scores,
    Span,
    StreamEvent,
    Timing,
    Truncation,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncRerankerClient",
    "ChannelOptions",
    "Limits",
    "ModelInfo",
    "Precision",
    "Priority",
    "Ranking",
    "RequestFailed",
    "RerankerClient",
    "RerankerError",
    "Scored",
    "ScoredDocument",
    "Scores",
    "Span",
    "StreamEvent",
    "Timing",
    "Truncation",
    "Usage",
    "rerank_request",
    "score_request",
]
