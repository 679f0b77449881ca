"""KV pull over NVIDIA NIXL (its UCX backend): host memory between processes on CPU machines,
VRAM and RDMA between GPU nodes, the same code for both.

Lifecycle: each worker creates one NIXL agent (name: worker, pid, random), registers its whole
pool once (DRAM for a host pool, VRAM for a CUDA pool) and prepares the list of its blocks ->
every handle it publishes carries {agent name, agent metadata, pool address, memory type}
(`NixlSource`, plain proto fields on the KvHandle, never pickled) -> a puller loads a peer's
metadata once per agent name, prepares the peer's block list and connects once -> per pull:
claim the handle on the control channel -> one READ request for all (remote, local) block
pairs, posted and waited for on the agent's own thread (never the event loop's) -> release.

Install: `pip install --no-deps nixl-cu12` (the `nixl` meta-package pulls CUDA torch).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import TypeVar

import numpy as np

from kvtransfer.errors import TransferError
from kvtransfer.pool import Pool
from kvtransfer.transport import Control, HandleRef, NixlSource, OneSidedTransport, check_ids, run_to_end

log = logging.getLogger(__name__)

MODULES = ("nixl_cu12", "nixl_cu13", "nixl")
MAX_PEERS = 64  # remote agents kept loaded (least recently used dropped)
PROGRESS_S = 0.02  # how often the agent progresses when nothing else calls it
READERS = 2  # concurrent reads a big pull is split into (and agent threads, and UCX workers)
SPLIT_MIN_BYTES = 64 << 20
_INIT = "NIXL_INIT_AGENT"
T = TypeVar("T")


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
        if setup.tls is not None:  # NOTE: with mutual TLS, KV leaves a host only through TLS
            raise TransferError("off with mutual TLS (NIXL/UCX does not encrypt)")
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
        # NOTE: NIXL's own progress thread polls without pause (~0.45 of a core per idle worker,
        # measured); ours progresses every PROGRESS_S instead (~0.6% of a core), which is all a
        # peer's connection set-up needs from us: reads themselves are one-sided
        # NOTE: RW sync lets two reads run at once (a big pull is split in two: one host's
        # process_vm_readv runs at ~0.5 of a memcpy alone, ~0.8-1.0 as two); UCX gets a worker each
        rw = nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
        config = nixl.nixl_agent_config(enable_prog_thread=False, backends=[], sync_mode=rw)
        self.agent = nixl.nixl_agent(self.name, config)
        self.agent.create_backend("UCX", {"num_workers": str(READERS)})
        base, self.mem_type, self.device_id = _where(dst_pool)
        self.base = base
        nbytes = dst_pool.num_blocks * dst_pool.block_bytes
        self._registered = self.agent.register_memory([(base, nbytes, self.device_id, "")], self.mem_type)
        descs = _block_descs(base, dst_pool.num_blocks, dst_pool.block_bytes, self.device_id)
        self._local = self.agent.prep_xfer_dlist(_INIT, descs, self.mem_type)
        self.metadata: bytes = self.agent.get_agent_metadata()
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._thread = ThreadPoolExecutor(READERS, thread_name_prefix="nixl")
        self._peers_lock = threading.Lock()
        self._stop = threading.Event()
        self._progress = threading.Thread(target=self._progress_forever, name="nixl-progress", daemon=True)
        self._progress.start()

    def _progress_forever(self) -> None:
        while not self._stop.wait(PROGRESS_S):
            with contextlib.suppress(Exception):
                self.agent.get_new_notifs()

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
        peer = await self._call(lambda _: self._peer(source, handle.num_blocks))
        await self.claim_once(handle)
        nbytes = len(src_block_ids) * self.dst_pool.block_bytes
        deadline = time.monotonic() + self.timeout_s + nbytes / self.min_bytes_per_s
        src = np.asarray(src_block_ids, dtype=np.int32)
        dst = np.asarray(dst_block_ids, dtype=np.int32)
        parts = READERS if nbytes >= SPLIT_MIN_BYTES and len(src) >= READERS else 1
        states = await asyncio.gather(*(
            self._call(lambda abort, s=s, d=d: self._read(peer, s, d, deadline, abort))
            for s, d in zip(np.array_split(src, parts), np.array_split(dst, parts))
        ))  # fmt: skip
        failed = next((state for state in states if state != "DONE"), None)
        if failed is not None:
            await self._call(lambda _: self._forget(source.agent))
            raise TransferError(f"NIXL read from {source.agent} failed: {failed}")

    async def _call(self, fn: Callable[[threading.Event], T]) -> T:
        """Run `fn` on an agent thread: NIXL posts a same-host read synchronously (150 ms for
        189 MB here) with the GIL released, so never on the event loop's thread."""
        return await run_to_end(fn, self._thread)

    def _read(self, peer: _Peer, src: np.ndarray, dst: np.ndarray, deadline: float, abort) -> str:
        """One READ of all block pairs, waited for (agent thread). On abort or past the deadline
        it still waits (bounded) until NIXL lets go of the destination blocks."""
        try:
            xfer = self.agent.make_prepped_xfer(
                "READ", self._local, dst, peer.blocks, src, skip_desc_merge=True
            )
        except Exception as exc:
            return f"could not set up the read ({exc})"
        try:
            state = self.agent.transfer(xfer)
            delay = 0.0
            while state == "PROC":
                if time.monotonic() > deadline or abort.is_set():
                    self._settle(xfer)
                    return "aborted" if abort.is_set() else "timed out"
                time.sleep(delay)
                delay = min(0.001, delay * 2 or 0.00002)
                state = self.agent.check_xfer_state(xfer)
            return state if state == "DONE" else f"{state} (the prefill worker may be gone)"
        except Exception as exc:  # NOTE: a peer that died raises from transfer(): a failed pull
            return f"{type(exc).__name__}: {exc} (the prefill worker may be gone)"
        finally:
            with contextlib.suppress(Exception):
                xfer.release()

    def _settle(self, xfer) -> None:
        """Wait (at most 5 s) for an abandoned read to stop writing our blocks."""
        end = time.monotonic() + 5.0
        with contextlib.suppress(Exception):
            while self.agent.check_xfer_state(xfer) == "PROC" and time.monotonic() < end:
                time.sleep(0.0005)

    def _peer(self, source: NixlSource, num_blocks: int) -> _Peer:
        """The peer's loaded metadata and block list, connected (agent thread)."""
        with self._peers_lock:
            return self._load_peer(source, num_blocks)

    def _load_peer(self, source: NixlSource, num_blocks: int) -> _Peer:
        peer = self._peers.get(source.agent)
        if peer is not None:
            self._peers.move_to_end(source.agent)
            return peer
        try:
            name = self.agent.add_remote_agent(source.metadata)
            name = name.decode() if isinstance(name, bytes) else name
            descs = _block_descs(source.base_addr, num_blocks, self.dst_pool.block_bytes, source.device_id)
            blocks = self.agent.prep_xfer_dlist(name, descs, source.mem_type)
            self.agent.make_connection(name)  # NOTE: else the first read pays the connection set-up
        except Exception as exc:
            raise TransferError(f"NIXL could not load agent {source.agent}: {exc}") from exc
        peer = self._peers[source.agent] = _Peer(name, blocks)
        while len(self._peers) > MAX_PEERS:
            self._drop_peer(next(iter(self._peers)))
        return peer

    def _forget(self, agent: str) -> None:
        """Drop a peer (gone, or evicted); a later handle from it loads it again (agent thread)."""
        with self._peers_lock:
            self._drop_peer(agent)

    def _drop_peer(self, agent: str) -> None:
        peer = self._peers.pop(agent, None)
        if peer is None:
            return
        with contextlib.suppress(Exception):
            peer.blocks.release()
        with contextlib.suppress(Exception):
            self.agent.remove_remote_agent(peer.name)

    async def close(self) -> None:
        def drop(_) -> None:
            for agent in list(self._peers):
                self._forget(agent)  # NOTE: takes the lock per peer
            with contextlib.suppress(Exception):
                self._local.release()
            with contextlib.suppress(Exception):
                self.agent.deregister_memory(self._registered)

        self._stop.set()
        self._progress.join(timeout=5)
        await self._call(drop)
        self._thread.shutdown(wait=True)


def _quiet(nixl: ModuleType) -> None:
    """NIXL logs every agent and backend it creates at INFO, to stdout; keep its warnings and up
    unless the operator asked for more with its own NIXL_LOG_LEVEL."""
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)
