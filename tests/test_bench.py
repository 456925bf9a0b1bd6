"""bench.compare at a tiny size: every contender (the service included) runs,
every figure is reported, and every contender scores like the card recipe.
A benchmark whose contenders score differently compares nothing."""

from __future__ import annotations

import json

import pytest

from bench import compare, frontend, workloads
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
    assert len(block["targets"]) == 5 and all(isinstance(t["pass"], bool) for t in block["targets"])
    # card-sorted scored every request at once: each request waited for the whole run
    sorted_card = block["contenders"]["card-sorted"]
    assert sorted_card["p50_ms"] == sorted_card["p99_ms"] == pytest.approx(1000 * sorted_card["seconds"], abs=1)


def test_repeat_reports_the_median_ratio_and_its_spread(tiny_model, tmp_path):
    out = tmp_path / "compare.json"
    compare.main(
        ["--model", str(tiny_model), "--workload", "a", "--requests", "2", "--documents", "4", "--repeat", "3",
         "--contenders", "card-sorted", "engine", "--layout", "packed", "--json", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    block = report["precisions"]["fp32"]
    assert block["rounds"] == 3 and report["settings"]["layout"] == "packed"
    assert report["settings"]["max_batch_tokens"] == 2048  # the CPU's default budget
    engine = block["contenders"]["engine"]
    assert len(engine["pairs_per_s_rounds"]) == 3
    assert engine["pairs_per_s"] == sorted(engine["pairs_per_s_rounds"])[1]  # the median round's figures
    assert engine["max_abs_logit_diff"] < 1e-4  # against card-sorted, the reference when the card did not run
    (target,) = block["targets"]
    assert target["target"] == "engine ÷ card-sorted pairs/s"
    spread = target["spread"]
    assert len(spread["rounds"]) == 3 and spread["min"] <= spread["median"] <= spread["max"]
    assert spread["median"] == sorted(spread["rounds"])[1] == pytest.approx(target["value"], abs=0.01)


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
    # CPU time comes in clock ticks: four tiny requests may spend none, and then there is no ratio
    ratio = report["http_over_grpc_cpu_per_request"]
    assert (ratio is None) == (report["grpc"]["front_end_cpu_ms_per_request"] == 0)
    assert report["max_abs_logit_diff"] < 1e-3


def test_the_front_end_ceiling_runs_the_real_server_with_workers_that_do_no_model_work(tmp_path):
    report = frontend.main(["--seconds", "2", "--warm-up", "2", "--floor", "--json", str(tmp_path / "frontend.json")])
    assert report["server_exit_code"] == 0
    assert 250 <= report["mean_pair_tokens"] <= 350
    servers = ("front end", "bare grpc.aio")
    assert [(r["shape"], r["server"]) for r in report["shapes"]] == [
        (shape, server) for server in servers for shape in ("score-1", "rerank-50")
    ]
    for result in report["shapes"]:
        assert result["pairs"] > 0 and result["pairs_per_s"] > 0
        assert result["front_end_cpu_us_per_pair"] > 0 and result["client_cpu_us_per_pair"] > 0
        if result["server"] == "front end":
            # the workers only answer zeros: tokenizing and the front end are where the CPU goes
            assert result["workers_cpu_us_per_pair"] < result["tokenizers_cpu_us_per_pair"]
        else:
            assert result["tokenizers_cpu_us_per_pair"] == result["workers_cpu_us_per_pair"] == 0
    rerank = report["shapes"][1]
    assert rerank["pairs"] == 50 * rerank["calls"]


def test_profile_samples_are_bucketed_from_the_innermost_frame_out():
    folded = "\n".join(
        [
            "main (a.py:1);Ranker.score (service/ranking.py:9);PromptEncoder.encode (workers/prompt.py:106) 6",
            "main (a.py:1);Ranker.score (service/ranking.py:9) 2",
            "run (asyncio/base_events.py:1);Handle._run (asyncio/events.py:80) 1",
            "main (a.py:1);emit (logging/__init__.py:1);format (structlog/stdlib.py:3) 1",
        ]
    )
    shares = frontend.bucket_shares(folded)
    assert shares["tokenize"]["share"] == 0.6 and shares["core (Ranker)"]["share"] == 0.2
    assert shares[frontend.C_CALLBACKS]["share"] == 0.1
    assert shares["interceptors, metrics, logs"]["share"] == 0.1
    assert list(shares["tokenize"]["top_frames"]) == ["PromptEncoder.encode (workers/prompt.py:106)"]
    assert sum(found["share"] for found in shares.values()) == pytest.approx(1.0)
