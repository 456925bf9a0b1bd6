"""Bad input is never INTERNAL and never costs unbounded memory: every field is
range-checked (INVALID_ARGUMENT naming the field and the limit), identifiers
that reach log lines are bounded, and a request over a count or size limit is
refused before its parts become Python objects, leaving the front end's
memory where it was. Against the real server, whose front-end process is
measured from /proc."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from bench.server import wait_until
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc

SECRET = "SENTINEL-document-text-3b9d"


@pytest.fixture(scope="module")
def server_flags():
    """One worker: the front end's memory is what is measured."""
    return ("--workers-per-device", "1", "--cpu-threads", "1")


@pytest.fixture(scope="module")
def stub(server):
    with server.channel(**{"grpc.max_send_message_length": 64 << 20}) as channel:
        yield reranker_pb2_grpc.RerankerStub(channel)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    return error.value


def with_timeout(seconds: int, nanos: int = 0, **fields) -> pb.RerankRequest:
    request = pb.RerankRequest(query="q", documents=["a"], **fields)
    request.timeout.seconds, request.timeout.nanos = seconds, nanos
    return request


@pytest.mark.parametrize(
    "seconds, nanos, message",
    [
        (2**63 - 1, 0, "not a valid Duration"),
        (-(2**63), 0, "not a valid Duration"),
        (1, -5, "not a valid Duration"),
        (0, 10**9, "not a valid Duration"),
        (0, 0, "timeout must be a positive number of seconds"),
        (-3, 0, "timeout must be a positive number of seconds"),
    ],
)
def test_out_of_range_timeouts(stub, seconds, nanos, message):
    error = refused(lambda: stub.Rerank(with_timeout(seconds, nanos), timeout=30))
    assert message in error.details()
    answers = list(stub.RerankMany(iter([with_timeout(seconds, nanos, request_id="t")]), timeout=30))
    assert len(answers) == 1 and answers[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert message in answers[0].error.message


def test_enums_out_of_range(stub):
    error = refused(lambda: stub.Rerank(pb.RerankRequest(query="q", documents=["a"], priority=99), timeout=30))
    assert "priority 99" in error.details()
    error = refused(lambda: stub.Score(pb.ScoreRequest(pairs=[pb.Pair(query="q")], truncation=42), timeout=30))
    assert "truncation 42" in error.details()


def test_max_tokens_per_doc_at_every_extreme(server, stub):
    """A cap at or above max_length is no cap (a 32-bit wire field once made 2**31 an
    INTERNAL); below 1 is refused; on both transports, with and without the cache."""
    documents = ["a document of a few words", "another document"]
    plain = stub.Rerank(pb.RerankRequest(query="extremes", documents=documents), timeout=30)
    for cap in (2**32 - 1, 2**31, 1 << 20):
        for truncation in (pb.TRUNCATION_END, pb.TRUNCATION_NONE, pb.TRUNCATION_CHUNK):
            # a query of its own each time, so that the cache cannot answer
            request = pb.RerankRequest(
                query=f"extremes {cap} {truncation}", documents=documents, max_tokens_per_doc=cap, truncation=truncation
            )
            answer = stub.Rerank(request, timeout=30)
            assert len(answer.results) == 2
            assert not any(result.truncated for result in answer.results)
    capped = stub.Rerank(pb.RerankRequest(query="extremes", documents=documents, max_tokens_per_doc=2**32 - 1))
    assert [(r.index, r.logit) for r in capped.results] == [(r.index, r.logit) for r in plain.results]
    for cap in (10**12, 2**63, 2**31):
        body = {"query": f"http extremes {cap}", "documents": documents, "max_tokens_per_doc": cap}
        answer = httpx.post(f"{server.http_url}/v2/rerank", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["results"]) == 2
    for cap in (0, -1, -(2**70)):
        body = {"query": "q", "documents": documents, "max_tokens_per_doc": cap}
        answer = httpx.post(f"{server.http_url}/v2/rerank", json=body, timeout=30)
        assert answer.status_code == 400, answer.text
        assert "max_tokens_per_doc" in answer.json()["message"]


def test_long_identifiers_are_refused_and_never_logged(server, stub):
    long_id = "x" * (1 << 20)
    error = refused(lambda: stub.Rerank(pb.RerankRequest(query="q", documents=["a"], request_id=long_id), timeout=30))
    assert f"{1 << 20} characters, more than 128" in error.details()
    refused(
        lambda: stub.Score(pb.ScoreRequest(pairs=[pb.Pair(query="q", document="d")], request_id=long_id), timeout=30)
    )
    many = [pb.RerankRequest(query="q", documents=["a"], request_id=long_id)]
    answers = list(stub.RerankMany(iter(many), timeout=30))
    assert answers[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and answers[0].request_id == ""
    server.wait_for_event("rerank_many_request_failed")
    assert max(len(line) for line in server.raw) < 4096


def test_a_refused_call_logs_why_but_not_the_text(server, stub):
    request = pb.RerankRequest(query="q", documents=[SECRET * 10_000], request_id="why")
    error = refused(lambda: stub.Rerank(request, timeout=30))
    wait_until(lambda: [e for e in server.events("rpc") if e.get("request_id") == "why"], "the call's log line", 10)
    (line,) = [e for e in server.events("rpc") if e.get("request_id") == "why"]
    assert line["code"] == "INVALID_ARGUMENT" and line["reason"] == error.details()
    assert "max_document_chars=131072" in line["reason"]
    assert SECRET not in server.log_text()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def test_oversized_requests_leave_no_memory_behind(server, stub):
    with server.channel(**{"grpc.max_send_message_length": 64 << 20}) as channel:
        raw = channel.unary_unary("/reranker.v1.Reranker/Rerank")
        stub.Rerank(pb.RerankRequest(query="q", documents=["warm up"] * 10), timeout=30)
        before = rss_bytes(server.process.pid)
        # 16 MB: eight million empty documents (field 2, length 0), three times
        empty_documents = b"\x0a\x01q" + b"\x12\x00" * 8_000_000
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as error:
                raw(empty_documents, timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "8000000 documents is more than max_documents_per_request=1000" in error.value.details()
        # thirty 10 MB requests, over the count or over the characters per document
        too_many = pb.RerankRequest(query="q", documents=["x" * 10_000] * 1001).SerializeToString()
        too_long = pb.RerankRequest(query="q", documents=["y" * 131_073] * 76).SerializeToString()
        for number in range(30):
            with pytest.raises(grpc.RpcError) as error:
                raw(too_many if number % 2 else too_long, timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the same through the HTTP port: 16 MB of JSON, five million empty documents
    empty_json = b'{"query": "q", "documents": [' + b",".join([b'""'] * 5_000_000) + b"]}"
    for _ in range(2):
        answer = httpx.post(f"{server.http_url}/v2/rerank", content=empty_json, timeout=60)
        assert answer.status_code == 400, answer.text
        assert "5000000 documents is more than max_documents_per_request=1000" in answer.json()["message"]
    deadline = time.monotonic() + 20
    while rss_bytes(server.process.pid) > before + (64 << 20) and time.monotonic() < deadline:
        time.sleep(0.2)
    grown = rss_bytes(server.process.pid) - before
    assert grown <= 64 << 20, f"the front end kept {grown / 2**20:.0f} MiB"
