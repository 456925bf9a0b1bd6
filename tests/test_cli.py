"""The `reranker` command's client side, run as a subprocess (the installed
console script) against a live server: `batch` (JSON lines in, one JSON line
per answer out, a bad line answered with an error field), `rerank --json`, and
`score`, and `health` (exit 0 only when SERVING), also as the Dockerfile and
the compose file run it. And its usage errors: a flag given twice, an unknown
flag after a subcommand."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from reranker_client import RerankerClient
from tests.serving import free_port, start_server
from tests.test_compose import COMPOSE, dockerfile_instructions
from tests.texts import DOCUMENTS, QUERY

RERANKER = str(pathlib.Path(sys.executable).with_name("reranker"))


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = start_server(tiny_model, "--cpu-threads", "1")
    yield srv
    assert srv.stop() == 0, srv.log_text()


@pytest.fixture(scope="module")
def client(server):
    with RerankerClient(server.address, timeout=60) as client:
        yield client


def reranker(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RERANKER, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_batch_answers_every_line_and_reports_the_bad_one(server, client, tmp_path):
    instruction = "Given a question, retrieve passages that answer it"
    records = [
        {"id": "plain", "query": QUERY, "documents": DOCUMENTS[:6]},
        {"id": "top-2", "query": QUERY, "documents": DOCUMENTS[:6], "top_n": 2, "instruction": instruction},
        {"query": "where is Tokyo?", "documents": DOCUMENTS[4:8]},  # no id: its line number, 3
        {"id": "bad", "query": "", "documents": ["a"]},
        {"id": "last", "query": "second query", "documents": ["one", "two", "three"]},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text(
        "\n".join(json.dumps(record, ensure_ascii=False) for record in records) + "\n\n"
    )  # a blank line is skipped
    sink = tmp_path / "out.jsonl"

    done = reranker("batch", str(source), "--output", str(sink), "--target", server.address, "--no-progress")

    assert done.returncode == 1, done.stderr  # one request failed
    assert "1 of 5 requests failed" in done.stderr
    lines = sink.read_text().splitlines()
    assert len(lines) == 5
    answers = {answer["requestId"]: answer for answer in map(json.loads, lines)}
    assert sorted(answers) == ["3", "bad", "last", "plain", "top-2"]

    assert answers["bad"]["error"] == {"code": grpc.StatusCode.INVALID_ARGUMENT.value[0], "message": "query is empty"}
    assert "results" not in answers["bad"]

    expected = {
        "plain": client.rerank(QUERY, DOCUMENTS[:6]),
        "top-2": client.rerank(QUERY, DOCUMENTS[:6], top_n=2, instruction=instruction),
        "3": client.rerank("where is Tokyo?", DOCUMENTS[4:8]),
        "last": client.rerank("second query", ["one", "two", "three"]),
    }
    for request_id, response in expected.items():
        got = answers[request_id]
        assert "error" not in got
        # MessageToDict leaves out zero values: index 0 has no "index" key.
        assert [result.get("index", 0) for result in got["results"]] == [result.index for result in response.results]
        assert [result["logit"] for result in got["results"]] == pytest.approx(
            [r.logit for r in response.results], abs=1e-5
        )
        assert int(got["usage"]["tokens"]) == response.usage.tokens
    assert len(answers["top-2"]["results"]) == 2


def test_batch_answers_unreadable_lines_without_losing_the_others(server):
    lines = [
        json.dumps({"id": "good", "query": "q", "documents": ["a"]}),
        "{not json",
        json.dumps({"id": "x", "query": "q"}),
    ]
    done = reranker("batch", "--target", server.address, "--no-progress", stdin="\n".join(lines))
    assert done.returncode == 1
    answers = {answer["requestId"]: answer for answer in map(json.loads, done.stdout.splitlines())}
    assert sorted(answers) == ["2", "3", "good"]
    assert len(answers["good"]["results"]) == 1
    assert answers["2"]["error"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers["2"]["error"]["message"].startswith("line 2: JSONDecodeError")
    assert answers["3"]["error"]["message"] == "line 3: KeyError: 'documents'"
    assert "2 of 3 requests failed" in done.stderr


def test_batch_from_stdin_to_stdout(server):
    lines = "\n".join(json.dumps({"id": f"r{i}", "query": f"query {i}", "documents": ["a", "b"]}) for i in range(3))
    done = reranker("batch", "--target", server.address, "--no-progress", stdin=lines)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(answer["requestId"] for answer in answers) == ["r0", "r1", "r2"]
    assert all(len(answer["results"]) == 2 and "error" not in answer for answer in answers)


def test_rerank_json(server, client):
    documents = DOCUMENTS[:4]
    done = reranker(
        "rerank", "--target", server.address, "--query", QUERY, *[f"--doc={d}" for d in documents], "--json"
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    expected = client.rerank(QUERY, documents)
    assert [result.get("index", 0) for result in got["results"]] == [result.index for result in expected.results]

    refused = reranker("rerank", "--target", server.address, "--query", " ", "--doc", "a")
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT: query is empty" in refused.stderr


def test_health_says_serving(server):
    for service in ("", "reranker.v1.Reranker"):
        done = reranker("health", "--target", server.address, "--service", service)
        assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr
    unknown = reranker("health", "--target", server.address, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_health_fails_when_not_serving_or_unreachable():
    """A health service that says NOT_SERVING, then one that is gone."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        done = reranker("health", "--target", f"127.0.0.1:{port}")
        assert (done.returncode, done.stdout.strip()) == (1, "NOT_SERVING")
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert reranker("health", "--target", f"127.0.0.1:{port}").returncode == 0
    finally:
        server.stop(0).wait()
    gone = reranker("health", "--target", f"127.0.0.1:{port}", "--timeout", "2")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


def test_the_container_health_checks_run_this_command(server):
    """The Dockerfile's HEALTHCHECK (a shell command reading RERANKER_PORT) and the
    compose file's healthcheck, run as written against the live server."""
    path = {"PATH": f"{pathlib.Path(RERANKER).parent}{os.pathsep}{os.environ['PATH']}"}
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    command = healthcheck.split(" CMD ", 1)[1]
    serving = subprocess.run(
        ["sh", "-c", command],
        env={**path, "RERANKER_PORT": str(server.port)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serving.returncode == 0, serving.stderr
    nobody = subprocess.run(
        ["sh", "-c", command],
        env={**path, "RERANKER_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nobody.returncode == 1  # Docker's "unhealthy"

    test = yaml.safe_load(COMPOSE.read_text())["services"]["reranker"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    argv = [server.address if argument == "127.0.0.1:50051" else argument for argument in test[1:]]
    assert server.address in argv
    done = subprocess.run(argv, env=path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr


# -- regressions: what a newcomer ran into ------------------------------------------------------


def test_score_scores_every_doc_in_order(server, client):
    """`--doc` repeated used to keep the last one only; now each is scored, one line per pair."""
    documents = DOCUMENTS[:3]
    done = reranker("score", "--target", server.address, "--query", QUERY, *[f"--doc={d}" for d in documents])
    assert done.returncode == 0, done.stderr
    expected = client.score([(QUERY, document) for document in documents])
    assert done.stdout.splitlines() == [
        f"score={result.score:.6f} logit={result.logit:+.6f}" for result in expected.results
    ]
    one = reranker("score", "--target", server.address, "--query", QUERY, "--doc", documents[1])
    assert (one.returncode, one.stdout.splitlines()) == (0, done.stdout.splitlines()[1:2])


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["score", "--query", "a", "--query", "b", "--doc", "x"], "--query"),
        (["rerank", "--query", "q", "--doc", "x", "--top-n", "1", "--top-n", "2"], "--top-n"),
        (["rerank", "--query", "q", "--doc", "x", "--instruction", "i", "--instruction", "j"], "--instruction"),
        (["info", "--target", "a:1", "--target", "b:2"], "--target"),
        (["batch", "in.jsonl", "--output", "a", "--output", "b"], "--output"),
        (["health", "--service", "a", "--service", "b"], "--service"),
        (["health", "--timeout", "1", "--timeout", "2"], "--timeout"),
        (["serve", "--port", "1", "--port", "2"], "--port"),
    ],
)
def test_a_single_value_flag_given_twice_is_refused(argv, flag):
    done = reranker(*argv)
    assert done.returncode == 2
    assert done.stderr.startswith(f"usage: reranker {argv[0]} "), done.stderr
    assert f"reranker {argv[0]}: error: argument {flag}: may be given only once" in done.stderr
    assert not done.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["score", "--query", "q", "--doc", "a", "--bogus"],
        ["rerank", "--query", "q", "--doc", "a", "--bogus"],
        ["batch", "--bogus"],
        ["info", "--bogus"],
        ["health", "--bogus"],
        ["serve", "--bogus"],
    ],
)
def test_an_unknown_flag_after_a_subcommand_shows_that_subcommands_usage(argv):
    command = argv[0]
    done = reranker(*argv)
    assert done.returncode == 2
    assert done.stderr.startswith(f"usage: reranker {command} "), done.stderr
    assert done.stderr.rstrip().endswith(f"reranker {command}: error: unrecognized arguments: --bogus")
