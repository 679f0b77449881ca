"""OpenAI `stop` strings over a text stream: cut at the first match, never emit any of it.

A stop string can straddle deltas, so text that could be the start of one is held back until the
next delta proves otherwise (held text is at most the longest stop string minus one).
"""

from __future__ import annotations


class StopStringMatcher:
    __slots__ = ("_held", "_max_hold", "_stops")

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was hit; after a hit the stream is over)."""
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        hold = self._hold_length(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
