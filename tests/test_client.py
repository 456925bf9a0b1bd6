"""The Python client package (clients/python) against the real server.

Its own tests (clients/python/tests: unit tests through grpc_testing, retries
against a server that fails on purpose, and test_live.py against a running
service) are run against a live server twice: from this environment, and from
a fresh virtual environment that has only the client package installed, where
torch, transformers and accelerate must be absent. Then a deadline against a
slow live server.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time

import grpc
import pytest

from bench.server import ROOT
from reranker_client import AsyncRerankerClient, RerankerClient, RerankerError
from tests.texts import QUERY

CLIENT = pathlib.Path(ROOT) / "clients" / "python"
CLIENT_TESTS = CLIENT / "tests"
SERVER_ONLY = ("torch", "transformers", "accelerate")


@pytest.fixture(scope="module")
def server_flags():
    """One worker, at most 4 rows per batch (so that streams have several parts)."""
    return ("--cpu-threads", "1", "--max-batch-size", "4")


def run_client_tests(python: str | pathlib.Path, server, model, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """pytest on clients/python/tests, with RERANKER_TEST_TARGET set to the live server.
    The rootdir is clients/python (its pyproject.toml); `cwd` is kept out of the way
    so that the installed package is what gets imported."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environment |= {"RERANKER_TEST_TARGET": server.address, "RERANKER_TEST_MODEL_ID": str(model)}
    return subprocess.run(
        [str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(CLIENT_TESTS)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )


def assert_all_passed(done: subprocess.CompletedProcess) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, output  # the live tests ran too


def test_client_tests_pass_against_the_server(server, tiny_model, tmp_path):
    assert_all_passed(run_client_tests(sys.executable, server, tiny_model, tmp_path))


@pytest.mark.timeout(600)  # a first run downloads grpcio and protobuf; pip's cache makes reruns fast
def test_client_installs_and_passes_alone_without_torch(server, tiny_model, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The package with its test extra (pytest, and grpcio-testing for test_unit.py); nothing of the server's.
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{CLIENT}[test]"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    torch = subprocess.run([str(python), "-c", "import torch"], cwd=tmp_path, capture_output=True, text=True)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr, torch.stderr
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert "qwen3-reranker-client" in installed
    assert not installed & set(SERVER_ONLY), sorted(installed)
    where = subprocess.run(
        [str(python), "-c", "import reranker, reranker_client; print(reranker.__file__, reranker_client.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(path.startswith(str(venv)) for path in where.stdout.split()), where.stdout  # the installed copy

    assert_all_passed(run_client_tests(python, server, tiny_model, tmp_path))


def test_deadline_ends_the_call_without_waiting_for_the_batch(server_factory, tiny_model):
    """The worker sleeps 1.5 s per batch; a 0.3 s deadline must not wait for it.
    The bound below only says "did not wait for the batch"."""
    slow = server_factory(tiny_model, "--cpu-threads", "1", entry=("tests.slow_server", "--worker-delay-ms", "1500"))
    with RerankerClient(slow.address, timeout=0.3) as client:
        start = time.monotonic()
        with pytest.raises(RerankerError) as error:
            client.rerank(QUERY, ["a", "b"])
        elapsed = time.monotonic() - start
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.4

    async def call():
        async with AsyncRerankerClient(slow.address) as client:
            start = time.monotonic()
            with pytest.raises(RerankerError) as error:
                await client.rerank(QUERY, ["c"], timeout=0.3)
            return error.value, time.monotonic() - start

    error, elapsed = asyncio.run(call())
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.4

    # The server is not stuck: a call with room for the batch succeeds.
    with RerankerClient(slow.address, timeout=60) as client:
        assert len(client.rerank(QUERY, ["d", "e"]).results) == 2
