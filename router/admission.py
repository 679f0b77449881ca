"""Admission control of the router's generation requests: in flight, queued, drained.

At most `max_in_flight` requests run at once (0: no limit); up to `max_queued` more wait in a
FIFO queue, each for at most `queue_timeout_s`. A full queue, or a wait that runs out, is a
429 with Retry-After: a client (or the mesh) retries elsewhere instead of piling up here, and
the router's memory stays bounded by `max_in_flight + max_queued` requests. A release hands its
slot straight to the oldest waiter, so the queue is fair and a slot is never lost.
"""

from __future__ import annotations

import asyncio
from collections import deque

from router.errors import ApiError

DRAINING_MESSAGE = "This server is draining (shutting down) and takes no new requests; retry on another one"
FULL_MESSAGE = (
    "This server has {n} requests in flight, its limit (--max-in-flight), and {q} queued, "
    "its queue's limit (--max-queued); retry shortly or on another one"
)
WAITED_MESSAGE = (
    "This server has {n} requests in flight, its limit (--max-in-flight); this one waited "
    "{t:g} s in the queue (--queue-timeout-s); retry shortly or on another one"
)


class Admission:
    def __init__(self, max_in_flight: int = 0, max_queued: int = 0, queue_timeout_s: float = 10.0) -> None:
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.draining = False
        self.num_active = 0  # admitted and not yet released (what a drain waits for)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle = asyncio.Event()

    @property
    def num_queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Admit one request (counted until `release`), after a wait in the queue if need be."""
        if self.draining:
            raise ApiError(503, DRAINING_MESSAGE, None, "draining")
        if not self.max_in_flight or (self.num_active < self.max_in_flight and not self._waiters):
            self.num_active += 1
            return
        if len(self._waiters) >= self.max_queued:
            n, q = self.num_active, len(self._waiters)
            raise ApiError(429, FULL_MESSAGE.format(n=n, q=q), None, "rate_limit_exceeded")
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await asyncio.shield(slot)  # NOTE: shielded: a timeout must not cancel a handed-over slot
        except (TimeoutError, asyncio.CancelledError) as exc:
            if slot.done() and slot.exception() is None:  # it came with the timeout or cancel: pass it on
                self.release()
            else:
                slot.cancel()
                self._waiters.remove(slot)
            if isinstance(exc, asyncio.CancelledError):
                raise
            n, t = self.num_active, self.queue_timeout_s
            raise ApiError(429, WAITED_MESSAGE.format(n=n, t=t), None, "rate_limit_exceeded") from None

    def release(self) -> None:
        """One admitted request ended: its slot goes to the oldest waiter, else it is freed."""
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # num_active unchanged: the slot changes hands
                return
        self.num_active -= 1
        if not self.num_active:
            self._idle.set()

    async def drain(self, seconds: float) -> bool:
        """Refuse new requests (queued ones too) and wait up to `seconds` for those in progress;
        True if all ended."""
        self.draining = True
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_exception(ApiError(503, DRAINING_MESSAGE, None, "draining"))
        try:
            async with asyncio.timeout(seconds):
                while self.num_active:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True
