"""The staged backend's data path on this CPU machine: two DevicePools over plain CPU tensors
(the same staging code a CUDA pool runs, minus pinned memory and streams), a TcpTransferServer
serving one, a StagedTransport pulling into the other, in chunks smaller than the pull."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.device_pool import DevicePool
from kvtransfer.handles import HandleRegistry
from kvtransfer.layout import KvLayout
from kvtransfer.pool import KvPool
from kvtransfer.registry import Setup, build
from kvtransfer.staged import StagedTransport
from kvtransfer.tcp import TcpTransferServer
from kvtransfer.transport import HandleRef

pytestmark = pytest.mark.integration

LAYOUT = KvLayout(dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)  # 512 B
NUM_BLOCKS = 40


def device_pool(seed: int | None) -> DevicePool:
    shape = (NUM_BLOCKS, LAYOUT.num_layers, 2, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    t = torch.zeros(shape, dtype=torch.bfloat16)
    if seed is not None:
        t.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return DevicePool(LAYOUT, t, stage_bytes=3 * LAYOUT.block_bytes)  # 3-block chunks


async def test_staged_pull_moves_exact_blocks_in_chunks() -> None:
    src, dst = device_pool(seed=1), device_pool(seed=None)
    registry = HandleRegistry()
    src_ids, dst_ids = [3, 4, 5, 6, 7, 20, 9, 30], [0, 1, 2, 10, 11, 12, 39, 5]
    handle = registry.publish("r1", src_ids, len(src_ids) * LAYOUT.block_size)
    async with TcpTransferServer(src, registry, "127.0.0.1") as server:
        staged = StagedTransport(dst, timeout_s=5)
        ref = HandleRef(handle_id="r1", token=handle.token, endpoint=server.endpoint, layout=LAYOUT,
                        num_blocks=NUM_BLOCKS)  # fmt: skip
        await staged.pull(ref, src_ids, dst_ids)
        assert await staged.release(ref) is True
        await staged.close()
    assert torch.equal(dst.blocks[dst_ids], src.blocks[src_ids])
    untouched = [i for i in range(NUM_BLOCKS) if i not in dst_ids]
    assert not dst.blocks[untouched].any()
    assert registry.num_pinned == 0 and staged.stats.num_blocks == len(src_ids)


async def test_registry_builds_staged_not_tcp_or_shm_for_a_device_pool() -> None:
    transports = build(Setup(device_pool(seed=None)))
    try:
        assert "staged" in transports.by_name and "tcp" not in transports.by_name
        assert "shm" in transports.missing and "tcp" in transports.missing
        assert "cuda_ipc" in transports.missing  # a CPU tensor is no CUDA pool
    finally:
        await transports.close()
    host = KvPool.create(LAYOUT, 4)
    try:
        assert "staged" in build(Setup(host), ("staged", "tcp")).missing
    finally:
        host.close()
