"""The `reranker` command's client side, run as a subprocess (the installed
console script) against a live server: `batch` (JSON lines in, one JSON line
per answer out, a bad line answered with an error field), `rerank --json`,
`score`, `info`, and `health` (exit 0 only when SERVING), also as the
Dockerfile and the compose file run it. And its usage errors: a flag given
twice, an unknown flag after a subcommand, a file that cannot be read."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.server import free_port
from reranker_client import RerankerClient
from tests.deploy_files import COMPOSE, dockerfile_instructions
from tests.texts import DOCUMENTS, QUERY

RERANKER = str(pathlib.Path(sys.executable).with_name("reranker"))


@pytest.fixture(scope="module")
def server_flags():
    return ("--cpu-threads", "1")


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
    assert answers["bad"]["results"] == []

    expected = {
        "plain": client.rerank(QUERY, DOCUMENTS[:6]),
        "top-2": client.rerank(QUERY, DOCUMENTS[:6], top_n=2, instruction=instruction),
        "3": client.rerank("where is Tokyo?", DOCUMENTS[4:8]),
        "last": client.rerank("second query", ["one", "two", "three"]),
    }
    for request_id, response in expected.items():
        got = answers[request_id]
        assert "error" not in got
        # Every field, index 0 included; 64-bit counts as numbers.
        assert [result["index"] for result in got["results"]] == [result.index for result in response.results]
        assert [result["logit"] for result in got["results"]] == pytest.approx(
            [r.logit for r in response.results], abs=1e-5
        )
        assert got["usage"]["tokens"] == response.usage.tokens
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
    assert answers["2"]["error"]["message"].startswith("line 2: not JSON: ")
    assert answers["3"]["error"]["message"] == 'line 3: missing field "documents"'
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
    assert [result["index"] for result in got["results"]] == [result.index for result in expected.results]

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


def test_batch_says_why_it_cannot_read_or_write_a_file(tmp_path):
    missing = reranker("batch", "/nonexistent.jsonl", "--no-progress")
    assert missing.returncode == 2
    assert missing.stderr == "error: cannot read /nonexistent.jsonl: No such file or directory\n"  # no traceback
    assert not missing.stdout

    folder = reranker("batch", str(tmp_path), "--no-progress")
    assert (folder.returncode, folder.stderr) == (2, f"error: cannot read {tmp_path}: Is a directory\n")

    source = tmp_path / "in.jsonl"
    source.write_text('{"query": "q", "documents": ["a"]}\n')
    unwritable = reranker("batch", str(source), "--output", str(tmp_path / "no" / "out.jsonl"), "--no-progress")
    assert unwritable.returncode == 2
    assert unwritable.stderr == f"error: cannot write {tmp_path / 'no' / 'out.jsonl'}: No such file or directory\n"

    ca = reranker("score", "--query", "q", "--doc", "a", "--ca", str(tmp_path / "ca.pem"))
    assert (ca.returncode, ca.stderr) == (2, f"error: cannot read {tmp_path / 'ca.pem'}: No such file or directory\n")


def test_batch_error_lines_name_the_real_line_and_the_problem(server, tmp_path):
    lines = [
        # U+2028 and U+0085 are line breaks to str.splitlines(), not to JSON lines.
        json.dumps({"id": "good", "query": "q", "documents": ["a\u2028b", "c\x85d"]}, ensure_ascii=False),  # 1
        "",  # 2: blank lines are skipped, and still counted
        json.dumps({"documents": ["a"]}),  # 3
        json.dumps({"query": "q", "documents": "not a list"}),  # 4
        '{"query": "q", documents: []}',  # 5
        "   ",  # 6
        json.dumps(["q", ["a"]]),  # 7
        json.dumps({"query": "q", "documents": ["a", 2]}),  # 8
        json.dumps({"query": "q", "documents": ["a"], "top_n": "two"}),  # 9
        json.dumps({"query": 7, "documents": ["a"]}),  # 10
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    done = reranker("batch", str(source), "--target", server.address, "--no-progress")
    assert done.returncode == 1
    assert done.stderr.strip() == "7 of 8 requests failed; see their error fields"
    answers = {answer["requestId"]: answer for answer in map(json.loads, done.stdout.splitlines())}
    assert len(answers["good"]["results"]) == 2 and "error" not in answers["good"]
    messages = {request_id: answer["error"]["message"] for request_id, answer in answers.items() if "error" in answer}
    assert messages.pop("5").startswith("line 5: not JSON: Expecting property name enclosed in double quotes")
    assert messages == {
        "3": 'line 3: missing field "query"',
        "4": 'line 4: "documents" must be a list of strings',
        "7": "line 7: not a JSON object ({query, documents, ...})",
        "8": 'line 8: "documents" must be a list of strings',
        "9": 'line 9: "top_n" must be an integer',
        "10": 'line 10: "query" must be a string',
    }
    assert all(answers[key]["error"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] for key in messages)


def test_health_names_the_unknown_service(server):
    done = reranker("health", "--target", server.address, "--service", "nope")
    assert done.returncode == 1
    assert done.stderr == 'error: NOT_FOUND: the server knows no service "nope"\n'


def test_json_output_has_every_field_and_numbers_as_numbers(server, client, tmp_path):
    """index 0, false and "" are printed, not dropped; 64-bit counts are numbers, not strings."""
    documents = ["Paris is the capital of France.", "bananas"]
    done = reranker(
        "rerank", "--target", server.address, "--query", QUERY, *[f"--doc={d}" for d in documents], "--json"
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert set(got) == {"requestId", "results", "usage", "timing"}
    assert sorted(result["index"] for result in got["results"]) == [0, 1]
    for result in got["results"]:
        assert set(result) == {"index", "score", "logit", "document", "truncated", "tokens", "span", "windows"}
        assert result["document"] == "" and result["truncated"] is False and isinstance(result["tokens"], int)
        assert result["span"] == {"start": 0, "end": len(documents[result["index"]])} and result["windows"] == 1
    assert got["usage"] == {
        "documents": 2,
        "tokens": sum(result["tokens"] for result in got["results"]),
        "truncatedDocuments": 0,
        "cachedDocuments": 0,
    }
    assert set(got["timing"]) == {"tokenize", "queue", "compute", "total"}

    info = reranker("info", "--target", server.address)
    assert info.returncode == 0, info.stderr
    model = json.loads(info.stdout)
    expected = client.model_info()
    assert model["modelMemoryBytes"] == expected.model_memory_bytes and isinstance(model["modelMemoryBytes"], int)
    assert model["revision"] == expected.revision  # "" for a local directory: printed all the same
    assert model["precision"] == "PRECISION_FP32" and model["devices"] == ["cpu"]
    assert set(model["limits"]) == {
        "maxLength",
        "maxDocumentsPerRequest",
        "maxQueryChars",
        "maxDocumentChars",
        "maxMessageBytes",
        "maxBatchTokens",
        "maxBatchSize",
        "maxWait",
        "maxQueuePairs",
        "maxQueueTokens",
        "maxWindowsPerDocument",
        "maxWindowsPerRequest",
    }
    assert model["limits"]["maxQueueTokens"] == expected.limits.max_queue_tokens
    assert isinstance(model["limits"]["maxQueueTokens"], int)

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "x", "query": QUERY, "documents": documents}) + "\n")
    batch = reranker("batch", str(source), "--target", server.address, "--no-progress")
    assert batch.returncode == 0, batch.stderr
    (line,) = batch.stdout.splitlines()
    answer = json.loads(line)
    assert sorted(result["index"] for result in answer["results"]) == [0, 1]
    assert isinstance(answer["usage"]["tokens"], int) and answer["usage"]["truncatedDocuments"] == 0


def test_make_demo_prints_a_first_call_that_works_once_the_server_answers(tiny_model):
    """scripts/demo.py (what `make demo` runs): it prints the call only once the server
    is SERVING, and the call, pasted into a shell at the repository's root, answers."""
    root = pathlib.Path(__file__).resolve().parent.parent
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "scripts/demo.py", "--model", str(tiny_model), "--port", str(port), "--host", "127.0.0.1",
         "--http-port", "0", "--metrics-port", "0", "--device", "cpu", "--log-format", "json"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        printed = []
        assert demo.stdout is not None
        for line in demo.stdout:
            printed.append(line)
            if "The demo server is ready" in line:
                break
        assert any('"event": "ready"' in line for line in printed), "the call was printed before the server was ready"
        rest = [next(demo.stdout) for _ in range(4)]
        call = "".join(rest[1:3]).strip()  # the two lines after "In another terminal, try:"
        assert call.startswith(".venv/bin/reranker rerank --target localhost:") and call.endswith('Germany."')
        if not (root / ".venv").exists():  # a test environment elsewhere: its own console script
            call = call.replace(".venv/bin/reranker", RERANKER, 1)
        answered = subprocess.run(["bash", "-c", call], cwd=root, capture_output=True, text=True, timeout=60)
        assert answered.returncode == 0, answered.stderr
        assert "Paris is the capital of France." in answered.stdout
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 0
