"""Same-host KV pull: map the prefill worker's shared-memory pool and memcpy each run of blocks.

Pull lifecycle: check layout -> map the source pool (cached per shm name, re-mapped when the
name now names a new segment) -> claim the handle once through the control channel (the
prefill worker's transfer listener) -> one copy per contiguous run; big pulls copy in a worker
thread (numpy drops the GIL while copying) so the event loop keeps serving tokens -> release.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from kvtransfer.errors import TransferError
from kvtransfer.host import host_id
from kvtransfer.pool import KvPool, Pool, _posixshmem
from kvtransfer.transport import Control, HandleRef, OneSidedTransport, check_ids, runs
from kvtransfer.transport import run_to_end as _run_to_end


class ShmTransport(OneSidedTransport):
    """Pulls from a same-host pool in shared memory (`HandleRef.shm_name`)."""

    backend = "shm"

    def __init__(
        self,
        dst_pool: KvPool,
        control: Control,
        compat_hash: str | None = None,
        thread_min_bytes: int = 32 << 20,
    ) -> None:
        super().__init__(dst_pool, control, compat_hash)
        # NOTE: a pull this big copies in a worker thread, so the event loop stalls for at most
        # ~3 ms (32 MiB at ~10 GB/s); smaller pulls copy inline, as the thread hop costs ~0.2 ms
        # and the copy ran ~20% slower off the loop's thread in bench.kvtransfer.
        self.thread_min_bytes = thread_min_bytes
        self._sources: dict[str, tuple[KvPool, int]] = {}  # shm name -> (mapping, inode)

    @classmethod
    def unavailable(cls, pool: Pool) -> str | None:
        return None if isinstance(pool, KvPool) else f"shm needs a pool in host memory, not on {pool.device}"

    def offer(self) -> dict[str, object]:
        name = getattr(self.dst_pool, "name", None)
        return {"shm_name": name} if name else {}

    def reach(self, handle: HandleRef) -> str | None:
        if not handle.shm_name:
            return "the prefill pool is not in shared memory"
        if handle.host_id != host_id():
            return f"the prefill worker is on another host ({handle.host_id})"
        return None

    async def _pull(
        self, handle: HandleRef, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> None:
        check_ids(src_block_ids, handle.num_blocks, "source")
        src_pool = self._source(handle)
        await self.claim_once(handle)
        plan = runs(src_block_ids, dst_block_ids)
        if len(src_block_ids) * self.dst_pool.block_bytes < self.thread_min_bytes:
            _copy_runs(src_pool, self.dst_pool, plan, None)
        else:
            await _run_to_end(lambda abort: _copy_runs(src_pool, self.dst_pool, plan, abort))

    def _source(self, handle: HandleRef) -> KvPool:
        name = handle.shm_name
        if not name:
            raise TransferError(f"handle {handle.handle_id!r} names no shared-memory pool")
        inode = _inode(name)
        cached = self._sources.get(name)
        if cached is not None and cached[1] == inode and cached[0].num_blocks >= handle.num_blocks:
            return cached[0]
        if cached is not None:  # NOTE: the name was unlinked or re-created: drop the old mapping
            cached[0].close()
            del self._sources[name]
        if inode is None:
            raise TransferError(f"shared-memory pool {name!r} is gone (prefill worker stopped?)")
        try:
            pool = KvPool.attach(name, handle.layout, handle.num_blocks)
        except (OSError, ValueError) as exc:
            raise TransferError(f"cannot map shared-memory pool {name!r}: {exc}") from exc
        self._sources[name] = (pool, inode)
        return pool

    async def close(self) -> None:
        for pool, _ in self._sources.values():
            pool.close()
        self._sources.clear()


def _inode(name: str) -> int | None:
    """The segment's inode now (None: no such name); a restarted owner means a new inode."""
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        return None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _copy_runs(
    src: KvPool, dst: KvPool, plan: list[tuple[int, int, int]], abort: threading.Event | None
) -> None:
    """One numpy slice copy (a memcpy, GIL released) per run; an abort stops between runs.

    NOTE: never split a run: glibc switches to non-temporal stores only above a size tied to
    the L3 size (here ~200 MB), and a 3 GB run copied in 64 MB pieces ran at half the speed.
    """
    src_arr, dst_arr = src.array, dst.array
    for s, d, n in plan:
        if abort is not None and abort.is_set():
            return
        dst_arr[d : d + n] = src_arr[s : s + n]
