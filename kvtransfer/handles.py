"""Prefill-side bookkeeping of pinned KV blocks handed to decode workers.

Handle lifecycle: publish (blocks pinned, one-time token minted) -> claim (the token is spent;
the claimer may now read the blocks; the TTL restarts so the pull has a full TTL) -> release
or expiry -> `on_unpin(handle)`, exactly once, which is how the engine gets its blocks back.

Thread-safe: the gRPC service, the transfer server and the expiry sweep may share one registry.
Callbacks run outside the lock, in the thread that released or expired the handle.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import msgspec

from kvtransfer.errors import TransferRefused

log = logging.getLogger(__name__)


class Handle(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the decode side needs to pull a request's prompt KV (the token is a bearer secret)."""

    handle_id: str
    token: bytes  # 128-bit random, raw (a bearer secret: never logged)
    block_ids: list[int]
    num_tokens: int
    expires_at: float  # registry clock (unix seconds by default)
    ttl_s: float


class _Entry:
    __slots__ = ("claimed", "handle")

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.claimed = False


class HandleRegistry:
    """Pinned handles by id (the request id), with one-time tokens and a TTL."""

    def __init__(
        self,
        on_unpin: Callable[[Handle], None] | None = None,
        clock: Callable[[], float] = time.time,
        remember: int = 4096,
    ) -> None:
        self._on_unpin = on_unpin
        self._clock = clock
        self._remember = remember
        self._live: dict[str, _Entry] = {}
        self._num_pinned_blocks = 0
        self.num_expired = 0  # handles unpinned by their TTL rather than a release (a counter)
        # NOTE: recently ended handles, so a late claim says why ("expired") instead of "unknown"
        self._ended: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def num_pinned(self) -> int:
        return len(self._live)

    @property
    def num_pinned_blocks(self) -> int:
        return self._num_pinned_blocks

    def get(self, handle_id: str) -> Handle | None:
        entry = self._live.get(handle_id)
        return entry.handle if entry is not None else None

    def publish(
        self, request_id: str, block_ids: Sequence[int], num_tokens: int, ttl_s: float = 30.0
    ) -> Handle:
        """Pin `block_ids` under the handle id `request_id` until release or `ttl_s` from now."""
        handle = Handle(
            handle_id=request_id,
            token=secrets.token_bytes(16),
            block_ids=list(block_ids),
            num_tokens=num_tokens,
            expires_at=self._clock() + ttl_s,
            ttl_s=ttl_s,
        )
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"handle {request_id!r} is already published")
            self._ended.pop(request_id, None)
            self._live[request_id] = _Entry(handle)
            self._num_pinned_blocks += len(handle.block_ids)
        return handle

    def claim(self, handle_id: str, token: bytes) -> Handle:
        """Spend the one-time token; raise `TransferRefused` saying why when it is not good."""
        expired = None
        with self._lock:
            entry = self._live.get(handle_id)
            if entry is None:
                reason = self._why_ended(handle_id, token)
            elif not hmac.compare_digest(entry.handle.token, token):
                reason = f"wrong token for handle {handle_id!r}"
            elif entry.claimed:
                reason = f"token for handle {handle_id!r} already used (reused)"
            elif self._clock() >= entry.handle.expires_at:
                expired = self._end(handle_id, "expired")
                reason = f"handle {handle_id!r} expired"
            else:
                entry.claimed = True
                entry.handle = msgspec.structs.replace(
                    entry.handle, expires_at=self._clock() + entry.handle.ttl_s
                )
                return entry.handle
        if expired is not None:
            self._unpin(expired)
        raise TransferRefused(reason)

    def is_live(self, handle: Handle) -> bool:
        """Is this claimed handle still pinned (not released, expired or republished)?"""
        entry = self._live.get(handle.handle_id)
        return entry is not None and entry.claimed and entry.handle.token == handle.token

    def release(self, handle_id: str, token: bytes | None = None) -> bool:
        """Unpin now; True if this call unpinned it. Idempotent; a wrong `token` releases nothing."""
        with self._lock:
            entry = self._live.get(handle_id)
            if entry is None or (token is not None and not hmac.compare_digest(entry.handle.token, token)):
                return False
            handle = self._end(handle_id, "released")
        self._unpin(handle)
        return True

    def expire(self, now: float | None = None) -> list[Handle]:
        """Unpin every handle past its expiry; returns them."""
        now = self._clock() if now is None else now
        with self._lock:
            due = [hid for hid, e in self._live.items() if now >= e.handle.expires_at]
            ended = [self._end(hid, "expired") for hid in due]
        for handle in ended:
            self._unpin(handle)
        return ended

    async def expire_forever(self, interval_s: float = 1.0) -> None:
        """Sweep expired handles every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.expire()

    def close(self) -> None:
        """Unpin everything (shutdown)."""
        for handle_id in list(self._live):
            self.release(handle_id)

    def _end(self, handle_id: str, why: str) -> Handle:
        entry = self._live.pop(handle_id)
        self._num_pinned_blocks -= len(entry.handle.block_ids)
        self.num_expired += why == "expired"
        why = "reused" if why == "released" and entry.claimed else why
        self._ended[handle_id] = (entry.handle.token, why)
        if len(self._ended) > self._remember:
            self._ended.popitem(last=False)
        return entry.handle

    def _why_ended(self, handle_id: str, token: bytes) -> str:
        ended = self._ended.get(handle_id)
        if ended is None:
            return f"unknown handle {handle_id!r}"
        if not hmac.compare_digest(ended[0], token):
            return f"wrong token for handle {handle_id!r}"
        if ended[1] == "reused":
            return f"token for handle {handle_id!r} already used (reused)"
        return f"handle {handle_id!r} {ended[1]}"

    def _unpin(self, handle: Handle) -> None:
        if self._on_unpin is None:
            return
        try:
            self._on_unpin(handle)
        except Exception:  # NOTE: one failing callback must not stop a sweep or a release
            log.exception("on_unpin failed for handle %r", handle.handle_id)
