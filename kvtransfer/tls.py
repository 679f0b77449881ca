"""Mutual TLS for the KV transfer listener and the pullers that dial it: each side presents a
certificate that the deployment's CA signed, and checks the other's against that CA.

asyncio's `loop.sock_*` calls do not take SSL sockets, so a TLS connection runs on asyncio
streams. `TlsStream` (the few socket methods tcp.py calls) and `TLS_IO` (the loop's
`sock_recv_into` / `sock_sendall`) stand in for them, so tcp.py keeps one request code path and
a plain connection keeps its raw socket calls (`recv_into` straight into the pool, `sendmsg`
straight from it) untouched. TLS copies: bytes are encrypted and decrypted on the way anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Sequence

STREAM_LIMIT = 1 << 20  # reader buffer; the default 64 KiB pauses reading too often for bulk KV


def server_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """The listener's side: its certificate, and a client certificate from `client_ca` required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """The puller's side: its own certificate, and the listener's checked against `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    # NOTE: a listener is dialled at the address it publishes (a pod IP, usually in no
    # certificate); the chain must still lead to the deployment's own CA
    ctx.check_hostname = False
    return ctx


class TlsStream:
    """A TLS connection, shaped like the raw socket tcp.py uses (only what it calls)."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def sendmsg(self, parts: Sequence) -> int:
        raise BlockingIOError  # NOTE: tcp._send_parts then sends each part through TLS_IO

    def recv(self, size: int, flags: int = 0) -> bytes:
        """Only the peek at an idle connection and the drain after an error reply call this."""
        if self.reader.at_eof() or self.writer.is_closing():
            return b""
        raise BlockingIOError

    def shutdown(self, how: int) -> None:
        if how == socket.SHUT_WR:
            self.writer.close()  # NOTE: what is buffered (an error reply) still goes out
        else:
            self.writer.transport.abort()  # wakes a pending read with EOF

    def close(self) -> None:
        self.writer.close()

    def fileno(self) -> int:
        sock = self.writer.get_extra_info("socket")
        return -1 if sock is None or self.writer.is_closing() else sock.fileno()


class _TlsIo:
    """The event loop's `sock_*` calls, for a TlsStream."""

    async def sock_recv_into(self, stream: TlsStream, view: memoryview) -> int:
        data = await stream.reader.read(len(view))
        view[: len(data)] = data
        return len(data)

    async def sock_sendall(self, stream: TlsStream, data) -> None:
        # NOTE: a copy: the TLS transport may hold the data past drain(), and a view of the KV
        # pool must not be read after the trailer said the handle was still pinned
        stream.writer.write(bytes(data))
        await stream.writer.drain()


TLS_IO = _TlsIo()


async def connect(host: str, port: int, ctx: ssl.SSLContext) -> TlsStream:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=host, limit=STREAM_LIMIT
    )
    nodelay(writer)
    return TlsStream(reader, writer)


def nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
