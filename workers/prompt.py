"""The model card's prompt, and how (instruction, query, document) becomes token ids.

This is the exact recipe of the Qwen3-Reranker model card: the system prefix,
the suffix and the body are tokenized separately and concatenated, and a body
that does not fit is cut at its end (the card's `truncation='longest_first'` on
a single sequence). Tokenizing the body as one string matters: the space after
`<Document>:` merges with the document's first word, so the head and the
document cannot be tokenized apart.
"""

from __future__ import annotations

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


class PromptEncoder:
    """Turns triples into token ids with the checkpoint's own tokenizer.

    Thread-safe: `encode` only reads the tokenizer, so the front end calls it
    from a thread pool.
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
        instruction = instruction or DEFAULT_INSTRUCTION
        heads = self._heads(instruction, {query for query, _ in pairs})
        bodies = self._tokenizer.encode_batch(
            [format_body(instruction, query, document) for query, document in pairs],
            add_special_tokens=False,
        )
        encoded = []
        for position, ((query, _), body) in enumerate(zip(pairs, bodies, strict=True)):
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
            # The head was always a prefix of the body in every case tried (docs/scoring.md#fact-check-the-shared-prefix-per-pair);
            # a pair for which it is not is scored whole, never wrongly.
            shared = len(self.prefix_ids) + len(head) if ids[: len(head)] == head else 0
            encoded.append(EncodedPair(full, truncated, shared))
        return encoded

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
