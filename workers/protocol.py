"""The messages between the front end and a worker process, and their bytes.

One socket per worker carries length-prefixed frames. Token ids travel as
int32 arrays and logits as float32 arrays: no pickles, no tensors, no text.
The first byte of a frame says what it holds.

Front end -> worker: ScoreBatch, Shutdown.
Worker -> front end: WorkerReady | WorkerLoadFailed (once), then one
BatchScores or BatchFailed per ScoreBatch, in the order received.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

FRAME_HEADER = struct.Struct("<I")


class Row(Protocol):
    """A pair as a worker receives it (workers.prompt.EncodedPair is one)."""

    @property
    def ids(self) -> array: ...  # array('i'): prefix + body + suffix token ids

    @property
    def shared(self) -> int: ...  # leading tokens it may share with rows that start the same


class Kind(enum.IntEnum):
    SCORE = 1
    SHUTDOWN = 2
    READY = 3
    LOAD_FAILED = 4
    SCORES = 5
    FAILED = 6


class Failure(enum.IntEnum):
    """Why a batch failed inside a worker."""

    INVALID = 1  # the batch itself is malformed (ids out of the vocabulary, ...)
    OUT_OF_MEMORY = 2  # even a single row does not fit on the device
    INTERNAL = 3  # anything else: a bug, or a device fault


@dataclass(frozen=True)
class ScoreBatch:
    """Rows of token ids to score. The batcher decided their grouping; the worker
    only pads them (on the right), computes their shared prefixes once, and runs
    them, splitting only on OOM."""

    batch_id: int
    lengths: array  # array('i'), one per row
    shared: array  # array('i'), one per row: leading tokens it may share (Scorer.score)
    ids: array  # array('i'), all rows concatenated

    _HEAD = struct.Struct("<BQI")

    @classmethod
    def from_pairs(cls, batch_id: int, pairs: Iterable[Row]) -> ScoreBatch:
        """The one place where rows are laid out back to back for a worker."""
        lengths, shared, ids = array("i"), array("i"), array("i")
        for pair in pairs:
            lengths.append(len(pair.ids))
            shared.append(pair.shared)
            ids.extend(pair.ids)
        return cls(batch_id, lengths, shared, ids)

    def encode(self) -> bytes:
        head = self._HEAD.pack(Kind.SCORE, self.batch_id, len(self.lengths))
        return head + self.lengths.tobytes() + self.shared.tobytes() + self.ids.tobytes()

    @classmethod
    def decode(cls, frame: bytes) -> ScoreBatch:
        _, batch_id, rows = cls._HEAD.unpack_from(frame)
        start = cls._HEAD.size
        lengths, shared, ids = array("i"), array("i"), array("i")
        lengths.frombytes(frame[start : start + 4 * rows])
        shared.frombytes(frame[start + 4 * rows : start + 8 * rows])
        ids.frombytes(frame[start + 8 * rows :])
        if len(shared) != rows or sum(lengths) != len(ids):
            raise ValueError(
                f"batch {batch_id}: {rows} rows whose lengths sum to {sum(lengths)}, but {len(ids)} ids arrived"
            )
        return cls(batch_id, lengths, shared, ids)


@dataclass(frozen=True)
class Shutdown:
    def encode(self) -> bytes:
        return bytes([Kind.SHUTDOWN])


@dataclass(frozen=True)
class BatchScores:
    """logit(yes) - logit(no) per row, in row order."""

    batch_id: int
    logits: array  # array('f')
    compute_seconds: float
    # Set when the worker had to split the batch after running out of memory:
    # the padded-token count that did fit, for the batcher to use from now on.
    token_budget: int = 0
    # The batch's groups of rows whose head was read from the worker's head
    # cache, and those whose head was computed (workers/heads.py).
    head_hits: int = 0
    head_misses: int = 0

    _HEAD = struct.Struct("<BQdIII")

    def encode(self) -> bytes:
        head = self._HEAD.pack(
            Kind.SCORES, self.batch_id, self.compute_seconds, self.token_budget, self.head_hits, self.head_misses
        )
        return head + self.logits.tobytes()

    @classmethod
    def decode(cls, frame: bytes) -> BatchScores:
        _, batch_id, seconds, budget, hits, misses = cls._HEAD.unpack_from(frame)
        logits = array("f")
        logits.frombytes(frame[cls._HEAD.size :])
        return cls(batch_id, logits, seconds, budget, hits, misses)


@dataclass(frozen=True)
class BatchFailed:
    batch_id: int
    failure: Failure
    message: str

    _HEAD = struct.Struct("<BQB")

    def encode(self) -> bytes:
        return self._HEAD.pack(Kind.FAILED, self.batch_id, self.failure) + self.message.encode()

    @classmethod
    def decode(cls, frame: bytes) -> BatchFailed:
        _, batch_id, failure = cls._HEAD.unpack_from(frame)
        return cls(batch_id, Failure(failure), frame[cls._HEAD.size :].decode(errors="replace"))


@dataclass(frozen=True)
class WorkerReady:
    """Sent once the model is loaded and warmed up."""

    device: str
    precision: str
    memory_bytes: int
    load_seconds: float
    # The padded-token budget that fitted during warm-up, when lower than the configured one.
    token_budget: int = 0
    # Compute seconds per padded token in the warm-up: the first yardstick for
    # telling a slow batch from a hung worker.
    seconds_per_token: float = 0.0

    def encode(self) -> bytes:
        return bytes([Kind.READY]) + json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, frame: bytes) -> WorkerReady:
        return cls(**json.loads(frame[1:]))


@dataclass(frozen=True)
class WorkerLoadFailed:
    message: str

    def encode(self) -> bytes:
        return bytes([Kind.LOAD_FAILED]) + self.message.encode()

    @classmethod
    def decode(cls, frame: bytes) -> WorkerLoadFailed:
        return cls(frame[1:].decode(errors="replace"))


Message = ScoreBatch | Shutdown | BatchScores | BatchFailed | WorkerReady | WorkerLoadFailed

_DECODERS: dict[Kind, Callable[[bytes], Message]] = {
    Kind.SCORE: ScoreBatch.decode,
    Kind.SHUTDOWN: lambda frame: Shutdown(),
    Kind.READY: WorkerReady.decode,
    Kind.LOAD_FAILED: WorkerLoadFailed.decode,
    Kind.SCORES: BatchScores.decode,
    Kind.FAILED: BatchFailed.decode,
}


def decode(frame: bytes) -> Message:
    return _DECODERS[Kind(frame[0])](frame)


def frame(message: Message) -> bytes:
    """The message's bytes behind their length prefix."""
    return framed(message.encode())


# The worker side is plain blocking I/O; the front end reads with asyncio streams.


def send(sock: socket.socket, message: Message) -> None:
    sock.sendall(frame(message))


def framed(payload: bytes) -> bytes:
    """A payload behind its length prefix."""
    return FRAME_HEADER.pack(len(payload)) + payload


def receive(sock: socket.socket) -> Message | None:
    """The next message, or None when the other side has closed the socket."""
    payload = receive_frame(sock)
    return None if payload is None else decode(payload)


def receive_frame(sock: socket.socket) -> bytes | None:
    """The next frame's payload, or None when the other side has closed the socket."""
    header = _read_exactly(sock, FRAME_HEADER.size)
    if header is None:
        return None
    return _read_exactly(sock, FRAME_HEADER.unpack(header)[0])


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            return None
        received += count
    return bytes(buffer)
