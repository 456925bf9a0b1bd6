"""Lower precisions on the CPU stay close to fp32 and keep clearly separated pairs in order
(the bounds and how they were measured: tests/precisions.py)."""

from __future__ import annotations

import pytest
import torch

from tests.pairs import encode, run
from tests.precisions import BOUNDS, PAIRS, spearman
from workers.scoring import load_scorer


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
    # scores still spread: a quantized head would flatten them (docs/scoring.md#fact-keep-the-head-in-full-precision)
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
