"""The HTTP/JSON port, called by real clients.

- A real server process (bench.server.start_server) with a bearer token, called
  by the official `cohere` SDK, LangChain's CohereRerank, and plain httpx for
  every shape, SSE and the docs; its scores equal the gRPC port's for the same
  request, and the model card's recipe's.
- The service in the test's own event loop (tests.apps) for every error status
  and fault: invalid input, tokens, unknown models, sizes, full queues, no
  worker, draining, deadlines, and clients that go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl

import cohere
import httpx
import numpy as np
import openapi_spec_validator
import pytest
from langchain_cohere import CohereRerank
from langchain_core.documents import Document

from bench.server import free_port
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc
from service.http_schema import ModelList, RerankResponse, TeiRank
from tests.apps import OUTCOMES, metric, run, running, settled, stub, until
from tests.doubles import Load
from tests.reference import Recipe
from tests.texts import DOCUMENTS, QUERY

TOKEN = "http-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_LENGTH = 512
# One worker that sleeps 100 ms per batch of at most 8 rows (as in test_faults.py).
SLOW = dict(workers_per_device=1, max_batch_size=8, max_queue_pairs=200, max_documents_per_request=100)


# -- a real server, real clients ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server_flags():
    return ("--cpu-threads", "1", "--max-length", str(MAX_LENGTH))


@pytest.fixture(scope="module")
def server_env():
    return {"RERANKER_AUTH_TOKENS": TOKEN}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(http) -> str:
    models = ModelList.model_validate(http.get("/v1/models").json())
    assert [card.max_model_len for card in models.data] == [MAX_LENGTH]
    return models.data[0].id


def grpc_rerank(server, documents: list[str], **fields) -> pb.RerankResponse:
    with server.channel() as channel:
        stub = reranker_pb2_grpc.RerankerStub(channel)
        request = pb.RerankRequest(query=QUERY, documents=documents, **fields)
        return stub.Rerank(request, timeout=60, metadata=tuple(AUTH.items()))


def same_as_grpc(results: list[tuple[int, float, float | None]], expected: pb.RerankResponse) -> None:
    """(index, score, logit) from HTTP equal gRPC's (index, score, logit), which are float32."""
    assert [index for index, _, _ in results] == [r.index for r in expected.results]
    assert [np.float32(score) for _, score, _ in results] == [r.score for r in expected.results]
    logits = [np.float32(logit) for _, _, logit in results if logit is not None]
    assert logits in ([], [r.logit for r in expected.results])


def test_the_cohere_sdk_ranks_as_grpc_does(server, model_id, tiny_model):
    client = cohere.ClientV2(api_key=TOKEN, base_url=server.http_url)
    answer = client.rerank(model=model_id, query=QUERY, documents=DOCUMENTS, top_n=3)
    expected = grpc_rerank(server, DOCUMENTS, top_n=3)
    same_as_grpc([(r.index, r.relevance_score, None) for r in answer.results], expected)
    assert len(answer.results) == 3 and answer.id
    # and the model card's recipe agrees
    recipe = Recipe(tiny_model, max_length=MAX_LENGTH).scores(None, QUERY, DOCUMENTS)
    for result in answer.results:
        assert abs(recipe[result.index][0] - result.relevance_score) < 1e-4


def test_the_cohere_sdk_sees_errors_as_its_own(server, model_id):
    with pytest.raises(cohere.core.ApiError) as refused:
        cohere.ClientV2(api_key="wrong", base_url=server.http_url).rerank(model=model_id, query="q", documents=["a"])
    assert refused.value.status_code == 401
    with pytest.raises(cohere.core.ApiError) as unknown:
        cohere.ClientV2(api_key=TOKEN, base_url=server.http_url).rerank(model="rerank-v3.5", query="q", documents=["a"])
    assert unknown.value.status_code == 404 and unknown.value.body["code"] == "NOT_FOUND"


def test_langchain_cohere_rerank_orders_documents_as_grpc_does(server, model_id):
    reranker = CohereRerank(model=model_id, cohere_api_key=TOKEN, base_url=server.http_url, top_n=3)
    ranked = reranker.compress_documents([Document(page_content=text) for text in DOCUMENTS], QUERY)
    expected = grpc_rerank(server, DOCUMENTS, top_n=3)
    assert [doc.page_content for doc in ranked] == [DOCUMENTS[r.index] for r in expected.results]
    assert [np.float32(doc.metadata["relevance_score"]) for doc in ranked] == [r.score for r in expected.results]


@pytest.mark.parametrize("route", ["/v2/rerank", "/v1/rerank", "/rerank"])
def test_every_cohere_route_answers_the_same_shape(http, server, route, model_id):
    documents = [{"text": text} if i % 2 else text for i, text in enumerate(DOCUMENTS)]  # both forms
    body = {"model": model_id, "query": QUERY, "documents": documents, "top_n": 4, "return_documents": True}
    answer = http.post(route, json=body, headers={"x-request-id": "shape-1"})
    assert answer.status_code == 200, answer.text
    parsed = RerankResponse.model_validate(answer.json())
    expected = grpc_rerank(server, DOCUMENTS, top_n=4)
    same_as_grpc([(r.index, r.relevance_score, r.logit) for r in parsed.results], expected)
    assert [r.document.text for r in parsed.results] == [DOCUMENTS[r.index] for r in expected.results]
    assert parsed.id == "shape-1" and parsed.model == model_id
    assert parsed.usage.total_tokens == parsed.meta.tokens.input_tokens == expected.usage.tokens


@pytest.mark.parametrize("raw_scores", [False, True])
def test_the_text_embeddings_inference_shape(http, server, raw_scores):
    answer = http.post(
        "/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": raw_scores, "return_text": True}
    )
    assert answer.status_code == 200, answer.text
    ranks = [TeiRank.model_validate(item) for item in answer.json()]
    expected = grpc_rerank(server, DOCUMENTS)
    assert [rank.index for rank in ranks] == [r.index for r in expected.results]
    wanted = [r.logit if raw_scores else r.score for r in expected.results]
    assert [np.float32(rank.score) for rank in ranks] == wanted
    assert [rank.text for rank in ranks] == [DOCUMENTS[r.index] for r in expected.results]


def test_instruction_and_truncation_extensions(http, server):
    instruction = "Judge whether the passage names a capital city"
    body = {"query": QUERY, "documents": DOCUMENTS, "instruction": instruction, "max_tokens_per_doc": 8}
    answer = http.post("/v1/rerank", json=body).json()
    expected = grpc_rerank(server, DOCUMENTS, instruction=instruction, max_tokens_per_doc=8)
    same_as_grpc([(r["index"], r["relevance_score"], r["logit"]) for r in answer["results"]], expected)
    refused = http.post("/v1/rerank", json={**body, "truncation": "none"})
    assert refused.status_code == 400 and "max_tokens_per_doc=8" in refused.json()["message"]
    tei = http.post("/rerank", json={"query": QUERY, "texts": ["word " * 600], "truncate": False})
    assert tei.status_code == 400 and f"max_length {MAX_LENGTH}" in tei.json()["message"]


def test_chunking_spans_windows_and_the_cache_over_http(http, server):
    long_document = "Berlin is in Germany. " * 60 + "Paris is the capital of France. " + "Rome is in Italy. " * 60
    body = {"query": QUERY, "documents": [long_document, "short"], "truncation": "chunk"}
    answer = http.post("/v2/rerank", json=body).json()
    by_index = {result["index"]: result for result in answer["results"]}
    expected = {
        r.index: r for r in grpc_rerank(server, [long_document, "short"], truncation=pb.TRUNCATION_CHUNK).results
    }
    chunked = by_index[0]
    assert chunked["windows"] == expected[0].windows > 1 and not chunked["truncated"]
    assert (chunked["span"]["start"], chunked["span"]["end"]) == (expected[0].span.start, expected[0].span.end)
    assert np.float32(chunked["logit"]) == expected[0].logit
    assert by_index[1]["windows"] == 1 and by_index[1]["span"] == {"start": 0, "end": len("short")}
    again = http.post("/v2/rerank", json=body).json()
    assert again["usage"]["cached_documents"] == 2  # both answered from the score cache
    assert [r["logit"] for r in again["results"]] == [r["logit"] for r in answer["results"]]


def events_of(text: str) -> list[tuple[str, dict]]:
    """Server-Sent Events as (event, data) pairs."""
    found = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((fields["event"], json.loads(fields["data"])))
    return found


def test_streaming_as_server_sent_events(http, server):
    documents = [f"{text} ({i})" for i in range(6) for text in DOCUMENTS]
    with http.stream("POST", "/v1/rerank", json={"query": QUERY, "documents": documents, "stream": True}) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        events = events_of(answer.read().decode())
    *scored, (last, final) = events
    assert last == "final" and {name for name, _ in scored} == {"scored"}
    streamed = sorted(r["index"] for _, data in scored for r in data["results"])
    assert streamed == list(range(len(documents)))
    ranking = RerankResponse.model_validate(final)
    assert len(ranking.results) == len(documents)
    assert [r.logit for r in ranking.results] == sorted((r.logit for r in ranking.results), reverse=True)


def test_a_call_without_the_token_is_refused_and_probes_need_none(server):
    with httpx.Client(base_url=server.http_url, timeout=30) as anonymous:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            refused = anonymous.post("/v2/rerank", json={"query": "q", "documents": ["a"]}, headers=headers)
            assert refused.status_code == 401 and refused.json()["code"] == "UNAUTHENTICATED"
        assert anonymous.get("/v1/models").status_code == 401
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/ready").json() == {"status": "ready"}


def test_log_lines_and_metrics_name_the_transport(http, server):
    http.post("/v2/rerank", json={"query": "q", "documents": ["logged"]})
    grpc_rerank(server, ["logged"])
    lines = server.events("rpc")
    assert {line["transport"] for line in lines} == {"grpc", "http"}
    refused = [line for line in lines if line["transport"] == "http" and line["code"] == "UNAUTHENTICATED"]
    assert all(line["status"] == 401 and line["reason"] for line in refused)
    assert server.metric("reranker_requests_total", transport="http", rpc="/v2/rerank", code="OK") >= 1
    assert server.metric("reranker_requests_total", transport="grpc", rpc="Rerank", code="OK") >= 1


def test_the_openapi_document_and_the_docs_pages_are_local(server):
    with httpx.Client(base_url=server.http_url, timeout=30) as anonymous:
        document = anonymous.get("/openapi.json").json()
        openapi_spec_validator.validate(document)  # a valid OpenAPI 3.1 document
        assert document["openapi"].startswith("3.1")
        assert {"/v2/rerank", "/v1/rerank", "/rerank", "/v1/models", "/health", "/ready"} <= set(document["paths"])
        assert "422" not in json.dumps(document["paths"])
        assert set(document["paths"]["/v2/rerank"]["post"]["responses"]) >= {"200", "400", "401", "429", "503", "504"}
        for page in ("/docs", "/redoc"):
            html = anonymous.get(page).text
            assert "cdn" not in html.lower()
            assets = [part.split('"')[0].split("'")[0] for part in html.split("/static-offline-docs/")[1:]]
            assert assets
            for asset in assets:
                fetched = anonymous.get("/static-offline-docs/" + asset)
                assert fetched.status_code == 200 and len(fetched.content) > 1000, asset


# -- every error status, in one process --------------------------------------------------------


def http_client(app, **headers) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", headers=headers, timeout=60)


def outcomes(app) -> dict[str, float]:
    return {o: metric(app, "reranker_pairs_total", outcome=o) for o in OUTCOMES}


def body(documents: int, tag: str = "q", **fields) -> dict:
    return {"query": tag, "documents": [f"doc {i} of {tag}" for i in range(documents)], **fields}


def refusal(answer: httpx.Response, status: int, code: str, *fragments: str) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert set(error) == {"message", "code"} and error["code"] == code
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


@pytest.mark.parametrize(
    "sent, fragments",
    [
        ({"query": " ", "documents": ["a"]}, ["query is empty"]),
        ({"query": "q", "documents": []}, ["no documents"]),
        (body(101), ["101 documents", "max_documents_per_request=100"]),
        ({"query": "q" * 70, "documents": ["a"]}, ["max_query_chars=64"]),
        ({"query": "q", "documents": ["a" * 300]}, ["document 0", "max_document_chars=256"]),
        ({"query": "q", "documents": "a"}, ["documents: ", "list"]),
        ({"query": "q", "documents": ["a", 7]}, ["documents[1]", '{"text": string}']),
        ({"query": "q", "documents": [{"txt": "a"}]}, ["documents[0]"]),
        ({"documents": ["a"]}, ["query: ", "required"]),
        ({"query": 3, "documents": ["a"]}, ["query: "]),
        (body(2, top_n=-1), ["top_n must be >= 0"]),
        (body(2, max_tokens_per_doc=0), ["max_tokens_per_doc must be at least 1"]),
        (body(2, timeout=-1), ["timeout must be a positive number"]),
        (body(2, truncation="middle"), ["truncation: "]),
        (body(2, priority="urgent"), ["priority: "]),
        ({"query": "q", "texts": "a"}, ["texts: "]),
        ({"query": "q", "texts": ["a"], "truncation_direction": "Left"}, ["truncation_direction: "]),
        ([1, 2], ["the body must be a JSON object"]),
        # JSON can carry a lone surrogate, which no tokenizer reads
        ({"query": "q", "documents": ["fine", "bad \ud800"]}, ["document 1 is not valid Unicode", "surrogate"]),
        ({"query": "q \udfff", "documents": ["a"]}, ["query is not valid Unicode"]),
    ],
)
def test_invalid_input_is_a_400_naming_the_field_and_the_limit(tiny_model, sent, fragments):
    async def scenario():
        limits = dict(max_documents_per_request=100, max_query_chars=64, max_document_chars=256)
        async with running(tiny_model, http_port=free_port(), **limits) as app, http_client(app) as client:
            # json.dumps escapes what is not ASCII, so that a lone surrogate can be sent at all
            sent_bytes = json.dumps(sent).encode()
            refusal(await client.post("/rerank", content=sent_bytes), 400, "INVALID_ARGUMENT", *fragments)
            assert outcomes(app)["scored"] == 0 and settled(app)

    run(scenario)


def test_malformed_bodies_and_headers_are_400s(tiny_model):
    async def scenario():
        async with running(tiny_model, http_port=free_port()) as app, http_client(app) as client:
            refusal(
                await client.post("/v2/rerank", content=b'{"query": "q", '), 400, "INVALID_ARGUMENT", "not valid JSON"
            )
            form = {"content-type": "application/x-www-form-urlencoded"}
            refusal(await client.post("/v2/rerank", content=b"query=q", headers=form), 400, "INVALID_ARGUMENT", "JSON")
            # no Content-Type at all (curl -d ... with the header removed): read as JSON
            bare = await client.post("/v2/rerank", content=json.dumps(body(1)).encode(), headers={"content-type": ""})
            assert bare.status_code == 200, bare.text
            sent = {"json": body(1), "headers": {"x-request-timeout": "soon"}}
            refusal(await client.post("/v2/rerank", **sent), 400, "INVALID_ARGUMENT", "X-Request-Timeout")
            long_id = {"json": body(1), "headers": {"x-request-id": "i" * 200}}
            refusal(await client.post("/v2/rerank", **long_id), 400, "INVALID_ARGUMENT", "request_id has 200")
            refusal(await client.get("/v2/rerank"), 405, "UNIMPLEMENTED")
            refusal(await client.post("/v3/rerank", json=body(1)), 404, "NOT_FOUND", "/docs")

    run(scenario)


def test_an_unknown_model_is_a_404(tiny_model):
    async def scenario():
        async with running(tiny_model, http_port=free_port()) as app, http_client(app) as client:
            error = refusal(await client.post("/v2/rerank", json=body(1, model="rerank-v3.5")), 404, "NOT_FOUND")
            assert str(tiny_model) in error["message"] and "rerank-v3.5" not in error["message"]
            assert (await client.post("/v2/rerank", json=body(1, model=str(tiny_model)))).status_code == 200

    run(scenario)


def test_tokens_are_required_when_configured(tiny_model):
    async def scenario():
        async with (
            running(tiny_model, http_port=free_port(), auth_tokens=(TOKEN,)) as app,
            http_client(app) as anonymous,
            http_client(app, **AUTH) as client,
        ):
            refusal(await anonymous.post("/v2/rerank", json=body(1)), 401, "UNAUTHENTICATED", "Bearer")
            assert (await client.post("/v2/rerank", json=body(1))).status_code == 200
            assert (await anonymous.get("/ready")).status_code == 200

    run(scenario)


def test_a_body_over_max_message_bytes_is_a_413_before_it_is_read(tiny_model):
    async def scenario():
        async with (
            running(tiny_model, http_port=free_port(), max_message_bytes=1000) as app,
            http_client(app) as client,
        ):
            big = body(100)
            refusal(await client.post("/v2/rerank", json=big), 413, "RESOURCE_EXHAUSTED", "max_message_bytes=1000")

            async def chunks():  # no Content-Length: counted as it arrives
                for _ in range(40):
                    yield b" " * 100

            refusal(await client.post("/v2/rerank", content=chunks()), 413, "RESOURCE_EXHAUSTED", "max_message_bytes")
            assert (await client.post("/v2/rerank", json=body(2))).status_code == 200
            assert metric(app, "reranker_pairs_admitted_total") == 2

    run(scenario)


def test_a_full_queue_and_the_call_limit_are_429s_with_retry_after(tiny_model):
    async def scenario():
        settings = {**SLOW, "max_queue_pairs": 100, "max_concurrent_rpcs": 2}
        async with (
            running(tiny_model, Load(delay_s=0.1), http_port=free_port(), **settings) as app,
            http_client(app) as client,
        ):
            first = asyncio.ensure_future(client.post("/v2/rerank", json=body(100, "first")))
            await until(lambda: metric(app, "reranker_pairs_admitted_total") == 100, "the first call admitted")
            full = await client.post("/v2/rerank", json=body(100, "second"))
            refusal(full, 429, "RESOURCE_EXHAUSTED", "queue full", "max_queue_pairs=100")
            assert full.headers["retry-after"] == "1"
            second = asyncio.ensure_future(client.post("/v2/rerank", json=body(1, "held")))
            await until(lambda: metric(app, "reranker_calls_in_progress") == 2, "two calls in progress")
            busy = await client.post("/v2/rerank", json=body(1, "third"))
            refusal(busy, 429, "RESOURCE_EXHAUSTED", "max_concurrent_rpcs=2")
            assert busy.headers["retry-after"] == "1"
            assert (await client.get("/health")).status_code == 200  # probes are not calls
            assert (await first).status_code == (await second).status_code == 200

    run(scenario)


def test_deadlines_from_the_header_the_body_and_the_server_default_are_504s(tiny_model):
    async def scenario():
        async with (
            running(tiny_model, Load(delay_s=0.1), http_port=free_port(), http_default_timeout_s=0.3, **SLOW) as app,
            http_client(app) as client,
        ):
            sent = [
                client.post("/v2/rerank", json=body(60, "header"), headers={"x-request-timeout": "0.3"}),
                client.post("/v2/rerank", json=body(60, "field", timeout=0.3)),
                client.post("/v2/rerank", json=body(60, "default")),
            ]
            for answer in await asyncio.gather(*sent):  # 180 pairs need about 2 s
                refusal(answer, 504, "DEADLINE_EXCEEDED", "deadline")
            await until(lambda: settled(app), "every pair accounted for")
            assert outcomes(app)["scored"] < 180  # the queued rest was dropped

    run(scenario)


def test_no_ready_worker_and_draining_are_503s_and_ready_says_so(tiny_model):
    async def scenario():
        load = Load(delay_s=0.15, per_worker=((0, (("die_on", frozenset({1})),)),))
        settings = dict(workers_per_device=1, max_batch_size=4)
        async with running(tiny_model, load, http_port=free_port(), **settings) as app, http_client(app) as client:
            assert (await client.get("/ready")).status_code == 200
            dying = asyncio.ensure_future(client.post("/v2/rerank", json=body(4, "dies")))
            await until(lambda: not app.serving, "the only worker to die")
            refusal(await client.get("/ready"), 503, "UNAVAILABLE", "not ready")
            down = await client.post("/v2/rerank", json=body(1, "nobody"))
            refusal(down, 503, "UNAVAILABLE", "no worker is ready")
            assert down.headers["retry-after"] == "1"
            refusal(await dying, 503, "UNAVAILABLE", "every worker has died")  # its only worker died
            await until(lambda: app.serving, "the worker to come back")
            assert (await client.get("/ready")).status_code == 200

            calls = [asyncio.ensure_future(client.post("/v2/rerank", json=body(8, f"d{i}"))) for i in range(4)]
            await until(lambda: metric(app, "reranker_pairs_admitted_total") >= 4 + 32, "the calls admitted")
            draining = asyncio.ensure_future(app.shutdown(asyncio.Event()))
            await until(lambda: app.batcher.closed, "new work refused")
            refusal(await client.get("/ready"), 503, "UNAVAILABLE")
            assert (await client.get("/health")).status_code == 200
            late = await client.post("/v2/rerank", json=body(1, "late"))
            refusal(late, 503, "UNAVAILABLE", "shutting down")
            assert late.headers["retry-after"] == "1"
            assert [len((await call).json()["results"]) for call in calls] == [8] * 4  # in flight: finished
            await draining

    run(scenario)


def test_grace_expiry_ends_every_http_call_with_a_503(tiny_model):
    async def scenario():
        settings = dict(workers_per_device=1, max_batch_size=2, grace_period_s=0.5)
        async with running(tiny_model, Load(delay_s=0.3), http_port=free_port(), **settings) as app:
            async with http_client(app) as client:
                calls = [client.post("/v2/rerank", json=body(10, f"g{i}")) for i in range(4)]
                pending = asyncio.ensure_future(asyncio.gather(*calls))
                # all four admitted (a busy machine may still be sending some), work in flight
                await until(lambda: metric(app, "reranker_pairs_admitted_total") == 40, "all four calls admitted")
                await until(lambda: metric(app, "reranker_batches_total") > 0, "work in flight")
                await app.shutdown(asyncio.Event())
                answers = await pending
            for answer in answers:  # 40 pairs need about 6 s; the grace is 0.5 s
                refusal(answer, 503, "UNAVAILABLE", "shut down")
            assert metric(app, "reranker_requests_total", transport="http", code="UNAVAILABLE") == 4

    run(scenario)


def test_a_client_that_leaves_a_stream_cancels_its_queued_rest(tiny_model):
    async def scenario():
        async with running(tiny_model, Load(delay_s=0.1), http_port=free_port(), **SLOW) as app:
            async with http_client(app) as client:
                sent = body(80, stream=True)
                async with client.stream("POST", "/v1/rerank", json=sent) as answer:
                    assert answer.status_code == 200
                    async for line in answer.aiter_lines():
                        if line.startswith("data: "):
                            assert len(json.loads(line[6:])["results"]) <= 8
                            break
                # the connection is closed here, after one event
                await until(lambda: settled(app), "the queue to empty after the client left")
            # 80 pairs, 8 per batch, at most two batches on the worker: most never ran
            assert outcomes(app)["cancelled"] >= 80 - 4 * 8
            assert (
                metric(app, "reranker_requests_total", transport="http", rpc="/v1/rerank:stream", code="CANCELLED") == 1
            )

    run(scenario)


def test_an_error_after_the_first_event_ends_the_stream_with_an_error_event(tiny_model):
    async def scenario():
        load = Load(delay_s=0.1, per_worker=((0, (("die_on", frozenset({3})),)),))
        async with running(tiny_model, load, http_port=free_port(), **SLOW) as app, http_client(app) as client:
            async with client.stream("POST", "/v1/rerank", json=body(40, stream=True)) as answer:
                assert answer.status_code == 200
                events = events_of((await answer.aread()).decode())
            # batches 1 and 2 were scored; the only worker died on batch 3
            names = [name for name, _ in events]
            assert names[0] == "scored" and names[-1] == "error" and "final" not in names
            assert events[-1][1]["code"] == "UNAVAILABLE" and "worker" in events[-1][1]["message"]
            rpc = "/v1/rerank:stream"
            assert metric(app, "reranker_requests_total", transport="http", rpc=rpc, code="UNAVAILABLE") == 1
            await until(lambda: settled(app), "every pair accounted for")

    run(scenario)


def test_a_client_that_leaves_a_call_cancels_it(tiny_model):
    async def scenario():
        async with running(tiny_model, Load(delay_s=0.1), http_port=free_port(), **SLOW) as app:
            async with http_client(app) as client:
                sent = asyncio.ensure_future(client.post("/v2/rerank", json=body(80)))
                await until(lambda: metric(app, "reranker_pairs_admitted_total") == 80, "the call admitted")
                sent.cancel()  # httpx closes the connection of a request it gave up
                with contextlib.suppress(asyncio.CancelledError):
                    await sent
            await until(lambda: settled(app), "the queue to empty after the client left")
            assert outcomes(app)["cancelled"] >= 80 - 4 * 8

            def counted() -> float:
                return metric(app, "reranker_requests_total", transport="http", code="CANCELLED")

            await until(lambda: counted() == 1, "the call to be counted CANCELLED")

    run(scenario)


def test_http_and_grpc_calls_share_the_batcher_and_the_metrics(tiny_model):
    async def scenario():
        async with running(tiny_model, http_port=free_port()) as app, http_client(app) as client:
            channel, reranker = stub(app)
            async with channel:
                by_grpc, by_http = await asyncio.gather(
                    reranker.Rerank(pb.RerankRequest(query=QUERY, documents=DOCUMENTS), timeout=60),
                    client.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS}),
                )
            assert [r.index for r in by_grpc.results] == [r["index"] for r in by_http.json()["results"]]
            assert metric(app, "reranker_requests_total", transport="http", rpc="/v2/rerank", code="OK") == 1
            assert metric(app, "reranker_requests_total", transport="grpc", rpc="Rerank", code="OK") == 1
            assert metric(app, "reranker_request_duration_seconds_count", transport="http") == 1
            # the same pairs at once from both ports are computed once (single flight): one call waits
            # for the other's pairs, whichever transport brought them
            assert metric(app, "reranker_pairs_admitted_total") == len(DOCUMENTS)
            cached = by_grpc.usage.cached_documents + by_http.json()["usage"]["cached_documents"]
            assert cached == len(DOCUMENTS)

    run(scenario)


def test_with_the_cache_off_http_and_grpc_compute_the_same_scores(tiny_model):
    """The real-server tests above compare HTTP with gRPC through the score cache (the
    second call reads what the first computed), which checks how each maps the request;
    here both compute, one call at a time in one batch each, and agree bit for bit."""

    async def scenario():
        settings = dict(http_port=free_port(), score_cache_bytes=0, workers_per_device=1, max_batch_size=64)
        async with running(tiny_model, **settings) as app, http_client(app) as client:
            channel, reranker = stub(app)
            async with channel:
                for fields in ({}, {"instruction": "Find the capital", "max_tokens_per_doc": 8}):
                    by_http = await client.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS, **fields})
                    by_grpc = await reranker.Rerank(
                        pb.RerankRequest(query=QUERY, documents=DOCUMENTS, **fields), timeout=60
                    )
                    answer = by_http.json()
                    assert answer["usage"]["cached_documents"] == by_grpc.usage.cached_documents == 0
                    same_as_grpc([(r["index"], r["relevance_score"], r["logit"]) for r in answer["results"]], by_grpc)
            assert metric(app, "reranker_pairs_admitted_total") == 4 * len(DOCUMENTS)

    run(scenario)


def test_no_http_port_when_it_is_zero(tiny_model):
    async def scenario():
        async with running(tiny_model) as app:
            assert app.http is None

    run(scenario)


def test_https_and_mutual_tls_with_the_grpc_port_certificates(tiny_model, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued, client_cert = ca.issue_cert("127.0.0.1"), ca.issue_cert("client.example")
    cert, key, authority = (tmp_path / name for name in ("server.pem", "server.key", "ca.pem"))
    issued.private_key_pem.write_to_path(key)
    for blob in issued.cert_chain_pems:
        blob.write_to_path(cert, append=True)
    ca.cert_pem.write_to_path(authority)
    trusted = ssl.create_default_context(cafile=str(authority))
    presenting = ssl.create_default_context(cafile=str(authority))
    client_cert.configure_cert(presenting)
    tls = dict(tls_cert=str(cert), tls_key=str(key))

    async def scenario():
        async with running(tiny_model, http_port=free_port(), **tls) as app:
            url = f"https://127.0.0.1:{app.http.port}"
            async with httpx.AsyncClient(base_url=url, verify=trusted, timeout=30) as client:
                assert (await client.post("/v2/rerank", json=body(2))).status_code == 200
            async with httpx.AsyncClient(base_url=url.replace("https", "http"), timeout=30) as plain:
                with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
                    await plain.get("/health")
        async with running(tiny_model, http_port=free_port(), tls_client_ca=str(authority), **tls) as app:
            url = f"https://127.0.0.1:{app.http.port}"
            async with httpx.AsyncClient(base_url=url, verify=presenting, timeout=30) as client:
                assert (await client.post("/v2/rerank", json=body(2))).status_code == 200
            async with httpx.AsyncClient(base_url=url, verify=trusted, timeout=30) as anonymous:
                with pytest.raises(httpx.TransportError):  # no client certificate
                    await anonymous.get("/health")

    run(scenario)
