"""The `cascade` layout: a shared head's keys and values used where they are, never copied into rows.

The padded layout (workers/scoring.py) computes each group's head once, then
copies its keys and values into every row of the group, and every layer joins
them to the row's own (an index_select and a cat per layer, in memory traffic
proportional to rows x head). Here each layer's attention of the rows is
computed in two parts and merged, as FlashInfer's cascade attention does:

  own   each row's queries against its own keys, causal. Rows are padded on the
        right, so a real token never sees padding, and every query sees at least
        one key (no empty softmax).
  head  all the group's queries at once against the head's keys: the group's
        rows are folded into one query sequence of batch 1, so the head's keys
        are read once per group, not once per row; nothing is masked, since a
        head precedes every token of its rows.

Each part returns its log-sum-exp, and out = (e^lse_own o_own + e^lse_head o_head)
/ (e^lse_own + e^lse_head) is the softmax over head and row together, as if
the pair ran alone. FlexAttention (`torch.nn.attention.flex_attention`) gives the
log-sum-exp: on CUDA it is compiled; on the CPU it runs unfused, which is exact
(the tests use it) but not fast.

Every other pass (the heads themselves, rows that share nothing) runs through
SDPA as in the padded layout: the attention function registered here only
takes its own path when the model is called with `cascade_heads`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "reranker_cascade"


@dataclass(frozen=True)
class Heads:
    """What a batch's rows share: every layer's keys and values of each group's
    head ((groups, kv heads, longest head, head dim), padded on the right), each
    head's length, each group's rows (consecutive: [start, end)), and the rows'
    own causal mask."""

    cache: DynamicCache
    lengths: list[int]
    rows: list[tuple[int, int]]
    causal: BlockMask


def install(model: PreTrainedModel) -> None:
    """Route the model's attention through `attention` (SDPA unless given `cascade_heads`)."""
    if model.config._attn_implementation != "sdpa":
        raise ValueError(
            f"the cascade layout runs with attn_implementation sdpa, not {model.config._attn_implementation}"
        )
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)


def causal_mask(width: int, device: torch.device) -> BlockMask:
    """Each row's own keys, causal; built once per batch, used by every layer."""
    return create_block_mask(_causal, None, None, width, width, device=device)


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cascade_heads: Heads | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (rows, heads, width, dim), key and
    value (rows, kv heads, width, dim); returns (rows, width, heads, dim)."""
    if cascade_heads is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    heads = cascade_heads
    own, own_lse = _attend(query, key, value, scaling, heads.causal)
    layer: Any = heads.cache.layers[cast(int, module.layer_idx)]  # a DynamicLayer: .keys, .values
    parts = []
    for group, ((start, end), length) in enumerate(zip(heads.rows, heads.lengths, strict=True)):
        queries = query[start:end]
        rows, count, width, dim = queries.shape
        folded = queries.transpose(0, 1).reshape(1, count, rows * width, dim)
        keys = layer.keys[group : group + 1, :, :length]
        values = layer.values[group : group + 1, :, :length]
        out, lse = _attend(folded, keys, values, scaling, None)
        parts.append((out.view(count, rows, width, dim).transpose(0, 1), lse.view(count, rows, width).transpose(0, 1)))
    head = torch.cat([out for out, _ in parts])
    head_lse = torch.cat([lse for _, lse in parts])
    return _merge(own, own_lse, head, head_lse).transpose(1, 2).contiguous(), None


def _causal(batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return key <= query


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, mask: BlockMask | None
) -> tuple[torch.Tensor, torch.Tensor]:
    out, aux = _flex(query.device)(
        query, key, value, block_mask=mask, scale=scaling, enable_gqa=True, return_aux=AuxRequest(lse=True)
    )
    return out, aux.lse


def _merge(own: torch.Tensor, own_lse: torch.Tensor, head: torch.Tensor, head_lse: torch.Tensor) -> torch.Tensor:
    """The softmax over both parts' keys, from each part's output and log-sum-exp (in float32)."""
    most = torch.maximum(own_lse, head_lse)
    own_weight = (own_lse - most).exp().unsqueeze(-1)
    head_weight = (head_lse - most).exp().unsqueeze(-1)
    merged = (own.float() * own_weight + head.float() * head_weight) / (own_weight + head_weight)
    return merged.to(own.dtype)


_compiled: Callable | None = None


def _flex(device: torch.device) -> Callable:
    """FlexAttention compiled on CUDA (its fused kernel); unfused elsewhere."""
    global _compiled
    if device.type != "cuda":
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled
