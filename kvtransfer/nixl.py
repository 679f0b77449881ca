"""KV pull over NVIDIA NIXL (its UCX backend): host memory between processes on CPU machines,
VRAM and RDMA between GPU nodes, the same code for both.

Lifecycle: each worker creates one NIXL agent (name: worker, pid, random), registers its whole
pool once (DRAM for a host pool, VRAM for a CUDA pool) and prepares the list of its blocks ->
every handle it publishes carries {agent name, agent metadata, pool address, memory type}
(`NixlSource`, plain proto fields on the KvHandle, never pickled) -> a puller loads a peer's
metadata once per agent name and prepares the peer's block list once -> per pull: claim the
handle on the control channel -> one READ request for all (remote, local) block pairs -> wait
for DONE without holding the event loop -> release the handle.

Install: `pip install --no-deps nixl-cu12` (the `nixl` meta-package pulls CUDA torch).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from kvtransfer.errors import TransferError
from kvtransfer.pool import Pool
from kvtransfer.transport import Control, HandleRef, NixlSource, OneSidedTransport, check_ids

log = logging.getLogger(__name__)

MODULES = ("nixl_cu12", "nixl_cu13", "nixl")
MAX_PEERS = 64  # remote agents kept loaded (least recently used dropped)
_INIT = "NIXL_INIT_AGENT"


def nixl_module() -> ModuleType | None:
    """The installed NIXL Python package (wheels name it per CUDA major), or None."""
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "nixl_agent"):
            return mod
    return None


def _where(pool: Pool) -> tuple[int, str, int]:
    """(address of block 0, NIXL memory type, device id) of a pool."""
    tensor = getattr(pool, "tensor", None)
    if tensor is not None:
        cuda = tensor.device.type == "cuda"
        return tensor.data_ptr(), "VRAM" if cuda else "DRAM", (tensor.device.index or 0) if cuda else 0
    return pool.address, "DRAM", 0  # type: ignore[attr-defined]


def _block_descs(base: int, num_blocks: int, block_bytes: int, device_id: int) -> np.ndarray:
    """Nx3 (address, length, device) rows, one per block."""
    out = np.empty((num_blocks, 3), dtype=np.uint64)
    out[:, 0] = base + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_bytes)
    out[:, 1] = block_bytes
    out[:, 2] = device_id
    return out


class _Peer:
    __slots__ = ("blocks", "name")

    def __init__(self, name: str, blocks) -> None:
        self.name = name  # the remote agent's name as loaded
        self.blocks = blocks  # its prepared block list


class NixlTransport(OneSidedTransport):
    """Reads a prefill worker's blocks through NIXL straight into this worker's pool."""

    backend = "nixl"

    @classmethod
    def unavailable(cls, pool: Pool) -> str | None:
        if nixl_module() is None:
            return "the nixl package is not installed (pip install --no-deps nixl-cu12)"
        return None

    @classmethod
    def create(cls, setup, control: Control) -> NixlTransport:
        return cls(setup.pool, control, setup.compat_hash, name=setup.name)

    def __init__(
        self,
        dst_pool: Pool,
        control: Control,
        compat_hash: str | None = None,
        name: str = "",
        timeout_s: float = 10.0,
        min_bytes_per_s: float = 100e6,
    ) -> None:
        super().__init__(dst_pool, control, compat_hash)
        nixl = nixl_module()
        if nixl is None:
            raise TransferError(self.unavailable(dst_pool) or "nixl is not installed")
        _quiet(nixl)
        self.timeout_s = timeout_s
        self.min_bytes_per_s = min_bytes_per_s
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "pdrouter"
        self.name = f"{safe}-{os.getpid()}-{secrets.token_hex(4)}"
        self.agent = nixl.nixl_agent(self.name, nixl.nixl_agent_config(backends=["UCX"]))
        if "UCX" not in self.agent.backends:
            raise TransferError("NIXL has no UCX backend here")
        base, self.mem_type, self.device_id = _where(dst_pool)
        self.base = base
        nbytes = dst_pool.num_blocks * dst_pool.block_bytes
        self._registered = self.agent.register_memory([(base, nbytes, self.device_id, "")], self.mem_type)
        descs = _block_descs(base, dst_pool.num_blocks, dst_pool.block_bytes, self.device_id)
        self._local = self.agent.prep_xfer_dlist(_INIT, descs, self.mem_type)
        self.metadata: bytes = self.agent.get_agent_metadata()
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    def offer(self) -> dict[str, object]:
        source = NixlSource(
            agent=self.name, metadata=self.metadata, base_addr=self.base,
            mem_type=self.mem_type, device_id=self.device_id,
        )  # fmt: skip
        return {"nixl": source}

    def reach(self, handle: HandleRef) -> str | None:
        return None if handle.nixl is not None else "the prefill worker offers no NIXL source"

    async def _pull(
        self, handle: HandleRef, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> None:
        check_ids(src_block_ids, handle.num_blocks, "source")
        source = handle.nixl
        if source is None:
            raise TransferError(f"handle {handle.handle_id!r} offers no NIXL source")
        peer = self._peer(source, handle.num_blocks)
        await self.claim_once(handle)
        nbytes = len(src_block_ids) * self.dst_pool.block_bytes
        try:
            xfer = self.agent.make_prepped_xfer(
                "READ", self._local, np.asarray(dst_block_ids, dtype=np.int32),
                peer.blocks, np.asarray(src_block_ids, dtype=np.int32),
            )  # fmt: skip
        except Exception as exc:
            self._forget(source.agent)
            raise TransferError(f"NIXL could not set up the read from {source.agent}: {exc}") from exc
        try:
            await self._run(xfer, self.timeout_s + nbytes / self.min_bytes_per_s, source.agent)
        finally:
            with contextlib.suppress(Exception):
                xfer.release()

    async def _run(self, xfer, timeout_s: float, peer: str) -> None:
        """Post the read and wait for it; on cancel or timeout wait until NIXL is done with it,
        so nothing writes into the destination blocks after the pull has ended."""
        state = self.agent.transfer(xfer)
        deadline = time.monotonic() + timeout_s
        delay = 0.0
        try:
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(f"NIXL read from {peer} timed out after {timeout_s:.1f} s")
                await asyncio.sleep(delay)
                delay = min(0.002, delay * 2 or 0.0001)
                state = self.agent.check_xfer_state(xfer)
        except BaseException:
            self._settle(xfer)
            raise
        if state != "DONE":
            self._forget(peer)
            raise TransferError(f"NIXL read from {peer} failed ({state}); the prefill worker may be gone")

    def _settle(self, xfer) -> None:
        """Block until an abandoned read stops (bounded): it may still be writing our blocks."""
        end = time.monotonic() + 5.0
        with contextlib.suppress(Exception):
            while self.agent.check_xfer_state(xfer) == "PROC" and time.monotonic() < end:
                time.sleep(0.0005)

    def _peer(self, source: NixlSource, num_blocks: int) -> _Peer:
        peer = self._peers.get(source.agent)
        if peer is not None:
            self._peers.move_to_end(source.agent)
            return peer
        try:
            name = self.agent.add_remote_agent(source.metadata)
            name = name.decode() if isinstance(name, bytes) else name
            descs = _block_descs(source.base_addr, num_blocks, self.dst_pool.block_bytes, source.device_id)
            blocks = self.agent.prep_xfer_dlist(name, descs, source.mem_type)
        except Exception as exc:
            raise TransferError(f"NIXL could not load agent {source.agent}: {exc}") from exc
        peer = self._peers[source.agent] = _Peer(name, blocks)
        while len(self._peers) > MAX_PEERS:
            self._forget(next(iter(self._peers)))
        return peer

    def _forget(self, agent: str) -> None:
        """Drop a peer (gone, or evicted); a later handle from it loads it again."""
        peer = self._peers.pop(agent, None)
        if peer is None:
            return
        with contextlib.suppress(Exception):
            peer.blocks.release()
        with contextlib.suppress(Exception):
            self.agent.remove_remote_agent(peer.name)

    async def close(self) -> None:
        for agent in list(self._peers):
            self._forget(agent)
        with contextlib.suppress(Exception):
            self._local.release()
        with contextlib.suppress(Exception):
            self.agent.deregister_memory(self._registered)


def _quiet(nixl: ModuleType) -> None:
    """NIXL logs every agent and backend it creates at INFO, to stdout; keep its warnings and up
    unless the operator asked for more with its own NIXL_LOG_LEVEL."""
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)
