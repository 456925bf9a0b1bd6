"""bench.compare at a tiny size: every contender (the service included) runs,
every figure is reported, and every contender scores like the card recipe.
A benchmark whose contenders score differently compares nothing."""

from __future__ import annotations

import json

import pytest

from bench import compare, workloads
from bench.contenders import CONTENDERS, SERVICE

FIGURES = (
    "requests",
    "pairs_per_s",
    "tokens_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "padding_efficiency",
    "peak_memory_mib",
    "mfu",
    "max_abs_logit_diff",
)


def test_every_contender_reports_every_figure_and_agrees_with_the_card(tiny_model, tmp_path):
    pytest.importorskip("sentence_transformers", reason="the bench extra: pip install -e '.[bench]'")
    out = tmp_path / "compare.json"
    compare.main(
        [
            "--model",
            str(tiny_model),
            "--workload",
            "a",
            "--requests",
            "3",
            "--documents",
            "6",
            "--card-requests",
            "1",
            "--json",
            str(out),
        ]
    )

    block = json.loads(out.read_text())["precisions"]["fp32"]
    assert list(block["contenders"]) == list(CONTENDERS)
    for name, figures in block["contenders"].items():
        assert "error" not in figures, (name, figures)
        missing = [key for key in FIGURES if figures.get(key) is None]
        assert not missing, (name, missing)
        assert figures["pairs_per_s"] > 0 and 0 < figures["mfu"] < 1
        assert figures["max_abs_logit_diff"] < 1e-3, (name, figures["max_abs_logit_diff"])
    assert block["reference"] == "card"
    assert set(block["service_pairs_per_s_over"]) == set(CONTENDERS) - {SERVICE}
    assert len(block["targets"]) == 3 and all(isinstance(t["pass"], bool) for t in block["targets"])


def test_workloads_are_seeded_real_text_of_the_sizes_asked(tiny_model):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    first, again = (workloads.build("a", tokenizer, requests=3) for _ in range(2))
    assert first == again
    assert first != workloads.build("a", tokenizer, requests=3, seed=1)
    for request in first.requests:
        assert len(request.documents) == 50 and len(set(request.documents)) == 50
        lengths = workloads.token_counts(tokenizer, list(request.documents))
        assert min(lengths) >= 30 and max(lengths) <= 500
        names = [name for name, doc in workloads.docstrings() if doc in request.documents]
        assert request.query in names  # the query names a function one of the documents describes
    long = workloads.build("c", tokenizer, requests=1)
    assert all(
        abs(n - workloads.LONG_TOKENS) <= 2 for n in workloads.token_counts(tokenizer, list(long.requests[0].documents))
    )


def test_http_against_grpc_at_a_tiny_size(tiny_model, tmp_path):
    """bench.http_vs_grpc reports both transports, and they agree on the logits."""
    pytest.importorskip("aiohttp", reason="the bench extra: pip install -e '.[bench]'")
    from bench import http_vs_grpc

    out = tmp_path / "http_vs_grpc.json"
    sizes = ["--requests", "4", "--documents", "3", "--clients", "2", "--rounds", "1"]
    report = http_vs_grpc.main(["--model", str(tiny_model), *sizes, "--json", str(out)])
    assert json.loads(out.read_text()) == report
    for transport in http_vs_grpc.TRANSPORTS:
        figures = report[transport]
        assert figures["pairs_per_s"] > 0 and figures["front_end_cpu_ms_per_request"] >= 0
    assert report["max_abs_logit_diff"] < 1e-3
