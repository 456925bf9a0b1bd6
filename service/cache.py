"""Repeated work done once: the score cache and single flight.

RAG pipelines send the same (query, document) pairs again: pagination,
retries, several users asking the same question. The front end keeps each
document's result (a DocumentScore: the float32 logit exactly as the worker
computed it, and the rest of what a result says) in a least-recently-used map
bounded in bytes, so a repeated pair is answered without reaching the batcher.
A pair that some call is computing right now is not computed again: later
calls wait for that computation (single flight).

The key is a 128-bit BLAKE2b hash of everything that decides a result: the
model (id, revision, precision), max_length, the instruction, the query, the
document, the truncation mode, max_tokens_per_doc and the chunk overlap. Texts
are not kept: an entry costs ENTRY_BYTES whatever the document's length.

Everything runs on the event loop; `keys` hashes a call's texts, and the
Ranker calls it a chunk at a time so that a huge call never holds the loop long.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import cachetools

from service.calls import DocumentScore
from service.metrics import Metrics

# What one entry holds in memory: its key, its DocumentScore, and the cache's
# bookkeeping of both. Measured with tracemalloc on CPython 3.11: 352 to 448
# bytes an entry between 1,000 and 190,000 entries (the dicts grow in steps);
# tests/test_cache.py checks that it still holds.
ENTRY_BYTES = 512
_KEY_BYTES = 16
_VERSION = b"reranker score cache 1"

Watcher = Callable[[DocumentScore | None], None]


def scope(*fields: object) -> hashlib.blake2b:
    """A hasher fed with the fields every pair of a call shares (model, options)."""
    hasher = hashlib.blake2b(_VERSION, digest_size=_KEY_BYTES)
    for value in fields:
        _feed(hasher, value)
    return hasher


def keys(shared: hashlib.blake2b, pairs: Sequence[tuple[str, str]]) -> list[bytes]:
    """Each (query, document)'s key within `shared`: about a microsecond per KB of
    text, so a caller hashes a large call a chunk at a time."""
    found = []
    for query, document in pairs:
        hasher = shared.copy()
        _feed(hasher, query)
        _feed(hasher, document)
        found.append(hasher.digest())
    return found


def _feed(hasher: hashlib.blake2b, value: object) -> None:
    """Length-prefixed, so that no two different field lists feed the same bytes."""
    data = ("-" if value is None else str(value)).encode("utf-8", "surrogatepass")
    hasher.update(len(data).to_bytes(8, "little"))
    hasher.update(data)


class Flight:
    """One pair being computed by one call, and whoever else waits for it."""

    __slots__ = ("watchers",)

    def __init__(self) -> None:
        self.watchers: list[Watcher] = []


class _Scores(cachetools.LRUCache):
    """cachetools' LRU by size, counting what it evicts (its documented extension point)."""

    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        super().__init__(max_bytes, getsizeof=lambda _: ENTRY_BYTES)
        self._metrics = metrics

    def popitem(self):
        item = super().popitem()
        self._metrics.cache_evictions.inc()
        return item


class ScoreCache:
    """Results by key, at most `max_bytes` of them (ENTRY_BYTES each), least
    recently used first out; and the pairs in flight."""

    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        if max_bytes < ENTRY_BYTES:
            raise ValueError(f"a score cache of {max_bytes} bytes holds no entry (one takes {ENTRY_BYTES})")
        self._scores = _Scores(max_bytes, metrics)
        self._flights: dict[bytes, Flight] = {}
        self._metrics = metrics
        # Read when /metrics is scraped, not written for every result.
        metrics.cache_entries.set_function(lambda: len(self._scores))
        metrics.cache_bytes.set_function(lambda: self._scores.currsize)

    def __len__(self) -> int:
        return len(self._scores)

    def claim(self, key: bytes, watcher: Watcher) -> DocumentScore | Flight | None:
        """A cached result (a hit); or, when another call is computing it, that
        call's Flight, which will tell `watcher` the result, or None if that call
        gave up (claim again then); or None: nobody is, and the caller now
        computes it, and must `finish` or `abandon` it."""
        score = self._scores.get(key)
        if score is not None:
            self._metrics.cache_hits.inc()
            return score
        flight = self._flights.get(key)
        if flight is not None:
            self._metrics.cache_joins.inc()
            flight.watchers.append(watcher)
            return flight
        self._metrics.cache_misses.inc()
        self._flights[key] = Flight()
        return None

    def finish(self, key: bytes, score: DocumentScore) -> None:
        """The claimant computed `key`: keep it, and tell whoever waited."""
        self._scores[key] = score
        self._land(key, score)

    def abandon(self, key: bytes) -> None:
        """The claimant will not compute `key` (cancelled, failed, past its
        deadline): whoever waited claims it again, and one of them computes it."""
        self._land(key, None)

    def _land(self, key: bytes, score: DocumentScore | None) -> None:
        flight = self._flights.pop(key)
        for watcher in flight.watchers:
            watcher(score)
