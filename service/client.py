"""A typed Python client for the Reranker service, sync and asyncio.

Every call has a deadline. UNAVAILABLE and RESOURCE_EXHAUSTED are retried by
gRPC itself, through the channel's service config (retryPolicy with backoff
and retryThrottling), not by a loop here. Errors surface as RerankerError,
which carries the status code and the server's message.

    with RerankerClient("localhost:50051") as client:
        ranking = client.rerank("what is the capital of France?", ["Paris is...", "Berlin is..."])
        for result in ranking.results:
            print(result.index, result.score)

Several replicas: pass a list of "ip:port" addresses, or a "dns:///name:port"
target whose name resolves to every replica (a Kubernetes headless Service):
calls are spread over them round-robin, and a replica that goes away is
skipped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc

SERVICE = "reranker.v1.Reranker"
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


class RerankerError(Exception):
    """A call ended with a status other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> RerankerError:
        return cls(error.code(), error.details() or "")


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach the server. Build once and share; channels are expensive."""

    target: str | Sequence[str] = "localhost:50051"
    timeout: float = 30.0  # seconds, for every call that does not name its own
    max_attempts: int = 3  # per call, the first one included; 1 turns retries off
    token: str = ""  # bearer token, sent as `authorization: Bearer <token>`
    tls: bool = False
    root_certificates: bytes | None = None  # PEM; None uses the system's roots
    certificate_chain: bytes | None = None  # PEM client certificate, for mutual TLS
    private_key: bytes | None = None
    max_message_bytes: int = 64 * 1024 * 1024

    def resolved_target(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return "ipv4:" + ",".join(self.target)  # a static list for the round_robin policy

    def service_config(self) -> str:
        config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
        if self.max_attempts > 1:
            config["methodConfig"] = [
                {
                    "name": [{"service": SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": list(RETRYABLE),
                    },
                }
            ]
            # Stop retrying when most calls fail: retries must not amplify an overload.
            # Each failed attempt spends a token, each success earns 0.1 back, and retries
            # stop below half of maxTokens: so once more than ~9% of attempts keep failing,
            # retries stop whatever maxTokens is. maxTokens only sizes the burst that may be
            # retried at once. A replica that dies fails every call it holds at the same
            # moment: 10 tokens let only 4 of them retry (tests/test_replicas.py lost the
            # rest); 100 covers about 50.
            config["retryThrottling"] = {"maxTokens": 100, "tokenRatio": 0.1}
        return json.dumps(config)

    def channel_arguments(self) -> list[tuple[str, object]]:
        return [
            ("grpc.service_config", self.service_config()),
            ("grpc.enable_retries", 1 if self.max_attempts > 1 else 0),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def open(self, module):
        """A channel from `module` (grpc, or grpc.aio: they share these calls)."""
        credentials = self.credentials()
        if credentials is None:
            return module.insecure_channel(self.resolved_target(), self.channel_arguments())
        return module.secure_channel(self.resolved_target(), credentials, self.channel_arguments())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def rerank_request(
    query: str,
    documents: Sequence[str],
    *,
    instruction: str = "",
    top_n: int = 0,
    return_documents: bool = False,
    request_id: str = "",
    priority: int = pb.PRIORITY_UNSPECIFIED,
    truncation: int = pb.TRUNCATION_UNSPECIFIED,
) -> pb.RerankRequest:
    return pb.RerankRequest(
        query=query,
        documents=list(documents),
        instruction=instruction,
        top_n=top_n,
        return_documents=return_documents,
        request_id=request_id,
        priority=priority,
        truncation=truncation,
    )


def score_request(pairs: Iterable[tuple[str, str]], *, instruction: str = "", request_id: str = "") -> pb.ScoreRequest:
    return pb.ScoreRequest(
        pairs=[pb.Pair(query=query, document=document) for query, document in pairs],
        instruction=instruction,
        request_id=request_id,
    )


class RerankerClient:
    """Blocking client. Thread-safe; one per process is enough."""

    def __init__(self, target: str | Sequence[str] = "localhost:50051", **options) -> None:
        self.options = ChannelOptions(target=target, **options)
        self._channel = self.options.open(grpc)
        self._stub = reranker_pb2_grpc.RerankerStub(self._channel)

    def __enter__(self) -> RerankerClient:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=timeout or self.options.timeout, metadata=self.options.metadata())
        except grpc.RpcError as error:
            raise RerankerError.from_rpc_error(error) from None

    def _stream(self, call) -> Iterator:
        try:
            yield from call
        except grpc.RpcError as error:
            raise RerankerError.from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once finished; frees the server's work if we stopped early

    def rerank(
        self, query: str, documents: Sequence[str], *, timeout: float | None = None, **fields
    ) -> pb.RerankResponse:
        """Rank `documents` for `query`; fields: instruction, top_n, return_documents, request_id, priority, truncation."""
        return self._call(self._stub.Rerank, rerank_request(query, documents, **fields), timeout)

    def rerank_stream(
        self, query: str, documents: Sequence[str], *, timeout: float | None = None, **fields
    ) -> Iterator[pb.RerankStreamResponse]:
        """Scores as batches complete, then the final ranking. Closing the iterator
        (or leaving a for loop over it) cancels the call and the server's queued work."""
        return self._stream(self._call(self._stub.RerankStream, rerank_request(query, documents, **fields), timeout))

    def rerank_many(
        self, requests: Iterable[pb.RerankRequest], *, timeout: float | None = None
    ) -> Iterator[pb.RerankResponse]:
        """Many requests over one stream; answers come back as they complete, each
        with its request's request_id (and `error` set if that request failed)."""
        return self._stream(self._call(self._stub.RerankMany, iter(requests), timeout))

    def score(self, pairs: Iterable[tuple[str, str]], *, timeout: float | None = None, **fields) -> pb.ScoreResponse:
        return self._call(self._stub.Score, score_request(pairs, **fields), timeout)

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)


class AsyncRerankerClient:
    """asyncio client; create it inside the event loop that uses it."""

    def __init__(self, target: str | Sequence[str] = "localhost:50051", **options) -> None:
        self.options = ChannelOptions(target=target, **options)
        self._channel = self.options.open(grpc.aio)
        self._stub = reranker_pb2_grpc.RerankerStub(self._channel)

    async def __aenter__(self) -> AsyncRerankerClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=timeout or self.options.timeout, metadata=self.options.metadata())
        except grpc.RpcError as error:
            raise RerankerError.from_rpc_error(error) from None

    async def _stream(self, call) -> AsyncIterator:
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise RerankerError.from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once finished; frees the server's work if we stopped early

    async def rerank(
        self, query: str, documents: Sequence[str], *, timeout: float | None = None, **fields
    ) -> pb.RerankResponse:
        return await self._call(self._stub.Rerank, rerank_request(query, documents, **fields), timeout)

    def rerank_stream(
        self, query: str, documents: Sequence[str], *, timeout: float | None = None, **fields
    ) -> AsyncIterator[pb.RerankStreamResponse]:
        call = self._stub.RerankStream(
            rerank_request(query, documents, **fields),
            timeout=timeout or self.options.timeout,
            metadata=self.options.metadata(),
        )
        return self._stream(call)

    def rerank_many(
        self, requests: AsyncIterable[pb.RerankRequest] | Iterable[pb.RerankRequest], *, timeout: float | None = None
    ) -> AsyncIterator[pb.RerankResponse]:
        call = self._stub.RerankMany(
            requests, timeout=timeout or self.options.timeout, metadata=self.options.metadata()
        )
        return self._stream(call)

    async def score(
        self, pairs: Iterable[tuple[str, str]], *, timeout: float | None = None, **fields
    ) -> pb.ScoreResponse:
        return await self._call(self._stub.Score, score_request(pairs, **fields), timeout)

    async def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
