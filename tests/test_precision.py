"""Lower precisions on the CPU stay close to fp32 and keep clearly separated pairs in order.

Bounds measured on the tiny random model (200 pairs; bitsandbytes 0.50, torch 2.13 CPU):
Spearman vs fp32 was bf16 0.999, fp16 1.000, int8 0.9975, nf4 0.843, and every
pair farther apart in fp32 logit than the margin below kept its order. The
random weights (initializer_range 0.2) are harder to quantize than trained
ones; the bounds leave a little room under what was measured.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_scoring import encode, run
from tests.texts import DOCUMENTS, QUERIES
from workers.scoring import load_scorer

QUERY_SET = QUERIES + [
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


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.fixture(scope="module")
def reference(tiny_model):
    encoded = encode(tiny_model, PAIRS)
    return encoded, torch.tensor(run(load_scorer(str(tiny_model), "cpu", "fp32"), encoded))


@pytest.mark.parametrize("precision", BOUNDS)
def test_close_to_fp32(tiny_model, reference, precision):
    encoded, fp32 = reference
    least_spearman, margin, most_error = BOUNDS[precision]
    scorer = load_scorer(str(tiny_model), "cpu", precision)
    assert scorer.precision == precision
    assert scorer.head.dtype == torch.float32
    logits = torch.tensor(run(scorer, encoded))
    assert len(PAIRS) == 200
    assert spearman(logits, fp32) >= least_spearman
    assert (logits - fp32).abs().max() <= most_error
    # scores still spread: a quantized head would flatten them (FACTS.md)
    assert logits.std() > 0.5 * fp32.std()
    separated = (fp32[:, None] - fp32[None, :]) > margin
    assert separated.sum() > 100
    assert ((logits[:, None] - logits[None, :])[separated] > 0).all()


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_weights_but_full_precision_head(tiny_model, precision):
    scorer = load_scorer(str(tiny_model), "cpu", precision)
    quantized = [m for m in scorer.backbone.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")]
    assert quantized, "no layer was quantized"
    full = load_scorer(str(tiny_model), "cpu", "fp32")
    assert scorer.memory_bytes < full.memory_bytes
