"""Scoring (query, document) token rows with a Qwen3-Reranker, the model card's way,
computing only what the score needs.

The card runs the whole causal LM and reads the vocabulary-sized logits of the
last position. The score only needs logit("yes") - logit("no") there, so this
runs the transformer body, applies the final norm to the last real token of each
row, and multiplies by the two output rows, kept in float32 whatever the
weights' precision (a quantized head flattens every score; see FACTS.md).

Rows are padded on the right: every row then has positions 0..n-1, exactly as
when scored alone, and padding never changes a score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from workers.precision import resolve_precision
from workers.prompt import answer_token_ids

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Scorer:
    backbone: torch.nn.Module  # the transformer body, with its final norm taken out
    norm: torch.nn.Module  # the final norm, applied to one position per row
    head: torch.Tensor  # (2, hidden) float32: the "yes" and "no" rows of the output head
    device: torch.device
    precision: str
    memory_bytes: int
    vocab_size: int
    # Testing only: pretend to run out of memory above this many padded tokens.
    oom_above_tokens: int = 0

    @torch.inference_mode()
    def score(self, lengths: list[int], ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """logit(yes) - logit(no) per row (float32, on the CPU).

        `ids` holds the rows back to back. If the device runs out of memory the
        rows are split in halves and retried; the second value is then the
        largest padded-token count that fitted (0 when no split was needed).
        Raises torch.OutOfMemoryError only when a single row does not fit, and
        ValueError for ids outside the vocabulary.
        """
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got {int(ids.min())}..{int(ids.max())}")
        rows = list(torch.split(ids.to(torch.long), lengths))
        logits, fitted, split = self._score_splitting(rows)
        return logits, fitted if split else 0

    def _score_splitting(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, int, bool]:
        try:
            return self._forward(rows), len(rows) * max(len(row) for row in rows), False
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
        # Out of the handler, the failed attempt's tensors are gone with its traceback.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(rows) // 2
        first, fitted_first, _ = self._score_splitting(rows[:half])
        second, fitted_second, _ = self._score_splitting(rows[half:])
        return torch.cat([first, second]), max(fitted_first, fitted_second), True

    def _forward(self, rows: list[torch.Tensor]) -> torch.Tensor:
        lengths = torch.tensor([len(row) for row in rows])
        if self.oom_above_tokens and len(rows) * int(lengths.max()) > self.oom_above_tokens:
            raise torch.OutOfMemoryError(f"injected: more than {self.oom_above_tokens} padded tokens")
        input_ids = pad_sequence(rows, batch_first=True, padding_value=0)
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        hidden = self.backbone(
            input_ids=input_ids.to(self.device, non_blocking=True),
            attention_mask=attention_mask.to(self.device, non_blocking=True),
            use_cache=False,
        ).last_hidden_state
        last = hidden[torch.arange(len(rows), device=self.device), lengths.to(self.device) - 1]
        yes_no = self.norm(last).float() @ self.head.T
        return (yes_no[:, 0] - yes_no[:, 1]).cpu()

    def warm_up(self, max_length: int, max_batch_tokens: int) -> int:
        """Run a small batch, and on CUDA a full-budget one, so that the first
        request pays no start-up cost and a budget that cannot fit shows now.
        Returns the padded-token budget that fits (0: the configured one)."""
        self.score([16], torch.zeros(16, dtype=torch.int32))
        if self.device.type != "cuda":
            return 0
        width = min(max_length, max_batch_tokens)
        rows = max(1, max_batch_tokens // width)
        _, fitted = self.score([width] * rows, torch.zeros(width * rows, dtype=torch.int32))
        torch.cuda.synchronize(self.device)
        return fitted


def load_scorer(path: str, device: str, precision: str, attn_implementation: str = "sdpa") -> Scorer:
    """Load a checkpoint onto `device` in `precision` (a name from workers.precision, or auto)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    precision = resolve_precision(precision, device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        device_map={"": device},
        attn_implementation=attn_implementation,
        **_precision_arguments(precision),
    ).eval()
    return scorer_from_model(model, answer_token_ids(Tokenizer.from_file(f"{path}/tokenizer.json")), precision)


def scorer_from_model(model: torch.nn.Module, answer_ids: tuple[int, int], precision: str) -> Scorer:
    """Take a loaded causal LM apart into what scoring needs; the full output head is let go."""
    head = model.get_output_embeddings()
    if not head.weight.dtype.is_floating_point:
        raise ValueError(f"the output head was quantized ({head.weight.dtype}); it must stay in full precision")
    backbone = model.get_decoder()
    norm, backbone.norm = backbone.norm, torch.nn.Identity()
    rows = head.weight[list(answer_ids)].detach().float().clone()
    # Without the full output head (1.2 GB in bf16 on the 8B, where it is not tied).
    memory = _bytes_held(backbone, norm) + rows.numel() * rows.element_size()
    return Scorer(
        backbone=backbone,
        norm=norm,
        head=rows,
        device=rows.device,
        precision=precision,
        memory_bytes=memory,
        vocab_size=backbone.get_input_embeddings().num_embeddings,
    )


def _precision_arguments(precision: str) -> dict:
    if precision in _DTYPES:
        return {"dtype": _DTYPES[precision]}
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        # LLM.int8: int8 linear layers with float16 activations; the output head is left alone.
        return {"dtype": torch.float16, "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {
        "dtype": torch.bfloat16,
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
    }


def _bytes_held(*modules: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total

