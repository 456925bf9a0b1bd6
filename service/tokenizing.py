"""Tokenizing, in processes beside the front end.

Tokenizing one pair of about 300 tokens with the Qwen3 tokenizer costs about
0.5 ms of CPU, more than everything else the front end does for that pair
(docs/architecture.md#the-front-ends-cpu). In the front end's own process
that would cap it near 2,000 pairs per second whatever the host's cores, and
compete with the event loop for the GIL. So the `Ranker` hands each chunk of
a call's texts to one of `tokenizer_processes` spawned processes
(workers.tokenizer), each with its own PromptEncoder, and gets back the
windows as token ids. The sockets are read by the event loop itself: no
helper threads, no pickles (a ProcessPoolExecutor's threads cost the front
end about a fifth of its CPU; see the same page).

A chunk goes to the process with the fewest chunks waiting. A process that
dies (killed, out of memory) is started again at once, and the chunks it held
are tried once more on another; a chunk that outlives two processes fails its
call with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import multiprocessing
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from service.errors import Internal, Unavailable
from service.metrics import Metrics
from workers import protocol, tokenizer
from workers.prompt import Chunking, Window

log = structlog.get_logger("tokenizers")

# How long a chunk waits for a tokenizer process when none is running (all restarting).
_WAIT_FOR_A_PROCESS_S = 10.0
_READY_TIMEOUT_S = 120.0
# A process that keeps dying young is started again after 0.5, 1, 2, ... at most 30 s
# (the count resets once one has lived a minute), not in a tight loop.
_FIRST_DELAY_S, _MAX_DELAY_S, _LIVED_S = 0.5, 30.0, 60.0


class TokenizerStartError(RuntimeError):
    """The tokenizer processes could not start."""


class _Died(Exception):
    """The process holding a chunk died before answering it."""


@dataclass(eq=False)
class _Process:
    number: int
    process: multiprocessing.process.BaseProcess | None = None
    writer: asyncio.StreamWriter | None = None
    ready: bool = False
    waiting: dict[int, asyncio.Future[tokenizer.Answer]] = field(default_factory=dict)
    task: asyncio.Task | None = None


class TokenizerPool:
    """`processes` tokenizer processes, each with the checkpoint's tokenizer and `max_length`."""

    def __init__(self, tokenizer_file: str, max_length: int, processes: int, metrics: Metrics) -> None:
        self._arguments = (tokenizer_file, max_length, os.getpid())
        self._metrics = metrics
        self._context = multiprocessing.get_context("spawn")  # never forked: gRPC's threads
        self._processes = [_Process(number) for number in range(processes)]
        self._ids = itertools.count(1)
        self._changed: asyncio.Event | None = None
        self._stopping = False
        metrics.tokenizer_chunks_waiting.set_function(lambda: sum(len(p.waiting) for p in self._processes))

    @property
    def pids(self) -> list[int]:
        return [p.process.pid for p in self._processes if p.process is not None and p.process.pid is not None]

    async def start(self) -> None:
        """Start every process and wait until each has loaded the tokenizer. Raises TokenizerStartError."""
        self._changed = asyncio.Event()
        first = [asyncio.get_running_loop().create_future() for _ in self._processes]
        for process, started in zip(self._processes, first, strict=True):
            process.task = asyncio.create_task(self._supervise(process, started), name=f"tokenizer-{process.number}")
        outcomes = await asyncio.gather(*first, return_exceptions=True)
        failed = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
        if failed is not None:
            raise failed

    async def _supervise(self, process: _Process, started: asyncio.Future[None]) -> None:
        """Run the process; start it again whenever it dies, until the pool stops."""
        loop = asyncio.get_running_loop()
        delay = 0.0
        while not self._stopping:
            born = loop.time()
            why = await self._run_once(process, started)
            if self._stopping:
                return
            if not started.done():
                started.set_exception(TokenizerStartError(f"tokenizer process {process.number} {why}"))
                return
            delay = 0.0 if loop.time() - born >= _LIVED_S else min(_MAX_DELAY_S, max(_FIRST_DELAY_S, 2 * delay))
            log.error("tokenizer_process_died", number=process.number, reason=why, restart_in_seconds=delay)
            self._metrics.tokenizer_restarts.inc()
            await asyncio.sleep(delay)

    async def _run_once(self, process: _Process, started: asyncio.Future[None]) -> str:
        ours, theirs = socket.socketpair()
        child = self._context.Process(
            target=tokenizer.serve, args=(theirs, *self._arguments), name=f"tokenizer-{process.number}", daemon=True
        )
        child.start()
        theirs.close()
        process.process = child
        reader, process.writer = await asyncio.open_unix_connection(sock=ours)
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                ready = await _read_frame(reader)
            if ready[0] != tokenizer.READY:
                failed = tokenizer.decode_answer(ready)
                return failed.message if isinstance(failed, tokenizer.Failed) else "answered before it was ready"
            process.ready = True
            self._wake()
            if not started.done():
                started.set_result(None)
            while True:
                answer = tokenizer.decode_answer(await _read_frame(reader))
                waiter = process.waiting.pop(answer.request_id, None)
                if waiter is not None and not waiter.done():  # else its call gave up
                    waiter.set_result(answer)
        except TimeoutError:
            return f"did not load the tokenizer within {_READY_TIMEOUT_S:.0f} s"
        except (asyncio.IncompleteReadError, ConnectionError):
            await asyncio.to_thread(child.join, 5)
            return f"ended (exit code {child.exitcode})"
        finally:
            process.ready = False
            process.writer.close()
            child.kill()  # a no-op if it has ended
            for waiter in process.waiting.values():
                if not waiter.done():
                    waiter.set_exception(_Died())
            process.waiting.clear()

    async def encode_windows(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str,
        truncate: bool,
        max_document_tokens: int | None,
        chunking: Chunking | None,
    ) -> list[list[Window]]:
        """PromptEncoder.encode_windows in a tokenizer process, raising what it
        raises, and workers.tokenizer.NotText for a text UTF-8 cannot hold."""
        request = tokenizer.Tokenize(0, pairs, instruction, truncate, max_document_tokens, chunking)
        for attempt in (1, 2):
            try:
                answer = await self._ask(request)
            except _Died:
                if attempt == 2:
                    raise Unavailable("two tokenizer processes died while tokenizing this request") from None
                continue
            if isinstance(answer, tokenizer.Refused):
                raise answer.error
            if isinstance(answer, tokenizer.Failed):
                log.error("tokenizing_failed", error=answer.message)
                raise Internal("tokenizing failed; the server log has the details")
            return answer.windows
        raise AssertionError("unreachable")

    async def _ask(self, request: tokenizer.Tokenize) -> tokenizer.Answer:
        number = next(self._ids)
        frame = protocol.framed(dataclasses.replace(request, request_id=number).encode())  # raises NotText
        process = await self._least_busy()
        assert process.writer is not None, "a ready process has a channel"
        waiter: asyncio.Future[tokenizer.Answer] = asyncio.get_running_loop().create_future()
        process.waiting[number] = waiter
        try:
            process.writer.write(frame)
            await process.writer.drain()
            answer = await waiter
            self._metrics.tokenizer_chunks.inc()
            return answer
        except ConnectionError:
            raise _Died() from None
        finally:
            process.waiting.pop(number, None)

    async def _least_busy(self) -> _Process:
        """The ready process with the fewest chunks waiting; waits a while if none is ready."""
        assert self._changed is not None, "start() ran first"
        try:
            async with asyncio.timeout(_WAIT_FOR_A_PROCESS_S):
                while True:
                    ready = [process for process in self._processes if process.ready]
                    if ready:
                        return min(ready, key=lambda process: len(process.waiting))
                    if self._stopping:
                        raise Unavailable("the server is shutting down; retry on another replica")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise Unavailable(
                f"no tokenizer process has been running for {_WAIT_FOR_A_PROCESS_S:.0f} s; retry shortly"
            ) from None

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the processes and wait until they have ended (killed after `timeout`);
        chunks still waiting end UNAVAILABLE (as their calls already have)."""
        self._stopping = True
        self._wake()
        for process in self._processes:
            if process.writer is not None:
                process.writer.close()  # the process sees the end of its socket and exits
        await asyncio.gather(*(_reap(process, timeout) for process in self._processes))
        tasks = [process.task for process in self._processes if process.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _reap(process: _Process, timeout: float) -> None:
    child = process.process
    if child is None:
        return
    await asyncio.to_thread(child.join, timeout)
    if child.exitcode is None:
        child.kill()
        await asyncio.to_thread(child.join)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(protocol.FRAME_HEADER.size)
    return await reader.readexactly(protocol.FRAME_HEADER.unpack(header)[0])
