"""The tokenizer process, and the messages between it and the front end.

The front end hands chunks of a request's (query, document) texts to a few of
these processes (service.tokenizing) so that tokenizing, the largest CPU cost
of a request, runs beside the event loop instead of in it. Each process holds
its own PromptEncoder and answers every Tokenize frame, in order, with the
windows the encoder made (Tokenized), the reason it refused the pair
(Refused: a prompt too long, too many windows, ...), or Failed.

Frames are workers.protocol's: a length prefix, then a payload whose first
byte says what it holds. Texts travel as UTF-8 and token ids as int32 arrays;
no pickles.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from workers import protocol
from workers.process import die_with_parent
from workers.prompt import (
    Chunking,
    EncodedPair,
    PromptEncoder,
    PromptTooLong,
    TooManyWindows,
    Window,
    WindowTooSmall,
)

READY, TOKENIZE, TOKENIZED, REFUSED, FAILED = 11, 12, 13, 14, 15
# The encoder's refusals, which cross back as themselves.
_REFUSALS = {kind.__name__: kind for kind in (PromptTooLong, TooManyWindows, WindowTooSmall)}


class NotText(ValueError):
    """A text is not valid Unicode (it holds a lone surrogate, which JSON can carry
    and no tokenizer reads): the query or document of pair `position`, or the
    instruction (`position` None)."""

    def __init__(self, position: int | None, field: str) -> None:
        where = "the instruction" if position is None else f"the {field} of pair {position}"
        super().__init__(f"{where} is not valid Unicode text (it holds a lone surrogate)")
        self.position = position
        self.field = field


def _utf8(text: str, position: int | None, field: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise NotText(position, field) from None


def _text(data: memoryview) -> str:
    return str(data, "utf-8")


@dataclass(frozen=True)
class Tokenize:
    """A chunk of one call's pairs, with the call's options (PromptEncoder.encode_windows)."""

    request_id: int
    pairs: Sequence[tuple[str, str]]
    instruction: str
    truncate: bool
    max_document_tokens: int | None
    chunking: Chunking | None

    _HEAD = struct.Struct("<BQBiiiII")

    def encode(self) -> bytes:
        """Raises NotText for a text that UTF-8 cannot hold."""
        texts = [_utf8(self.instruction, None, "instruction")]
        lengths = array("I")
        for position, (query, document) in enumerate(self.pairs):
            texts.append(_utf8(query, position, "query"))
            lengths.append(len(texts[-1]))
            texts.append(_utf8(document, position, "document"))
            lengths.append(len(texts[-1]))
        flags = self.truncate | (self.max_document_tokens is not None) << 1 | (self.chunking is not None) << 2
        head = self._HEAD.pack(
            TOKENIZE,
            self.request_id,
            flags,
            self.max_document_tokens or 0,
            self.chunking.overlap if self.chunking else 0,
            self.chunking.max_windows if self.chunking else 0,
            len(self.pairs),
            len(texts[0]),
        )
        return b"".join((head, lengths.tobytes(), *texts))

    @classmethod
    def decode(cls, payload: bytes) -> Tokenize:
        _, request_id, flags, cap, overlap, max_windows, count, instruction_bytes = cls._HEAD.unpack_from(payload)
        lengths = array("I")
        start = cls._HEAD.size
        lengths.frombytes(payload[start : start + 8 * count])
        view = memoryview(payload)
        at = start + 8 * count
        instruction = _text(view[at : at + instruction_bytes])
        at += instruction_bytes
        texts = []
        for length in lengths:
            texts.append(_text(view[at : at + length]))
            at += length
        return cls(
            request_id,
            list(zip(texts[0::2], texts[1::2], strict=True)),
            instruction,
            bool(flags & 1),
            cap if flags & 2 else None,
            Chunking(overlap, max_windows) if flags & 4 else None,
        )


@dataclass(frozen=True)
class Tokenized:
    """Each pair's windows, in the pairs' order."""

    request_id: int
    windows: list[list[Window]]

    _HEAD = struct.Struct("<BQII")
    _FIELDS = 5  # per window: length, shared, truncated, start, end

    def encode(self) -> bytes:
        counts, fields, ids = array("i"), array("i"), array("i")
        for document in self.windows:
            counts.append(len(document))
            for window in document:
                pair = window.pair
                fields.extend((len(pair.ids), pair.shared, pair.truncated, window.start, window.end))
                ids.extend(pair.ids)
        head = self._HEAD.pack(TOKENIZED, self.request_id, len(counts), len(fields) // self._FIELDS)
        return b"".join((head, counts.tobytes(), fields.tobytes(), ids.tobytes()))

    @classmethod
    def decode(cls, payload: bytes) -> Tokenized:
        _, request_id, documents, windows = cls._HEAD.unpack_from(payload)
        counts, fields, ids = array("i"), array("i"), array("i")
        at = cls._HEAD.size
        counts.frombytes(payload[at : at + 4 * documents])
        at += 4 * documents
        fields.frombytes(payload[at : at + 4 * cls._FIELDS * windows])
        ids.frombytes(payload[at + 4 * cls._FIELDS * windows :])
        decoded: list[list[Window]] = []
        field, offset = 0, 0
        for count in counts:
            document = []
            for _ in range(count):
                length, shared, truncated, start, end = fields[field : field + cls._FIELDS]
                pair = EncodedPair(ids[offset : offset + length], bool(truncated), shared)
                document.append(Window(pair, start, end))
                field += cls._FIELDS
                offset += length
            decoded.append(document)
        return cls(request_id, decoded)


@dataclass(frozen=True)
class Refused:
    """The encoder refused a pair of the chunk (PromptTooLong, TooManyWindows, WindowTooSmall)."""

    request_id: int
    error: ValueError

    _HEAD = struct.Struct("<BQ")

    def encode(self) -> bytes:
        _, arguments = cast(tuple[type, tuple], self.error.__reduce__())
        return self._HEAD.pack(REFUSED, self.request_id) + json.dumps([type(self.error).__name__, arguments]).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Refused:
        _, request_id = cls._HEAD.unpack_from(payload)
        name, arguments = json.loads(payload[cls._HEAD.size :])
        return cls(request_id, _REFUSALS[name](*arguments))


@dataclass(frozen=True)
class Failed:
    """Tokenizing the chunk raised something unexpected (a bug): its description."""

    request_id: int
    message: str

    _HEAD = struct.Struct("<BQ")

    def encode(self) -> bytes:
        return self._HEAD.pack(FAILED, self.request_id) + self.message.encode("utf-8", "replace")

    @classmethod
    def decode(cls, payload: bytes) -> Failed:
        _, request_id = cls._HEAD.unpack_from(payload)
        return cls(request_id, payload[cls._HEAD.size :].decode("utf-8", "replace"))


Answer = Tokenized | Refused | Failed
_ANSWERS: dict[int, Callable[[bytes], Answer]] = {
    TOKENIZED: Tokenized.decode,
    REFUSED: Refused.decode,
    FAILED: Failed.decode,
}


def decode_answer(payload: bytes) -> Answer:
    return _ANSWERS[payload[0]](payload)


def answer(encoder: PromptEncoder, request: Tokenize) -> Answer:
    """What the process answers to `request`."""
    try:
        windows = encoder.encode_windows(
            request.pairs, request.instruction, request.truncate, request.max_document_tokens, request.chunking
        )
    except tuple(_REFUSALS.values()) as exc:
        return Refused(request.request_id, exc)
    except Exception as exc:  # a bug, or the tokenizer library's own error: say so, keep serving
        return Failed(request.request_id, f"{type(exc).__name__}: {exc}")
    return Tokenized(request.request_id, windows)


def serve(sock: socket.socket, tokenizer_file: str, max_length: int, parent_pid: int) -> None:
    """The process's entry point: load the tokenizer, say ready, answer until the front end closes the socket."""
    from tokenizers import Tokenizer

    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when it stops
    # One thread each: the processes are the parallelism, so that tokenizer_processes
    # is the cores they take (the library's own thread pool would take every core, in
    # every process, and still run a one-pair call on one).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(15, b"tokenizer")  # PR_SET_NAME: ps and /proc/<pid>/comm tell it from a worker
    try:
        encoder = PromptEncoder(Tokenizer.from_file(tokenizer_file), max_length)
    except Exception as exc:  # the front end must hear why, not see a silent exit
        sock.sendall(protocol.framed(Failed(0, f"could not load {tokenizer_file}: {exc}").encode()))
        return
    sock.sendall(protocol.framed(struct.pack("<BI", READY, os.getpid())))
    while (payload := protocol.receive_frame(sock)) is not None:
        sock.sendall(protocol.framed(answer(encoder, Tokenize.decode(payload)).encode()))
