"""Routing policies: pick one worker among healthy candidates."""

from __future__ import annotations

import itertools
from typing import Protocol, TypeVar

T = TypeVar("T")


class Policy(Protocol):
    def pick(self, candidates: list[T]) -> T: ...


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: list[T]) -> T:
        return candidates[next(self._counter) % len(candidates)]
