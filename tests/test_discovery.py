"""Discovery: workers found by DNS join and leave the pool at run time."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from router.discovery import DnsDiscovery, parse_dns
from tests.kv_helpers import route_workers, wait_for, worker_load
from tests.procs import Proc, free_port, pdrouter, wait_http_ok


@pytest.mark.unit
async def test_dns_refresh_adds_and_removes_by_difference() -> None:
    answers = [{"10.0.0.1:7000", "10.0.0.2:7000"}, {"10.0.0.2:7000", "10.0.0.3:7000"}, OSError("no dns")]
    added: list[str] = []
    removed: list[str] = []

    async def resolver(name: str, port: int) -> set[str]:
        assert (name, port) == ("workers.ns.svc", 7000)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def remove(address: str) -> None:
        removed.append(address)

    d = DnsDiscovery("dns://workers.ns.svc:7000", resolver=resolver)
    await d.refresh(added.append, remove)
    assert added == ["10.0.0.1:7000", "10.0.0.2:7000"] and removed == []
    await d.refresh(added.append, remove)
    assert added[2:] == ["10.0.0.3:7000"] and removed == ["10.0.0.1:7000"]
    await d.refresh(added.append, remove)  # a failed lookup changes nothing
    assert d.known == {"10.0.0.2:7000", "10.0.0.3:7000"} and len(added) == 3 and len(removed) == 1


@pytest.mark.unit
def test_bad_discovery_urls_are_refused() -> None:
    assert parse_dns("dns://svc:50061") == ("svc", 50061)
    for bad in ("dns://svc", "etcd://x:1/p", "svc:1"):
        with pytest.raises(ValueError, match="dns://NAME:PORT"):
            parse_dns(bad)


@pytest.mark.integration
def test_router_finds_its_worker_by_dns(tmp_path, default_model_dir) -> None:
    wport, hport = free_port(), free_port()
    worker = Proc(
        pdrouter("worker", "--engine", "mock", "--port", str(wport), "--model", str(default_model_dir)),
        tmp_path / "w.log",
    )
    router = Proc(
        pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()),
                 "--model", str(default_model_dir), "--discovery", f"dns://localhost:{wport}",
                 "--discovery-interval-s", "0.2"),
        tmp_path / "r.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{hport}"
    try:
        wait_http_ok(base + "/ready", router, 60)
        body = json.dumps(
            {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        )
        req = urllib.request.Request(
            base + "/v1/chat/completions", body.encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 3
        assert f"worker 127.0.0.1:{wport} joined" in router.log()
        worker.stop()  # localhost still resolves, so the worker stays listed, but unhealthy
        wait_for(lambda: "is unhealthy" in router.log(), what="the stopped worker marked unhealthy")
    finally:
        router.stop()
        worker.stop()


NAME = "workers.pdrouter.test"


def _own_hosts_file(hosts: Path) -> list[str]:
    """A command prefix that runs its command in a mount namespace of its own where /etc/hosts is
    `hosts` (a bind mount: rewriting `hosts` in place changes what the name resolves to there)."""
    return ["unshare", "--mount", "--propagation", "private",
            "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]  # fmt: skip


def _no_own_hosts_file(tmp_path: Path) -> str | None:
    """Why a process cannot get an /etc/hosts of its own here (None: it can)."""
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    probe = tmp_path / "probe-hosts"
    probe.write_text(f"127.0.0.9 {NAME}\n")
    argv = [*_own_hosts_file(probe), "getent", "hosts", NAME]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if run.returncode != 0 or "127.0.0.9" not in run.stdout:
        return (
            f"cannot bind-mount a hosts file in a mount namespace (needs CAP_SYS_ADMIN): {run.stderr.strip()}"
        )
    return None


def _metrics(base: str) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        return r.read().decode()


def _chat_route(base: str, i: int) -> dict[str, str]:
    body = json.dumps({"model": "default", "max_tokens": 3,
                       "messages": [{"role": "user", "content": f"request {i}"}]})  # fmt: skip
    req = urllib.request.Request(
        base + "/v1/chat/completions", body.encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 3
        return route_workers(r.headers["x-pdrouter-route"])


def _worker(tmp_path: Path, model_dir: Path, address: str) -> Proc:
    host, port = address.split(":")
    argv = pdrouter("worker", "--engine", "mock", "--host", host, "--port", port, "--model", str(model_dir))
    return Proc(argv, tmp_path / f"w-{address}.log")


@pytest.mark.integration
def test_a_worker_whose_dns_record_goes_away_leaves_the_pool(tmp_path, default_model_dir) -> None:
    """The real resolution path (getaddrinfo through the router's /etc/hosts, which is a file of
    this test's): NAME resolves to two workers, both serve; then to one: the other, still running
    and healthy, leaves the pool and gets no more requests; then to two again: it rejoins."""
    why = _no_own_hosts_file(tmp_path)
    if why is not None:
        pytest.skip(f"an /etc/hosts of the router's own: {why}")
    port, hport = free_port(), free_port()
    a, b = f"127.0.0.1:{port}", f"127.0.0.2:{port}"
    both = f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n127.0.0.2 {NAME}\n"
    hosts = tmp_path / "hosts"
    hosts.write_text(both)
    workers = {address: _worker(tmp_path, default_model_dir, address) for address in (a, b)}
    router = Proc(
        [*_own_hosts_file(hosts),
         *pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()),
                   "--model", str(default_model_dir), "--discovery", f"dns://{NAME}:{port}",
                   "--discovery-interval-s", "0.2", "--decode-policy", "round_robin")],
        tmp_path / "r.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{hport}"
    try:
        wait_http_ok(base + "/ready", router, 60)
        for address in (a, b):
            wait_for(lambda x=address: f"{x} is healthy" in router.log(), 30, f"the router using {address}")
        assert {_chat_route(base, i)["decode"] for i in range(4)} == {a, b}  # round robin over both
        assert f'worker="{b}"' in _metrics(base)

        hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n")  # NOTE: in place: the bind mount follows
        wait_for(lambda: f"worker {b} left" in router.log(), 15, f"{b} removed from the pool")
        assert workers[b].alive() and worker_load(b).kv_blocks_total > 0  # still up: gone by DNS alone
        assert [_chat_route(base, 10 + i)["decode"] for i in range(4)] == [a] * 4
        metrics = _metrics(base)
        assert f'worker="{a}"' in metrics and f'worker="{b}"' not in metrics  # its series left too

        hosts.write_text(both)
        wait_for(lambda: router.log().count(f"worker {b} joined") == 2, 15, f"{b} back in the pool")
        wait_for(lambda: router.log().count(f"{b} is healthy") == 2, 30, f"the router using {b} again")
        assert {_chat_route(base, 20 + i)["decode"] for i in range(4)} == {a, b}
    finally:
        router.stop()
        for w in workers.values():
            w.stop()
