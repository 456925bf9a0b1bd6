"""Workers as threads of this process: the same worker loop, channel and pool
as in production, without spawning processes. For tests and benchmarks, where
a worker that loads in a second (or misbehaves on purpose) is what is wanted.

Loading a model imports torch, so a server that must stay torch-free never
uses this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable

from workers import process
from workers.process import Loaded, WorkerSpec

# transformers is not thread-safe while it loads a model: it swaps torch's weight
# initialisation and default device process-wide for the duration, so two workers
# loading at once in one process got uninitialised weights (scores of 1e-43 and
# -2e23; tests/test_batcher.py caught it). Thread workers load one at a time.
_LOADING = threading.Lock()


class ThreadLauncher:
    """Starts each worker as a thread that runs `workers.process.work` with `load`
    (by default the spec's checkpoint). A `load` that wraps the scorer gives a
    worker that is slow, fails, hangs or dies, for fault tests."""

    def __init__(self, load: Callable[[WorkerSpec], Loaded] | None = None) -> None:
        self._load = load

    def launch(self, spec: WorkerSpec) -> _ThreadHandle:
        ours, theirs = socket.socketpair()
        handle = _ThreadHandle(ours, theirs, spec, self._load)
        handle.thread.start()
        return handle


class _ThreadHandle:
    def __init__(self, sock: socket.socket, theirs: socket.socket, spec: WorkerSpec, load) -> None:
        self.sock = sock
        self.outcome: str | None = None
        self.thread = threading.Thread(
            target=self.run, args=(theirs, spec, load), name=f"worker-{spec.worker_id}", daemon=True
        )

    def run(self, theirs: socket.socket, spec: WorkerSpec, load: Callable[[WorkerSpec], Loaded] | None) -> None:
        def one_at_a_time(spec: WorkerSpec) -> Loaded:
            with _LOADING:
                return (load or process.load_checkpoint)(spec)

        try:
            self.outcome = f"stopped: {process.work(theirs, spec, one_at_a_time)}"
        except BaseException as exc:  # the thread's "process" died: say how, as an exit code would
            self.outcome = f"died: {type(exc).__name__}: {exc}"
        finally:
            theirs.close()

    def kill(self) -> None:
        """A thread cannot be killed: cut its channel. The front end sees the end
        at once; the thread ends when it next touches the channel."""
        with contextlib.suppress(OSError):  # already closed
            self.sock.shutdown(socket.SHUT_RDWR)

    async def ended(self, timeout: float) -> str | None:
        await asyncio.to_thread(self.thread.join, timeout)
        if self.thread.is_alive():
            return None
        return self.outcome
