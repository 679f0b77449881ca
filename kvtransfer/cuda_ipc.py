"""Same-node KV pull between CUDA pools: the decode worker opens the prefill worker's pool
allocation through a CUDA IPC handle once, then copies only the missing blocks device to
device (the copy engine; NVLink or PCIe peer access between two GPUs, or within one GPU).

Lifecycle: the prefill worker exports its pool tensor's allocation once (torch's
`_share_cuda_()`: IPC handle, offsets, ref counter, event) and every handle carries it
(`CudaIpcSource`) -> the decode worker maps it once per handle bytes (`_new_shared_cuda`), on
its own index of the same GPU (matched by UUID) -> per pull: claim on the control channel ->
one copy per contiguous run on a side stream -> wait for its event without holding the event
loop -> release.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvtransfer.errors import TransferError
from kvtransfer.host import host_id
from kvtransfer.pool import KvPool, Pool
from kvtransfer.transport import Control, CudaIpcSource, HandleRef, OneSidedTransport, check_ids, runs

if TYPE_CHECKING:
    import torch

# NOTE: torch is imported inside the functions: the registry loads this module in every worker,
# and mock workers start without torch.


def device_uuids() -> dict[str, int]:
    """This process's CUDA devices by UUID (indexes differ between processes)."""
    import torch

    return {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}


class CudaIpcTransport(OneSidedTransport):
    backend = "cuda_ipc"

    @classmethod
    def unavailable(cls, pool: Pool) -> str | None:
        if isinstance(pool, KvPool) or not pool.device.startswith("cuda"):
            return f"cuda_ipc needs a pool on a CUDA device; this one is on {pool.device}"
        return None

    def __init__(self, dst_pool, control: Control, compat_hash: str | None = None) -> None:
        import torch

        super().__init__(dst_pool, control, compat_hash)
        self.stream = torch.cuda.Stream(dst_pool.tensor.device)
        self._uuids = device_uuids()
        self._sources: dict[bytes, torch.Tensor] = {}  # IPC handle -> the peer pool's blocks
        self._export = self._share(dst_pool.tensor)

    @staticmethod
    def _share(tensor: torch.Tensor) -> CudaIpcSource:
        import torch

        if tensor.storage_offset() != 0:
            raise TransferError("cuda_ipc exports a pool tensor that starts its storage")
        (dev, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = (
            tensor.untyped_storage()._share_cuda_()
        )
        return CudaIpcSource(
            device_uuid=str(torch.cuda.get_device_properties(dev).uuid), device_index=dev,
            handle=handle, storage_bytes=size, storage_offset=offset,
            ref_counter_handle=rc_handle, ref_counter_offset=rc_offset,
            event_handle=ev_handle or b"", event_sync_required=bool(ev_sync),
        )  # fmt: skip

    def offer(self) -> dict[str, object]:
        return {"cuda_ipc": self._export}

    def reach(self, handle: HandleRef) -> str | None:
        src = handle.cuda_ipc
        if src is None:
            return "the prefill pool is not on a CUDA device"
        if handle.host_id != host_id():
            return f"the prefill worker is on another node ({handle.host_id})"
        if src.device_uuid not in self._uuids:
            return f"its GPU {src.device_uuid} is not visible to this worker"
        return None

    async def _pull(
        self, handle: HandleRef, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> None:
        import torch

        check_ids(src_block_ids, handle.num_blocks, "source")
        src = self._open(handle)
        await self.claim_once(handle)
        dst = self.dst_pool.blocks
        with torch.cuda.stream(self.stream):
            for s, d, n in runs(src_block_ids, dst_block_ids):
                dst[d : d + n].copy_(src[s : s + n], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        try:
            delay = 0.0
            while not done.query():
                await asyncio.sleep(delay)
                delay = min(0.001, delay * 2 or 0.00005)
        except BaseException:
            done.synchronize()  # NOTE: nothing may write our blocks once the pull has ended
            raise

    def _open(self, handle: HandleRef) -> torch.Tensor:
        import torch

        src = handle.cuda_ipc
        assert src is not None
        blocks = self._sources.get(src.handle)
        if blocks is not None:
            return blocks
        device = self._uuids.get(src.device_uuid)
        if device is None:
            raise TransferError(f"GPU {src.device_uuid} of the prefill pool is not visible here")
        try:
            storage = torch.UntypedStorage._new_shared_cuda(
                device, src.handle, src.storage_bytes, src.storage_offset,
                src.ref_counter_handle, src.ref_counter_offset,
                src.event_handle or None, src.event_sync_required,
            )  # fmt: skip
        except Exception as exc:
            raise TransferError(f"cannot open the prefill pool through CUDA IPC: {exc}") from exc
        bb = self.dst_pool.block_bytes
        flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}").set_(storage)
        blocks = flat[: handle.num_blocks * bb].view(handle.num_blocks, bb)
        self._sources[src.handle] = blocks
        return blocks

    async def close(self) -> None:
        import torch

        with contextlib.suppress(Exception):
            self._sources.clear()
            torch.cuda.synchronize()
