"""The one interface every KV transfer backend implements (NIXL-shaped: a pull by handle).

Pull lifecycle on the decode side: check layout/compat -> claim the handle (tcp: the first read
does it; one-sided backends: a claim call on the control channel) -> copy each contiguous run of
blocks straight into the local pool -> release the handle (its release must succeed, or the
handle ended during the pull and the bytes may be stale). `pull` is a coroutine; cancelling it
aborts the pull, and once it returns or raises nothing writes into the destination blocks any
more, so the engine may reuse them.

Backends are registered by name in `kvtransfer.registry`; each says which pools it can run on
(`unavailable`), what it adds to the handles its worker publishes (`offer`), and whether it can
reach a given handle from here (`reach`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import msgspec

from kvtransfer.errors import LayoutMismatch, TransferError, TransferRefused
from kvtransfer.layout import KvLayout
from kvtransfer.pool import Pool, runs

if TYPE_CHECKING:
    from kvtransfer.registry import Setup

__all__ = [
    "Control",
    "CudaIpcSource",
    "HandleRef",
    "LayoutMismatch",
    "NixlSource",
    "OneSidedTransport",
    "TransferError",
    "TransferRefused",
    "TransferStats",
    "Transport",
    "check_compat",
    "check_ids",
    "run_to_end",
    "runs",
]

T = TypeVar("T")


class NixlSource(msgspec.Struct, frozen=True, kw_only=True):
    """The prefill pool as NIXL sees it; loaded into the puller's agent once per agent name."""

    agent: str  # the prefill worker's NIXL agent name (unique per process)
    metadata: bytes  # its agent metadata (connection info and registered memory), opaque
    base_addr: int  # address of block 0 of the registered pool
    mem_type: str  # "DRAM" | "VRAM"
    device_id: int = 0


class CudaIpcSource(msgspec.Struct, frozen=True, kw_only=True):
    """The prefill pool's CUDA allocation, as torch's `_share_cuda_()` describes it."""

    device_uuid: str  # the GPU holding it (device indexes differ between processes)
    device_index: int  # the exporter's index of that GPU
    handle: bytes  # cudaIpcMemHandle of the allocation
    storage_bytes: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class HandleRef(msgspec.Struct, frozen=True, kw_only=True):
    """What the decode side gets from the router to pull blocks from a prefill worker: one
    handle, and every way the prefill worker offers to read its pool."""

    handle_id: str
    token: bytes  # the one-time 128-bit token, raw
    endpoint: str  # "host:port" of the prefill worker's transfer listener (tcp data, control)
    layout: KvLayout
    compat_hash: str = ""
    num_blocks: int = 0  # blocks in the prefill pool (bounds the source ids)
    host_id: str = ""  # the prefill worker's host (kvtransfer.host.host_id)
    source_worker: str = ""  # for logs and spans
    shm_name: str = ""  # shm: the prefill pool's shared-memory name
    nixl: NixlSource | None = None
    cuda_ipc: CudaIpcSource | None = None


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


class Control(Protocol):
    """The prefill worker's handle bookkeeping, reached from the decode side (tcp's listener
    in the workers; a registry in-process in tests)."""

    async def claim(self, handle: HandleRef) -> None: ...

    async def release(self, handle: HandleRef) -> bool: ...


class Transport(ABC):
    """Pulls KV blocks from a remote pool into `dst_pool`; backends implement `_pull`."""

    backend: ClassVar[str] = ""

    def __init__(self, dst_pool: Pool, compat_hash: str | None = None) -> None:
        self.dst_pool = dst_pool
        self.compat_hash = compat_hash  # this side's hash; None: compare layouts only
        self.stats = TransferStats()

    @classmethod
    def unavailable(cls, pool: Pool) -> str | None:
        """Why this backend cannot run with `pool` in this process (None: it can)."""
        return None

    @classmethod
    def create(cls, setup: Setup, control: Control) -> Transport:
        """Build it in a worker (kvtransfer.registry.build)."""
        return cls(setup.pool, setup.compat_hash)  # type: ignore[call-arg]

    def offer(self) -> dict[str, object]:
        """HandleRef fields this backend adds to every handle its worker publishes."""
        return {}

    def reach(self, handle: HandleRef) -> str | None:
        """Why this backend cannot pull `handle` from here (None: it can)."""
        return None

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

    @abstractmethod
    async def claim(self, handle: HandleRef) -> None:
        """Spend the handle's one-time token; TransferRefused saying why when it is not good."""

    @abstractmethod
    async def release(self, handle: HandleRef) -> bool:
        """Unpin the handle at its prefill worker; True if this call released it."""

    async def close(self) -> None:  # noqa: B027 - a backend with nothing to close needs no override
        """Drop connections/mappings; pulls in flight fail."""


class OneSidedTransport(Transport):
    """A backend that reads the prefill pool without the prefill process (shm, nixl, cuda_ipc):
    claim and release go through `control`, and a handle is claimed once before its first read
    (the tokens of the last 4096 handles claimed are remembered, so a handle can be pulled in
    several calls)."""

    def __init__(self, dst_pool: Pool, control: Control, compat_hash: str | None = None) -> None:
        super().__init__(dst_pool, compat_hash)
        self.control = control
        self._claimed: OrderedDict[bytes, None] = OrderedDict()

    @classmethod
    def create(cls, setup: Setup, control: Control) -> Transport:
        return cls(setup.pool, control, setup.compat_hash)  # type: ignore[call-arg]

    async def claim(self, handle: HandleRef) -> None:
        try:
            await self.control.claim(handle)
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(f"claiming handle {handle.handle_id!r} failed: {exc}") from exc
        self._claimed[handle.token] = None  # NOTE: by token: a republished request id is a new handle
        if len(self._claimed) > 4096:
            self._claimed.popitem(last=False)

    async def claim_once(self, handle: HandleRef) -> None:
        if handle.token not in self._claimed:
            await self.claim(handle)

    async def release(self, handle: HandleRef) -> bool:
        self._claimed.pop(handle.token, None)  # NOTE: a later read must claim (and be refused)
        return await self.control.release(handle)


def check_ids(ids: Sequence[int], num_blocks: int, side: str) -> None:
    """Raise TransferError unless every id is a block of a pool of `num_blocks`."""
    if ids and (min(ids) < 0 or max(ids) >= num_blocks):
        raise TransferError(f"{side} block ids out of range [0, {num_blocks}): {min(ids)}..{max(ids)}")


def check_compat(handle: HandleRef, dst_pool: Pool, compat_hash: str | None) -> None:
    """LayoutMismatch naming both sides unless the remote pool holds the same KV shape."""
    if handle.layout != dst_pool.layout:
        raise LayoutMismatch(dst_pool.layout.describe(), handle.layout.describe())
    if compat_hash and handle.compat_hash and handle.compat_hash != compat_hash:
        raise LayoutMismatch(
            f"{dst_pool.layout.describe()} compat={compat_hash}",
            f"{handle.layout.describe()} compat={handle.compat_hash}",
        )


async def run_to_end(fn: Callable[[threading.Event], T], executor: Executor | None = None) -> T:
    """Run `fn(abort)` in a thread; on cancellation set `abort` and wait until `fn` has returned,
    so nothing writes into the destination blocks after the pull has ended."""
    abort = threading.Event()
    fut = asyncio.get_running_loop().run_in_executor(executor, fn, abort)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        abort.set()
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                continue
            except Exception:
                break
        raise
