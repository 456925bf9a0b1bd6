"""CUDA checks, run by bench/gpu_check.sh on a GPU machine; skipped elsewhere.

They print what they measure (run with -s) so that BENCHMARKS.md can quote it."""

from __future__ import annotations

from array import array

import pytest
import torch

from tests.pairs import encode, run
from tests.precisions import BOUNDS, CUDA_ONLY_BOUNDS, PAIRS, spearman
from workers.prompt import EncodedPair
from workers.protocol import ScoreBatch
from workers.scoring import load_scorer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cpu_fp32(tiny_model):
    encoded = encode(tiny_model, PAIRS)
    return encoded, torch.tensor(run(load_scorer(str(tiny_model), "cpu", "fp32"), encoded))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8", "nf4", "fp8"])
def test_cuda_precisions_against_cpu_fp32(tiny_model, cpu_fp32, precision):
    encoded, reference = cpu_fp32
    if precision == "fp8":
        pytest.importorskip("torchao", reason="fp8 needs torchao")
        if torch.cuda.get_device_capability(0) < (8, 9):
            pytest.skip("fp8 needs compute capability 8.9")
    scorer = load_scorer(str(tiny_model), "cuda:0", precision)
    assert scorer.head.dtype == torch.float32 and scorer.head.device.type == "cuda"
    logits = torch.tensor(run(scorer, encoded))
    error = (logits - reference).abs().max().item()
    rho = spearman(logits, reference)
    print(
        f"\n[cuda {precision}] max |logit - cpu fp32| = {error:.5f}, Spearman = {rho:.5f}, "
        f"memory = {scorer.memory_bytes} B"
    )
    if precision == "fp32":
        assert error < 1e-3
    else:
        least_spearman, _, most_error = {**BOUNDS, **CUDA_ONLY_BOUNDS}[precision]
        assert rho >= least_spearman and error <= most_error


@pytest.mark.parametrize("variant", ["padded", "packed", "packed/flex_attention", "cascade"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_layouts_against_cpu_fp32(tiny_model, cpu_fp32, variant, precision):
    """Every layout on CUDA, with SDPA's CUDA kernels and with FlexAttention: the CPU's fp32 scores."""
    encoded, reference = cpu_fp32
    layout, _, attn = variant.partition("/")
    scorer = load_scorer(str(tiny_model), "cuda:0", precision, attn or "sdpa", layout)
    logits = torch.tensor(run(scorer, encoded))
    error = (logits - reference).abs().max().item()
    print(f"\n[cuda {precision} {variant}] max |logit - cpu fp32| = {error:.6f}")
    assert error < (1e-3 if precision == "fp32" else BOUNDS[precision][2])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_padding_invariance(tiny_model, precision):
    scorer = load_scorer(str(tiny_model), "cuda:0", precision)
    encoded = encode(tiny_model, PAIRS[:40])
    alone = torch.tensor([run(scorer, [pair])[0] for pair in encoded])
    together = torch.tensor(run(scorer, encoded))
    drift = (alone - together).abs().max().item()
    print(f"\n[cuda {precision}] max |alone - in a 40-row batch| = {drift:.6f}")
    assert drift < (1e-4 if precision == "fp32" else 0.1)


def test_real_out_of_memory_splits_and_finds_a_budget():
    """A 0.6B-shaped model on a card with only 6 GiB left, asked to warm up on a
    million padded tokens: the batch is split on real CUDA OOMs until it fits, and
    the budget that fitted comes back (the pool then uses it for this worker)."""
    from transformers import Qwen3ForCausalLM

    from bench.common import random_config
    from workers.scoring import scorer_from_model

    with torch.device("cuda:0"):
        model = Qwen3ForCausalLM(random_config("0.6b")).to(torch.bfloat16).eval()
    scorer = scorer_from_model(model, (9693, 2152), "bf16")
    del model
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    blocker = torch.empty(free - 6 * 2**30, dtype=torch.uint8, device="cuda:0")
    try:
        budget = 8192 * 128
        fitted, _ = scorer.warm_up(8192, budget)
        print(f"\n[cuda] with 6 GiB free, warm-up asked for {budget} padded tokens; {fitted} fitted")
        assert 0 < fitted < budget
        # and the scorer still works afterwards
        logits, _ = scorer.score(ScoreBatch.from_pairs(0, [EncodedPair(array("i", range(16)), False)]))
        assert torch.isfinite(logits).all()
    finally:
        del blocker
        torch.cuda.empty_cache()
