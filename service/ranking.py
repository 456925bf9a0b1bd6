"""The core: what a call does, whatever transport carried it.

One path for every call: check it against the limits (counts before
contents, so that an oversized request is refused before its parts become
Python objects) -> keep each distinct (query, document) pair once ->
tokenize in chunks off the event loop (a huge request never holds the
tokenizer threads for long, and stops when its caller is gone) -> one Job in
the batcher -> answers built from the job's logits. Errors are
service.errors exceptions; each transport maps them to its statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import structlog

from service.batcher import Batcher
from service.calls import Answer, CallOptions, ModelInfo, RerankCall, ScoreCall, Scored, Timing, Truncation, Usage
from service.errors import DeadlineExceeded, InvalidArgument, Unavailable
from service.tracing import Tracing
from service.work import BATCH, INTERACTIVE, Job
from workers.prompt import EncodedPair, PromptEncoder, PromptTooLong

# Identifiers reach log lines and error messages: keep them short.
MAX_ID_CHARS = 128
# A tokenizer task holds at most this much of one request, so that small calls
# behind a huge one wait for one chunk, not for the whole request.
_CHUNK_PAIRS = 64
_CHUNK_CHARS = 256 * 1024


@dataclass(frozen=True)
class CallLimits:
    max_documents_per_request: int
    max_query_chars: int
    max_document_chars: int


@dataclass
class _Work:
    """One call on its way: its distinct pairs, their tokens, its job."""

    arrived: float  # perf_counter
    count: int  # pairs in the call
    distinct_of: list[int] = field(default_factory=list)  # call index -> distinct pair index
    encoded: list[EncodedPair] = field(default_factory=list)  # per distinct pair
    tokenize_seconds: float = 0.0
    job: Job | None = None

    def result(self, index: int, document: str | None = None) -> Scored:
        distinct = self.distinct_of[index]
        pair = self.encoded[distinct]
        return Scored(index, self.job.logits[distinct], pair.truncated, pair.length, document)

    def usage(self) -> Usage:
        pairs = [self.encoded[distinct] for distinct in self.distinct_of]
        return Usage(self.count, sum(pair.length for pair in pairs), sum(pair.truncated for pair in pairs))

    def timing(self) -> Timing:
        job = self.job
        return Timing(
            tokenize=self.tokenize_seconds,
            queue=max(0.0, job.started_at - job.admitted_at),
            compute=job.compute_seconds,
            total=time.perf_counter() - self.arrived,
        )


class Ranker:
    """Scores calls through one batcher; shared by every transport."""

    def __init__(
        self,
        limits: CallLimits,
        encoder: PromptEncoder,
        batcher: Batcher,
        tokenizers: Executor,
        tracing: Tracing | None = None,
    ) -> None:
        self._limits = limits
        self._encoder = encoder
        self._batcher = batcher
        self._tokenizers = tokenizers
        self._tracing = tracing
        self.info: ModelInfo | None = None  # set once the workers are ready

    def model_info(self) -> ModelInfo:
        if self.info is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.info

    async def rerank(self, call: RerankCall, span: str = "Rerank") -> Answer:
        self._identify(call.options)
        async with self._running(call.options, self._rerank_pairs(call), span) as work:
            await work.job.finished()
        return self._ranking(call, work)

    async def rerank_stream(self, call: RerankCall, span: str = "RerankStream") -> AsyncIterator[list[Scored] | Answer]:
        """The documents each batch scored, as batches complete; then the ranking."""
        self._identify(call.options)
        async with self._running(call.options, self._rerank_pairs(call), span, stream=True) as work:
            calls_of: dict[int, list[int]] = {}
            for index, distinct in enumerate(work.distinct_of):
                calls_of.setdefault(distinct, []).append(index)
            async for distinct_indices in work.job.scored_batches():
                yield [work.result(index) for distinct in distinct_indices for index in calls_of[distinct]]
        yield self._ranking(call, work)

    async def score(self, call: ScoreCall, span: str = "Score") -> Answer:
        self._identify(call.options)
        count = len(call.pairs)
        self._check_count(count)
        pairs = list(call.pairs)
        for position, (query, _) in enumerate(pairs):
            if not query.strip():
                raise InvalidArgument(f"pairs[{position}].query is empty")
        async with self._running(call.options, pairs, span) as work:
            await work.job.finished()
        return Answer(call.options.request_id, [work.result(i) for i in range(count)], work.usage(), work.timing())

    # -- the one path ---------------------------------------------------------------------

    def _rerank_pairs(self, call: RerankCall) -> list[tuple[str, str]]:
        self._check_count(len(call.documents))
        if call.top_n < 0:
            raise InvalidArgument(f"top_n must be >= 0 (0 returns every document), got {call.top_n}")
        if not call.query.strip():
            raise InvalidArgument("query is empty")
        return [(call.query, document) for document in call.documents]

    @staticmethod
    def _identify(options: CallOptions) -> None:
        """The request id goes on every log line of the call, so it is checked first."""
        if len(options.request_id) > MAX_ID_CHARS:
            raise InvalidArgument(f"request_id has {len(options.request_id)} characters, more than {MAX_ID_CHARS}")
        structlog.contextvars.bind_contextvars(request_id=options.request_id)

    def _check_count(self, count: int) -> None:
        """Before anything else is read: a count over the limit costs nothing more."""
        limit = self._limits.max_documents_per_request
        if not count:
            raise InvalidArgument("no documents: give at least one")
        if count > limit:
            raise InvalidArgument(f"{count} documents is more than max_documents_per_request={limit}")

    def _check(self, options: CallOptions, pairs: list[tuple[str, str]]) -> None:
        limits = self._limits
        if options.priority not in (INTERACTIVE, BATCH):
            raise InvalidArgument(f"unknown priority {options.priority}")
        if options.timeout is not None and not (options.timeout > 0 and math.isfinite(options.timeout)):
            raise InvalidArgument(f"timeout must be a positive number of seconds, got {options.timeout}")
        if options.max_tokens_per_doc is not None and options.max_tokens_per_doc < 1:
            raise InvalidArgument(f"max_tokens_per_doc must be at least 1, got {options.max_tokens_per_doc}")
        if len(options.instruction) > limits.max_query_chars:
            raise InvalidArgument(
                f"instruction has {len(options.instruction)} characters, more than max_query_chars={limits.max_query_chars}"
            )
        for position, (query, document) in enumerate(pairs):
            if len(query) > limits.max_query_chars:
                raise InvalidArgument(
                    f"query has {len(query)} characters, more than max_query_chars={limits.max_query_chars}"
                )
            if len(document) > limits.max_document_chars:
                raise InvalidArgument(
                    f"document {position} has {len(document)} characters, "
                    f"more than max_document_chars={limits.max_document_chars}"
                )

    @contextlib.asynccontextmanager
    async def _running(
        self, options: CallOptions, pairs: list[tuple[str, str]], span: str, stream: bool = False
    ) -> AsyncIterator[_Work]:
        """Check, tokenize and admit a call's pairs; inside the block its job is in
        the batcher, and leaving the block (however) drops what is still queued."""
        work = _Work(time.perf_counter(), len(pairs))
        self._check(options, pairs)
        structlog.contextvars.bind_contextvars(documents=len(pairs))
        loop = asyncio.get_running_loop()
        deadline = None if options.timeout is None else loop.time() + options.timeout
        error: BaseException | None = None
        try:
            distinct = _distinct(pairs, work.distinct_of)
            work.encoded = await self._encode(distinct, work.distinct_of, options, deadline)
            work.tokenize_seconds = time.perf_counter() - work.arrived
            priority = BATCH if options.priority == BATCH else INTERACTIVE
            job = Job(work.encoded, priority=priority, deadline=deadline, stream=stream)
            async with self._batcher.running(job):
                work.job = job
                yield work
            structlog.contextvars.bind_contextvars(
                distinct=len(distinct),
                tokens=job.tokens,
                truncated=sum(pair.truncated for pair in work.encoded),
                queue_ms=round(1000 * (job.started_at - job.admitted_at), 2),
                compute_ms=round(1000 * job.compute_seconds, 2),
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            if self._tracing is not None:
                self._tracing.record(span, options.request_id, work.arrived, work.tokenize_seconds, work.job, error)
            if error is not None:
                # Break the cycles (this frame -> error -> its traceback -> this frame, and
                # the job's future -> error) that would keep the call's pairs in memory
                # until the cycle collector runs.
                error, work.job = None, None

    async def _encode(
        self, pairs: list[tuple[str, str]], distinct_of: list[int], options: CallOptions, deadline: float | None
    ) -> list[EncodedPair]:
        """Tokenize in chunks, one at a time in the tokenizer pool; stop when the
        caller is gone (cancelled) or the deadline has passed."""
        loop = asyncio.get_running_loop()
        truncate = options.truncation is Truncation.END
        encoded: list[EncodedPair] = []
        for start, chunk in _chunks(pairs):
            if deadline is not None and loop.time() >= deadline:
                raise DeadlineExceeded("the deadline passed while the request was being tokenized")
            try:
                encoded += await loop.run_in_executor(
                    self._tokenizers,
                    self._encoder.encode,
                    chunk,
                    options.instruction,
                    truncate,
                    options.max_tokens_per_doc,
                )
            except PromptTooLong as exc:
                if exc.position is None:
                    raise InvalidArgument(str(exc)) from None
                index = distinct_of.index(start + exc.position)  # the call's first document with that text
                cap = options.max_tokens_per_doc
                if cap is not None and exc.document_tokens > cap:
                    limit = f"{exc.document_tokens} document tokens, more than max_tokens_per_doc={cap}"
                else:
                    limit = f"{exc.needed} tokens, more than max_length {self._encoder.max_length}"
                raise InvalidArgument(f"document {index} needs {limit}, and truncation was refused") from None
        return encoded

    def _ranking(self, call: RerankCall, work: _Work) -> Answer:
        logits = [work.job.logits[distinct] for distinct in work.distinct_of]
        order = sorted(range(len(logits)), key=lambda i: -logits[i])  # stable: ties keep request order
        if call.top_n:
            order = order[: call.top_n]
        documents = call.documents if call.return_documents else None
        results = [work.result(i, documents[i] if documents is not None else None) for i in order]
        return Answer(call.options.request_id, results, work.usage(), work.timing())


def _distinct(pairs: list[tuple[str, str]], distinct_of: list[int]) -> list[tuple[str, str]]:
    """The distinct pairs, in first-seen order; fills `distinct_of` (call index ->
    distinct index). Identical pairs are scored once, so their scores are equal
    by construction, whatever batches they would have landed in."""
    seen: dict[tuple[str, str], int] = {}
    distinct = []
    for pair in pairs:
        number = seen.setdefault(pair, len(distinct))
        if number == len(distinct):
            distinct.append(pair)
        distinct_of.append(number)
    return distinct


def _chunks(pairs: Sequence[tuple[str, str]]) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """(start, pairs) pieces of at most _CHUNK_PAIRS pairs and about _CHUNK_CHARS characters."""
    start = 0
    while start < len(pairs):
        end, size = start, 0
        while end < len(pairs) and end - start < _CHUNK_PAIRS and (end == start or size < _CHUNK_CHARS):
            size += len(pairs[end][0]) + len(pairs[end][1])
            end += 1
        yield start, list(pairs[start:end])
        start = end
