"""Finding a model: a directory or a hub id in the local cache, never a download."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from workers.checkpoint import CheckpointNotFound, resolve_checkpoint


def fake_cache(root, repo_id: str, source) -> str:
    """Lay a checkpoint out the way huggingface_hub caches it; returns the commit hash."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return commit


def test_local_directory(tiny_model):
    checkpoint = resolve_checkpoint(str(tiny_model))
    assert checkpoint.path == tiny_model.resolve()
    assert checkpoint.revision == "" and checkpoint.model_type == "qwen3"
    assert checkpoint.max_positions == 40960


def test_hub_id_from_the_local_cache(tiny_model, tmp_path, monkeypatch):
    commit = fake_cache(tmp_path, "Qwen/Qwen3-Reranker-4B", tiny_model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its constants at import: resolve in a fresh interpreter
    code = (
        "import json, sys; from workers.checkpoint import resolve_checkpoint as r; "
        "c = r('Qwen/Qwen3-Reranker-4B'); print(json.dumps([str(c.path), c.revision]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path, revision = json.loads(result.stdout)
    assert revision == commit and path.endswith(commit)


def test_missing_hub_id_says_what_to_do(tmp_path, monkeypatch):
    code = "from workers.checkpoint import resolve_checkpoint as r; r('Qwen/Qwen3-Reranker-8B')"
    env = {"HF_HUB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "'Qwen/Qwen3-Reranker-8B' is not a local directory and is not in the Hugging Face cache" in result.stderr
    assert str(tmp_path) in result.stderr and "hf download Qwen/Qwen3-Reranker-8B" in result.stderr


def test_missing_directory_and_incomplete_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFound, match=r"model directory .* does not exist"):
        resolve_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFound, match=r"has no tokenizer\.json"):
        resolve_checkpoint(str(tmp_path))


def test_serve_with_a_missing_model_exits_2_with_a_clear_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--model",
            str(tmp_path / "absent"),
            "--log-format",
            "json",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    failed = [e for e in events if e.get("event") == "startup_failed"]
    assert failed and "does not exist" in failed[0]["error"]
