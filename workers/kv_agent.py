"""A worker's side of KV transfer, both directions.

Prefill leg: the engine finishes the prompt with its blocks pinned -> `publish` turns them into
a handle (one-time token, TTL) that the router hands to a decode worker -> the decode worker
pulls and releases it, or the router releases it, or the TTL does -> the blocks are unpinned.
Decode leg: `importer` gives the engine a pull function for the handle; the engine asks it for
the blocks its own prefix cache lacks; any failure there makes the engine recompute the prompt
(counted, logged). `finish_import` releases the handle on the prefill side whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from kvtransfer.errors import TransferError, TransferRefused
from kvtransfer.handles import Handle, HandleRegistry
from kvtransfer.layout import KvLayout, compat_hash
from kvtransfer.select import choose_backend, host_id
from kvtransfer.shm import ShmTransport
from kvtransfer.tcp import TcpTransferServer, TcpTransport
from kvtransfer.transport import HandleRef
from pdrouter_proto import worker_pb2 as pb
from workers.engine.engine import Engine
from workers.engine.sequence import KvImport

log = logging.getLogger("pdrouter.worker.kv")

DEFAULT_TTL_S = 30.0
_tracer = trace.get_tracer("pdrouter.worker")


def layout_to_pb(layout: KvLayout) -> pb.KvLayout:
    return pb.KvLayout(
        dtype=layout.dtype,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
    )


def layout_from_pb(layout: pb.KvLayout) -> KvLayout:
    return KvLayout(
        dtype=layout.dtype,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
    )


def handle_ref(request_id: str, h: pb.KvHandle, backend: str) -> HandleRef:
    return HandleRef(
        handle_id=request_id,
        token=h.token.hex(),
        endpoint=h.endpoint,
        backend=backend,
        layout=layout_from_pb(h.layout),
        compat_hash=h.compat_hash,
        shm_name=h.shm_name,
        num_blocks=h.pool_num_blocks,
    )


class KvAgent:
    def __init__(
        self,
        engine: Engine,
        worker_id: str,
        version: str,
        host: str,
        port: int = 0,
        backend: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
    ) -> None:
        """`tls`: (listener, puller) contexts for mutual TLS on KV transfer (workers.tls.kv_contexts)."""
        pool = engine.runner.transfer_pool
        if pool is None:
            raise ValueError("this engine's KV pool cannot be transferred (not in host memory)")
        self.engine = engine
        self.pool = pool
        self.worker_id = worker_id
        self.backend = backend
        self.ttl_s = ttl_s
        self.host_id = host_id()
        self.compat = compat_hash(engine.spec.name, pool.layout, version)
        self.registry = HandleRegistry(on_unpin=self._unpin)
        server_tls, client_tls = tls or (None, None)
        self.server = TcpTransferServer(pool, self.registry, host, port, tls=server_tls)
        self.tcp = TcpTransport(pool, self.compat, tls=client_tls)
        self.shm = ShmTransport(pool, claim=self.tcp.claim, compat_hash=self.compat)
        self.stats = pb.KvTransferStats()
        self._sweeper: asyncio.Task | None = None
        self._releases: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.server.start()
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
        await self.tcp.close()
        await self.shm.close()
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
        return pb.KvHandle(
            worker_id=self.worker_id,
            endpoint=self.server.endpoint,
            backend=self.backend or "auto",
            block_ids=block_ids,
            layout=layout_to_pb(self.pool.layout),
            token=bytes.fromhex(handle.token),
            expires_at=handle.expires_at,
            compat_hash=self.compat,
            num_tokens=num_tokens,
            shm_name=self.pool.name or "",
            host_id=self.host_id,
            pool_num_blocks=self.pool.num_blocks,
        )

    def release(self, request_id: str, token: bytes) -> bool:
        return self.registry.release(request_id, token.hex() if token else None)

    def _unpin(self, handle: Handle) -> None:
        self.engine.unpin(handle.handle_id)

    # -- decode side ------------------------------------------------------------------------

    def importer(self, request_id: str, h: pb.KvHandle, parent: Context | None = None) -> KvImport:
        """What the engine needs to pull this handle's blocks; the prompt is recomputed on failure."""
        same_host = h.host_id == self.host_id and bool(h.shm_name)
        try:
            backend = choose_backend(h.host_id if same_host else "", self.host_id, self._override(same_host))
        except ValueError as exc:
            log.warning("KV transfer for %s: %s; using tcp", request_id, exc)
            backend = "tcp"
        ref = handle_ref(request_id, h, backend)
        transport = self.shm if backend == "shm" else self.tcp

        async def pull(src: list[int], dst: list[int]) -> None:
            nbytes = len(src) * self.pool.block_bytes
            attrs = {"pdrouter.kv.backend": backend, "pdrouter.kv.blocks": len(src),
                     "pdrouter.kv.bytes": nbytes, "pdrouter.kv.source": h.worker_id}  # fmt: skip
            with _tracer.start_as_current_span("kv_transfer", context=parent, attributes=attrs) as span:
                t0 = time.perf_counter()
                try:
                    await transport.pull(ref, src, dst)
                except TransferError as exc:
                    self.stats.pull_failures += 1
                    reason = exc.reason if isinstance(exc, TransferRefused) else str(exc)
                    span.set_attribute("pdrouter.kv.fallback_reason", reason)
                    span.set_status(Status(StatusCode.ERROR, reason))
                    log.warning(
                        "KV pull for %s from %s (%s) failed: %s", request_id, h.worker_id, backend, reason
                    )
                    raise
                seconds = time.perf_counter() - t0
                span.set_attribute("pdrouter.kv.gbps", nbytes / seconds / 1e9 if seconds > 0 else 0.0)
            self.stats.pulls += 1
            self.stats.blocks_pulled += len(src)
            self.stats.bytes_pulled += nbytes

        return KvImport(list(h.block_ids), h.num_tokens, pull)

    def _override(self, same_host: bool) -> str | None:
        if self.backend in (None, "auto"):
            return None
        if self.backend == "shm" and not same_host:
            return None  # NOTE: shm cannot reach another host; fall back to the automatic choice
        return self.backend

    def finish_import(self, request_id: str, h: pb.KvHandle) -> None:
        """Release the handle on the prefill worker (in the background; idempotent there)."""
        ref = handle_ref(request_id, h, "tcp")
        task = asyncio.ensure_future(self._release_remote(ref))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_remote(self, ref: HandleRef) -> None:
        with contextlib.suppress(TransferError, OSError, TimeoutError):
            await self.tcp.release(ref)
