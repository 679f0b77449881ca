"""The etcd client (workers/etcd.py), registration and EtcdDiscovery against a real etcd:
wire shapes, leases, the watch, and what an etcd outage does (nothing to the pool)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import pytest

from router.discovery import EtcdDiscovery, make_discovery
from tests.etcd_server import EtcdServer
from workers.etcd import (
    DEFAULT_PREFIX,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    WatchCompacted,
    parse_etcd_url,
    prefix_end,
)
from workers.registration import Registration, WorkerRecord


async def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)  # poll interval


class Compaction(msgspec.Struct):
    revision: int


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path)
    yield server
    server.stop()


# -- unit ----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_urls() -> None:
    t = parse_etcd_url("etcd://10.0.0.1:2379/pdrouter/prod")
    assert t.endpoints == (("10.0.0.1", 2379),) and t.prefix == "/pdrouter/prod/"
    t = parse_etcd_url("etcd://a:1,b:2,[::1]:3/p/")
    assert t.endpoints == (("a", 1), ("b", 2), ("::1", 3)) and t.prefix == "/p/"
    assert parse_etcd_url("etcd://a:1").prefix == parse_etcd_url("etcd://a:1/").prefix == DEFAULT_PREFIX
    for bad in ("etcd://a/p", "etcd://:1/p", "etcd://a:1,b/p", "dns://a:1", "a:1/p", "etcd://a:x/p"):
        with pytest.raises(ValueError, match=r"etcd://HOST:PORT"):
            parse_etcd_url(bad)
    with pytest.raises(ValueError, match=r"--discovery wants etcd://"):
        make_discovery("etcd://nohost/p")


@pytest.mark.unit
def test_prefix_end() -> None:
    assert prefix_end(b"/w/") == b"/w0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


@pytest.mark.unit
def test_gateway_json_shapes() -> None:
    """What the gateway sends: int64 as strings, bytes as base64, enum defaults left out."""
    from workers.etcd import _KEEPALIVE, _RANGE, _WATCH, LeaseIdRequest, PutRequest

    got = _RANGE.decode(
        b'{"header":{"revision":"7"},"kvs":[{"key":"L3cvYQ==","value":"dg==","mod_revision":"5",'
        b'"lease":"4111120216175796999"}],"count":"1"}'
    )
    assert got.header.revision == 7 and got.kvs[0].key == b"/w/a" and got.kvs[0].lease == 4111120216175796999
    assert _RANGE.decode(b'{"header":{"revision":"1"}}').kvs == []
    assert _KEEPALIVE.decode(b'{"result":{"ID":"9","TTL":"10"}}').result.ttl == 10
    assert _KEEPALIVE.decode(b'{"result":{"ID":"9"}}').result.ttl == 0  # gone
    line = _WATCH.decode(
        b'{"result":{"events":[{"kv":{"key":"YQ=="}},{"type":"DELETE","kv":{"key":"Yg=="}}]}}'
    )
    assert [(e.type, e.kv.key) for e in line.result.events] == [("PUT", b"a"), ("DELETE", b"b")]
    assert msgspec.json.encode(PutRequest(b"k", b"v")) == b'{"key":"aw==","value":"dg=="}'
    assert msgspec.json.encode(LeaseIdRequest("12")) == b'{"ID":"12"}'


@pytest.mark.unit
async def test_no_endpoint_answering_is_unavailable() -> None:
    from tests.procs import free_port

    client = EtcdClient((("127.0.0.1", free_port()), ("127.0.0.1", free_port())), timeout_s=1)
    with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
        await client.get_prefix("/x/")


@pytest.mark.unit
async def test_discovery_applies_puts_and_deletes_by_address() -> None:
    """Keys map to the record's address; a value that is not a record falls back to the key."""
    from workers.etcd import Event, KeyValue, WatchResult

    d = EtcdDiscovery("etcd://h:1/w")
    added: list[str] = []
    removed: list[str] = []

    async def remove(address: str) -> None:
        removed.append(address)

    async def watch(prefix: str, start: int):
        assert (prefix, start) == ("/w/", 8)
        record = msgspec.json.encode(WorkerRecord(address="10.0.0.9:1"))
        yield WatchResult(events=[Event(KeyValue(b"/w/x", record)), Event(KeyValue(b"/w/a:1"), "DELETE")])

    async def get_prefix(prefix: str):
        return 7, [KeyValue(b"/w/a:1", b"not json"), KeyValue(b"/w/b:2", b"")]

    d.client.get_prefix, d.client.watch_prefix = get_prefix, watch  # type: ignore[method-assign]
    assert await d.sync(added.append, remove) == 8
    await d.watch(added.append, remove, 8)
    assert added == ["a:1", "b:2", "10.0.0.9:1"] and removed == ["a:1"]
    assert d.known == {"b:2", "10.0.0.9:1"}


# -- against a real etcd -------------------------------------------------------------------------


@pytest.mark.integration
async def test_client_kv_lease_and_watch(etcd) -> None:
    client = EtcdClient((("127.0.0.1", etcd.port),))
    lease = await client.grant(2)
    assert lease.lease_id > 0 and lease.ttl >= 2  # NOTE: ids use up to 63 bits: they travel as strings
    rev = await client.put("/t/a", b"1", lease.lease_id)
    await client.put("/t0", b"not under /t/")
    start, kvs = await client.get_prefix("/t/")
    assert start >= rev and [(kv.key, kv.value, kv.lease) for kv in kvs] == [(b"/t/a", b"1", lease.lease_id)]
    assert await client.keep_alive(lease.lease_id) >= 2

    events: list[tuple[str, bytes]] = []

    async def watch() -> None:
        async for batch in client.watch_prefix("/t/", start + 1):
            events.extend((e.type, e.kv.key) for e in batch.events)

    task = asyncio.create_task(watch())
    try:
        await client.put("/t/b", b"2")
        await client.delete("/t/b")
        await client.revoke(lease.lease_id)  # its key goes with it
        await client.revoke(lease.lease_id)  # already gone: not an error
        await until(lambda: len(events) == 3, what="three watch events")
        assert events == [("PUT", b"/t/b"), ("DELETE", b"/t/b"), ("DELETE", b"/t/a")]
        assert await client.keep_alive(lease.lease_id) == 0
        assert (await client.get_prefix("/t/"))[1] == []
    finally:
        task.cancel()
    with pytest.raises(EtcdError) as bad:
        await client.put("/t/c", b"x", lease_id=12345)  # no such lease
    assert bad.value.code == 5 and "lease not found" in str(bad.value)


@pytest.mark.integration
async def test_watch_from_a_compacted_revision_says_so(etcd) -> None:
    client = EtcdClient((("127.0.0.1", etcd.port),))
    for i in range(3):
        rev = await client.put("/c/k", str(i).encode())
    await client._call("/v3/kv/compaction", Compaction(rev))
    with pytest.raises(WatchCompacted, match="compacted"):
        async for _ in client.watch_prefix("/c/", 1):
            pass
    assert rev > 1


@pytest.mark.integration
async def test_an_expired_lease_is_registered_again(etcd) -> None:
    """etcd loses the lease (here: revoked behind the worker's back): the next keep-alive sees
    TTL 0 and the worker registers again under a new lease."""
    reg = Registration(etcd.url("/r"), [WorkerRecord(address="10.1.1.1:5", role="decode")], ttl_s=2)
    client = EtcdClient((("127.0.0.1", etcd.port),))
    reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        first = reg.lease_id
        _, kvs = await client.get_prefix("/r/")
        assert [msgspec.json.decode(kv.value) for kv in kvs] == [{"address": "10.1.1.1:5", "role": "decode"}]
        await client.revoke(first)
        await until(lambda: reg.lease_id not in (0, first), what="a new lease")
        _, kvs = await client.get_prefix("/r/")
        assert [kv.lease for kv in kvs] == [reg.lease_id]
    finally:
        await reg.close()
    assert (await client.get_prefix("/r/"))[1] == []  # close() revoked it


@pytest.mark.integration
async def test_discovery_keeps_its_workers_while_etcd_is_down(etcd, caplog) -> None:
    client = EtcdClient((("127.0.0.1", etcd.port),))
    d = EtcdDiscovery(etcd.url("/d"))
    pool: set[str] = set()

    async def remove(address: str) -> None:
        pool.discard(address)

    task = asyncio.create_task(d.run(pool.add, remove))
    try:
        await client.put("/d/a:1", msgspec.json.encode(WorkerRecord(address="a:1")))
        await client.put("/d/b:2", msgspec.json.encode(WorkerRecord(address="b:2")))
        await until(lambda: pool == {"a:1", "b:2"}, what="both workers added")
        await client.delete("/d/a:1")
        await until(lambda: pool == {"b:2"}, what="a:1 removed")
        etcd.stop()

        def failures() -> int:
            return sum("etcd discovery:" in r.getMessage() for r in caplog.records)

        await until(lambda: failures() >= 3, what="three failed rounds while etcd is down")
        assert pool == {"b:2"}
        etcd.start()  # same data: b:2 is still there; c:3 joined while the router could not watch
        await client.put("/d/c:3", msgspec.json.encode(WorkerRecord(address="c:3")))
        await until(lambda: pool == {"b:2", "c:3"}, 15, "the watch back after the outage")
    finally:
        task.cancel()
