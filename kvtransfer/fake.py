"""In-process pieces for tests: a control channel over a HandleRegistry, and a transport that
copies between two KvPools of one process, records pulls and fails on demand."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kvtransfer.handles import HandleRegistry
from kvtransfer.pool import KvPool
from kvtransfer.transport import HandleRef, OneSidedTransport, check_ids, runs


class RegistryControl:
    """Claim and release straight on the prefill side's registry (same process)."""

    def __init__(self, registry: HandleRegistry) -> None:
        self.registry = registry

    async def claim(self, handle: HandleRef) -> None:
        self.registry.claim(handle.handle_id, handle.token)

    async def release(self, handle: HandleRef) -> bool:
        return self.registry.release(handle.handle_id, handle.token)


class NoControl:
    """Every claim succeeds and every release releases (pulls of refs nobody published)."""

    async def claim(self, handle: HandleRef) -> None:
        return None

    async def release(self, handle: HandleRef) -> bool:
        return True


class FakeTransport(OneSidedTransport):
    """`pull` claims through `control`, then copies `src_pool` blocks into `dst_pool` (one slice
    copy per run). `fail_with`: raise this instead of copying. `gate`: wait for it before
    copying (to test aborts and in-flight states without sleeping)."""

    backend = "fake"

    def __init__(
        self,
        src_pool: KvPool,
        dst_pool: KvPool,
        control: RegistryControl | NoControl | None = None,
        fail_with: BaseException | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        super().__init__(dst_pool, control or NoControl())
        self.src_pool = src_pool
        self.fail_with = fail_with
        self.gate = gate
        self.calls: list[tuple[str, list[int], list[int]]] = []

    async def _pull(
        self, handle: HandleRef, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> None:
        self.calls.append((handle.handle_id, list(src_block_ids), list(dst_block_ids)))
        check_ids(src_block_ids, self.src_pool.num_blocks, "source")
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        await self.claim_once(handle)
        bb = self.dst_pool.block_bytes
        src, dst = self.src_pool.buffer, self.dst_pool.buffer
        for s, d, n in runs(src_block_ids, dst_block_ids):
            dst[d * bb : (d + n) * bb] = src[s * bb : (s + n) * bb]
