"""The core: what a call does, whatever transport carried it.

One path for every call: check it against the limits (counts before
contents, so that an oversized request is refused before its parts become
Python objects) -> keep each distinct (query, document) pair once -> look
each up in the score cache (service.cache): a hit is answered at once, a pair
another call is computing is waited for -> tokenize the rest in chunks in the
tokenizer processes (a huge request never holds them for long, and stops when
its caller is gone), each document into one window, or several
when chunking -> one Job in the batcher -> each document's result as soon as
all its windows are scored (the best window's logit and span) -> answers.
Errors are service.errors exceptions; each transport maps them to its
statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace

import structlog

from service import cache
from service.batcher import Batcher
from service.cache import ScoreCache
from service.calls import (
    Answer,
    CallOptions,
    DocumentScore,
    ModelInfo,
    RerankCall,
    ScoreCall,
    Scored,
    Timing,
    Truncation,
    Usage,
)
from service.errors import DeadlineExceeded, InvalidArgument, Unavailable
from service.tokenizing import TokenizerPool
from service.tracing import Tracing
from service.work import BATCH, INTERACTIVE, Job
from workers.prompt import (
    DEFAULT_INSTRUCTION,
    Chunking,
    EncodedPair,
    PromptTooLong,
    TooManyWindows,
    Window,
    WindowTooSmall,
)
from workers.tokenizer import NotText

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
    max_windows_per_document: int
    max_windows_per_request: int


class _State(enum.Enum):
    UNCLAIMED = "unclaimed"  # to look up, compute or wait for
    COMPUTING = "computing"  # in one of this call's jobs
    WAITING = "waiting"  # another call is computing it
    DONE = "done"


@dataclass(eq=False)
class _Document:
    """One distinct pair of a call on its way to a result."""

    pair: tuple[str, str]
    key: bytes | None = None  # None: not cached, not shared
    state: _State = _State.UNCLAIMED
    score: DocumentScore | None = None
    cached: bool = False  # the score came from the cache or another call

    @property
    def scored(self) -> DocumentScore:
        assert self.score is not None, "a document of a finished call has its score"
        return self.score


@dataclass(eq=False)
class _Work:
    """One call on its way: its distinct documents, their jobs, what is ready."""

    arrived: float  # perf_counter
    count: int  # pairs in the call
    distinct_of: list[int] = field(default_factory=list)  # call index -> distinct pair index
    documents: list[_Document] = field(default_factory=list)  # per distinct pair
    unclaimed: list[int] = field(default_factory=list)  # distinct indices to claim
    pending: int = 0  # distinct pairs not yet scored
    ready: list[int] = field(default_factory=list)  # scored since the last look
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    jobs: list[Job] = field(default_factory=list)
    tokenize_seconds: float = 0.0

    def resolve(self, distinct: int, score: DocumentScore, cached: bool) -> None:
        document = self.documents[distinct]
        document.state, document.score, document.cached = _State.DONE, score, cached
        self.pending -= 1
        self.ready.append(distinct)
        self.changed.set()

    def landed(self, distinct: int, score: DocumentScore | None) -> None:
        """The call computing a pair this one waits for is done with it: the
        result, or None when it gave up (then claim it again)."""
        if self.documents[distinct].state is not _State.WAITING:
            return
        if score is None:
            self.documents[distinct].state = _State.UNCLAIMED
            self.unclaimed.append(distinct)
            self.changed.set()
        else:
            self.resolve(distinct, score, cached=True)

    def failure(self) -> BaseException | None:
        return next((error for job in self.jobs if (error := job.failure()) is not None), None)

    def result(self, index: int, document: str | None = None) -> Scored:
        score = self.documents[self.distinct_of[index]].scored
        return Scored(
            index, score.logit, score.truncated, score.tokens, document, score.start, score.end, score.windows
        )

    def usage(self) -> Usage:
        documents = [self.documents[distinct] for distinct in self.distinct_of]
        return Usage(
            self.count,
            sum(document.scored.tokens for document in documents),
            sum(document.scored.truncated for document in documents),
            sum(document.cached for document in documents),
        )

    def timing(self) -> Timing:
        return Timing(
            tokenize=self.tokenize_seconds,
            queue=max((max(0.0, job.started_at - job.admitted_at) for job in self.jobs), default=0.0),
            compute=sum(job.compute_seconds for job in self.jobs),
            total=time.perf_counter() - self.arrived,
        )


class _Scoring:
    """The documents of one job: which windows are whose, and each document's
    result once its last window is scored."""

    def __init__(
        self, work: _Work, distinct: list[int], windows: list[list[Window]], score_cache: ScoreCache | None
    ) -> None:
        self._work, self._distinct, self._windows, self._cache = work, distinct, windows, score_cache
        self._owner: list[int] = []  # job pair index -> position in `distinct`
        self._first: list[int] = []  # position -> its first pair's index
        for position, document_windows in enumerate(windows):
            self._first.append(len(self._owner))
            self._owner += [position] * len(document_windows)
        self._remaining = [len(document_windows) for document_windows in windows]
        self.job: Job | None = None

    def pairs(self) -> list[EncodedPair]:
        return [window.pair for document_windows in self._windows for window in document_windows]

    def scored(self, indices: list[int]) -> None:
        for index in indices:
            position = self._owner[index]
            self._remaining[position] -= 1
            if self._remaining[position]:
                continue
            first = self._first[position]
            assert self.job is not None, "scores arrive for an admitted job"
            score = _best(self._windows[position], self.job.logits[first : first + len(self._windows[position])])
            distinct = self._distinct[position]
            self._work.resolve(distinct, score, cached=False)
            key = self._work.documents[distinct].key
            if key is not None and self._cache is not None:
                self._cache.finish(key, score)


def _best(windows: list[Window], logits: list[float]) -> DocumentScore:
    """A document's result: its best window's logit and span (the first of equals)."""
    best = max(range(len(windows)), key=logits.__getitem__)
    window = windows[best]
    return DocumentScore(
        logit=logits[best],
        truncated=window.pair.truncated,
        tokens=sum(window.pair.length for window in windows),
        start=window.start,
        end=window.end,
        windows=len(windows),
    )


def check_request_id(request_id: str) -> None:
    """Request ids reach log lines and stream bookkeeping: bounded before either."""
    if len(request_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"request_id has {len(request_id)} characters, more than {MAX_ID_CHARS}")


class Ranker:
    """Scores calls through one batcher; shared by every transport."""

    def __init__(
        self,
        limits: CallLimits,
        max_length: int,
        batcher: Batcher,
        tokenizers: TokenizerPool,
        tracing: Tracing | None = None,
        score_cache: ScoreCache | None = None,
        chunk_overlap_tokens: int = 0,
    ) -> None:
        self._limits = limits
        self._max_length = max_length
        self._batcher = batcher
        self._tokenizers = tokenizers
        self._tracing = tracing
        self._cache = score_cache
        self._overlap = chunk_overlap_tokens
        self.info: ModelInfo | None = None  # set once the workers are ready

    def model_info(self) -> ModelInfo:
        if self.info is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.info

    async def rerank(self, call: RerankCall, span: str = "Rerank") -> Answer:
        self._identify(call.options)
        async with self._running(call.options, self._rerank_pairs(call), span) as (work, progress):
            async for _ in progress:
                pass
        return self._ranking(call, work)

    async def rerank_stream(
        self, call: RerankCall, span: str = "RerankStream"
    ) -> AsyncGenerator[list[Scored] | Answer, None]:
        """Documents as they are scored (a chunked one once all its windows are); then the ranking."""
        self._identify(call.options)
        async with self._running(call.options, self._rerank_pairs(call), span) as (work, progress):
            calls_of: dict[int, list[int]] = {}
            for index, distinct in enumerate(work.distinct_of):
                calls_of.setdefault(distinct, []).append(index)
            async for distinct_indices in progress:
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
        async with self._running(call.options, pairs, span) as (work, progress):
            async for _ in progress:
                pass
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
        check_request_id(options.request_id)
        structlog.contextvars.bind_contextvars(request_id=options.request_id)

    def _check_count(self, count: int) -> None:
        """Before anything else is read: a count over the limit costs nothing more."""
        limit = self._limits.max_documents_per_request
        if not count:
            raise InvalidArgument("no documents: give at least one")
        if count > limit:
            raise InvalidArgument(f"{count} documents is more than max_documents_per_request={limit}")

    def _check(self, options: CallOptions, pairs: list[tuple[str, str]]) -> CallOptions:
        """Refuse what breaks a rule or a limit; return the options as the call runs them."""
        limits = self._limits
        if options.priority not in (INTERACTIVE, BATCH):
            raise InvalidArgument(f"unknown priority {options.priority}")
        if options.timeout is not None and not (options.timeout > 0 and math.isfinite(options.timeout)):
            raise InvalidArgument(f"timeout must be a positive number of seconds, got {options.timeout}")
        if options.max_tokens_per_doc is not None and options.max_tokens_per_doc < 1:
            raise InvalidArgument(f"max_tokens_per_doc must be at least 1, got {options.max_tokens_per_doc}")
        if len(options.instruction) > limits.max_query_chars:
            raise InvalidArgument(
                f"instruction has {len(options.instruction)} characters, "
                f"more than max_query_chars={limits.max_query_chars}"
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
        if options.max_tokens_per_doc is not None and options.max_tokens_per_doc >= self._max_length:
            # max_length allows fewer document tokens than that anyway (Cohere's clients send 4,096)
            return replace(options, max_tokens_per_doc=None)
        return options

    @contextlib.asynccontextmanager
    async def _running(
        self, options: CallOptions, pairs: list[tuple[str, str]], span: str
    ) -> AsyncIterator[tuple[_Work, AsyncGenerator[list[int], None]]]:
        """Check a call; inside the block, iterate its progress (the distinct pairs
        scored, as they are). Leaving the block (however) drops this call's work
        still queued, and hands the pairs it had claimed but not scored to the
        calls waiting for them."""
        work = _Work(time.perf_counter(), len(pairs))
        options = self._check(options, pairs)
        self._batcher.check_open()
        structlog.contextvars.bind_contextvars(documents=len(pairs))
        loop = asyncio.get_running_loop()
        deadline = None if options.timeout is None else loop.time() + options.timeout
        error: BaseException | None = None
        try:
            work.documents = [_Document(pair) for pair in _distinct(pairs, work.distinct_of)]
            work.unclaimed = list(range(len(work.documents)))
            work.pending = len(work.documents)
            async with contextlib.AsyncExitStack() as jobs:
                progress = self._progress(work, options, deadline, jobs)
                async with contextlib.aclosing(progress):
                    yield work, progress
            documents = work.documents
            structlog.contextvars.bind_contextvars(
                distinct=len(documents),
                cached=sum(document.cached for document in documents),
                windows=sum(len(job.pairs) for job in work.jobs),
                tokens=sum(job.tokens for job in work.jobs),
                truncated=sum(document.scored.truncated for document in documents),
                queue_ms=round(1000 * work.timing().queue, 2),
                compute_ms=round(1000 * work.timing().compute, 2),
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            for document in work.documents:
                if document.state is _State.COMPUTING and document.key is not None and self._cache is not None:
                    self._cache.abandon(document.key)
            if self._tracing is not None:
                self._tracing.record(span, options.request_id, work.arrived, work.tokenize_seconds, work.jobs, error)
            if error is not None:
                # Break the cycles (this frame -> error -> its traceback -> this frame, and
                # a job's future -> error) that would keep the call's pairs in memory
                # until the cycle collector runs.
                error = None
                work.jobs.clear()

    async def _progress(
        self, work: _Work, options: CallOptions, deadline: float | None, jobs: contextlib.AsyncExitStack
    ) -> AsyncGenerator[list[int], None]:
        """The call's distinct pairs as they are scored: cached ones first, then as
        batches (of this call or of the calls it waits for) complete."""
        if self._cache is not None and self.info is not None:
            await self._keys(work, options, deadline, self.info)
        while True:
            if work.unclaimed:
                claimed = self._claim(work)
                if claimed:
                    await self._submit(work, claimed, options, deadline, jobs)
            if (error := work.failure()) is not None:
                raise error
            if work.ready:
                ready, work.ready = work.ready, []
                yield ready
            elif not work.pending:
                return
            elif not work.unclaimed:  # else a call it waited for gave up: claim again at once
                try:
                    async with asyncio.timeout_at(deadline):
                        await work.changed.wait()
                except TimeoutError:
                    raise DeadlineExceeded("the deadline passed before the request was answered") from None
                work.changed.clear()

    def _claim(self, work: _Work) -> list[int]:
        """Answer what the cache holds, wait for what others compute, and return
        the distinct pairs this call computes."""
        claimed = []
        for distinct in work.unclaimed:
            document = work.documents[distinct]
            found = (
                None
                if document.key is None or self._cache is None
                else self._cache.claim(document.key, functools.partial(work.landed, distinct))
            )
            if isinstance(found, DocumentScore):
                work.resolve(distinct, found, cached=True)
            elif found is not None:
                document.state = _State.WAITING
            else:
                document.state = _State.COMPUTING
                claimed.append(distinct)
        work.unclaimed = []
        return claimed

    async def _submit(
        self,
        work: _Work,
        claimed: list[int],
        options: CallOptions,
        deadline: float | None,
        jobs: contextlib.AsyncExitStack,
    ) -> None:
        """Tokenize the claimed pairs into windows and admit them as one job."""
        windows = await self._encode(work, claimed, options, deadline)
        scoring = _Scoring(work, claimed, windows, self._cache)
        priority = BATCH if options.priority == BATCH else INTERACTIVE
        job = Job(scoring.pairs(), priority=priority, deadline=deadline, on_scored=scoring.scored)
        scoring.job = job
        await jobs.enter_async_context(self._batcher.running(job))
        work.jobs.append(job)
        job.watch(work.changed.set)

    async def _keys(self, work: _Work, options: CallOptions, deadline: float | None, info: ModelInfo) -> None:
        """Each distinct pair's cache key, hashed on the event loop one chunk at a time."""
        chunked = options.truncation is Truncation.CHUNK
        shared = cache.scope(
            info.model_id,
            info.revision,
            info.precision,
            self._max_length,
            options.instruction or DEFAULT_INSTRUCTION,
            options.truncation.value,
            options.max_tokens_per_doc,
            self._overlap if chunked else None,
        )
        pairs = [document.pair for document in work.documents]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        for start, chunk in _chunks(pairs):
            if start:
                await asyncio.sleep(0)  # hashing a chunk takes well under a millisecond: let others run between
            _check_deadline(loop, deadline, "hashed")
            for document, key in zip(
                work.documents[start : start + len(chunk)], cache.keys(shared, chunk), strict=True
            ):
                document.key = key
        work.tokenize_seconds += time.perf_counter() - started

    async def _encode(
        self, work: _Work, claimed: list[int], options: CallOptions, deadline: float | None
    ) -> list[list[Window]]:
        """Tokenize in chunks, one at a time in the tokenizer processes; stop when
        the caller is gone (cancelled) or the deadline has passed."""
        loop = asyncio.get_running_loop()
        limits = self._limits
        chunking = (
            Chunking(self._overlap, limits.max_windows_per_document) if options.truncation is Truncation.CHUNK else None
        )
        cap = options.max_tokens_per_doc
        pairs = [work.documents[distinct].pair for distinct in claimed]
        windows: list[list[Window]] = []
        count = sum(len(job.pairs) for job in work.jobs)
        started = time.perf_counter()
        for start, chunk in _chunks(pairs):
            _check_deadline(loop, deadline, "tokenized")
            try:
                async with asyncio.timeout_at(deadline):
                    encoded = await self._tokenizers.encode_windows(
                        chunk, options.instruction, options.truncation is not Truncation.NONE, cap, chunking
                    )
            except TimeoutError:
                raise DeadlineExceeded("the deadline passed while the request was being tokenized") from None
            except PromptTooLong as exc:
                if exc.position is None:
                    raise InvalidArgument(str(exc)) from None
                index = self._index(work, claimed[start + exc.position])
                if cap is not None and exc.document_tokens > cap:
                    limit = f"{exc.document_tokens} document tokens, more than max_tokens_per_doc={cap}"
                else:
                    limit = f"{exc.needed} tokens, more than max_length {self._max_length}"
                raise InvalidArgument(f"document {index} needs {limit}, and truncation was refused") from None
            except NotText as exc:
                if exc.position is None:
                    raise InvalidArgument(str(exc)) from None
                index = self._index(work, claimed[start + exc.position])
                what = "query" if exc.field == "query" else f"document {index}"
                raise InvalidArgument(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None
            except TooManyWindows as exc:
                index = self._index(work, claimed[start + exc.position])
                raise InvalidArgument(
                    f"document {index} needs more than max_windows_per_document={exc.limit} windows"
                ) from None
            except WindowTooSmall as exc:
                index = self._index(work, claimed[start + exc.position])
                raise InvalidArgument(
                    f"document {index} has a character that takes more than the {exc.width} tokens of a window "
                    f"(max_tokens_per_doc={cap})"
                ) from None
            windows += encoded
            count += sum(len(document_windows) for document_windows in encoded)
            if chunking is not None and count > limits.max_windows_per_request:
                raise InvalidArgument(
                    f"the documents need more than max_windows_per_request={limits.max_windows_per_request} windows"
                )
        work.tokenize_seconds += time.perf_counter() - started
        return windows

    @staticmethod
    def _index(work: _Work, distinct: int) -> int:
        """The call's first document with that text."""
        return work.distinct_of.index(distinct)

    def _ranking(self, call: RerankCall, work: _Work) -> Answer:
        logits = [work.documents[distinct].scored.logit for distinct in work.distinct_of]
        order = sorted(range(len(logits)), key=lambda i: -logits[i])  # stable: ties keep request order
        if call.top_n:
            order = order[: call.top_n]
        documents = call.documents if call.return_documents else None
        results = [work.result(i, documents[i] if documents is not None else None) for i in order]
        return Answer(call.options.request_id, results, work.usage(), work.timing())


def _check_deadline(loop: asyncio.AbstractEventLoop, deadline: float | None, doing: str) -> None:
    if deadline is not None and loop.time() >= deadline:
        raise DeadlineExceeded(f"the deadline passed while the request was being {doing}")


def _distinct(pairs: list[tuple[str, str]], distinct_of: list[int]) -> list[tuple[str, str]]:
    """The distinct pairs, in first-seen order; fills `distinct_of` (call index ->
    distinct index). Identical pairs are scored once, so their scores are equal
    by construction, whatever batches they would have landed in."""
    seen: dict[tuple[str, str], int] = {}
    distinct: list[tuple[str, str]] = []
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
