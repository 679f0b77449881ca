"""Any-host KV pull over TCP: the prefill worker's transfer server streams raw block bytes
straight from its pool; the decode side `recv_into`s them straight into its own pool blocks.
The same server also takes the two control calls of a handle's life that need no gRPC: claim
(what a same-host shm pull does before it reads shared memory) and release (after a pull).

Wire protocol (little-endian; one request in flight per connection, connections reused):
  request   header `<4sBBHI16s` magic b"PDKV", version 1, op, handle id length, block count,
            16 raw token bytes; then the handle id (utf-8); then count x uint32 source block ids
            op 1 read: count >= 0 ids; op 2 claim, op 3 release: count 0
  response  `<BQ` status, value.
            status 0 (ok), op 1: value = the server's block_bytes, then count x block_bytes raw
              bytes in request order, then one trailer byte (0: the handle was still pinned when
              the last byte went out; 1: it ended meanwhile, the data may be stale).
            status 0, op 2: value = block_bytes. status 0, op 3: value = 1 if this call released.
            status 1 (refused) / 2 (bad request): value = length of a utf-8 reason that follows;
              after 2 the server closes the connection.
The first read or claim on a connection claims the handle (spends the one-time token); later
reads on that connection with the same handle and token go on without claiming again.
With `tls` contexts (kvtransfer/tls.py) both sides run the same protocol inside mutual TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import ssl
import struct
from collections.abc import Sequence

import numpy as np

from kvtransfer.errors import LayoutMismatch, TransferError, TransferRefused
from kvtransfer.handles import Handle, HandleRegistry
from kvtransfer.pool import KvPool, Pool
from kvtransfer.tls import STREAM_LIMIT, TLS_IO, TlsStream, nodelay
from kvtransfer.tls import connect as tls_connect
from kvtransfer.transport import HandleRef, Transport, check_ids

log = logging.getLogger(__name__)

MAGIC = b"PDKV"
VERSION = 1
OP_READ, OP_CLAIM, OP_RELEASE = 1, 2, 3
OK, REFUSED, BAD_REQUEST = 0, 1, 2
REQUEST = struct.Struct("<4sBBHI16s")
RESPONSE = struct.Struct("<BQ")
MAX_IDS = 1 << 20
MAX_ID_LEN = 1024
_IOV_MAX = 1024
# NOTE: bounded syscall sizes. Measured on loopback (2 vCPUs, 737 KB blocks, 188 MB pulls): one
# send/recv per whole run moved ~3.0 GB/s, sends of <= 1 MiB with receives of <= 256 KiB ~4.2 GB/s
# (smaller sends, 256 KiB, fell to ~2.7 GB/s). Each call holds the socket lock for less time, so
# the two sides overlap better.
SEND_CHUNK = 1 << 20
RECV_CHUNK = 256 << 10


def encode_request(handle_id: str, token: bytes, src_block_ids: Sequence[int], op: int = OP_READ) -> bytes:
    hid = handle_id.encode()
    if not isinstance(token, bytes) or len(token) != 16:
        raise TransferRefused(f"malformed token for handle {handle_id!r}")
    ids = np.asarray(src_block_ids, dtype="<u4").tobytes()
    return REQUEST.pack(MAGIC, VERSION, op, len(hid), len(src_block_ids), token) + hid + ids


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


async def _recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket (straight into the caller's memory); EOFError if it closes."""
    pos, size = 0, len(view)
    while pos < size:
        got = await loop.sock_recv_into(sock, view[pos : pos + RECV_CHUNK])
        if not got:
            raise EOFError(f"connection closed after {pos} of {size} bytes")
        pos += got


async def _recv_bytes(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    await _recv_into(loop, sock, memoryview(buf))
    return buf


class TcpTransferServer:
    """Serves pinned blocks of `pool` to holders of a handle token, on `host` only."""

    def __init__(
        self,
        pool: Pool,
        registry: HandleRegistry,
        host: str,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.host = host
        self.port = port
        self.tls = tls  # a server context that requires client certificates (tls.server_context)
        self._listener: socket.socket | None = None
        self._tls_server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.num_connections = 0

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family, kind, proto, _, addr = (
            await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        )[0]
        lsock = socket.socket(family, kind, proto)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(addr)
            lsock.listen(128)
            lsock.setblocking(False)
        except BaseException:
            lsock.close()
            raise
        self._listener = lsock
        self.port = lsock.getsockname()[1]
        if self.tls is not None:
            self._tls_server = await asyncio.start_server(
                self._serve_tls, sock=lsock, ssl=self.tls, limit=STREAM_LIMIT
            )
        else:
            self._spawn(self._accept(lsock))

    async def close(self) -> None:
        """Stop listening and drop every connection (pulls in flight fail on the other side)."""
        if self._tls_server is not None:
            self._tls_server.close()
            self._tls_server = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> TcpTransferServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(lsock)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.num_connections += 1
            self._spawn(self._serve(sock))

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TLS connection (the handshake, client certificate checked, is done by now)."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # NOTE: so close() drops TLS connections too
        nodelay(writer)
        self.num_connections += 1
        try:
            await self._serve(TlsStream(reader, writer), TLS_IO)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            pass  # NOTE: close() cancels it; ending cancelled trips asyncio's handler callback (3.11)
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _serve(self, sock: socket.socket, io=None) -> None:
        loop = io or asyncio.get_running_loop()
        bound: list = [None, frozenset()]  # the handle this connection claimed, its block ids
        try:
            while await self._one_request(loop, sock, bound):
                pass
        except (OSError, EOFError):
            pass  # NOTE: the puller went away; its side reports the failure
        except Exception:
            log.exception("KV transfer connection failed")
        finally:
            sock.close()

    async def _one_request(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, bound: list) -> bool:
        head = bytearray(REQUEST.size)
        got = await loop.sock_recv_into(sock, head)
        if not got:
            return False  # clean close between requests
        if got < len(head):
            await _recv_into(loop, sock, memoryview(head)[got:])
        magic, version, op, id_len, count, raw_token = REQUEST.unpack(head)
        ok_op = op == OP_READ or (op in (OP_CLAIM, OP_RELEASE) and count == 0)
        if magic != MAGIC or version != VERSION or not ok_op or id_len > MAX_ID_LEN or count > MAX_IDS:
            await self._refuse(loop, sock, BAD_REQUEST, "bad request header (not a pdrouter KV pull?)")
            _drain_and_shut(sock)
            return False
        tail = await _recv_bytes(loop, sock, id_len + 4 * count)
        handle_id = tail[:id_len].decode(errors="replace")
        ids = np.frombuffer(tail, dtype="<u4", offset=id_len).tolist()
        bb = self.pool.block_bytes
        if op == OP_RELEASE:
            released = self.registry.release(handle_id, raw_token)
            await loop.sock_sendall(sock, RESPONSE.pack(OK, int(released)))
            return True
        try:
            handle = self._authorize(bound, handle_id, raw_token, ids, fresh=op == OP_CLAIM)
        except TransferRefused as exc:
            await self._refuse(loop, sock, REFUSED, exc.reason)
            return True
        if op == OP_CLAIM:
            await loop.sock_sendall(sock, RESPONSE.pack(OK, bb))
            return True
        parts: list = [RESPONSE.pack(OK, bb)]
        for views in self.pool.read_chunks(ids):  # NOTE: a device pool stages each chunk in host memory
            for v in views:
                parts += (v[i : i + SEND_CHUNK] for i in range(0, len(v), SEND_CHUNK))
            await _send_parts(loop, sock, parts)
            parts = []
        await loop.sock_sendall(sock, b"\0" if self.registry.is_live(handle) else b"\1")
        return True

    def _authorize(self, bound: list, handle_id: str, token: bytes, ids: list[int], fresh: bool) -> Handle:
        """The handle, claimed now (`fresh`, or not yet claimed on this connection) or before."""
        handle: Handle | None = bound[0]
        if fresh or not (
            handle is not None
            and handle.handle_id == handle_id
            and hmac.compare_digest(handle.token, token)
            and self.registry.is_live(handle)
        ):
            handle = self.registry.claim(handle_id, token)
            bound[0], bound[1] = handle, frozenset(handle.block_ids)
        if not bound[1].issuperset(ids):
            raise TransferRefused(f"block ids outside handle {handle_id!r}")
        if ids and max(ids) >= self.pool.num_blocks:
            raise TransferRefused(f"block ids outside the pool of {self.pool.num_blocks} blocks")
        return handle

    async def _refuse(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, status: int, reason: str
    ) -> None:
        text = reason.encode()
        await loop.sock_sendall(sock, RESPONSE.pack(status, len(text)) + text)


async def _send_parts(loop: asyncio.AbstractEventLoop, sock: socket.socket, parts: list) -> None:
    """Send `parts` in order, straight from their memory: one `sendmsg` per batch of up to
    IOV_MAX parts takes as much as the socket buffer holds now (fewer syscalls and wake-ups than
    a send per part); whatever it leaves goes through `sock_sendall`, which waits for room."""
    i = 0
    while i < len(parts):
        batch = parts[i : i + _IOV_MAX]
        try:
            sent = sock.sendmsg(batch)
        except (BlockingIOError, InterruptedError):
            sent = 0
        for part in batch:
            size = len(part)
            if sent < size:
                await loop.sock_sendall(sock, memoryview(part)[sent:])
                sent = 0
            else:
                sent -= size
        i += len(batch)


def _drain_and_shut(sock: socket.socket) -> None:
    """Half-close after an error reply; unread input would turn our close into a reset that
    can destroy the reply before the peer reads it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


class _Conn:
    __slots__ = ("endpoint", "handle_id", "io", "sock")

    def __init__(self, endpoint: str, sock: socket.socket, io=None) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.io = io  # TLS: stands in for the loop's sock_* calls (None: the loop's own)
        self.handle_id = ""  # the handle this connection claimed last (later pulls of it reuse it)

    def is_stale(self) -> bool:
        """The peer closed or reset an idle connection (one non-blocking peek)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


class TcpTransport(Transport):
    """Pulls from a `TcpTransferServer` at `HandleRef.endpoint`; connections pooled per endpoint.

    A pull fails with TransferError after `timeout_s` plus the time its bytes take at
    `min_bytes_per_s`, so a stalled server never hangs the decode side.
    """

    backend = "tcp"

    @classmethod
    def unavailable(cls, pool: Pool) -> str | None:
        if isinstance(pool, KvPool):
            return None
        return f"tcp moves host memory; a pool on {pool.device} moves through 'staged'"

    def reach(self, handle: HandleRef) -> str | None:
        return None if handle.endpoint else "the handle names no transfer listener"

    def __init__(
        self,
        dst_pool: Pool,
        compat_hash: str | None = None,
        timeout_s: float = 10.0,
        min_bytes_per_s: float = 100e6,
        max_idle_per_endpoint: int = 4,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(dst_pool, compat_hash)
        self.tls = tls  # a client context with this side's certificate (tls.client_context)
        self.timeout_s = timeout_s
        self.min_bytes_per_s = min_bytes_per_s
        self.max_idle_per_endpoint = max_idle_per_endpoint
        self._idle: dict[str, list[_Conn]] = {}
        self._busy: set[_Conn] = set()

    async def _pull(
        self, handle: HandleRef, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> None:
        check_ids(src_block_ids, handle.num_blocks or 1 << 32, "source")
        request = encode_request(handle.handle_id, handle.token, src_block_ids)
        nbytes = len(dst_block_ids) * self.dst_pool.block_bytes
        conn: _Conn | None = None
        reusable = False
        try:
            async with asyncio.timeout(self.timeout_s + nbytes / self.min_bytes_per_s):
                conn = await self._checkout(handle)
                try:
                    await self._request(conn, handle, request, dst_block_ids)
                except TransferRefused:
                    reusable = True  # NOTE: a refusal leaves the connection in step
                    raise
                reusable = True
        except TimeoutError as exc:
            raise TransferError(f"pull from {handle.endpoint} timed out") from exc
        except (OSError, EOFError) as exc:
            raise TransferError(f"pull from {handle.endpoint} failed: {exc}") from exc
        finally:
            if conn is not None:
                self._checkin(conn, reusable)

    async def claim(self, handle: HandleRef) -> None:
        """Spend the handle's token at its transfer server without reading (what a same-host
        shm pull needs first: `ShmTransport(pool, tcp)`); TransferRefused saying why."""
        await self._control(handle, OP_CLAIM)

    async def release(self, handle: HandleRef) -> bool:
        """Unpin the handle at its transfer server; True if this call released it."""
        return bool(await self._control(handle, OP_RELEASE))

    async def _control(self, handle: HandleRef, op: int) -> int:
        request = encode_request(handle.handle_id, handle.token, (), op)
        loop = asyncio.get_running_loop()
        conn: _Conn | None = None
        reusable = False
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await self._checkout(handle)
                io = conn.io or loop
                await io.sock_sendall(conn.sock, request)
                status, value = RESPONSE.unpack(await _recv_bytes(io, conn.sock, RESPONSE.size))
                if status != OK:
                    reason = (await _recv_bytes(io, conn.sock, value)).decode(errors="replace")
                    reusable = status == REFUSED
                    raise TransferRefused(reason) if reusable else EOFError(f"server rejected: {reason}")
                reusable = True
        except TimeoutError as exc:
            raise TransferError(f"call to {handle.endpoint} timed out") from exc
        except (OSError, EOFError) as exc:
            raise TransferError(f"call to {handle.endpoint} failed: {exc}") from exc
        finally:
            if conn is not None:
                self._checkin(conn, reusable)
        if op == OP_CLAIM:
            conn.handle_id = handle.handle_id
            if value != self.dst_pool.block_bytes:
                raise LayoutMismatch(
                    f"{self.dst_pool.layout.describe()} block_bytes={self.dst_pool.block_bytes}",
                    f"block_bytes={value} at {handle.endpoint}",
                )
        return value

    async def _request(
        self, conn: _Conn, handle: HandleRef, request: bytes, dst_block_ids: Sequence[int]
    ) -> None:
        loop = conn.io or asyncio.get_running_loop()
        sock = conn.sock
        await loop.sock_sendall(sock, request)
        status, value = RESPONSE.unpack(await _recv_bytes(loop, sock, RESPONSE.size))
        if status != OK:
            reason = (await _recv_bytes(loop, sock, value)).decode(errors="replace")
            if status == REFUSED:
                raise TransferRefused(reason)
            raise EOFError(f"server rejected the request: {reason}")
        bb = self.dst_pool.block_bytes
        if value != bb:
            raise LayoutMismatch(
                f"{self.dst_pool.layout.describe()} block_bytes={bb}",
                f"block_bytes={value} at {handle.endpoint}",
            )
        conn.handle_id = handle.handle_id
        for view, commit in self.dst_pool.write_chunks(dst_block_ids):
            await _recv_into(loop, sock, view)
            if commit is not None:
                commit()  # NOTE: a device pool copies the staged chunk to the device
        trailer = await _recv_bytes(loop, sock, 1)
        if trailer[0] != 0:
            raise TransferError(f"handle {handle.handle_id!r} ended during the pull; the data may be stale")

    async def _checkout(self, handle: HandleRef) -> _Conn:
        idle = self._idle.get(handle.endpoint)
        while idle:
            conn = next((c for c in idle if c.handle_id == handle.handle_id), idle[-1])
            idle.remove(conn)
            if not conn.is_stale():
                self._busy.add(conn)
                return conn
            conn.sock.close()
        if self.tls is not None:
            host, port = split_endpoint(handle.endpoint)
            stream = await tls_connect(host, port, self.tls)
            conn = _Conn(handle.endpoint, stream, TLS_IO)  # type: ignore[arg-type]
        else:
            conn = _Conn(handle.endpoint, await self._connect(handle.endpoint))
        self._busy.add(conn)
        return conn

    def _checkin(self, conn: _Conn, reusable: bool) -> None:
        self._busy.discard(conn)
        idle = self._idle.setdefault(conn.endpoint, [])
        if reusable and len(idle) < self.max_idle_per_endpoint and conn.sock.fileno() >= 0:
            idle.append(conn)
        else:
            conn.sock.close()

    async def _connect(self, endpoint: str) -> socket.socket:
        loop = asyncio.get_running_loop()
        host, port = split_endpoint(endpoint)
        family, kind, proto, _, addr = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, addr)
        except BaseException:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.sock.close()
        self._idle.clear()
        for conn in list(self._busy):  # NOTE: wakes the pull's recv with EOF; the pull closes it
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
