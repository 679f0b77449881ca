"""Many hosts, simulated: a prefill worker and a decode worker each in its own network namespace,
found through etcd by a router in the root namespace, serving disaggregated requests with the
KV cache pulled over TCP from one namespace to the other (tests/netns.py has the layout)."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request

import msgspec
import pytest

from tests import netns
from tests.etcd_server import EtcdServer, etcd_binary
from tests.kv_helpers import route_workers, wait_for, worker_load
from tests.procs import Proc, free_port, pdrouter, wait_http_ok
from workers.etcd import EtcdClient

pytestmark = pytest.mark.integration

PREFIX = "/netns/workers"


@pytest.fixture
def hosts():
    etcd_binary()  # NOTE: a missing etcd fails here, before anything is skipped for namespaces
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"network namespaces: {why}")
    h = netns.Hosts(["prefill", "decode"])
    yield h
    h.close()


def _net_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_disaggregated_across_namespaces_found_through_etcd(tmp_path, default_model_dir, hosts) -> None:
    etcd = EtcdServer(tmp_path, host=hosts.root_ip)  # NOTE: on the bridge: reachable from every host
    procs: list[Proc] = []
    try:
        ports = {"prefill": free_port(), "decode": free_port()}
        addresses = {role: f"{hosts.ips[role]}:{port}" for role, port in ports.items()}
        for role, port in ports.items():
            argv = pdrouter("worker", "--engine", "mock", "--role", role, "--model", str(default_model_dir),
                            "--host", hosts.ips[role], "--port", str(port), "--kv-transfer", "tcp",
                            "--mock-token-delay-ms", "1", "--register", etcd.url(PREFIX))  # fmt: skip
            procs.append(Proc(hosts.argv(role, *argv), tmp_path / f"{role}.log"))
        hport = free_port()
        router = Proc(
            pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()),
                     "--model", str(default_model_dir), "--discovery", etcd.url(PREFIX),
                     "--local-prefill-max-tokens", "16"),
            tmp_path / "router.log",
        )  # fmt: skip
        procs.append(router)
        base = f"http://127.0.0.1:{hport}"
        wait_http_ok(base + "/ready", router, 60)
        for address in addresses.values():
            wait_for(lambda a=address: f"{a} is healthy" in router.log(), 30, f"the router using {address}")

        for p in procs[:2]:  # each worker in a namespace of its own, not the router's
            assert _net_ns(p.pid) not in (_net_ns(os.getpid()), _net_ns(router.pid))
        assert _net_ns(procs[0].pid) != _net_ns(procs[1].pid)
        _, kvs = asyncio.run(EtcdClient(((hosts.root_ip, etcd.port),)).get_prefix(PREFIX + "/"))
        records = {msgspec.json.decode(kv.value)["address"]: msgspec.json.decode(kv.value) for kv in kvs}
        assert {a: r["role"] for a, r in records.items()} == {v: k for k, v in addresses.items()}

        for i in range(3):
            prompt = f"request {i} across hosts: " + " ".join(f"w{i}x{j}" for j in range(80))
            body = {"model": "default", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
            req = urllib.request.Request(
                base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                route = route_workers(r.headers["x-pdrouter-route"])
                reply = json.loads(r.read())
            assert route == {"mode": "disaggregated", **addresses}
            assert reply["usage"]["completion_tokens"] == 8
        wait_for(lambda: worker_load(addresses["decode"]).kv_transfer.pulls >= 3, what="three pulls counted")
        pulled = worker_load(addresses["decode"]).kv_transfer
        assert pulled.pull_failures == 0 and pulled.blocks_pulled >= 3 * 5 and pulled.bytes_pulled > 0
        assert worker_load(addresses["prefill"]).kv_transfer.handles_published >= 3
    finally:
        for p in procs:
            p.stop()
        etcd.stop()
