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

# Messages at least this large make the next pass trim the heap.
LARGE_MESSAGE_BYTES = 1 << 20


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


class MemoryReleaser:
    """Trims the heap, at most once per `interval_s`, after large messages were seen."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval_s = interval_s
        self._pending = False
        self._trim = _malloc_trim()

    def saw(self, size: int) -> None:
        """A message of `size` bytes arrived (any thread)."""
        if size >= LARGE_MESSAGE_BYTES:
            self._pending = True

    async def run(self) -> None:
        if self._trim is None:
            return
        while True:
            await asyncio.sleep(self._interval_s)
            if self._pending:
                self._pending = False
                await asyncio.to_thread(self._trim, 0)
