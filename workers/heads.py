"""The keys and values of recently scored heads, kept for the next batches.

A head (system prompt, instruction and query) is shared by every row of its
request, but a request of many documents runs in several batches: without
this each batch computes its head again (on this project's CPU, workload a,
5-6 times a request). A worker keeps the heads it computed, newest last, within
a byte budget, and a later batch whose rows begin with the same tokens reads
them instead: the prefix caching of vLLM and SGLang, for the one prefix a
reranker's rows share. A head depends only on its tokens (its positions start
at 0 whatever the batch), so a stored head is what the batch would have computed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tensors come in from the scorer; no torch at run time (bench/null_server.py has none)
    import torch


@dataclass(frozen=True)
class Head:
    """Every layer's keys and values of one head: (layers, kv heads, tokens, head dim) each."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class HeadCache:
    """Heads by their tokens, least recently used first out, within `max_bytes` (0: none kept).
    Thread-safe, as the scorer that holds it is (workers run as threads in one-process tests)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"a head cache holds 0 bytes or more, not {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0  # lookups answered (a batch's group, not its rows)
        self.misses = 0
        self._heads: OrderedDict[bytes, Head] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        return key in self._heads

    def __len__(self) -> int:
        return len(self._heads)

    def get(self, key: bytes) -> Head | None:
        with self._lock:
            head = self._heads.get(key)
            if head is None:
                self.misses += 1
                return None
            self.hits += 1
            self._heads.move_to_end(key)
            return head

    def put(self, key: bytes, head: Head) -> None:
        """Keep a copy of `head` (a view of a batch's tensors would hold all of them)
        unless it alone is over the budget; older heads make room."""
        if head.bytes > self.max_bytes or key in self._heads:
            return
        kept = Head(head.keys.clone(), head.values.clone())
        with self._lock:
            if key in self._heads:
                return
            while self.bytes + kept.bytes > self.max_bytes:
                _, oldest = self._heads.popitem(last=False)
                self.bytes -= oldest.bytes
            self._heads[key] = kept
            self.bytes += kept.bytes

    def clear(self) -> None:
        """Let every head go (the device ran out of memory: the batch needs it more)."""
        with self._lock:
            self._heads.clear()
            self.bytes = 0
