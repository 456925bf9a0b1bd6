"""The clients, sync and asyncio, and what they share: ChannelOptions, RerankerError,
and the request builders.

Every call has a deadline. UNAVAILABLE and RESOURCE_EXHAUSTED are retried by
gRPC itself, through the channel's service config (retryPolicy with backoff
and retryThrottling), not by a loop here. Errors surface as RerankerError,
which carries the status code and the server's message. Answers are the typed
objects of reranker_client.results, each with its message as `raw`.

Several replicas: pass a list of "ip:port" addresses, or a "dns:///name:port"
target whose name resolves to every replica (a Kubernetes headless Service):
calls are spread over them round-robin, and a replica that goes away is
skipped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from reranker_client import results
from reranker_client.results import (
    ModelInfo,
    Priority,
    Ranking,
    RequestFailed,
    Scored,
    Scores,
    Truncation,
)

SERVICE = "reranker.v1.Reranker"
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

T = TypeVar("T")


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
    priority: int = Priority.UNSPECIFIED,
    truncation: int = Truncation.UNSPECIFIED,
    max_tokens_per_doc: int = 0,
) -> pb.RerankRequest:
    """A RerankRequest; a list of them is what rerank_many sends. `max_tokens_per_doc`
    keeps at most that many tokens of each document (0: as max_length allows)."""
    return pb.RerankRequest(
        query=query,
        documents=list(documents),
        instruction=instruction,
        top_n=top_n,
        return_documents=return_documents,
        request_id=request_id,
        priority=pb.Priority.Name(priority),
        truncation=pb.Truncation.Name(truncation),
        max_tokens_per_doc=max_tokens_per_doc,
    )


def score_request(
    pairs: Iterable[tuple[str, str]],
    *,
    instruction: str = "",
    request_id: str = "",
    priority: int = Priority.UNSPECIFIED,
    truncation: int = Truncation.UNSPECIFIED,
    max_tokens_per_doc: int = 0,
) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        pairs=[pb.Pair(query=query, document=document) for query, document in pairs],
        instruction=instruction,
        request_id=request_id,
        priority=pb.Priority.Name(priority),
        truncation=pb.Truncation.Name(truncation),
        max_tokens_per_doc=max_tokens_per_doc,
    )


class RerankerClient:
    """Blocking client. Thread-safe; one per process is enough.

    `target`: "host:port", a list of "ip:port" replicas (spread round-robin), or a
    resolver name such as "dns:///reranker:50051". `options`: the fields of
    ChannelOptions (timeout, max_attempts, token, tls, root_certificates,
    certificate_chain, private_key, max_message_bytes)."""

    def __init__(self, target: str | Sequence[str] = "localhost:50051", **options: Any) -> None:
        self.options = ChannelOptions(target=target, **options)
        self._channel = self.options.open(grpc)
        self._stub = reranker_pb2_grpc.RerankerStub(self._channel)

    @classmethod
    def from_channel(cls, channel: grpc.Channel, **options: Any) -> RerankerClient:
        """A client over a channel made elsewhere (with interceptors, or a test channel).
        Of the options only `timeout` and `token` apply: the channel's own arguments
        decide retries and balancing. Closing the client closes the channel."""
        client = cls.__new__(cls)
        client.options = ChannelOptions(**options)
        client._channel = channel
        client._stub = reranker_pb2_grpc.RerankerStub(channel)
        return client

    def __enter__(self) -> RerankerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=timeout or self.options.timeout, metadata=self.options.metadata())
        except grpc.RpcError as error:
            raise RerankerError.from_rpc_error(error) from None

    def _stream(self, call, convert: Callable[[Any], T]) -> Iterator[T]:
        try:
            for message in call:
                yield convert(message)
        except grpc.RpcError as error:
            raise RerankerError.from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once finished; frees the server's work if we stopped early

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str = "",
        top_n: int = 0,
        return_documents: bool = False,
        request_id: str = "",
        priority: int = Priority.UNSPECIFIED,
        truncation: int = Truncation.UNSPECIFIED,
        max_tokens_per_doc: int = 0,
        timeout: float | None = None,
    ) -> Ranking:
        """Rank `documents` for `query`: results best first, at most `top_n` (0: all).
        `truncation=Truncation.CHUNK` scores a long document whole, as windows of at most
        `max_tokens_per_doc` tokens (0: as many as max_length allows), keeping the best."""
        request = rerank_request(
            query,
            documents,
            instruction=instruction,
            top_n=top_n,
            return_documents=return_documents,
            request_id=request_id,
            priority=priority,
            truncation=truncation,
            max_tokens_per_doc=max_tokens_per_doc,
        )
        return results.ranking(self._call(self._stub.Rerank, request, timeout))

    def rerank_stream(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str = "",
        top_n: int = 0,
        return_documents: bool = False,
        request_id: str = "",
        priority: int = Priority.UNSPECIFIED,
        truncation: int = Truncation.UNSPECIFIED,
        max_tokens_per_doc: int = 0,
        timeout: float | None = None,
    ) -> Iterator[Scored | Ranking]:
        """A Scored event per completed batch, then the final Ranking. Closing the
        iterator (or leaving a for loop over it) cancels the call and the server's queued work."""
        request = rerank_request(
            query,
            documents,
            instruction=instruction,
            top_n=top_n,
            return_documents=return_documents,
            request_id=request_id,
            priority=priority,
            truncation=truncation,
            max_tokens_per_doc=max_tokens_per_doc,
        )
        return self._stream(self._call(self._stub.RerankStream, request, timeout), results.stream_event)

    def rerank_many(
        self, requests: Iterable[pb.RerankRequest], *, timeout: float | None = None
    ) -> Iterator[Ranking | RequestFailed]:
        """Many requests (see rerank_request) over one stream; answers come back as they
        complete, each with its request's request_id: a Ranking, or a RequestFailed for a
        request the server refused (the stream goes on). `timeout` bounds the whole stream."""
        return self._stream(self._call(self._stub.RerankMany, iter(requests), timeout), results.rerank_answer)

    def score(
        self,
        pairs: Iterable[tuple[str, str]],
        *,
        instruction: str = "",
        request_id: str = "",
        priority: int = Priority.UNSPECIFIED,
        truncation: int = Truncation.UNSPECIFIED,
        max_tokens_per_doc: int = 0,
        timeout: float | None = None,
    ) -> Scores:
        """Score explicit (query, document) pairs; results in input order."""
        request = score_request(
            pairs,
            instruction=instruction,
            request_id=request_id,
            priority=priority,
            truncation=truncation,
            max_tokens_per_doc=max_tokens_per_doc,
        )
        return results.scores(self._call(self._stub.Score, request, timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The loaded model and the server's limits."""
        return results.model_info(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))


class AsyncRerankerClient:
    """asyncio client, with RerankerClient's methods and options; create it inside
    the event loop that uses it."""

    def __init__(self, target: str | Sequence[str] = "localhost:50051", **options: Any) -> None:
        self.options = ChannelOptions(target=target, **options)
        self._channel = self.options.open(grpc.aio)
        self._stub = reranker_pb2_grpc.RerankerStub(self._channel)

    @classmethod
    def from_channel(cls, channel: grpc.aio.Channel, **options: Any) -> AsyncRerankerClient:
        """A client over a grpc.aio channel made elsewhere; see RerankerClient.from_channel."""
        client = cls.__new__(cls)
        client.options = ChannelOptions(**options)
        client._channel = channel
        client._stub = reranker_pb2_grpc.RerankerStub(channel)
        return client

    async def __aenter__(self) -> AsyncRerankerClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _kwargs(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout or self.options.timeout, "metadata": self.options.metadata()}

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, **self._kwargs(timeout))
        except grpc.RpcError as error:
            raise RerankerError.from_rpc_error(error) from None

    async def _stream(self, call, convert: Callable[[Any], T]) -> AsyncIterator[T]:
        try:
            async for message in call:
                yield convert(message)
        except grpc.RpcError as error:
            raise RerankerError.from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once finished; frees the server's work if we stopped early

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str = "",
        top_n: int = 0,
        return_documents: bool = False,
        request_id: str = "",
        priority: int = Priority.UNSPECIFIED,
        truncation: int = Truncation.UNSPECIFIED,
        max_tokens_per_doc: int = 0,
        timeout: float | None = None,
    ) -> Ranking:
        request = rerank_request(
            query,
            documents,
            instruction=instruction,
            top_n=top_n,
            return_documents=return_documents,
            request_id=request_id,
            priority=priority,
            truncation=truncation,
            max_tokens_per_doc=max_tokens_per_doc,
        )
        return results.ranking(await self._call(self._stub.Rerank, request, timeout))

    def rerank_stream(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str = "",
        top_n: int = 0,
        return_documents: bool = False,
        request_id: str = "",
        priority: int = Priority.UNSPECIFIED,
        truncation: int = Truncation.UNSPECIFIED,
        max_tokens_per_doc: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[Scored | Ranking]:
        request = rerank_request(
            query,
            documents,
            instruction=instruction,
            top_n=top_n,
            return_documents=return_documents,
            request_id=request_id,
            priority=priority,
            truncation=truncation,
            max_tokens_per_doc=max_tokens_per_doc,
        )
        return self._stream(self._stub.RerankStream(request, **self._kwargs(timeout)), results.stream_event)

    def rerank_many(
        self,
        requests: AsyncIterable[pb.RerankRequest] | Iterable[pb.RerankRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[Ranking | RequestFailed]:
        return self._stream(self._stub.RerankMany(requests, **self._kwargs(timeout)), results.rerank_answer)

    async def score(
        self,
        pairs: Iterable[tuple[str, str]],
        *,
        instruction: str = "",
        request_id: str = "",
        priority: int = Priority.UNSPECIFIED,
        truncation: int = Truncation.UNSPECIFIED,
        max_tokens_per_doc: int = 0,
        timeout: float | None = None,
    ) -> Scores:
        request = score_request(
            pairs,
            instruction=instruction,
            request_id=request_id,
            priority=priority,
            truncation=truncation,
            max_tokens_per_doc=max_tokens_per_doc,
        )
        return results.scores(await self._call(self._stub.Score, request, timeout))

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return results.model_info(await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))
