"""Passive health of one worker, from how its requests end: a circuit breaker.

closed --(`threshold` failures in a row, or one that says the worker is unreachable)--> open
for a cool-down --> half-open: one active probe (gRPC health Check) --> closed on SERVING, or
open again for twice as long (up to `max_cooldown_s`). A request that succeeds resets the count.
Half-open lets requests in again with the count one short of the threshold, so a worker that
still fails is ejected by its next failure, not after `threshold` more.
"""

from __future__ import annotations


class Breaker:
    __slots__ = ("cooldown_s", "failures", "max_cooldown_s", "min_cooldown_s", "open", "threshold", "trips")

    def __init__(self, threshold: int = 3, cooldown_s: float = 1.0, max_cooldown_s: float = 30.0) -> None:
        self.threshold = threshold
        self.min_cooldown_s = self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.failures = 0  # in a row
        self.trips = 0  # openings since the last success
        self.open = False

    def success(self) -> None:
        self.failures = self.trips = 0
        self.cooldown_s = self.min_cooldown_s

    def failure(self, unreachable: bool = False) -> bool:
        """Count one failed request; True when this one opens the breaker (eject the worker)."""
        self.failures += 1
        if self.open or (self.failures < self.threshold and not unreachable):
            return False
        self.open = True
        if self.trips:  # it failed again right after a half-open: wait longer this time
            self._back_off()
        self.trips += 1
        return True

    def probed(self, serving: bool) -> None:
        """The half-open probe's answer: close (half-open), or stay open twice as long."""
        if serving:
            self.open = False
            self.failures = self.threshold - 1
        else:
            self._back_off()

    def _back_off(self) -> None:
        self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
