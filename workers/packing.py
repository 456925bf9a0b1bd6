"""Packed rows: several documents back to back behind their shared head, in one row.

The padded layout (workers/scoring.py) computes a shared head once, copies its
keys and values into every row, and pads each document to the longest. A
packed row instead holds one or more segments, each a head followed by its
documents back to back; an attention mask lets every document see its own head
and itself, and nothing else, and each document's positions continue from its
head, so that every token sees exactly the keys and positions it would see if
its pair were scored alone. The score is read at each document's last token.
SGLang scores "multiple items" this way.

Rows are described by three ids per token, from which both masks are built:
`part` (every head and every document of a row has its own number; -1 for
padding), `segment` (the segment the part belongs to; -1 for padding) and
`head` (the token belongs to a head). Query token q may see key token k when
k <= q and either they lie in the same part, or k lies in q's segment's head.
Padding sees earlier padding, so that no row of the mask is empty (an empty
row would give NaN, and 0 x NaN spreads).

The dense mask is additive float (0 / -inf), never boolean: with eager
attention a boolean 4D mask gave wrong scores (docs/scoring.md#fact-additive-float-masks).
FlexAttention takes a BlockMask built from the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence


@dataclass(frozen=True)
class Segment:
    """A head and the documents that follow it; `rows` are the documents'
    indices in the batch, in the same order."""

    head: torch.Tensor  # may be empty: a row scored whole is a segment of one document
    documents: list[torch.Tensor]
    rows: list[int]


@dataclass(frozen=True)
class Packed:
    """Packed rows, padded on the right, ready for the model."""

    input_ids: torch.Tensor  # (rows, width) int64
    position_ids: torch.Tensor  # (rows, width) int64
    part: torch.Tensor  # (rows, width) int64, -1 for padding
    segment: torch.Tensor  # (rows, width) int64, -1 for padding
    head: torch.Tensor  # (rows, width) bool
    # Where each batch row's score is read, in batch-row order: packed row, position.
    read_rows: torch.Tensor  # (batch rows,) int64
    read_positions: torch.Tensor  # (batch rows,) int64

    @property
    def tokens(self) -> int:
        """Tokens the model runs, padding included."""
        return self.input_ids.numel()

    def visible(self, device: torch.device | None = None) -> torch.Tensor:
        """(rows, width, width) bool, built on `device`: may query q see key k."""
        part, segment, head = (tensor.to(device) for tensor in (self.part, self.segment, self.head))
        width = part.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=part.device).tril()
        same_part = part[:, :, None] == part[:, None, :]
        own_head = head[:, None, :] & (segment[:, :, None] == segment[:, None, :])
        return causal & (same_part | own_head)

    def dense_mask(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """(rows, 1, width, width), built on `device` (only the ids cross to it):
        0 where a query may see a key, -inf elsewhere."""
        hidden = ~self.visible(device)
        return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))[:, None]

    def block_mask(self, device: torch.device):
        """The same mask as a FlexAttention BlockMask, on `device`."""
        from torch.nn.attention.flex_attention import create_block_mask

        part, segment, head = (tensor.to(device) for tensor in (self.part, self.segment, self.head))

        def visible(batch, _head, q, k):
            same_part = part[batch, q] == part[batch, k]
            own_head = head[batch, k] & (segment[batch, q] == segment[batch, k])
            return (k <= q) & (same_part | own_head)

        rows, width = self.input_ids.shape
        return create_block_mask(visible, rows, None, width, width, device=device)


def pack(segments: Sequence[Segment], row_tokens: int, width_multiple: int = 1) -> Packed:
    """Lay `segments` into rows of at most `row_tokens` tokens (or the longest
    head + document, if longer), in order. A segment that does not fit in what
    is left of a row continues in the next row behind a copy of its head, so a
    row may hold the end of one request and the start of another. Rows are
    padded to the longest, rounded up to a multiple of `width_multiple`."""
    limit = max([row_tokens] + [len(s.head) + len(d) for s in segments for d in s.documents])
    rows: list[_RowBuilder] = [_RowBuilder()]
    reads: dict[int, tuple[int, int]] = {}
    for number, segment in enumerate(segments):
        opened_in = None  # the row in which this segment's head was last laid
        for document, index in zip(segment.documents, segment.rows, strict=True):
            row = rows[-1]
            need = len(document) + (len(segment.head) if opened_in is not row else 0)
            if row.length + need > limit:
                row = _RowBuilder()
                rows.append(row)
            if opened_in is not row:
                row.add(segment.head, number, head=True, first_position=0)
                opened_in = row
            row.add(document, number, head=False, first_position=len(segment.head))
            reads[index] = (len(rows) - 1, row.length - 1)

    def padded(pieces: str, value: int) -> torch.Tensor:
        tensor = pad_sequence([torch.cat(getattr(row, pieces)) for row in rows], batch_first=True, padding_value=value)
        return torch.nn.functional.pad(tensor, (0, -tensor.shape[1] % width_multiple), value=value)

    order = sorted(reads)
    return Packed(
        input_ids=padded("ids", 0),
        position_ids=padded("positions", 0),
        part=padded("parts", -1),
        segment=padded("segments", -1),
        head=padded("heads", False),
        read_rows=torch.tensor([reads[index][0] for index in order], dtype=torch.long),
        read_positions=torch.tensor([reads[index][1] for index in order], dtype=torch.long),
    )


class _RowBuilder:
    def __init__(self) -> None:
        self.ids: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.parts: list[torch.Tensor] = []
        self.segments: list[torch.Tensor] = []
        self.heads: list[torch.Tensor] = []
        self.length = 0

    def add(self, tokens: torch.Tensor, segment: int, head: bool, first_position: int) -> None:
        n = len(tokens)
        self.ids.append(tokens.long())
        self.positions.append(torch.arange(first_position, first_position + n))
        self.parts.append(torch.full((n,), len(self.parts), dtype=torch.long))
        self.segments.append(torch.full((n,), segment, dtype=torch.long))
        self.heads.append(torch.full((n,), head, dtype=torch.bool))
        self.length += n
