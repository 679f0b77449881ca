"""The router with its workers gone: 503 with a message, never dies, recovers when they return."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.kv_helpers import wait_for
from tests.procs import Proc, free_port, pdrouter, wait_http_ok

pytestmark = pytest.mark.integration


def _status(url: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_status(url: str, want: int, timeout: float = 30, body: bytes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _status(url, body)[0] == want:
            return
        time.sleep(0.05)  # poll interval
    raise TimeoutError(f"{url} never answered {want}")


def _worker(tmp_path, port: int, model: str) -> Proc:
    return Proc(
        pdrouter("worker", "--engine", "mock", "--port", str(port), "--model", model),
        tmp_path / f"w{port}-{time.monotonic_ns()}.log",
    )


def test_all_workers_down_then_back(tmp_path, default_model_dir) -> None:
    wport, hport, gport = free_port(), free_port(), free_port()
    worker = _worker(tmp_path, wport, str(default_model_dir))
    router = Proc(
        pdrouter(
            "router",
            "--port",
            str(hport),
            "--grpc-port",
            str(gport),
            "--worker",
            f"127.0.0.1:{wport}",
            "--model",
            str(default_model_dir),
        ),
        tmp_path / "router.log",
    )
    base = f"http://127.0.0.1:{hport}"
    body = json.dumps(
        {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    ).encode()
    try:
        wait_http_ok(base + "/ready", router, 60)
        assert _status(base + "/v1/chat/completions", body)[0] == 200
        worker.stop()
        _wait_status(base + "/ready", 503)
        status, payload = _status(base + "/v1/chat/completions", body)
        assert status == 503 and "No healthy decode worker" in payload["error"]["message"]
        assert _status(base + "/health")[0] == 200 and router.alive()
        worker = _worker(tmp_path, wport, str(default_model_dir))
        _wait_status(base + "/ready", 200)
        assert _status(base + "/v1/chat/completions", body)[0] == 200
    finally:
        worker.stop()
        router.stop()


def test_serve_reports_a_dead_child(tmp_path, default_model_dir) -> None:
    serve = Proc(
        pdrouter(
            "serve",
            "--engine",
            "mock",
            "--port",
            str(free_port()),
            "--grpc-port",
            str(free_port()),
            "--worker-arg=--mock-timing=oops",
        ),
        tmp_path / "serve.log",
    )
    try:
        code = serve.proc.wait(timeout=60)
    finally:
        serve.stop()
    assert code == 1
    log = serve.log()
    assert "--mock-timing wants six comma-separated numbers" in log
    assert "exited with code" in log


def test_ready_waits_for_ready_min_workers_at_start_only(tmp_path, default_model_dir) -> None:
    """`serve` passes every worker it starts: a stack is ready as asked for, not half of it; once
    it was, losing one worker (that serve is restarting, say) keeps the router ready."""
    ports = [free_port(), free_port()]
    hport, gport = free_port(), free_port()
    workers = [_worker(tmp_path, ports[0], str(default_model_dir))]
    argv = ["router", "--port", str(hport), "--grpc-port", str(gport), "--model", str(default_model_dir)]
    for p in ports:
        argv += ["--worker", f"127.0.0.1:{p}"]
    router = Proc(pdrouter(*argv, "--ready-min-workers", "2"), tmp_path / "router.log")
    base = f"http://127.0.0.1:{hport}"
    body = json.dumps(
        {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    ).encode()
    try:
        wait_http_ok(base + "/health", router, 60)
        _wait_status(base + "/v1/chat/completions", 200, body=body)  # NOTE: one worker routes already
        assert _status(base + "/ready")[0] == 503
        workers.append(_worker(tmp_path, ports[1], str(default_model_dir)))
        _wait_status(base + "/ready", 200)
        workers.pop().stop()
        down = f"127.0.0.1:{ports[1]} is unhealthy"
        wait_for(lambda: down in router.log(), what="the router sees the second worker down")
        assert _status(base + "/ready")[0] == 200
    finally:
        for w in workers:
            w.stop()
        router.stop()
