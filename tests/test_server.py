"""The real server on loopback, two CPU worker processes, the tiny model, called
through the generated stubs."""

from __future__ import annotations

import concurrent.futures
import functools
import threading

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenizers import Tokenizer

from bench.server import wait_until
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from service.settings import Settings
from tests.reference import Recipe
from tests.texts import DOCUMENTS, QUERY
from workers.prompt import Chunking, PromptEncoder

MAX_LENGTH = 512
SECRET = "SENTINEL-never-in-logs-7f3a"


@pytest.fixture(scope="module")
def server_flags():
    return (
        "--workers-per-device", "2", "--cpu-threads", "1", "--max-length", str(MAX_LENGTH),
        "--max-batch-size", "64", "--max-batch-tokens", "16384",
    )  # fmt: skip


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield reranker_pb2_grpc.RerankerStub(channel)


@pytest.fixture(scope="module")
def recipe(tiny_model):
    return Recipe(tiny_model, max_length=MAX_LENGTH)


@functools.cache
def expected_logits(recipe, instruction, query, documents):
    return [logit for _, logit in recipe.scores(instruction, query, list(documents))]


def test_rerank_equals_the_recipe(stub, recipe):
    response = stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCUMENTS, request_id="r-1"), timeout=60)
    assert response.request_id == "r-1"
    assert sorted(result.index for result in response.results) == list(range(len(DOCUMENTS)))
    expected = expected_logits(recipe, None, QUERY, tuple(DOCUMENTS))
    for result in response.results:
        assert result.logit == pytest.approx(expected[result.index], abs=1e-4)
        assert 0 < result.score < 1
    logits = [result.logit for result in response.results]
    assert logits == sorted(logits, reverse=True)
    assert response.usage.documents == len(DOCUMENTS)
    assert response.usage.tokens == sum(result.tokens for result in response.results)
    # compute is summed over batches, which may run at once on both workers: it can exceed total
    assert response.timing.total.ToNanoseconds() >= response.timing.queue.ToNanoseconds()
    assert response.timing.compute.ToNanoseconds() > 0


def test_instruction_top_n_and_documents(stub, recipe):
    instruction = "Given a question, retrieve passages that answer it"
    response = stub.Rerank(
        pb.RerankRequest(query=QUERY, documents=DOCUMENTS[:6], instruction=instruction, top_n=2, return_documents=True),
        timeout=60,
    )
    assert len(response.results) == 2
    expected = expected_logits(recipe, instruction, QUERY, tuple(DOCUMENTS[:6]))
    best = sorted(range(6), key=lambda i: -expected[i])[:2]
    assert [result.index for result in response.results] == best
    assert [result.document for result in response.results] == [DOCUMENTS[i] for i in best]
    plain = stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCUMENTS[:6]), timeout=60)
    assert all(result.document == "" for result in plain.results)


def test_top_n_beyond_the_documents_is_clamped(stub):
    response = stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCUMENTS[:3], top_n=50), timeout=60)
    assert len(response.results) == 3


def test_truncation_is_reported(stub, recipe):
    long_document = "Paris " * 2000
    response = stub.Rerank(pb.RerankRequest(query=QUERY, documents=["short", long_document]), timeout=60)
    by_index = {result.index: result for result in response.results}
    assert by_index[1].truncated and by_index[1].tokens == MAX_LENGTH
    assert not by_index[0].truncated and by_index[0].tokens < MAX_LENGTH
    assert response.usage.truncated_documents == 1
    assert by_index[1].logit == pytest.approx(
        expected_logits(recipe, None, QUERY, ("short", long_document))[1], abs=1e-4
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub.Rerank(
            pb.RerankRequest(query=QUERY, documents=["short", long_document], truncation=pb.TRUNCATION_NONE), timeout=60
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "document 1 needs" in refused.value.details() and f"max_length {MAX_LENGTH}" in refused.value.details()


def test_max_tokens_per_doc_cuts_each_document(stub, recipe, tiny_model):
    long_document = "Paris is the capital of France. " * 40
    whole = stub.Rerank(pb.RerankRequest(query=QUERY, documents=[long_document]), timeout=60).results[0]
    roomy = stub.Rerank(pb.RerankRequest(query=QUERY, documents=[long_document], max_tokens_per_doc=1000), timeout=60)
    assert roomy.results[0].logit == pytest.approx(whole.logit, abs=1e-5) and not roomy.results[0].truncated
    cut = stub.Rerank(pb.RerankRequest(query=QUERY, documents=[long_document], max_tokens_per_doc=20), timeout=60)
    result = cut.results[0]
    assert result.truncated and cut.usage.truncated_documents == 1
    # the recipe cutting the body at the head plus 20 document tokens reads the same tokens
    # prompt + head with an empty document, less the space after "<Document>:", which is a
    # token of its own there but merges into a document's first word
    head = len(recipe.token_ids(None, QUERY, [""])[0]) - 1
    assert result.tokens == head + 20
    expected = Recipe(tiny_model, max_length=result.tokens).scores(None, QUERY, [long_document])[0][1]
    assert result.logit == pytest.approx(expected, abs=1e-4)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Rerank(
            pb.RerankRequest(
                query=QUERY, documents=["short", long_document], max_tokens_per_doc=20, truncation=pb.TRUNCATION_NONE
            ),
            timeout=60,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "document 1 needs" in refused.value.details() and "max_tokens_per_doc=20" in refused.value.details()


def test_chunking_scores_a_long_document_whole(stub, tiny_model):
    """Through the real server: a document of about five max_length pairs, chunked;
    its logit is the recipe's best over the same windows' texts."""
    long_document = " ".join(DOCUMENTS[:20]) * 3
    request = pb.RerankRequest(query=QUERY, documents=["short", long_document], truncation=pb.TRUNCATION_CHUNK)
    response = stub.Rerank(request, timeout=120)
    result = {r.index: r for r in response.results}[1]
    encoder = PromptEncoder(Tokenizer.from_file(str(tiny_model / "tokenizer.json")), MAX_LENGTH)
    defaults = Settings(model="unused")
    chunking = Chunking(defaults.chunk_overlap_tokens, defaults.max_windows_per_document)
    (windows,) = encoder.encode_windows([(QUERY, long_document)], chunking=chunking)
    assert result.windows == len(windows) >= 3 and not result.truncated
    assert all(window.pair.length <= MAX_LENGTH for window in windows)
    texts = [long_document[window.start : window.end] for window in windows]
    expected = [logit for _, logit in Recipe(tiny_model, max_length=8192).scores(None, QUERY, texts)]
    assert result.logit == pytest.approx(max(expected), abs=1e-4)
    assert long_document[result.span.start : result.span.end] in texts
    assert response.usage.tokens == sum(r.tokens for r in response.results)


def rpc_lines(server, prefix: str, count: int) -> dict[str, dict] | None:
    """The `rpc` log lines of the calls whose request id starts with `prefix`, by id, once there are `count`."""
    lines = {line["request_id"]: line for line in server.events("rpc") if line.get("request_id", "").startswith(prefix)}
    return lines if len(lines) == count else None


def test_repeats_are_answered_from_the_cache(server, stub):
    documents = [f"cache check {i}" for i in range(5)]
    first = stub.Rerank(pb.RerankRequest(query=QUERY, documents=documents, request_id="cache-1"), timeout=60)
    admitted, hits = server.metric("reranker_pairs_admitted_total"), server.metric("reranker_score_cache_hits_total")
    again = stub.Rerank(pb.RerankRequest(query=QUERY, documents=documents, request_id="cache-2"), timeout=60)
    assert server.metric("reranker_pairs_admitted_total") == admitted  # nothing reached the queue
    assert server.metric("reranker_score_cache_hits_total") == hits + 5
    assert server.metric("reranker_score_cache_entries") >= 5
    assert server.metric("reranker_score_cache_bytes") == 512 * server.metric("reranker_score_cache_entries")
    assert (first.usage.cached_documents, again.usage.cached_documents) == (0, 5)
    assert [(r.index, r.logit) for r in again.results] == [(r.index, r.logit) for r in first.results]
    # the call's log line says so too (written as the call ends, so perhaps just after the answer)
    logged = wait_until(lambda: rpc_lines(server, "cache-", 2), "both calls' log lines", 10)
    assert (logged["cache-1"]["cached"], logged["cache-2"]["cached"]) == (0, 5)
    assert (logged["cache-1"]["windows"], logged["cache-2"]["windows"]) == (5, 0)


def test_score_keeps_input_order(stub, recipe):
    pairs = [pb.Pair(query=QUERY, document=d) for d in DOCUMENTS[:5]] + [
        pb.Pair(query="東京はどこ?", document=DOCUMENTS[5])
    ]
    response = stub.Score(pb.ScoreRequest(pairs=pairs, request_id="s-1"), timeout=60)
    assert response.request_id == "s-1"
    assert [result.index for result in response.results] == list(range(6))
    expected = expected_logits(recipe, None, QUERY, tuple(DOCUMENTS[:5]))
    assert [r.logit for r in response.results[:5]] == pytest.approx(expected, abs=1e-4)
    assert response.results[5].logit == pytest.approx(
        expected_logits(recipe, None, "東京はどこ?", (DOCUMENTS[5],))[0], abs=1e-4
    )


def test_stream_yields_partial_results_then_the_ranking(stub):
    # Batches that complete together may come in one event, so their number depends on
    # the machine's load; one event per batch is tests/test_faults.py's, with batches
    # answered one at a time.
    documents = [f"document number {i} " + "words " * (i % 7) for i in range(150)]
    messages = list(stub.RerankStream(pb.RerankRequest(query=QUERY, documents=documents, top_n=5), timeout=60))
    partial, final = messages[:-1], messages[-1]
    assert partial and all(message.WhichOneof("event") == "scored" for message in partial)
    assert final.WhichOneof("event") == "final"
    streamed = [result.index for message in partial for result in message.scored.results]
    assert sorted(streamed) == list(range(150))  # each document once
    scored = {result.index: result.logit for message in partial for result in message.scored.results}
    assert len(final.final.results) == 5
    best = sorted(scored, key=lambda i: -scored[i])[:5]
    assert [result.index for result in final.final.results] == best


def test_rerank_many_answers_every_request(stub, recipe):
    # Against the recipe, not a unary call: the score cache would answer that one from RerankMany's results.
    queries = [f"query {i}" for i in range(20)]
    documents = DOCUMENTS[:8]
    requests = [pb.RerankRequest(query=q, documents=documents, request_id=f"m-{i}") for i, q in enumerate(queries)]
    answers = {answer.request_id: answer for answer in stub.RerankMany(iter(requests), timeout=120)}
    assert sorted(answers) == sorted(f"m-{i}" for i in range(20))
    for i, query in enumerate(queries):
        expected = expected_logits(recipe, None, query, tuple(documents))
        got = answers[f"m-{i}"]
        assert not got.HasField("error")
        assert sorted(r.index for r in got.results) == list(range(len(documents)))
        logits = [r.logit for r in got.results]
        assert logits == sorted(logits, reverse=True)
        assert logits == pytest.approx([expected[r.index] for r in got.results], abs=1e-4)


def test_rerank_many_reports_a_bad_request_and_goes_on(stub):
    requests = [
        pb.RerankRequest(query=QUERY, documents=["a"], request_id="good"),
        pb.RerankRequest(query="", documents=["a"], request_id="bad"),
        pb.RerankRequest(query=QUERY, documents=["b"], request_id="good-2"),
    ]
    answers = {answer.request_id: answer for answer in stub.RerankMany(iter(requests), timeout=60)}
    assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "query is empty" in answers["bad"].error.message
    assert len(answers["good"].results) == 1 and len(answers["good-2"].results) == 1


def test_concurrent_requests_share_batches_and_big_ones_spread(server, tiny_model):
    """From the server's own counters: 16 concurrent requests take fewer than 16
    batches, and one 200-document request runs on both workers."""
    batches_before = server.metric("reranker_batches_total")
    barrier = threading.Barrier(16)

    def call(i):
        with server.channel() as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)  # connected before the race
            barrier.wait()
            return stub.Rerank(pb.RerankRequest(query=f"q{i}", documents=["one small document"]), timeout=60)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    assert all(len(r.results) == 1 for r in results)
    assert server.metric("reranker_batches_total") - batches_before < 16

    per_worker = [server.metric("reranker_batches_total", worker=w) for w in ("0", "1")]
    with server.channel() as channel:
        reranker_pb2_grpc.RerankerStub(channel).Rerank(
            pb.RerankRequest(query=QUERY, documents=[f"doc {i}" for i in range(200)]), timeout=60
        )
    after = [server.metric("reranker_batches_total", worker=w) for w in ("0", "1")]
    assert after[0] > per_worker[0] and after[1] > per_worker[1]


@pytest.mark.parametrize(
    "request_, message",
    [
        (pb.RerankRequest(query="", documents=["a"]), "query is empty"),
        (pb.RerankRequest(query="   ", documents=["a"]), "query is empty"),
        (pb.RerankRequest(query="q"), "no documents"),
        (pb.RerankRequest(query="q", documents=["a"], top_n=-1), "top_n must be >= 0"),
        (pb.RerankRequest(query="q", documents=["a"] * 1001), "max_documents_per_request=1000"),
        (pb.RerankRequest(query="q", documents=["a" * 131073]), "max_document_chars=131072"),
        (pb.RerankRequest(query="q" * 32769, documents=["a"]), "max_query_chars=32768"),
        (pb.RerankRequest(query="word " * 600, documents=["a"]), "leaving no room for a document"),
        (pb.RerankRequest(query="q", documents=["a"], cancel=True), "only meaningful on RerankMany"),
    ],
)
def test_bad_input_is_invalid_argument(stub, request_, message):
    with pytest.raises(grpc.RpcError) as error:
        stub.Rerank(request_, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_score_without_pairs_is_invalid(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Score(pb.ScoreRequest(), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_whitespace_duplicates_and_every_plane(stub):
    documents = ["   ", "", "same", "same", "\U0010fffd \U000f0000 𓀀 \x00"]
    response = stub.Rerank(pb.RerankRequest(query=QUERY, documents=documents), timeout=30)
    by_index = {r.index: r for r in response.results}
    assert len(by_index) == 5
    assert by_index[2].logit == by_index[3].logit
    order = [r.index for r in response.results]
    assert order.index(2) < order.index(3)  # ties keep request order


def test_unknown_fields_are_ignored(server):
    known = pb.RerankRequest(query=QUERY, documents=["a", "b"]).SerializeToString()
    unknown_field = bytes([0xF8, 0x06, 0x2A])  # field 111, varint 42
    with server.channel() as channel:
        call = channel.unary_unary(
            "/reranker.v1.Reranker/Rerank", request_serializer=None, response_deserializer=pb.RerankResponse.FromString
        )
        response = call(known + unknown_field, timeout=30)
    assert len(response.results) == 2


def test_model_info(stub, tiny_model):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.model_id == str(tiny_model)
    assert info.precision == pb.PRECISION_FP32
    assert list(info.devices) == ["cpu", "cpu"]
    assert info.limits.max_length == MAX_LENGTH
    assert info.limits.max_batch_tokens == 16384 and info.limits.max_batch_size == 64
    assert info.default_instruction.startswith("Given a web search query")
    assert info.server_version and info.model_memory_bytes > 0


def test_health_and_reflection(server):
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.health("reranker.v1.Reranker") == health_pb2.HealthCheckResponse.SERVING
    with server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="reranker.v1.Reranker"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    assert "reranker.v1.Reranker" in [s.name for s in listed.list_services_response.service]
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert any(f.package == "reranker.v1" and any(s.name == "Reranker" for s in f.service) for f in files)


def test_logs_carry_no_request_text(server, stub):
    stub.Rerank(pb.RerankRequest(query=SECRET, documents=[SECRET, "x"], request_id="log-check"), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Rerank(pb.RerankRequest(query="", documents=[SECRET]), timeout=30)
    # The log line is written after the answer is sent: wait for this call's own line.
    lines = wait_until(
        lambda: [line for line in server.events("rpc") if line.get("request_id") == "log-check"],
        "the call's rpc line",
        30,
    )
    assert lines[0]["code"] == "OK" and lines[0]["documents"] == 2 and lines[0]["tokens"] > 0
    assert SECRET not in server.log_text()


def test_front_end_never_loads_torch(server):
    with open(f"/proc/{server.process.pid}/maps") as maps:
        assert "libtorch" not in maps.read()
    assert len(server.worker_pids()) == 2
    for pid in server.worker_pids():
        with open(f"/proc/{pid}/maps") as maps:
            assert "libtorch" in maps.read()


def test_health_is_not_serving_until_workers_are_ready(server_factory, tiny_model):
    srv = server_factory(tiny_model, wait=False)
    assert srv.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    with srv.channel() as channel:
        stub = reranker_pb2_grpc.RerankerStub(channel)
        for call in (
            lambda: stub.Rerank(pb.RerankRequest(query="q", documents=["a"]), timeout=10),
            lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    srv.wait_serving()
    assert srv.health() == health_pb2.HealthCheckResponse.SERVING
