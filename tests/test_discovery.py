"""Discovery: workers found by DNS join and leave the pool at run time."""

from __future__ import annotations

import json
import urllib.request

import pytest

from router.discovery import DnsDiscovery, parse_dns
from tests.kv_helpers import wait_for
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
