"""The bound on calls in progress, shared by every transport."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from prometheus_client import Gauge

from service.errors import ResourceExhausted


class CallLimit:
    """At most `limit` calls at once (health checks and metrics are not calls);
    one more is refused at once with ResourceExhausted naming the limit."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit = limit
        self.in_progress = 0
        self._gauge = gauge
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        if self.in_progress >= self.limit:
            raise ResourceExhausted(
                f"{self.in_progress} calls are in progress, the most this server takes "
                f"(max_concurrent_rpcs={self.limit}); retry later"
            )
        self.in_progress += 1
        self._gauge.inc()
        self._idle.clear()
        try:
            yield
        finally:
            self.in_progress -= 1
            self._gauge.dec()
            if not self.in_progress:
                self._idle.set()

    async def idle(self) -> None:
        """Wait until no call is in progress."""
        await self._idle.wait()
