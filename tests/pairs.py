"""Pairs as the service encodes them, and scores as a worker computes them:
shared by the scoring, precision, worker and GPU tests."""

from __future__ import annotations

import dataclasses

from workers.prompt import EncodedPair, PromptEncoder
from workers.protocol import ScoreBatch


def encode(model_dir, pairs, instruction="", max_length=8192) -> list[EncodedPair]:
    from tokenizers import Tokenizer

    encoder = PromptEncoder(Tokenizer.from_file(str(model_dir / "tokenizer.json")), max_length)
    return encoder.encode(pairs, instruction)


def run(scorer, encoded: list[EncodedPair], share: bool = True) -> list[float]:
    """Scores of one batch of `encoded`; without `share`, no prefix is shared."""
    pairs = encoded if share else [dataclasses.replace(pair, shared=0) for pair in encoded]
    logits, _ = scorer.score(ScoreBatch.from_pairs(0, pairs))
    return logits.tolist()
