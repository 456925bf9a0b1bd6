"""buf (from clients/node's npm packages) on the contract: the lint rules of
buf.yaml pass, and its breaking-change rules catch a renumbered field while
letting an added one through."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.npm import BUF, ROOT, node_modules

PROTO = "proto/reranker/v1/reranker.proto"


@pytest.fixture(scope="module")
def buf() -> str:
    node_modules()
    return str(BUF)


def run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_passes(buf):
    done = run(buf, "lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_lint_exceptions_are_scoped_to_the_contract(buf, tmp_path):
    """The exceptions in buf.yaml name reranker.proto only: the same service in
    another file is held to the STANDARD rules."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    (tmp_path / "proto/reranker/v1").mkdir(parents=True)
    (tmp_path / "proto/reranker/v1/other.proto").write_text(
        'syntax = "proto3";\npackage reranker.v1;\n'
        "message Thing {}\nservice Other { rpc Get(Thing) returns (Thing); }\n"
    )
    done = run(buf, "lint", cwd=tmp_path)
    assert done.returncode != 0
    assert 'Service name "Other" should be suffixed with "Service"' in done.stdout


def changed_workspace(tmp_path, old: str, new: str):
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    (tmp_path / "proto/reranker/v1").mkdir(parents=True)
    text = (ROOT / PROTO).read_text()
    assert old in text
    (tmp_path / PROTO).write_text(text.replace(old, new, 1))
    return tmp_path


def test_buf_breaking_catches_a_renumbered_field(buf, tmp_path):
    workspace = changed_workspace(tmp_path, "int32 top_n = 4;", "int32 top_n = 99;")  # 99: a number no field has
    done = run(buf, "breaking", str(workspace), "--against", str(ROOT))
    assert done.returncode != 0
    assert 'Previously present field "4" with name "top_n" on message "RerankRequest" was deleted' in done.stdout, (
        done.stdout + done.stderr
    )


def test_buf_breaking_catches_a_retyped_field(buf, tmp_path):
    workspace = changed_workspace(tmp_path, "int32 top_n = 4;", "int64 top_n = 4;")
    done = run(buf, "breaking", str(workspace), "--against", str(ROOT))
    assert done.returncode != 0
    assert 'changed type from "int32" to "int64"' in done.stdout, done.stdout + done.stderr


def test_buf_breaking_accepts_an_added_field(buf, tmp_path):
    workspace = changed_workspace(tmp_path, "  bool cancel = 10;\n", "  bool cancel = 10;\n  string tenant = 99;\n")
    done = run(buf, "breaking", str(workspace), "--against", str(ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
