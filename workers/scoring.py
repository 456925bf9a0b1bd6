"""Scoring (query, document) token rows with a Qwen3-Reranker, the model card's way,
computing only what the score needs.

The card runs the whole causal LM and reads the vocabulary-sized logits of the
last position. The score only needs logit("yes") - logit("no") there, so this
runs the transformer body, applies the final norm to the last real token of each
row, and multiplies by the two output rows, kept in float32 whatever the
weights' precision (a quantized head flattens every score; see docs/scoring.md#fact-keep-the-head-in-full-precision).

Rows are padded on the right: every row then has positions 0..n-1, exactly as
when scored alone, and padding never changes a score.

Rows that begin with the same tokens (the system prompt, instruction and query
of one request: about a third of a typical pair) share them: their keys and
values are computed once, copied to each row, and only the rest of every row
(document and suffix) runs through the model. A worker may keep recent heads
for the next batches of the same request (workers/heads.py), which then skip
the head altogether. The front end says how many leading tokens each row may
share; rows are grouped here by those tokens' content, so sharing never
depends on where the rows came from.

That is the `padded` layout. The `cascade` layout (workers/cascade.py) does
the same without the copy: each row attends to its group's head where it lies.
The `packed` layout (workers/packing.py) lays the same groups into packed rows
instead: each head once per row, its documents back to back behind it, an
attention mask keeping them apart. Which layout runs is the worker's choice
(workers/layout.py); all give the same scores.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache, PreTrainedModel

from workers import cascade
from workers.heads import Head, HeadCache
from workers.layout import COMPILE_MODES, PACKED_ROW_TOKENS, resolve_layout
from workers.packing import Segment, pack
from workers.precision import resolve_precision
from workers.prompt import answer_token_ids
from workers.protocol import ScoreBatch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Share prefixes only when that skips at least this fraction of a batch's tokens.
# The shared path needs an explicit attention mask; equal-length rows scored whole
# need none and take a faster kernel: four 4,077-token rows sharing 70 tokens took
# 15.1 s shared and 10.3-13.2 s whole on the CPU, eight 1,000-token rows 3.2 s
# shared and 3.4 s whole (6% skipped).
_MIN_SHARED_FRACTION = 0.05
# Under torch.compile, rows are padded to a multiple of this: fewer shapes to compile or record.
_COMPILED_WIDTH_MULTIPLE = 64


@dataclass
class Scorer:
    backbone: PreTrainedModel  # the transformer body, with its final norm taken out
    norm: torch.nn.Module  # the final norm, applied to one position per row
    head: torch.Tensor  # (2, hidden) float32: the "yes" and "no" rows of the output head
    device: torch.device
    precision: str
    memory_bytes: int
    vocab_size: int
    layout: str = "padded"  # how rows that share a head run: "padded", "packed" or "cascade" (workers/layout.py)
    packed_row_tokens: int = PACKED_ROW_TOKENS  # the packed layout's row length, unless a pair is longer
    width_multiple: int = 1  # rows are padded to a multiple of this many tokens (see `compile`)
    heads: HeadCache = field(default_factory=lambda: HeadCache(0))  # heads kept for later batches (workers/heads.py)
    # The backbone's name for the key/value cache argument (`cache` from transformers 5.24).
    _cache_keyword: str = field(init=False)
    # Whether attention runs through FlexAttention (packed rows then take a block mask).
    _flex: bool = field(init=False)

    def __post_init__(self) -> None:
        parameters = inspect.signature(self.backbone.forward).parameters
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        backbone: Any = self.backbone  # a transformers model: its config is no submodule
        self._flex = backbone.config._attn_implementation == "flex_attention"

    @property
    def embeddings(self) -> torch.nn.Module:
        """The input embedding layer: every token the body computes goes in there."""
        backbone: Any = self.backbone
        return backbone.get_input_embeddings()

    @torch.inference_mode()
    def score(self, batch: ScoreBatch) -> tuple[torch.Tensor, int]:
        """logit(yes) - logit(no) per row of `batch` (float32, on the CPU).

        `batch.shared[i]` leading tokens of row i may be computed once with
        every other row that starts with the same tokens, or read from the
        head cache (0: none). If the device runs out of memory the kept heads
        are let go, and the rows are split in halves and retried;
        the second value is then the largest padded-token count that fitted
        (0 when no split was needed). Raises torch.OutOfMemoryError only when
        a single row does not fit, and ValueError for ids outside the
        vocabulary or a shared length that leaves nothing of its row.
        """
        lengths, shared = list(batch.lengths), list(batch.shared)
        ids = torch.frombuffer(batch.ids, dtype=torch.int32) if len(batch.ids) else torch.zeros(0, dtype=torch.int32)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got {int(ids.min())}..{int(ids.max())}")
        if any(not 0 <= s < n for s, n in zip(shared, lengths, strict=True)):
            raise ValueError("each row's shared length must lie in [0, its length)")
        rows = [_Row(tokens, prefix) for tokens, prefix in zip(torch.split(ids.long(), lengths), shared, strict=True)]
        logits, fitted, split = self._score_splitting(rows)
        return logits, fitted if split else 0

    def _score_splitting(self, rows: list[_Row]) -> tuple[torch.Tensor, int, bool]:
        try:
            return self._forward(rows), len(rows) * max(len(row.tokens) for row in rows), False
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
        # Out of the handler, the failed attempt's tensors are gone with its traceback.
        self.heads.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(rows) // 2
        first, fitted_first, _ = self._score_splitting(rows[:half])
        second, fitted_second, _ = self._score_splitting(rows[half:])
        return torch.cat([first, second]), max(fitted_first, fitted_second), True

    def _forward(self, rows: list[_Row]) -> torch.Tensor:
        groups: dict[bytes, list[int]] = {}
        for index, row in enumerate(rows):
            if row.shared:
                groups.setdefault(row.key, []).append(index)
        # A group shares when its head runs once for several rows, or not at all (kept from an earlier batch).
        kept = {key for key in groups if key in self.heads}
        shares = {key: members for key, members in groups.items() if len(members) > 1 or key in kept}
        skipped = sum((len(members) - (key not in kept)) * rows[members[0]].shared for key, members in shares.items())
        sharing = list(shares.values())
        if skipped < _MIN_SHARED_FRACTION * sum(len(row.tokens) for row in rows):
            sharing = []
        together = [index for members in sharing for index in members]
        alone = sorted(set(range(len(rows))) - set(together))
        if sharing and self.layout == "packed":
            return self._forward_packed(rows, sharing, alone)
        logits = torch.empty(len(rows))
        if together:
            logits[together] = self._forward_sharing([[rows[index] for index in members] for members in sharing])
        if alone:
            logits[alone] = self._forward_whole([rows[index].tokens for index in alone])
        return logits

    def compile(self, mode: str) -> None:
        """Run the body through torch.compile in `mode` (workers.layout.COMPILE_MODES;
        reduce-overhead records CUDA graphs). Rows are then padded to multiples of
        64 tokens, so that a few shapes cover every batch and each is compiled,
        or recorded, once."""
        if mode == "off":
            return
        self.backbone = cast(PreTrainedModel, torch.compile(self.backbone, mode=mode))
        self.width_multiple = _COMPILED_WIDTH_MULTIPLE

    def _forward_whole(self, rows: list[torch.Tensor]) -> torch.Tensor:
        input_ids, attention_mask, lengths = _pad_right(rows, self.width_multiple)
        hidden = self.backbone(
            input_ids=self._put(input_ids),
            attention_mask=self._put(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return self._answer(hidden, lengths)

    def _forward_sharing(self, groups: list[list[_Row]]) -> torch.Tensor:
        """Logits of the groups' rows, group after group. Each group's head is
        read from the head cache or runs once (`_heads`); the rest of each row
        runs after it with explicit positions, seeing the head's keys and
        values: copied into every row of the group (padded layout), or in place
        (cascade layout, workers/cascade.py). Heads and rests are both padded
        on the right, so a padded-layout row's keys may have a masked gap
        between its head and its rest."""
        rows = [row for group in groups for row in group]
        keys, values = self._heads(groups)
        head_lengths = torch.tensor([group[0].shared for group in groups])
        rest_ids, rest_mask, lengths = _pad_right([row.tokens[row.shared :] for row in rows], self.width_multiple)
        starts = torch.tensor([row.shared for row in rows])
        positions = self._put(starts[:, None] + torch.arange(rest_ids.shape[1]))
        if self.layout == "cascade":
            ends = list(itertools.accumulate(len(group) for group in groups))
            heads = cascade.Heads(
                self._cache(keys, values),
                head_lengths.tolist(),
                list(itertools.pairwise([0, *ends])),
                cascade.causal_mask(rest_ids.shape[1], self.device),
            )
            hidden = self.backbone(
                input_ids=self._put(rest_ids), position_ids=positions, use_cache=False, cascade_heads=heads
            ).last_hidden_state
            return self._answer(hidden, lengths)
        which = torch.tensor([number for number, group in enumerate(groups) for _ in group])
        cache = self._cache(keys, values)
        cache.batch_select_indices(which.to(self.device))
        head_mask = (torch.arange(keys.shape[3]) < head_lengths[:, None]).long()
        hidden = self.backbone(
            input_ids=self._put(rest_ids),
            attention_mask=self._put(torch.cat([head_mask[which], rest_mask], dim=1)),
            position_ids=positions,
            use_cache=True,
            **{self._cache_keyword: cache},
        ).last_hidden_state
        return self._answer(hidden, lengths)

    def _heads(self, groups: list[list[_Row]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's keys and values of each group's head, (layers, groups,
        kv heads, longest head, head dim) each, padded on the right: from the head
        cache where it holds them, the others computed together and kept there."""
        keys = [group[0].key for group in groups]
        heads = [self.heads.get(key) for key in keys]
        missing = [number for number, head in enumerate(heads) if head is None]
        if missing:
            ids, mask, _ = _pad_right(
                [groups[number][0].tokens[: groups[number][0].shared] for number in missing], self.width_multiple
            )
            cache = DynamicCache(config=self.backbone.config)
            self.backbone(
                input_ids=self._put(ids), attention_mask=self._put(mask), use_cache=True, **{self._cache_keyword: cache}
            )
            layers: Any = cache.layers  # DynamicLayers: .keys, .values (rows, kv heads, tokens, head dim)
            computed_keys = torch.stack([layer.keys for layer in layers])
            computed_values = torch.stack([layer.values for layer in layers])
            for slot, number in enumerate(missing):
                length = groups[number][0].shared
                head = Head(computed_keys[:, slot, :, :length], computed_values[:, slot, :, :length])
                self.heads.put(keys[number], head)
                heads[number] = head
        stored = cast(list[Head], heads)
        width = max(head.tokens for head in stored)
        width += -width % self.width_multiple
        return (
            torch.stack([_pad_tokens(head.keys, width) for head in stored], dim=1),
            torch.stack([_pad_tokens(head.values, width) for head in stored], dim=1),
        )

    def _cache(self, keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
        """A key/value cache holding, per layer, `keys[layer]` and `values[layer]`."""
        return DynamicCache(ddp_cache_data=zip(keys, values, strict=True), config=self.backbone.config)

    def _forward_packed(self, rows: list[_Row], sharing: list[list[int]], alone: list[int]) -> torch.Tensor:
        """Logits of all `rows` in packed rows: each sharing group a segment
        behind its head, each row alone a segment of its own."""
        nothing = torch.zeros(0, dtype=torch.long)
        segments = [
            Segment(
                rows[members[0]].tokens[: rows[members[0]].shared],
                [rows[index].tokens[rows[index].shared :] for index in members],
                members,
            )
            for members in sharing
        ]
        segments += [Segment(nothing, [rows[index].tokens], [index]) for index in alone]
        packed = pack(segments, self.packed_row_tokens, self.width_multiple)
        if self._flex:
            mask = packed.block_mask(self.device)
        else:
            mask = packed.dense_mask(next(self.embeddings.parameters()).dtype, self.device)
        hidden = self.backbone(
            input_ids=self._put(packed.input_ids),
            position_ids=self._put(packed.position_ids),
            attention_mask=mask,
            use_cache=False,
        ).last_hidden_state
        return self._read(hidden, packed.read_rows, packed.read_positions)

    def _put(self, tensor: torch.Tensor) -> torch.Tensor:
        """To the device; from pinned memory on CUDA, so that the copy does not
        wait for the host (the inputs are small: ids and masks only)."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _answer(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The final norm and the yes/no rows, at each row's last real token only."""
        return self._read(hidden, torch.arange(len(lengths)), lengths - 1)

    def _read(self, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final norm and the yes/no rows, at the given (row, position) of `hidden` only."""
        last = hidden[rows.to(self.device), positions.to(self.device)]
        yes_no = self.norm(last).float() @ self.head.T
        return (yes_no[:, 0] - yes_no[:, 1]).cpu()

    def warm_up(self, max_length: int, max_batch_tokens: int) -> tuple[int, float]:
        """Run a small batch, and on CUDA a full-budget one, so that the first
        request pays no start-up cost and a budget that cannot fit shows now.
        Returns the padded-token budget that fits (0: the configured one) and
        the seconds per padded token the last warm-up batch took. Both batches
        run the shared-prefix path too: it holds every layer's keys and values
        at once, the most memory a batch can take."""
        try:
            batch = _zeros([16, 16, 16], [8, 8, 0])
            start = time.perf_counter()
            self.score(batch)
            seconds_per_token = (time.perf_counter() - start) / 48
            if self.device.type != "cuda":
                return 0, seconds_per_token
            width = max(2, min(max_length, max_batch_tokens // 2))
            rows = max_batch_tokens // width
            start = time.perf_counter()
            _, fitted = self.score(_zeros([width] * rows, [width // 2] * rows))
            torch.cuda.synchronize(self.device)
            return fitted, (time.perf_counter() - start) / (fitted or rows * width)
        finally:
            self.heads.clear()  # the warm-up's heads of zeros are nobody's


@dataclass
class _Row:
    tokens: torch.Tensor
    shared: int

    @functools.cached_property
    def key(self) -> bytes:
        """The shared head's tokens: how rows are grouped, and the head cache's key."""
        return self.tokens[: self.shared].numpy().tobytes()


def _zeros(lengths: list[int], shared: list[int]) -> ScoreBatch:
    """A batch of rows of token 0, for warming up."""
    return ScoreBatch(0, array("i", lengths), array("i", shared), array("i", bytes(4 * sum(lengths))))


def _pad_tokens(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(..., tokens, dim) padded with zeros to `width` tokens."""
    return torch.nn.functional.pad(tensor, (0, 0, 0, width - tensor.shape[-2]))


def _pad_right(rows: list[torch.Tensor], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids padded on the right (to a multiple of `multiple` tokens), their attention
    mask, and each row's length."""
    lengths = torch.tensor([len(row) for row in rows])
    input_ids = pad_sequence(rows, batch_first=True, padding_value=0)
    input_ids = torch.nn.functional.pad(input_ids, (0, -input_ids.shape[1] % multiple))
    return input_ids, (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(), lengths


def load_scorer(
    path: str,
    device: str,
    precision: str,
    attn_implementation: str = "sdpa",
    layout: str = "auto",
    compile_mode: str = "off",
    head_cache_bytes: int = 0,
) -> Scorer:
    """Load a checkpoint onto `device` in `precision` (a name from workers.precision,
    or auto), to run rows in `layout` (a name from workers.layout, or auto),
    through torch.compile in `compile_mode` unless it is off, keeping up to
    `head_cache_bytes` of recent heads for later batches (workers/heads.py)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    precision = resolve_precision(precision, device)
    layout = resolve_layout(layout, device)
    if attn_implementation == "flex_attention" and not device.startswith("cuda"):
        # docs/scoring.md#fact-flex-attention-on-the-cpu
        raise ValueError("flex_attention needs a CUDA device: torch's CPU FlexAttention kernel fails to compile")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if precision == "fp8" and not (device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 9)):
        raise ValueError("fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper)")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        device_map={"": device},
        attn_implementation=attn_implementation,
        **_precision_arguments(precision),
    ).eval()
    if precision == "fp8":
        _to_fp8(model.get_decoder())
    answer_ids = answer_token_ids(Tokenizer.from_file(f"{path}/tokenizer.json"))
    scorer = scorer_from_model(model, answer_ids, precision, layout)
    scorer.heads = HeadCache(head_cache_bytes)
    scorer.compile(compile_mode)
    return scorer


def _to_fp8(body: torch.nn.Module) -> None:
    """torchao float8: each linear layer's weights in float8 (a scale per row), its
    activations cast to float8 as they come. The output head is not in the body:
    its yes/no rows stay float32."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(body, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def scorer_from_model(
    model: PreTrainedModel, answer_ids: tuple[int, int], precision: str, layout: str = "padded"
) -> Scorer:
    """Take a loaded causal LM apart into what scoring needs; the full output head is let go."""
    if layout == "cascade":
        cascade.install(model)
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
        layout=layout,
    )


def _precision_arguments(precision: str) -> dict:
    if precision in _DTYPES:
        return {"dtype": _DTYPES[precision]}
    if precision == "fp8":
        return {"dtype": torch.bfloat16}  # then torchao (_to_fp8)
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
