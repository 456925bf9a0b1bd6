"""Bearer tokens, checked the same way on every transport."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


class BearerTokens:
    """The accepted tokens; `accepts` compares in constant time."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def accepts(self, authorization: str) -> bool:
        """Whether an `authorization` value (`Bearer <token>`) carries an accepted token."""
        scheme, _, token = authorization.partition(" ")
        candidate = token.strip().encode() if scheme.lower() == "bearer" else b""
        accepted = False
        for known in self._tokens:  # no early exit: the time taken does not depend on which matched
            accepted |= hmac.compare_digest(candidate, known)
        return accepted
