"""Start-up faults: each ends the server with exit 2 and one log line that names
the file, port or setting and what is wrong; no traceback, no process left
behind. And the start-up's own events: `listening`, then `ready`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

import pytest

from bench.server import ROOT


def serve(*args: str, model=None, env: dict | None = None) -> tuple[int, list[dict], str]:
    """Run `reranker serve` to its end; returns its exit code, its JSON log
    events and its raw output. Fails if a process it started outlives it."""
    marker = uuid.uuid4().hex
    command = [sys.executable, "-m", "service", "serve", *args]
    defaults = {"--host": "127.0.0.1", "--device": "cpu", "--log-format": "json"}
    defaults |= {"--port": "0", "--metrics-port": "0", "--http-port": "0"}
    for flag, value in defaults.items():
        if flag not in args:  # a flag may be given once
            command += [flag, value]
    if model is not None:
        command += ["--model", str(model)]
    environment = {**os.environ, "RERANKER_TEST_MARKER": marker, **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert not _processes_with(marker), "a process the server started is still running"
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return result.returncode, events, output


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if marker.encode() in environ.read():
                    found.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
    return found


def assert_refused(code: int, events: list[dict], output: str, *fragments: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [e for e in events if e.get("level") == "error"]
    assert len(errors) == 1 and errors[0]["event"] == "startup_failed", output
    for fragment in fragments:
        assert fragment in errors[0]["error"], errors[0]["error"]
    assert not [e for e in events if e.get("event") in ("listening", "worker_ready")]


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """A copy of the tiny model whose files a test may spoil."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[1, 2]", "holds a JSON list, not an object"),
        ("{not json", "is not readable JSON"),
        ('{"max_position_embeddings": "many"}', "max_position_embeddings must be a whole number"),
    ],
)
def test_a_bad_config_json_is_named(model_copy, content, fragment):
    (model_copy / "config.json").write_text(content)
    code, events, output = serve(model=model_copy)
    assert_refused(code, events, output, str(model_copy / "config.json"), fragment)


def test_a_corrupt_tokenizer_is_named(model_copy):
    (model_copy / "tokenizer.json").write_text('{"model": "garbage"}')
    code, events, output = serve(model=model_copy)
    assert_refused(code, events, output, str(model_copy / "tokenizer.json"), "is not a usable tokenizer")


def test_a_missing_model_is_named(tmp_path):
    code, events, output = serve(model=tmp_path / "absent")
    assert_refused(code, events, output, "does not exist")


def test_a_metrics_port_in_use_is_named(tiny_model):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, events, output = serve("--metrics-port", str(port), model=tiny_model)
    assert_refused(code, events, output, f"127.0.0.1:{port}", "--metrics-port")


def test_an_http_port_in_use_is_named(tiny_model):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, events, output = serve("--http-port", str(port), model=tiny_model)
    assert_refused(code, events, output, f"127.0.0.1:{port}", "--http-port")


def test_a_second_server_on_the_same_port_refuses_to_start(tiny_model, server_factory):
    first = server_factory(tiny_model, "--workers-per-device", "1", "--cpu-threads", "1", wait=False)
    code, events, output = serve("--port", str(first.port), model=tiny_model)
    assert_refused(code, events, output, f"127.0.0.1:{first.port}", "in use")


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key"])
def test_missing_tls_files_are_named(tiny_model, tmp_path, missing):
    files = {"tls_cert": tmp_path / "server.pem", "tls_key": tmp_path / "server.key"}
    for name, path in files.items():
        if name != missing:
            path.write_text("-----BEGIN NOTHING-----\n")
    code, events, output = serve(
        "--tls-cert", str(files["tls_cert"]), "--tls-key", str(files["tls_key"]), model=tiny_model
    )
    assert_refused(code, events, output, missing, str(files[missing]), "No such file")


def test_a_missing_tokens_file_is_named(tiny_model, tmp_path):
    code, events, output = serve("--auth-tokens-file", str(tmp_path / "absent"), model=tiny_model)
    assert_refused(code, events, output, "auth_tokens_file", str(tmp_path / "absent"), "No such file")


def test_a_tokens_file_without_tokens_fails_closed(tiny_model, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# accepted tokens\n\n   # indented comment\n\t# tabbed comment\n   \n")
    code, events, output = serve("--auth-tokens-file", str(tokens), model=tiny_model)
    assert_refused(code, events, output, str(tokens), "holds no token", "authentication off")


def test_listening_then_ready(tiny_model, server_factory):
    server = server_factory(tiny_model, "--workers-per-device", "1", "--cpu-threads", "1", "--metrics-port", "0")
    names = [line["event"] for line in server.lines]
    assert names.index("listening") < names.index("ready")
    assert server.events("ready")[0]["port"] == server.port
