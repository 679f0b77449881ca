"""Token ids -> text deltas, one request at a time, in O(window) per step.

Decoding the whole output each step is quadratic, and decoding one token at a time breaks
multi-byte characters and tokenizers that merge spaces across tokens. We decode a short window
(the last emitted tokens plus the new ones) and emit only what the window adds, holding back
while the window ends in an incomplete UTF-8 sequence (U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence

from router.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    __slots__ = ("_prefix", "_read", "_tok", "_tokens")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0  # window start: context so the next decode merges spaces correctly
        self._read = 0  # tokens before this are already emitted as text

    def add(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        self._tokens.extend(ids)
        prefix_text = self._tok.decode(self._tokens[self._prefix : self._read])
        text = self._tok.decode(self._tokens[self._prefix :])
        if text.endswith(_REPLACEMENT) or len(text) <= len(prefix_text):
            return ""  # wait for the rest of a multi-byte character
        self._prefix, self._read = self._read, len(self._tokens)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character comes out as U+FFFD)."""
        if self._read == len(self._tokens):
            return ""
        prefix_text = self._tok.decode(self._tokens[self._prefix : self._read])
        text = self._tok.decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return text[len(prefix_text) :]
