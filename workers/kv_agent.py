"""A worker's side of KV transfer, both directions.

Prefill leg: the engine finishes the prompt with its blocks pinned -> `publish` turns them into
a handle (one-time token, TTL) carrying every way this worker offers to read its pool (each
transport's `offer`) -> the decode worker pulls and releases it, or the router releases it, or
the TTL does -> the blocks are unpinned.
Decode leg: `importer` picks a transport for the handle (kvtransfer.registry) and gives the
engine a pull function; the engine asks it for the blocks its own prefix cache lacks -> the
pull claims, copies, and releases the handle as soon as the copy is over (a release that finds
the handle already gone means the bytes may be stale: a failure) -> any failure makes the
engine recompute the prompt (counted, logged, traced with its reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from kvtransfer.errors import LayoutMismatch, TransferError, TransferRefused
from kvtransfer.handles import Handle, HandleRegistry
from kvtransfer.host import host_id
from kvtransfer.layout import KvLayout, compat_hash
from kvtransfer.registry import Setup, Transports, build
from kvtransfer.tcp import TcpTransferServer
from kvtransfer.transport import CudaIpcSource, HandleRef, NixlSource, Transport
from pdrouter_proto import worker_pb2 as pb
from workers.engine.engine import Engine
from workers.engine.sequence import KvImport

log = logging.getLogger("pdrouter.worker.kv")

DEFAULT_TTL_S = 30.0
_tracer = trace.get_tracer("pdrouter.worker")


def layout_to_pb(layout: KvLayout) -> pb.KvLayout:
    return pb.KvLayout(**msgspec.structs.asdict(layout))


def _struct_from_pb(msg, cls: type[msgspec.Struct]):
    return cls(**{f: getattr(msg, f) for f in cls.__struct_fields__})


def layout_from_pb(layout: pb.KvLayout) -> KvLayout:
    return _struct_from_pb(layout, KvLayout)


def handle_ref(request_id: str, h: pb.KvHandle) -> HandleRef:
    return HandleRef(
        handle_id=request_id,
        token=h.token,
        endpoint=h.endpoint,
        layout=layout_from_pb(h.layout),
        compat_hash=h.compat_hash,
        num_blocks=h.pool_num_blocks,
        host_id=h.host_id,
        source_worker=h.worker_id,
        shm_name=h.shm_name,
        nixl=_struct_from_pb(h.nixl, NixlSource) if h.HasField("nixl") else None,
        cuda_ipc=_struct_from_pb(h.cuda_ipc, CudaIpcSource) if h.HasField("cuda_ipc") else None,
    )


def _offer_to_pb(handle: pb.KvHandle, offer: dict[str, object]) -> None:
    for key, value in offer.items():
        if isinstance(value, msgspec.Struct):
            getattr(handle, key).CopyFrom(type(getattr(handle, key))(**msgspec.structs.asdict(value)))
        else:
            setattr(handle, key, value)


class Unreachable(TransferError):
    """No transport in this worker can reach the handle's prefill worker."""


def failure_kind(exc: TransferError) -> str:
    """The reason class a failed pull is counted under (KvTransferStats.failures_by_reason)."""
    if isinstance(exc, TransferRefused):
        return "refused"  # unknown, wrong or reused token, expired, released
    if isinstance(exc, LayoutMismatch):
        return "layout_mismatch"
    if isinstance(exc, Unreachable):
        return "unreachable"
    return "failed"  # connection lost, peer gone, timed out, stale data


class KvAgent:
    """This worker's handles (prefill side) and pulls (decode side) over `transports`."""

    def __init__(
        self,
        engine: Engine,
        worker_id: str,
        compat: str,
        transports: Transports,
        host: str,
        port: int = 0,
        backend: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`transports`: kvtransfer.registry.build(...) (or test doubles); `backend`: the operator's
        --kv-transfer choice (None/auto: per handle, kvtransfer.registry.AUTO_ORDER); `tls`: the
        transfer listener's mutual-TLS context (workers.tls.kv_contexts)."""
        pool = engine.runner.transfer_pool
        if pool is None:
            raise ValueError("this engine's KV pool cannot be transferred")
        self.engine = engine
        self.pool = pool
        self.worker_id = worker_id
        self.transports = transports
        self.backend = backend
        self.ttl_s = ttl_s
        self.host_id = host_id()
        self.compat = compat
        self.registry = HandleRegistry(on_unpin=self._unpin)
        self.server = TcpTransferServer(pool, self.registry, host, port, tls=tls)
        self.stats = pb.KvTransferStats()
        self._offer = pb.KvHandle()
        self._sweeper: asyncio.Task | None = None
        self._releases: set[asyncio.Task] = set()

    @classmethod
    def create(
        cls,
        engine: Engine,
        worker_id: str,
        version: str,
        host: str,
        port: int = 0,
        backend: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
    ) -> KvAgent:
        """An agent with every backend that can run here; `tls`: (listener, puller) contexts."""
        pool = engine.runner.transfer_pool
        if pool is None:
            raise ValueError("this engine's KV pool cannot be transferred")
        compat = compat_hash(engine.spec.name, pool.layout, version)
        server_tls, client_tls = tls or (None, None)
        transports = build(Setup(pool, compat, client_tls, worker_id))
        if backend not in (None, "auto") and backend not in transports.by_name:
            why = transports.missing.get(backend, "unknown backend")
            log.warning("--kv-transfer %s cannot run here (%s); choosing per handle", backend, why)
        return cls(engine, worker_id, compat, transports, host, port, backend, ttl_s, server_tls)

    async def start(self) -> None:
        await self.server.start()
        _offer_to_pb(self._offer, self.transports.offer())
        self._offer.worker_id = self.worker_id
        self._offer.endpoint = self.server.endpoint
        self._offer.layout.CopyFrom(layout_to_pb(self.pool.layout))
        self._offer.compat_hash = self.compat
        self._offer.host_id = self.host_id
        self._offer.pool_num_blocks = self.pool.num_blocks
        self._sweeper = asyncio.ensure_future(self._sweep(1.0))

    async def _sweep(self, interval_s: float) -> None:
        """Unpin handles nobody released within their TTL (a lost router or decode worker)."""
        while True:
            await asyncio.sleep(interval_s)
            for handle in self.registry.expire():
                log.warning("KV handle %s expired after %.0f s unreleased", handle.handle_id, handle.ttl_s)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.server.close()
        await self.transports.close()
        self.registry.close()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def snapshot(self) -> pb.KvTransferStats:
        s = pb.KvTransferStats()
        s.CopyFrom(self.stats)
        s.handles_pinned = self.registry.num_pinned
        s.blocks_pinned = self.registry.num_pinned_blocks
        s.handles_expired = self.registry.num_expired
        return s

    # -- prefill side -----------------------------------------------------------------------

    def publish(self, request_id: str, block_ids: list[int], num_tokens: int) -> pb.KvHandle:
        handle = self.registry.publish(request_id, block_ids, num_tokens, self.ttl_s)
        self.stats.handles_published += 1
        out = pb.KvHandle()
        out.CopyFrom(self._offer)
        out.block_ids.extend(block_ids)
        out.token = handle.token
        out.expires_at = handle.expires_at
        out.num_tokens = num_tokens
        return out

    def release(self, request_id: str, token: bytes) -> bool:
        return self.registry.release(request_id, token or None)

    def _unpin(self, handle: Handle) -> None:
        self.engine.unpin(handle.handle_id)

    # -- decode side ------------------------------------------------------------------------

    def importer(self, request_id: str, h: pb.KvHandle, parent: Context | None = None) -> KvImport:
        """What the engine needs to pull this handle's blocks; the prompt is recomputed on failure."""
        ref = handle_ref(request_id, h)
        try:
            transport, note = self.transports.choose(ref, self.backend)
        except ValueError as exc:
            transport, note = None, str(exc)
        if note:
            log.warning("KV transfer for %s: %s", request_id, note)
        imp = KvImport(list(h.block_ids), h.num_tokens, None)  # type: ignore[arg-type]

        async def pull(src: list[int], dst: list[int]) -> None:
            try:
                if transport is None:
                    exc = Unreachable(note)
                    self._count_failure(exc)
                    self.release_later(ref)
                    raise exc
                await self._pull(transport, ref, src, dst, parent)
            finally:
                imp.released = True

        imp.pull = pull
        return imp

    async def _pull(
        self, transport: Transport, ref: HandleRef, src: list[int], dst: list[int], parent: Context | None
    ) -> None:
        """Copy the missing blocks, then release the handle at once (it must still have been
        pinned: otherwise the copy may hold a reused block's bytes)."""
        if not src:  # NOTE: the local prefix cache holds every block: nothing moves
            await self._release(transport, ref, required=False)
            return
        nbytes = len(src) * self.pool.block_bytes
        attrs = {"pdrouter.kv.backend": transport.backend, "pdrouter.kv.blocks": len(src),
                 "pdrouter.kv.bytes": nbytes, "pdrouter.kv.source": ref.source_worker}  # fmt: skip
        with _tracer.start_as_current_span("kv_transfer", context=parent, attributes=attrs) as span:
            t0 = time.perf_counter()
            try:
                await transport.pull(ref, src, dst)
                await self._release(transport, ref, required=True)
            except TransferError as exc:
                self._count_failure(exc)
                reason = exc.reason if isinstance(exc, TransferRefused) else str(exc)
                span.set_attribute("pdrouter.kv.fallback_reason", reason)
                span.set_status(Status(StatusCode.ERROR, reason))
                log.warning(
                    "KV pull for %s from %s (%s) failed: %s; recomputing",
                    ref.handle_id, ref.source_worker, transport.backend, reason,
                )  # fmt: skip
                self.release_later(ref)
                raise
            seconds = time.perf_counter() - t0
            span.set_attribute("pdrouter.kv.gbps", nbytes / seconds / 1e9 if seconds > 0 else 0.0)
        self.stats.pulls += 1
        self.stats.pulls_by_backend[transport.backend] += 1
        self.stats.blocks_pulled += len(src)
        self.stats.bytes_pulled += nbytes

    def _count_failure(self, exc: TransferError) -> None:
        self.stats.pull_failures += 1
        self.stats.failures_by_reason[failure_kind(exc)] += 1

    async def _release(self, transport: Transport, ref: HandleRef, required: bool) -> None:
        try:
            released = await transport.release(ref)
        except (OSError, TimeoutError) as exc:
            raise TransferError(f"releasing handle {ref.handle_id!r} failed: {exc}") from exc
        if required and not released:
            raise TransferError(f"handle {ref.handle_id!r} ended during the pull; the data may be stale")

    def release_later(self, ref_or_handle: HandleRef | tuple[str, pb.KvHandle]) -> None:
        """Give the handle back at the prefill worker in the background (idempotent there): a
        pull that failed, or a decode request that ended before its import began."""
        ref = ref_or_handle if isinstance(ref_or_handle, HandleRef) else handle_ref(*ref_or_handle)
        task = asyncio.ensure_future(self._release_quietly(ref))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_quietly(self, ref: HandleRef) -> None:
        with contextlib.suppress(TransferError, OSError, TimeoutError):
            await self.transports.control.release(ref)
