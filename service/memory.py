"""Giving memory back to the operating system after large messages.

Parsing a large request (a 16 MB message of 8 million empty documents takes
about 250 MB as protobuf objects) grows the C heap; freeing it leaves the
pages with the allocator, so the process stayed large after the request was
refused. glibc's malloc_trim returns them: measured on this project's
machine, the front end went from 157 MB to 406 MB after such a request and
stayed there without it, and came back to 109 MB with it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time

# Calls that received at least this much make the next pass trim the heap.
LARGE_MESSAGE_BYTES = 1 << 20


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


class MemoryReleaser:
    """Trims the heap once calls that carried large messages are over.

    The trim waits until `settle_s` have passed since the last such call
    ended: not when a message arrives, since a trim during the parse of a large
    message (seconds of work on a busy machine) finds nothing to give back and
    the memory freed after it stayed with the process; and not at the very
    moment the handler returns, while gRPC still holds the message to send the
    status. While large calls keep coming their memory is reused, not trimmed.
    """

    def __init__(self, settle_s: float = 1.0) -> None:
        self._settle_s = settle_s
        self._due: float | None = None
        self._trim = _malloc_trim()

    def call_ended(self, received_bytes: int) -> None:
        """A call that received `received_bytes` is over (event loop thread)."""
        if received_bytes >= LARGE_MESSAGE_BYTES:
            self._due = time.monotonic() + self._settle_s

    async def run(self) -> None:
        if self._trim is None:
            return
        while True:
            await asyncio.sleep(self._settle_s / 2)
            if self._due is not None and time.monotonic() >= self._due:
                self._due = None
                await asyncio.to_thread(self._trim, 0)
