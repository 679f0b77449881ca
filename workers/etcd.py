"""A small etcd v3 client: what discovery and registration need, nothing more.

Calls: range over a prefix, put, lease grant / keep-alive / revoke, and a prefix watch that
streams events. It speaks etcd's JSON gateway (`POST /v3/...` on the client port, keys and values
base64, 64-bit integers as strings), which every etcd since 3.4 serves: plain HTTP/1.1 over
asyncio streams with httptools parsing, so no generated stubs and no third-party etcd package
(the `etcd3` one is unmaintained). A unary call opens its own connection; a watch holds one,
with TCP keep-alive so a peer that vanished is noticed.

Several endpoints (`etcd://h1:2379,h2:2379/prefix`) are tried in turn; a call that reaches
none raises `EtcdUnavailable`, which callers treat as "retry later, change nothing".

Lives in workers/ (like tls.py) so router and workers share it; it imports neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
import msgspec

DEFAULT_PREFIX = "/pdrouter/workers/"


class EtcdError(Exception):
    """etcd answered with an error (code is the gRPC status code, e.g. 5 NOT_FOUND)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered (refused, timed out, connection lost)."""


class WatchCompacted(EtcdError):
    """The watch's start revision is gone (compacted) or etcd cancelled it: list again."""


@dataclass(frozen=True)
class EtcdTarget:
    endpoints: tuple[tuple[str, int], ...]
    prefix: str


def parse_etcd_url(url: str) -> EtcdTarget:
    """`etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`; the prefix (default /pdrouter/workers/)
    always ends in '/'."""
    parts = urlsplit(url)
    endpoints = [_endpoint(item) for item in parts.netloc.split(",")] if parts.scheme == "etcd" else []
    if not endpoints or None in endpoints:
        raise ValueError(f"wants etcd://HOST:PORT[,HOST:PORT...][/PREFIX]; got {url!r}")
    path = parts.path.rstrip("/")
    return EtcdTarget(tuple(e for e in endpoints if e is not None), path + "/" if path else DEFAULT_PREFIX)


def _endpoint(item: str) -> tuple[str, int] | None:
    host, _, port = item.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return (host, int(port)) if host and port.isdigit() else None


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # NOTE: etcd's "every key"


# -- wire shapes of the JSON gateway (bytes fields are base64 in JSON, as etcd wants) -------------


class RangeRequest(msgspec.Struct, omit_defaults=True):
    key: bytes
    range_end: bytes = b""


class PutRequest(msgspec.Struct, omit_defaults=True):
    key: bytes
    value: bytes
    lease: int = 0


class DeleteRangeRequest(msgspec.Struct, omit_defaults=True):
    key: bytes
    range_end: bytes = b""


class LeaseGrantRequest(msgspec.Struct, rename={"ttl": "TTL"}):
    ttl: int


class LeaseIdRequest(msgspec.Struct, rename={"lease_id": "ID"}):
    lease_id: str  # NOTE: a string: lease ids use all 63 bits, beyond a JSON double


class WatchCreate(msgspec.Struct, omit_defaults=True):
    key: bytes
    range_end: bytes = b""
    start_revision: int = 0


class WatchRequest(msgspec.Struct):
    create_request: WatchCreate


class Header(msgspec.Struct):
    revision: int = 0


class KeyValue(msgspec.Struct):
    key: bytes
    value: bytes = b""
    mod_revision: int = 0
    lease: int = 0


class RangeResponse(msgspec.Struct):
    header: Header = msgspec.field(default_factory=Header)
    kvs: list[KeyValue] = []


class RevisionResponse(msgspec.Struct):
    header: Header = msgspec.field(default_factory=Header)


class Lease(msgspec.Struct, rename={"lease_id": "ID", "ttl": "TTL"}):
    lease_id: int = 0
    ttl: int = 0  # NOTE: 0 in a keep-alive answer: the lease is gone (expired or revoked)


class KeepAliveLine(msgspec.Struct):
    result: Lease | None = None


class Event(msgspec.Struct):
    kv: KeyValue
    type: str = "PUT"  # NOTE: the gateway leaves out enum defaults: no type is PUT


class WatchResult(msgspec.Struct):
    header: Header = msgspec.field(default_factory=Header)
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: list[Event] = []


class WatchLine(msgspec.Struct):
    result: WatchResult | None = None
    error: msgspec.Raw | None = None


class ErrorBody(msgspec.Struct):
    message: str = ""
    error: str = ""
    code: int = 0


_ENCODER = msgspec.json.Encoder()
_RANGE = msgspec.json.Decoder(RangeResponse, strict=False)
_REVISION = msgspec.json.Decoder(RevisionResponse, strict=False)
_LEASE = msgspec.json.Decoder(Lease, strict=False)
_KEEPALIVE = msgspec.json.Decoder(KeepAliveLine, strict=False)
_WATCH = msgspec.json.Decoder(WatchLine, strict=False)
_ERROR = msgspec.json.Decoder(ErrorBody, strict=False)


# -- HTTP/1.1 ------------------------------------------------------------------------------------


class _Reply:
    """httptools callbacks for one response: status, body bytes, complete or not."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.body = bytearray()
        self.headers_done = False
        self.done = False

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True

    @property
    def status(self) -> int:
        return self.parser.get_status_code()

    def feed(self, data: bytes) -> None:
        if not data:
            raise EtcdUnavailable("etcd closed the connection mid-answer")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise EtcdUnavailable(f"bad HTTP from etcd: {exc}") from None

    def error(self) -> EtcdError:
        try:
            body = _ERROR.decode(bytes(self.body))
            return EtcdError(body.message or body.error or f"HTTP {self.status}", body.code)
        except msgspec.DecodeError:
            return EtcdError(f"HTTP {self.status}: {bytes(self.body[:200])!r}")


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # NOTE: Linux names; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class EtcdClient:
    def __init__(self, endpoints: tuple[tuple[str, int], ...], timeout_s: float = 3.0) -> None:
        if not endpoints:
            raise ValueError("etcd: no endpoints")
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self._current = 0  # NOTE: the endpoint that answered last; the next call starts there

    # -- calls -----------------------------------------------------------------------------------

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under `prefix` and the store revision they were read at."""
        key = prefix.encode()
        reply = _RANGE.decode(await self._call("/v3/kv/range", RangeRequest(key, prefix_end(key))))
        return reply.header.revision, reply.kvs

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        reply = _REVISION.decode(await self._call("/v3/kv/put", PutRequest(key.encode(), value, lease_id)))
        return reply.header.revision

    async def delete(self, key: str) -> int:
        reply = _REVISION.decode(await self._call("/v3/kv/deleterange", DeleteRangeRequest(key.encode())))
        return reply.header.revision

    async def grant(self, ttl_s: int) -> Lease:
        """A new lease; etcd may raise the TTL to its minimum (2 s by default)."""
        return _LEASE.decode(await self._call("/v3/lease/grant", LeaseGrantRequest(ttl_s)))

    async def keep_alive(self, lease_id: int) -> int:
        """Renew once; the lease's TTL from now, or 0 when the lease is gone."""
        body = await self._call("/v3/lease/keepalive", LeaseIdRequest(str(lease_id)))
        line = _KEEPALIVE.decode(body.strip() or b"{}")
        return line.result.ttl if line.result is not None else 0

    async def revoke(self, lease_id: int) -> None:
        """Drop the lease and every key attached to it; a lease already gone is not an error."""
        try:
            await self._call("/v3/lease/revoke", LeaseIdRequest(str(lease_id)))
        except EtcdError as exc:
            if exc.code != 5 or isinstance(exc, EtcdUnavailable):  # 5: NOT_FOUND
                raise

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchResult]:
        """Every change under `prefix` from `start_revision` on, batch by batch, until the
        connection breaks (EtcdUnavailable) or etcd cancels the watch (WatchCompacted)."""
        key = prefix.encode()
        request = WatchRequest(WatchCreate(key, prefix_end(key), start_revision))
        async for line in self._stream("/v3/watch", request):
            msg = _WATCH.decode(line)
            if msg.error is not None:
                raise EtcdUnavailable(f"etcd watch error: {bytes(msg.error)[:200]!r}")
            result = msg.result
            if result is None:
                continue
            if result.canceled:
                why = f"compacted at {result.compact_revision}" if result.compact_revision else "cancelled"
                raise WatchCompacted(f"etcd watch {why} {result.cancel_reason}".strip())
            if result.events:
                yield result

    # -- transport ---------------------------------------------------------------------------------

    async def _call(self, path: str, request: msgspec.Struct) -> bytes:
        reader, writer = await self._connect()
        try:
            async with asyncio.timeout(self.timeout_s):
                writer.write(self._head(path, _ENCODER.encode(request), close=True))
                reply = _Reply()
                while not reply.done:
                    reply.feed(await reader.read(65536))
        except (OSError, TimeoutError) as exc:
            self._current += 1
            raise EtcdUnavailable(f"etcd {path}: {exc!r}") from None
        finally:
            writer.close()
        if reply.status != 200:
            raise reply.error()
        return bytes(reply.body)

    async def _stream(self, path: str, request: msgspec.Struct) -> AsyncIterator[bytes]:
        """The lines of a streaming answer (the gateway writes one JSON message per line)."""
        reader, writer = await self._connect()
        try:
            writer.write(self._head(path, _ENCODER.encode(request), close=False))
            reply = _Reply()
            while not reply.done:
                try:
                    data = await reader.read(65536)
                except OSError as exc:
                    raise EtcdUnavailable(f"etcd {path}: {exc!r}") from None
                reply.feed(data)
                if not reply.headers_done or reply.status != 200:
                    continue  # NOTE: an error answer is read whole, then raised below
                *lines, rest = reply.body.split(b"\n")
                reply.body = bytearray(rest)
                for line in lines:
                    if line.strip():
                        yield bytes(line)
            if reply.status != 200:
                raise reply.error()
            if reply.body.strip():
                yield bytes(reply.body)
        finally:
            writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        errors = []
        for i in range(len(self.endpoints)):
            index = (self._current + i) % len(self.endpoints)
            host, port = self.endpoints[index]
            try:
                async with asyncio.timeout(self.timeout_s):
                    reader, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{host}:{port}: {exc.strerror if isinstance(exc, OSError) else 'timed out'}")
                continue
            with contextlib.suppress(OSError):
                _keepalive(writer.get_extra_info("socket"))
            self._current = index
            return reader, writer
        raise EtcdUnavailable("no etcd endpoint answered (" + "; ".join(errors) + ")")

    def _head(self, path: str, body: bytes, close: bool) -> bytes:
        host, port = self.endpoints[self._current % len(self.endpoints)]
        host = f"[{host}]" if ":" in host else host
        return (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{'Connection: close' if close else 'Connection: keep-alive'}"
            "\r\n\r\n"
        ).encode() + body
