"""The Node.js client (clients/node) against a live server: its answers must be
the Python client's. Node and its packages are real (`npm ci` from the
committed lockfile); the test skips only where node or npm is absent."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import subprocess

import pytest

from bench.server import ROOT
from reranker_client import RerankerClient
from tests.npm import NODE_CLIENT, node_modules
from tests.texts import DOCUMENTS, QUERY

TOKEN = "node-client-token"
DOCS = DOCUMENTS[:12]
PAIRS = [[QUERY, DOCUMENTS[0]], ["where is Tokyo?", DOCUMENTS[5]], [QUERY, ""]]


def _load(path: pathlib.Path):
    """A module of the client package's tests (not a package of its own), by its path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def installed():
    return node_modules()


@pytest.fixture(scope="module")
def flaky():
    """A server that fails on purpose: the Python client's (clients/python/tests/retry_server.py)."""
    flaky_module = _load(pathlib.Path(ROOT) / "clients" / "python" / "tests" / "retry_server.py")
    with flaky_module.flaky_server() as (servicer, address):
        yield servicer, address


def run_check(address: str, inputs_file, *extra: str) -> tuple[int, dict]:
    done = subprocess.run(
        ["node", "check.js", "--target", address, "--input", str(inputs_file), "--timeout-ms", "60000", *extra],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip(), f"check.js printed nothing (exit {done.returncode}):\n{done.stderr}"
    return done.returncode, json.loads(done.stdout)


def test_node_client_matches_the_python_client(installed, server_factory, tiny_model, tmp_path):
    # 4 rows per batch, so that 12 documents stream as several partial messages. No score
    # cache: the stream repeats the rerank, and each client's answers must be computed, not
    # the other's served again.
    server = server_factory(
        tiny_model,
        "--max-batch-size",
        "4",
        "--cpu-threads",
        "1",
        "--score-cache-bytes",
        "0",
        env={"RERANKER_AUTH_TOKENS": TOKEN},
    )
    inputs = tmp_path / "inputs.json"
    inputs.write_text(
        json.dumps(
            {
                "query": QUERY,
                "documents": DOCS,
                "pairs": PAIRS,
                "invalid": {"query": "", "documents": ["a"]},
            }
        )
    )

    code, node = run_check(server.address, inputs, "--token", TOKEN)
    assert code == 0, node

    with RerankerClient(server.address, token=TOKEN, timeout=60) as client:
        ranking = client.rerank(QUERY, DOCS)
        scores = client.score([tuple(pair) for pair in PAIRS])
        info = client.model_info()

    expected_order = [result.index for result in ranking.results]
    expected_logit = {result.index: result.logit for result in ranking.results}

    # Rerank: the same ranking, the same logits, the same usage.
    rerank = node["rerank"]
    assert [result["index"] for result in rerank["results"]] == expected_order
    for result in rerank["results"]:
        assert result["logit"] == pytest.approx(expected_logit[result["index"]], abs=1e-5)
        assert result["score"] == pytest.approx(1 / (1 + math.exp(-result["logit"])), abs=1e-6)
    assert rerank["usage"]["documents"] == len(DOCS)
    assert rerank["usage"]["tokens"] == ranking.usage.tokens

    # RerankStream: partial batches first (each document once), then one final ranking.
    stream = node["stream"]
    assert stream["events"][-1] == "final" and set(stream["events"][:-1]) == {"scored"}
    assert stream["partials"]  # how many depends on the load: batches that complete together share an event
    streamed = [index for partial in stream["partials"] for index in partial]
    assert sorted(streamed) == list(range(len(DOCS)))
    for result in stream["scored"]:
        assert result["logit"] == pytest.approx(expected_logit[result["index"]], abs=1e-5)
    assert [result["index"] for result in stream["final"]["results"]] == expected_order

    # Score: input order, the same logits.
    assert [result["index"] for result in node["score"]["results"]] == [0, 1, 2]
    assert [result["logit"] for result in node["score"]["results"]] == pytest.approx(
        [r.logit for r in scores.results], abs=1e-5
    )

    # GetModelInfo: the same fields, enums by name, camelCase keys.
    model = node["modelInfo"]
    assert model["modelId"] == info.model_id == str(tiny_model)
    assert model["precision"] == "PRECISION_FP32"
    assert model["devices"] == list(info.devices) == ["cpu"]
    assert model["defaultInstruction"] == info.default_instruction
    assert model["serverVersion"] == info.server_version
    assert model["modelMemoryBytes"] == info.model_memory_bytes > 0
    assert model["limits"]["maxBatchSize"] == info.limits.max_batch_size == 4
    assert model["limits"]["maxLength"] == info.limits.max_length
    assert model["limits"]["maxDocumentsPerRequest"] == info.limits.max_documents_per_request

    # A bad request: a RerankerError with the status code and the server's message.
    assert node["invalid"]["codeName"] == "INVALID_ARGUMENT" and node["invalid"]["code"] == 3
    assert "query is empty" in node["invalid"]["details"]

    # Without the bearer token the server refuses the first call, and check.js says so.
    code, refused = run_check(server.address, inputs)
    assert code == 1
    assert refused["error"]["codeName"] == "UNAUTHENTICATED"


RETRY_SCRIPT = """
const { RerankerClient } = require('./index');
const [target, query, requestId, maxAttempts] = process.argv.slice(1);
const client = new RerankerClient(target, { maxAttempts: Number(maxAttempts), timeoutMs: 30000 });
client.rerank(query, ['a'], { requestId })
  .then((response) => console.log(JSON.stringify({ ok: response.requestId })))
  .catch((error) => console.log(JSON.stringify({ code: error.codeName, details: error.details })))
  .finally(() => client.close());
"""


@pytest.mark.parametrize(
    "max_attempts, expected, attempts",
    [(3, {"ok": "node-3"}, 3), (1, {"code": "UNAVAILABLE", "details": "attempt 1 fails on purpose"}, 1)],
)
def test_node_client_retries_unavailable(installed, flaky, max_attempts, expected, attempts):
    """The server fails the first two attempts with UNAVAILABLE: with maxAttempts 3
    the third succeeds; with 1 the call fails at once."""
    servicer, address = flaky
    request_id = f"node-{max_attempts}"
    done = subprocess.run(
        ["node", "-e", RETRY_SCRIPT, address, "UNAVAILABLE:2", request_id, str(max_attempts)],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected
    assert servicer.attempts[request_id] == attempts
