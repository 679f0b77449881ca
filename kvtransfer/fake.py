"""In-process transport for tests: copies between two KvPools, records pulls, fails on demand."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kvtransfer.pool import KvPool
from kvtransfer.transport import HandleRef, Transport, check_ids, runs


class FakeTransport(Transport):
    """`pull` copies `src_pool` blocks into `dst_pool` (one slice copy per run).

    `fail_with`: raise this instead of copying. `gate`: wait for it before copying (to test
    aborts and in-flight states without sleeping).
    """

    backend = "fake"

    def __init__(
        self,
        src_pool: KvPool,
        dst_pool: KvPool,
        fail_with: BaseException | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        super().__init__(dst_pool)
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
        bb = self.dst_pool.block_bytes
        src, dst = self.src_pool.buffer, self.dst_pool.buffer
        for s, d, n in runs(src_block_ids, dst_block_ids):
            dst[d * bb : (d + n) * bb] = src[s * bb : (s + n) * bb]
