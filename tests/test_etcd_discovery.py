"""Discovery through etcd with real processes: workers `--register` under a prefix with a lease,
the router `--discovery etcd://...` watches it. A worker that joins takes requests; one killed
with SIGKILL is dropped when its lease expires, with no request lost (the router migrates the
streams it held); one sent SIGTERM deregisters at once and still finishes its streams."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import pytest

from tests.etcd_server import EtcdServer
from tests.kv_helpers import route_workers, wait_for
from tests.procs import Proc, free_port, pdrouter, wait_http_ok
from workers.etcd import EtcdClient

pytestmark = pytest.mark.integration

TTL_S = 2  # NOTE: etcd's smallest lease TTL (it raises 1 to 2)


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path)
    yield server
    server.stop()


class Cluster:
    """Workers and one router on 127.0.0.1, all found through one etcd prefix."""

    def __init__(self, tmp: Path, model_dir: Path, etcd: EtcdServer, ttl_s: int, delay_ms: str) -> None:
        self.tmp, self.model_dir, self.etcd = tmp, str(model_dir), etcd
        self.url = etcd.url("/test/workers")
        self.ttl_s, self.delay_ms = ttl_s, delay_ms
        self.workers: dict[str, Proc] = {}
        self.router: Proc | None = None
        self.base = ""

    def add_worker(self) -> str:
        port = free_port()
        address = f"127.0.0.1:{port}"
        self.workers[address] = Proc(
            pdrouter("worker", "--engine", "mock", "--port", str(port), "--model", self.model_dir,
                     "--mock-token-delay-ms", self.delay_ms,
                     "--register", self.url, "--register-ttl-s", str(self.ttl_s)),
            self.tmp / f"worker-{port}.log",
        )  # fmt: skip
        return address

    def start_router(self) -> None:
        hport = free_port()
        self.router = Proc(
            pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()),
                     "--model", self.model_dir, "--discovery", self.url, "--decode-policy", "round_robin"),
            self.tmp / "router.log",
        )  # fmt: skip
        self.base = f"http://127.0.0.1:{hport}"
        wait_http_ok(self.base + "/ready", self.router, 60)

    def wait_healthy(self, address: str) -> None:
        wait_for(lambda: f"worker {address} is healthy" in self.log(), 30, f"the router using {address}")

    def log(self) -> str:
        return self.router.log() if self.router is not None else ""

    def registered(self) -> set[str]:
        _, kvs = asyncio.run(EtcdClient((("127.0.0.1", self.etcd.port),)).get_prefix("/test/workers/"))
        return {msgspec.json.decode(kv.value)["address"] for kv in kvs}

    def stop(self) -> None:
        for p in [self.router, *self.workers.values()]:
            if p is not None:
                p.stop()


@pytest.fixture
def cluster(request, tmp_path, default_model_dir, etcd):
    ttl_s, delay_ms = getattr(request, "param", (TTL_S, "5"))
    c = Cluster(tmp_path, default_model_dir, etcd, ttl_s, delay_ms)
    yield c
    c.stop()


def _complete(base: str, content: str, tokens: int) -> tuple[int, str, int]:
    """(HTTP status, decode worker, completion tokens) of one non-streaming request."""
    body = {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    req = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            decode = route_workers(r.headers["x-pdrouter-route"])["decode"]
            return r.status, decode, json.loads(r.read())["usage"]["completion_tokens"]
    except urllib.error.HTTPError as e:
        return e.code, "", 0


class Load:
    """Requests back to back from a few threads until stopped; every result kept."""

    def __init__(self, base: str, threads: int = 4, tokens: int = 20) -> None:
        self.base, self.tokens = base, tokens
        self.results: list[tuple[int, str, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _loop(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.results.append(_complete(self.base, f"load {i} request {n}", self.tokens))
            except OSError as exc:  # NOTE: a transport failure is a failed request too
                self.errors.append(repr(exc))
            n += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def test_workers_join_and_a_killed_one_leaves_within_its_lease(cluster) -> None:
    first = [cluster.add_worker(), cluster.add_worker()]
    cluster.start_router()
    for address in first:
        cluster.wait_healthy(address)

    third = cluster.add_worker()  # joins a running router through etcd alone
    cluster.wait_healthy(third)
    assert cluster.registered() == {*first, third}
    routes = [_complete(cluster.base, f"after the join {i}", 4) for i in range(6)]
    assert all(status == 200 and n == 4 for status, _, n in routes)
    assert {decode for _, decode, _ in routes} == {*first, third}  # round robin reaches it

    victim = first[0]
    load = Load(cluster.base)
    try:
        wait_for(lambda: len(load.results) >= 8, 30, "load running")
        before = len(load.results)
        os.kill(cluster.workers[victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: f"worker {victim} left" in cluster.log(), cluster.ttl_s + 8, "the lease expiring")
        removed_after = time.monotonic() - killed
        wait_for(lambda: len(load.results) >= before + 12, 30, "load going on after the removal")
    finally:
        load.stop()
    migrated = cluster.log().count("migrating")
    print(f"killed worker removed after {removed_after:.2f} s (lease TTL {cluster.ttl_s} s); "
          f"{len(load.results)} requests, {migrated} streams migrated")  # fmt: skip
    assert removed_after <= cluster.ttl_s + 2.0  # NOTE: expiry is checked every ~0.5 s; slack for 2 cores
    assert cluster.registered() == {first[1], third}
    assert load.errors == []
    failed = [r for r in load.results if r[0] != 200 or r[2] != load.tokens]
    assert failed == [], f"{len(failed)} of {len(load.results)} requests failed"
    late = [_complete(cluster.base, f"after the kill {i}", 4)[1] for i in range(4)]
    assert victim not in late and set(late) == {first[1], third}


@pytest.mark.parametrize("cluster", [(10, "50")], indirect=True)  # NOTE: TTL 10 s: only a revoke is quick
def test_sigterm_deregisters_at_once_and_its_streams_finish(cluster) -> None:
    workers = [cluster.add_worker(), cluster.add_worker()]
    cluster.start_router()
    for address in workers:
        cluster.wait_healthy(address)

    body = {"model": "default", "messages": [{"role": "user", "content": "a long stream"}],
            "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(
        cluster.base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as stream:
        victim = route_workers(stream.headers["x-pdrouter-route"])["decode"]
        other = next(a for a in workers if a != victim)
        assert stream.readline().startswith(b"data: ")  # tokens flowing (40 x 50 ms: ~2 s in all)
        os.kill(cluster.workers[victim].pid, signal.SIGTERM)
        sent = time.monotonic()
        wait_for(lambda: f"worker {victim} left" in cluster.log(), 5, "the revoke reaching the router")
        left_after = time.monotonic() - sent
        assert cluster.registered() == {other}
        assert _complete(cluster.base, "while it drains", 4)[1] == other
        lines = [ln for ln in stream.read().decode().splitlines() if ln.startswith("data: {")]
    usage = json.loads(lines[-1][len("data: ") :])["usage"]
    print(f"SIGTERM: worker left the router's pool after {left_after:.2f} s (lease TTL 10 s)")
    assert usage["completion_tokens"] == 40
    assert left_after < 3.0
    assert "migrating" not in cluster.log()  # the stream finished where it ran
    assert cluster.workers[victim].proc.wait(timeout=30) == 0
    assert "deregistered from etcd" in cluster.workers[victim].log()
