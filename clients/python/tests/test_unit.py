"""reranker_client without a server: grpc_testing's channel stands in for one.

grpc_testing drives synchronous code only, so these tests cover the blocking
client (the asyncio client shares its request builders, options and typed
results; test_live.py runs both against a real server). A test thread makes
the call; the test takes it from the channel, checks what the client sent (the
request's fields, the deadline, the `authorization` metadata), answers with OK
or an error code, and checks the typed result or the RerankerError.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable

import grpc
import grpc_testing
import pytest
from google.protobuf import duration_pb2

from reranker.v1 import reranker_pb2 as pb
from reranker_client import (
    ChannelOptions,
    Limits,
    ModelInfo,
    Precision,
    Priority,
    Ranking,
    RequestFailed,
    RerankerClient,
    RerankerError,
    Scored,
    ScoredDocument,
    Scores,
    Span,
    Timing,
    Truncation,
    Usage,
    rerank_request,
    results,
)

METHODS = pb.DESCRIPTOR.services_by_name["Reranker"].methods_by_name
WAIT = 10.0  # seconds; a test that waits this long has failed


class RecordingChannel:
    """grpc_testing's channel, with the `timeout` of every call recorded on its way
    through (grpc_testing itself drops it)."""

    def __init__(self) -> None:
        self.testing = grpc_testing.channel(pb.DESCRIPTOR.services_by_name.values(), grpc_testing.strict_real_time())
        self.timeouts: list[float | None] = []

    def _recorded(self, kind: str):
        def multicallable(method, *args, **kwargs):
            inner = getattr(self.testing, kind)(method, *args, **kwargs)

            def call(request, timeout=None, metadata=None, **more):
                self.timeouts.append(timeout)
                return inner(request, timeout=timeout, metadata=metadata, **more)

            return call

        return multicallable

    def __getattr__(self, name: str):
        if name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._recorded(name)
        return getattr(self.testing, name)  # take_unary_unary, close, ...

    def take(self, kind: str, method: str):
        """The next call of `method`, as grpc_testing hands it over; fails instead of
        blocking for ever when the client made none."""
        taken: list = []
        thread = threading.Thread(
            target=lambda: taken.append(getattr(self.testing, f"take_{kind}")(METHODS[method])), daemon=True
        )
        thread.start()
        thread.join(WAIT)
        assert taken, f"the client made no {method} call"
        return taken[0]


class InThread:
    """Runs a client call on a thread of its own (it blocks until the test answers)."""

    def __init__(self, function: Callable[[], object]) -> None:
        self._outcome: list[tuple[bool, object]] = []

        def run() -> None:
            try:
                self._outcome.append((True, function()))
            except BaseException as error:
                self._outcome.append((False, error))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join(WAIT)
        assert self._outcome, "the call did not return"
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


@pytest.fixture
def channel() -> RecordingChannel:
    return RecordingChannel()


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


TIMING = pb.Timing(tokenize=duration(0.001), queue=duration(0.25), compute=duration(1.5), total=duration(2.000000001))
EXPECTED_TIMING = Timing(tokenize=0.001, queue=0.25, compute=1.5, total=2.000000001)
# More than 2**32: a 64-bit count arrives whole.
USAGE = pb.Usage(documents=3, tokens=2**40 + 1, truncated_documents=0)
EXPECTED_USAGE = Usage(documents=3, tokens=2**40 + 1, truncated_documents=0)


def metadata_of(invocation_metadata) -> dict[str, str]:
    return {key: value for key, value in invocation_metadata if not key.startswith("grpc.")}


# -- unary calls: what is sent, what comes back ------------------------------------------------


def test_rerank_sends_every_field_the_deadline_and_the_token(channel):
    client = RerankerClient.from_channel(channel, timeout=7, token="s3cret")
    call = InThread(
        lambda: client.rerank(
            "q",
            ["a", "b", "c"],
            instruction="judge it",
            top_n=2,
            return_documents=True,
            request_id="r-1",
            priority=Priority.BATCH,
            truncation=Truncation.NONE,
        )
    )
    metadata, request, rpc = channel.take("unary_unary", "Rerank")

    assert request == pb.RerankRequest(
        query="q",
        documents=["a", "b", "c"],
        instruction="judge it",
        top_n=2,
        return_documents=True,
        request_id="r-1",
        priority=pb.PRIORITY_BATCH,
        truncation=pb.TRUNCATION_NONE,
    )
    assert metadata_of(metadata) == {"authorization": "Bearer s3cret"}
    assert channel.timeouts == [7]

    response = pb.RerankResponse(
        request_id="r-1",
        results=[
            pb.ScoredDocument(index=2, score=0.75, logit=1.0986123, document="c", tokens=12),
            # Index 0 and zero values: kept, not dropped.
            pb.ScoredDocument(index=0, score=0.0, logit=-20.0, document="a", truncated=True, tokens=0),
        ],
        usage=USAGE,
        timing=TIMING,
    )
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    ranking = call.result()

    assert isinstance(ranking, Ranking)
    assert ranking == Ranking(
        request_id="r-1",
        results=[
            ScoredDocument(
                index=2, score=0.75, logit=pytest.approx(1.0986123), document="c", truncated=False, tokens=12
            ),
            ScoredDocument(index=0, score=0.0, logit=-20.0, document="a", truncated=True, tokens=0),
        ],
        usage=EXPECTED_USAGE,
        timing=EXPECTED_TIMING,
    )
    assert ranking.results[1].index == 0
    assert ranking.raw == response and ranking.results[0].raw == response.results[0]
    assert ranking.usage.raw == USAGE and ranking.timing.raw == TIMING
    with pytest.raises(dataclasses.FrozenInstanceError):
        ranking.request_id = "other"  # type: ignore[misc]


def test_chunking_sends_the_cap_and_reads_spans_windows_and_cached_documents(channel):
    client = RerankerClient.from_channel(channel)
    call = InThread(lambda: client.rerank("q", ["a", "b"], truncation=Truncation.CHUNK, max_tokens_per_doc=256))
    _, request, rpc = channel.take("unary_unary", "Rerank")
    assert request == pb.RerankRequest(
        query="q", documents=["a", "b"], truncation=pb.TRUNCATION_CHUNK, max_tokens_per_doc=256
    )
    response = pb.RerankResponse(
        results=[
            pb.ScoredDocument(index=1, logit=2.0, tokens=900, span=pb.Span(start=1200, end=2100), windows=4),
            pb.ScoredDocument(index=0, logit=1.0, tokens=40, span=pb.Span(start=0, end=1), windows=1),
        ],
        usage=pb.Usage(documents=2, tokens=940, cached_documents=1),
    )
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    ranking = call.result()
    assert [(r.span, r.windows) for r in ranking.results] == [(Span(1200, 2100), 4), (Span(0, 1), 1)]
    assert ranking.usage == Usage(documents=2, tokens=940, truncated_documents=0, cached_documents=1)
    assert ranking.results[0].span.raw == response.results[0].span
    # From a server older than spans: no span, no windows.
    assert results.scored_document(pb.ScoredDocument(index=3)).span is None


def test_defaults_no_token_and_a_deadline_of_the_calls_own(channel):
    client = RerankerClient.from_channel(channel)  # timeout 30 s, no token
    call = InThread(lambda: client.rerank("q", ["a"], timeout=2.5))
    metadata, request, rpc = channel.take("unary_unary", "Rerank")
    assert request == pb.RerankRequest(query="q", documents=["a"])  # every other field at its default
    assert "authorization" not in metadata_of(metadata)
    rpc.terminate(pb.RerankResponse(results=[pb.ScoredDocument(index=0)]), (), grpc.StatusCode.OK, "")
    assert call.result().results == [ScoredDocument(0, 0.0, 0.0, "", False, 0)]

    call = InThread(lambda: client.model_info())
    _, _, rpc = channel.take("unary_unary", "GetModelInfo")
    rpc.terminate(pb.ModelInfo(), (), grpc.StatusCode.OK, "")
    call.result()
    assert channel.timeouts == [2.5, 30.0]


@pytest.mark.parametrize(
    "code, details",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "query is empty"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full (max_queue_pairs 4096)"),
        (grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        (grpc.StatusCode.UNAVAILABLE, ""),
    ],
)
def test_a_status_other_than_ok_raises_reranker_error(channel, code, details):
    client = RerankerClient.from_channel(channel)
    call = InThread(lambda: client.rerank("", ["a"]))
    _, _, rpc = channel.take("unary_unary", "Rerank")
    rpc.terminate(None, (), code, details)
    with pytest.raises(RerankerError) as error:
        call.result()
    assert (error.value.code, error.value.message) == (code, details)
    assert str(error.value) == f"{code.name}: {details}"


def test_score(channel):
    client = RerankerClient.from_channel(channel, token="t")
    call = InThread(
        lambda: client.score(
            [("q1", "a"), ("q2", "b")], instruction="i", request_id="s", truncation=Truncation.END, timeout=3
        )
    )
    metadata, request, rpc = channel.take("unary_unary", "Score")
    assert request == pb.ScoreRequest(
        pairs=[pb.Pair(query="q1", document="a"), pb.Pair(query="q2", document="b")],
        instruction="i",
        request_id="s",
        truncation=pb.TRUNCATION_END,
    )
    assert metadata_of(metadata) == {"authorization": "Bearer t"} and channel.timeouts == [3]
    response = pb.ScoreResponse(
        request_id="s",
        results=[pb.ScoredDocument(index=0, score=0.5, tokens=9), pb.ScoredDocument(index=1, score=0.25, tokens=8)],
        usage=pb.Usage(documents=2, tokens=17),
        timing=TIMING,
    )
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    scores = call.result()
    assert scores == Scores(
        request_id="s",
        results=[ScoredDocument(0, 0.5, 0.0, "", False, 9), ScoredDocument(1, 0.25, 0.0, "", False, 8)],
        usage=Usage(2, 17, 0),
        timing=EXPECTED_TIMING,
    )
    assert [result.index for result in scores.results] == [0, 1] and scores.raw == response

    call = InThread(lambda: client.score([]))
    _, _, rpc = channel.take("unary_unary", "Score")
    rpc.terminate(None, (), grpc.StatusCode.INVALID_ARGUMENT, "no pairs")
    with pytest.raises(RerankerError, match="INVALID_ARGUMENT: no pairs"):
        call.result()


def test_model_info(channel):
    client = RerankerClient.from_channel(channel)
    call = InThread(client.model_info)
    _, request, rpc = channel.take("unary_unary", "GetModelInfo")
    assert request == pb.GetModelInfoRequest()
    limits = pb.Limits(
        max_length=8192,
        max_documents_per_request=1000,
        max_query_chars=0,  # zero is a value like any other
        max_document_chars=100_000,
        max_message_bytes=64 << 20,
        max_batch_tokens=16384,
        max_batch_size=64,
        max_wait=duration(0.005),
        max_queue_pairs=4096,
        max_queue_tokens=2**33,
    )
    message = pb.ModelInfo(
        model_id="Qwen/Qwen3-Reranker-0.6B",
        revision="abc123",
        precision=pb.PRECISION_BF16,
        devices=["cuda:0", "cuda:1"],
        limits=limits,
        default_instruction="Given a web search query, retrieve relevant passages that answer the query",
        server_version="0.1.0",
        model_memory_bytes=2**31 + 5,
    )
    rpc.terminate(message, (), grpc.StatusCode.OK, "")
    info = call.result()
    assert info == ModelInfo(
        model_id="Qwen/Qwen3-Reranker-0.6B",
        revision="abc123",
        precision=Precision.BF16,
        devices=["cuda:0", "cuda:1"],
        limits=Limits(
            max_length=8192,
            max_documents_per_request=1000,
            max_query_chars=0,
            max_document_chars=100_000,
            max_message_bytes=64 << 20,
            max_batch_tokens=16384,
            max_batch_size=64,
            max_wait=0.005,
            max_queue_pairs=4096,
            max_queue_tokens=2**33,
        ),
        default_instruction="Given a web search query, retrieve relevant passages that answer the query",
        server_version="0.1.0",
        model_memory_bytes=2**31 + 5,
    )
    assert info.precision == pb.PRECISION_BF16 and info.precision.name == "BF16"
    assert info.raw == message and info.limits.raw == limits


# -- streams ------------------------------------------------------------------------------------


def test_rerank_stream_yields_scored_events_then_the_ranking(channel):
    client = RerankerClient.from_channel(channel, timeout=9, token="t")
    call = InThread(lambda: list(client.rerank_stream("q", ["a", "b", "c"], top_n=1, request_id="st")))
    metadata, request, rpc = channel.take("unary_stream", "RerankStream")
    assert request == pb.RerankRequest(query="q", documents=["a", "b", "c"], top_n=1, request_id="st")
    assert metadata_of(metadata) == {"authorization": "Bearer t"} and channel.timeouts == [9]
    batches = [
        pb.ScoredDocuments(results=[pb.ScoredDocument(index=1, score=0.9), pb.ScoredDocument(index=0, score=0.1)]),
        pb.ScoredDocuments(results=[pb.ScoredDocument(index=2, score=0.5)]),
    ]
    final = pb.RerankResponse(request_id="st", results=[pb.ScoredDocument(index=1, score=0.9)], usage=USAGE)
    for batch in batches:
        rpc.send_response(pb.RerankStreamResponse(scored=batch))
    rpc.send_response(pb.RerankStreamResponse(final=final))
    rpc.terminate((), grpc.StatusCode.OK, "")
    events = call.result()

    assert [type(event) for event in events] == [Scored, Scored, Ranking]
    assert [[result.index for result in event.results] for event in events] == [[1, 0], [2], [1]]
    assert events[0].results[1] == ScoredDocument(0, pytest.approx(0.1), 0.0, "", False, 0)
    assert events[0].raw == batches[0]
    assert events[-1].request_id == "st" and events[-1].usage == EXPECTED_USAGE and events[-1].raw == final


def test_leaving_a_stream_early_cancels_the_call(channel):
    client = RerankerClient.from_channel(channel)

    def first_only():
        for event in client.rerank_stream("q", ["a", "b"]):
            return event  # leaves the loop: the generator is closed
        return None

    call = InThread(first_only)
    _, _, rpc = channel.take("unary_stream", "RerankStream")
    rpc.send_response(pb.RerankStreamResponse(scored=pb.ScoredDocuments(results=[pb.ScoredDocument(index=0)])))
    assert call.result() == Scored(results=[ScoredDocument(0, 0.0, 0.0, "", False, 0)])
    # rpc.cancelled() returns once the client has cancelled (and raises for any other end).
    InThread(rpc.cancelled).result()


def test_a_stream_that_fails_raises_reranker_error(channel):
    client = RerankerClient.from_channel(channel)
    seen: list = []
    first = threading.Event()

    def consume():
        for event in client.rerank_stream("q", ["a", "b"]):
            seen.append(event)
            first.set()

    call = InThread(consume)
    _, _, rpc = channel.take("unary_stream", "RerankStream")
    rpc.send_response(pb.RerankStreamResponse(scored=pb.ScoredDocuments(results=[pb.ScoredDocument(index=0)])))
    assert first.wait(WAIT)  # (grpc_testing drops responses not yet read when the call ends)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "the worker died")
    with pytest.raises(RerankerError) as error:
        call.result()
    assert (error.value.code, error.value.message) == (grpc.StatusCode.UNAVAILABLE, "the worker died")
    assert len(seen) == 1


def test_rerank_many_yields_rankings_and_failed_requests(channel):
    client = RerankerClient.from_channel(channel, timeout=60)
    requests = [rerank_request("q", ["a", "b"], request_id="good"), rerank_request("", ["x"], request_id="bad")]
    call = InThread(lambda: list(client.rerank_many(requests)))
    _, rpc = channel.take("stream_stream", "RerankMany")
    assert [rpc.take_request(), rpc.take_request()] == requests
    rpc.requests_closed()
    failure = pb.RerankResponse(
        request_id="bad",
        error=pb.RequestError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="query is empty"),
    )
    answer = pb.RerankResponse(
        request_id="good", results=[pb.ScoredDocument(index=1, score=0.6), pb.ScoredDocument(index=0, score=0.4)]
    )
    rpc.send_response(failure)  # answers come back as they complete, not in request order
    rpc.send_response(answer)
    rpc.terminate((), grpc.StatusCode.OK, "")
    answers = call.result()

    assert answers[0] == RequestFailed(
        request_id="bad", code=grpc.StatusCode.INVALID_ARGUMENT, message="query is empty"
    )
    assert answers[0].raw == failure
    assert isinstance(answers[1], Ranking) and answers[1].request_id == "good"
    assert [result.index for result in answers[1].results] == [1, 0]
    assert channel.timeouts == [60]


# -- typed results, enums, options ---------------------------------------------------------------


def test_request_failed_codes():
    def failed(code: int) -> RequestFailed:
        return results.rerank_answer(pb.RerankResponse(request_id="x", error=pb.RequestError(code=code, message="m")))

    assert failed(8).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failed(1).code == grpc.StatusCode.CANCELLED
    assert failed(999).code == grpc.StatusCode.UNKNOWN  # a number gRPC does not know
    # An answer without `error` is a ranking, even an empty one.
    assert results.rerank_answer(pb.RerankResponse(request_id="y")) == Ranking(
        "y", [], Usage(0, 0, 0), Timing(0.0, 0.0, 0.0, 0.0)
    )


def test_enums_mirror_the_proto():
    for enum_class, proto_enum in ((Priority, "Priority"), (Truncation, "Truncation"), (Precision, "Precision")):
        descriptor = pb.DESCRIPTOR.enum_types_by_name[proto_enum]
        prefix = descriptor.values[0].name.removesuffix("UNSPECIFIED")
        assert {prefix + member.name: member.value for member in enum_class} == {
            value.name: value.number for value in descriptor.values
        }
    # A precision this package does not know yet reads as UNSPECIFIED rather than failing.
    assert results.model_info(pb.ModelInfo(precision=99)).precision == Precision.UNSPECIFIED


def test_typed_objects_keep_every_field_of_their_message():
    """A field added to the proto must reach the typed object too (or be left out on purpose)."""
    pairs = [
        (ScoredDocument, pb.ScoredDocument),
        (Usage, pb.Usage),
        (Timing, pb.Timing),
        (Scores, pb.ScoreResponse),
        (Scored, pb.ScoredDocuments),
        (Limits, pb.Limits),
        (ModelInfo, pb.ModelInfo),
    ]
    for typed, message in pairs:
        fields = {f.name for f in dataclasses.fields(typed)} - {"raw"}
        assert fields == set(message.DESCRIPTOR.fields_by_name), typed.__name__
    # RerankResponse's `error` becomes RequestFailed, not a field of Ranking.
    assert {f.name for f in dataclasses.fields(Ranking)} - {"raw"} == set(
        pb.RerankResponse.DESCRIPTOR.fields_by_name
    ) - {"error"}


def test_channel_options():
    options = ChannelOptions(["10.0.0.5:50051", "10.0.0.6:50051"], max_attempts=4, token="x")
    assert options.resolved_target() == "ipv4:10.0.0.5:50051,10.0.0.6:50051"
    assert ChannelOptions("dns:///reranker:50051").resolved_target() == "dns:///reranker:50051"
    assert options.metadata() == (("authorization", "Bearer x"),)
    assert ChannelOptions().metadata() == ()
    config = json.loads(options.service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "reranker.v1.Reranker"}]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    assert config["retryThrottling"] == {"maxTokens": 100, "tokenRatio": 0.1}
    assert dict(options.channel_arguments())["grpc.enable_retries"] == 1

    no_retries = ChannelOptions(max_attempts=1)
    assert json.loads(no_retries.service_config()) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert dict(no_retries.channel_arguments())["grpc.enable_retries"] == 0
    assert ChannelOptions().credentials() is None
    assert isinstance(ChannelOptions(tls=True).credentials(), grpc.ChannelCredentials)
