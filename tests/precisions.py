"""What "close to fp32" means for each precision, shared by the CPU and GPU precision tests.

Bounds measured on the tiny random model (200 pairs; bitsandbytes 0.50, torch 2.13 CPU):
Spearman vs fp32 was bf16 0.999, fp16 1.000, int8 0.9975, nf4 0.843, and every
pair farther apart in fp32 logit than the margin below kept its order. The
random weights (initializer_range 0.2) are harder to quantize than trained
ones; the bounds leave a little room under what was measured.
"""

from __future__ import annotations

import torch

from tests.texts import DOCUMENTS, QUERIES

QUERY_SET = [
    *QUERIES,
    "capital city",
    "Eiffel tower height",
    "German history",
    "how to cook rice",
    "数学",
    "python function",
    "¿Dónde está París?",
]
PAIRS = [(query, document) for query in QUERY_SET for document in DOCUMENTS[:20]]

# precision: (least Spearman, fp32 logit margin beyond which order must hold, most |logit - fp32|)
BOUNDS = {
    "bf16": (0.995, 0.2, 0.1),
    "fp16": (0.999, 0.05, 0.02),
    "int8": (0.99, 0.3, 0.2),
    "nf4": (0.80, 1.5, 1.25),
}
# Precisions only a GPU runs (tests/test_gpu.py). fp8 (torchao, compute capability
# 8.9+) has not been measured yet: int8's bounds, until bench/gpu_check.sh says more.
CUDA_ONLY_BOUNDS = {"fp8": (0.99, 0.3, 0.2)}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
