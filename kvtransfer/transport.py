"""The one interface every KV transfer backend implements (NIXL-shaped: a pull by handle).

Pull lifecycle on the decode side: check layout/compat -> claim the handle (backend-specific)
-> copy each contiguous run of blocks straight into the local pool -> return. `pull` is a
coroutine; cancelling it aborts the pull, and once it returns or raises nothing writes into the
destination blocks any more, so the engine may reuse them.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import msgspec

from kvtransfer.errors import LayoutMismatch, TransferError, TransferRefused
from kvtransfer.layout import KvLayout
from kvtransfer.pool import KvPool

__all__ = [
    "HandleRef",
    "LayoutMismatch",
    "TransferError",
    "TransferRefused",
    "TransferStats",
    "Transport",
    "check_compat",
    "check_ids",
    "runs",
]


class HandleRef(msgspec.Struct, frozen=True, kw_only=True):
    """What the decode side gets from the router to pull blocks from a prefill worker."""

    handle_id: str
    token: str  # hex of the one-time 128-bit token
    endpoint: str  # tcp: "host:port" of the transfer server
    backend: str  # "shm" | "tcp"
    layout: KvLayout
    compat_hash: str = ""
    shm_name: str = ""  # shm: the prefill pool's shared-memory name
    num_blocks: int = 0  # blocks in the prefill pool (bounds the source ids)


class TransferStats(msgspec.Struct, kw_only=True):
    """Totals a transport keeps for metrics (polled, never reset)."""

    num_pulls: int = 0
    num_failures: int = 0
    num_aborts: int = 0  # cancelled pulls
    num_blocks: int = 0
    num_bytes: int = 0
    seconds: float = 0.0

    def record(self, started: float, num_blocks: int, num_bytes: int) -> None:
        self.num_pulls += 1
        self.num_blocks += num_blocks
        self.num_bytes += num_bytes
        self.seconds += time.perf_counter() - started


class Transport(ABC):
    """Pulls KV blocks from a remote pool into `dst_pool`; backends implement `_pull`."""

    backend: str = ""

    def __init__(self, dst_pool: KvPool, compat_hash: str | None = None) -> None:
        self.dst_pool = dst_pool
        self.compat_hash = compat_hash  # this side's hash; None: compare layouts only
        self.stats = TransferStats()

    async def pull(
        self, handle: HandleRef, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> None:
        """Copy remote blocks `src_block_ids[i]` into local blocks `dst_block_ids[i]`.

        Raises a TransferError (TransferRefused, LayoutMismatch, ...) on any failure.
        """
        started = time.perf_counter()
        try:
            check_compat(handle, self.dst_pool, self.compat_hash)
            if len(src_block_ids) != len(dst_block_ids):
                raise TransferError(
                    f"{len(src_block_ids)} source ids but {len(dst_block_ids)} destination ids"
                )
            check_ids(dst_block_ids, self.dst_pool.num_blocks, "destination")
            if src_block_ids:
                await self._pull(handle, src_block_ids, dst_block_ids)
        except asyncio.CancelledError:
            self.stats.num_aborts += 1
            raise
        except Exception:
            self.stats.num_failures += 1
            raise
        n = len(src_block_ids)
        self.stats.record(started, n, n * self.dst_pool.block_bytes)

    @abstractmethod
    async def _pull(
        self, handle: HandleRef, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> None:
        """Backend part of `pull`: ids are checked against the local pool and equally long."""

    async def close(self) -> None:  # noqa: B027 - a backend with nothing to close needs no override
        """Drop connections/mappings; pulls in flight fail."""


def runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """`(src_start, dst_start, n)` for each stretch where both ids go up by one: one copy each.

    `runs(ids, ids)` merges one side only (what a sender or a receiver alone needs).
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source ids but {len(dst_ids)} destination ids")
    out: list[tuple[int, int, int]] = []
    if not src_ids:
        return out
    s0, d0, n = src_ids[0], dst_ids[0], 0
    for s, d in zip(src_ids, dst_ids):
        if s == s0 + n and d == d0 + n:
            n += 1
        else:
            out.append((s0, d0, n))
            s0, d0, n = s, d, 1
    out.append((s0, d0, n))
    return out


def check_ids(ids: Sequence[int], num_blocks: int, side: str) -> None:
    """Raise TransferError unless every id is a block of a pool of `num_blocks`."""
    if ids and (min(ids) < 0 or max(ids) >= num_blocks):
        raise TransferError(f"{side} block ids out of range [0, {num_blocks}): {min(ids)}..{max(ids)}")


def check_compat(handle: HandleRef, dst_pool: KvPool, compat_hash: str | None) -> None:
    """LayoutMismatch naming both sides unless the remote pool holds the same KV shape."""
    if handle.layout != dst_pool.layout:
        raise LayoutMismatch(dst_pool.layout.describe(), handle.layout.describe())
    if compat_hash and handle.compat_hash and handle.compat_hash != compat_hash:
        raise LayoutMismatch(
            f"{dst_pool.layout.describe()} compat={compat_hash}",
            f"{handle.layout.describe()} compat={handle.compat_hash}",
        )
