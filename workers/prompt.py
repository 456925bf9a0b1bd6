"""The model card's prompt, and how (instruction, query, document) becomes token ids.

This is the exact recipe of the Qwen3-Reranker model card: the system prefix,
the suffix and the body are tokenized separately and concatenated, and a body
that does not fit is cut at its end (the card's `truncation='longest_first'` on
a single sequence). Tokenizing the body as one string matters: the space after
`<Document>:` merges with the document's first word, so the head and the
document cannot be tokenized apart.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

SYSTEM_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# The card's max_length: prefix + body + suffix, in tokens.
DEFAULT_MAX_LENGTH = 8192


def format_body(instruction: str, query: str, document: str) -> str:
    """The card's `format_instruction`."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


class PromptTooLong(ValueError):
    """The query and instruction leave no room for any document token
    (`position` None), or the pair at `position` does not fit and truncation
    was refused. `needed` is the pair's (or the head's) length in tokens."""

    def __init__(self, message: str, needed: int, position: int | None = None, document_tokens: int = 0) -> None:
        super().__init__(message)
        self.needed = needed
        self.position = position
        self.document_tokens = document_tokens

    def __reduce__(self):  # it crosses from a tokenizer process to the front end
        return type(self), (str(self), self.needed, self.position, self.document_tokens)


class TooManyWindows(ValueError):
    """The document at `position` needs more than `limit` windows."""

    def __init__(self, position: int, limit: int) -> None:
        super().__init__(f"document {position} needs more than {limit} windows")
        self.position = position
        self.limit = limit

    def __reduce__(self):
        return type(self), (self.position, self.limit)


class WindowTooSmall(ValueError):
    """One character of the document at `position` takes more tokens than a window holds."""

    def __init__(self, position: int, width: int) -> None:
        super().__init__(f"a character of document {position} takes more than the {width} tokens a window holds")
        self.position = position
        self.width = width

    def __reduce__(self):
        return type(self), (self.position, self.width)


@dataclass(frozen=True)
class EncodedPair:
    """One pair as the model reads it: prefix + body + suffix token ids."""

    ids: array  # array('i')
    truncated: bool
    # Leading tokens that every pair with this instruction and query starts with
    # (system prefix + body up to "<Document>:"), computed once for all of them.
    shared: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Window:
    """A document, or a part of it, as one pair: the characters `document[start:end]`
    (Python string positions, that is Unicode code points) are what the model read,
    in full. A document that fits is one window [0, len(document)); one cut at its
    end is [0, the first character not read); a chunked one is several."""

    pair: EncodedPair
    start: int
    end: int


@dataclass(frozen=True)
class Chunking:
    """How a document too long for one pair is split (TRUNCATION_CHUNK)."""

    overlap: int  # tokens a window shares with the one before it, at most a quarter of a window
    max_windows: int  # per document; more is TooManyWindows


class PromptEncoder:
    """Turns triples into token ids with the checkpoint's own tokenizer.

    Each tokenizer process (workers.tokenizer) holds one; it only reads the
    tokenizer, so it is also safe to share between threads.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.prefix_ids = tokenizer.encode(SYSTEM_PREFIX, add_special_tokens=False).ids
        self.suffix_ids = tokenizer.encode(SUFFIX, add_special_tokens=False).ids
        self.max_length = max_length
        # Tokens left for the body once the fixed prompt is in.
        self.body_budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_budget < 1:
            raise ValueError(
                f"max_length {max_length} leaves no room: the prompt alone takes "
                f"{len(self.prefix_ids) + len(self.suffix_ids)} tokens"
            )

    @property
    def fixed_tokens(self) -> int:
        """Tokens of the prompt that every pair carries."""
        return len(self.prefix_ids) + len(self.suffix_ids)

    def encode(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str = "",
        truncate: bool = True,
        max_document_tokens: int | None = None,
    ) -> list[EncodedPair]:
        """Encode (query, document) pairs that share one instruction.

        A document is cut at its end where the pair would exceed `max_length`,
        or where the document alone would exceed `max_document_tokens` (Cohere's
        max_tokens_per_doc). Raises PromptTooLong when a query and the
        instruction alone fill the budget, or, with `truncate=False`, when a
        document would have to be cut.
        """
        return [windows[0].pair for windows in self.encode_windows(pairs, instruction, truncate, max_document_tokens)]

    def encode_windows(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str = "",
        truncate: bool = True,
        max_document_tokens: int | None = None,
        chunking: Chunking | None = None,
    ) -> list[list[Window]]:
        """Each pair's windows: one, encoded as `encode` does, with the span of the
        document the model reads; or, with `chunking`, several for a document
        that does not fit, instead of cutting it (see `_split`). Raises as
        `encode` does, and TooManyWindows or WindowTooSmall when chunking fails."""
        instruction = instruction or DEFAULT_INSTRUCTION
        heads = self._heads(instruction, {query for query, _ in pairs})
        encoded = self._encode(pairs, instruction, heads, truncate or chunking is not None, max_document_tokens)
        return [
            self._split(position, query, document, instruction, heads[query], max_document_tokens, chunking)
            if chunking is not None and window.pair.truncated
            else [window]
            for position, ((query, document), (window, _)) in enumerate(zip(pairs, encoded, strict=True))
        ]

    def _encode(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str,
        heads: dict[str, list[int]],
        truncate: bool,
        max_document_tokens: int | None,
    ) -> list[tuple[Window, int]]:
        """Each pair as one window, with how many tokens its document takes in the
        prompt before any cut."""
        bodies = self._tokenizer.encode_batch(
            [format_body(instruction, query, document) for query, document in pairs],
            add_special_tokens=False,
        )
        encoded = []
        for position, ((query, document), body) in enumerate(zip(pairs, bodies, strict=True)):
            ids = body.ids
            head = heads[query]
            limit = self.body_budget
            if max_document_tokens is not None:
                limit = min(limit, len(head) + max_document_tokens)
            truncated = len(ids) > limit
            if truncated and not truncate:
                needed = len(ids) + self.fixed_tokens
                raise PromptTooLong(
                    f"document {position} needs {needed} tokens, more than max_length {self.max_length}, "
                    "and truncation was refused",
                    needed,
                    position,
                    len(ids) - len(head),
                )
            full = array("i", self.prefix_ids)
            full.extend(ids[:limit] if truncated else ids)
            full.extend(self.suffix_ids)
            # The head was always a prefix of the body in every case tried
            # (docs/scoring.md#fact-check-the-shared-prefix-per-pair); a pair for
            # which it is not is scored whole, never wrongly.
            shared = len(self.prefix_ids) + len(head) if ids[: len(head)] == head else 0
            end = len(document)
            if truncated:
                # Offsets are characters of the body; the first token not read starts
                # the first character not read in full.
                end = max(0, body.offsets[limit][0] - len(format_body(instruction, query, "")))
            encoded.append((Window(EncodedPair(full, truncated, shared), 0, end), len(ids) - len(head)))
        return encoded

    def _split(
        self,
        position: int,
        query: str,
        document: str,
        instruction: str,
        head: list[int],
        max_document_tokens: int | None,
        chunking: Chunking,
    ) -> list[Window]:
        """A document too long for one pair, as overlapping windows.

        Windows are planned on the document's own tokens, `width` document tokens
        each (what the pair has room for), each sharing `overlap` tokens with the
        one before. They are cut only where a token starts on a character
        boundary: a character of several tokens (an emoji, a CJK character) is
        never split. Each window is encoded exactly like a document whose text
        is the window's characters, and shrunk if that text takes more tokens in
        the prompt than planned. A window after the first that starts at a word
        drops the word's leading space: the prompt's own space after
        "<Document>:" stands for it, so the word keeps its token. The last window
        ends at the document's end and is as long as the others.
        """
        width = self.body_budget - len(head)
        if max_document_tokens is not None:
            width = min(width, max_document_tokens)
        overlap = min(chunking.overlap, width // 4)
        offsets = self._tokenizer.encode(document, add_special_tokens=False).offsets
        count = len(offsets)
        cuts = [0, *(i for i in range(1, count) if offsets[i][0] >= offsets[i - 1][1]), count]

        def at_most(token: int) -> int:  # the last cut at or before `token` (0 before the start)
            return cuts[max(0, bisect.bisect_right(cuts, token) - 1)]

        def first_from(token: int) -> int:  # the first cut at or after `token`
            return cuts[bisect.bisect_left(cuts, token)]

        def char(token: int) -> int:
            return offsets[token][0] if token < count else len(document)

        windows: list[Window] = []
        start = 0
        while True:
            begin = char(start)
            if start and document[begin] == " " and document[begin + 1 : begin + 2].strip():
                begin += 1
            end = at_most(start + width)
            while True:
                if end <= start:
                    raise WindowTooSmall(position, width)
                ((window, tokens),) = self._encode(
                    [(query, document[begin : char(end)])], instruction, {query: head}, True, width
                )
                if not window.pair.truncated:
                    break
                end = at_most(end - (tokens - width))
            windows.append(Window(window.pair, begin, char(end)))
            if len(windows) > chunking.max_windows:
                raise TooManyWindows(position, chunking.max_windows)
            if end == count:
                return windows
            previous, start = start, at_most(end - overlap)
            if start <= previous:
                start = first_from(previous + 1)
            if start + width >= count:  # the last window: as long as the others
                start = first_from(max(count - width, previous + 1))

    def _heads(self, instruction: str, queries: set[str]) -> dict[str, list[int]]:
        """Each query's body tokens up to "<Document>:", which tokenize the same with
        any document after them (the space that follows merges into the
        document's first token, so it is left out)."""
        heads = {}
        for query in queries:
            head = self._tokenizer.encode(format_body(instruction, query, "")[:-1], add_special_tokens=False).ids
            if len(head) >= self.body_budget:
                needed = len(head) + self.fixed_tokens
                raise PromptTooLong(
                    f"the query and instruction take {needed} tokens with the "
                    f"prompt, leaving no room for a document within max_length {self.max_length}",
                    needed,
                )
            heads[query] = head
        return heads


def answer_token_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """The ids of "yes" and "no" in this checkpoint's vocabulary."""
    yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
    if yes is None or no is None:
        raise ValueError('the tokenizer has no single token "yes" or "no": not a Qwen3-Reranker checkpoint')
    return yes, no
