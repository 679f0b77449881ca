"""Faults: a stalled worker (SIGSTOP), a dead prefill worker, a request deadline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from tests.kv_helpers import wait_for, worker_load
from tests.procs import PrefillDecode, Proc, free_port, pdrouter, wait_http_ok
from tests.test_migration import _start, _streams

pytestmark = pytest.mark.integration


def test_stalled_worker_streams_migrate_and_match(tmp_path, default_model_dir) -> None:
    workers, router, base = _start(tmp_path, default_model_dir, "--stream-idle-timeout-s", "1.5")
    stopped: list[Proc] = []
    try:
        reference = asyncio.run(_streams(base))

        def stall(routes: list[str]) -> None:
            victim = workers[routes[0]]
            os.kill(victim.pid, signal.SIGSTOP)  # alive, connected, silent
            stopped.append(victim)

        assert asyncio.run(_streams(base, stall)) == reference
        assert "sent nothing for 1.5 s" in router.log()
        wait_for(lambda: "silent for" in router.log(), what="the stalled worker ejected")
    finally:
        for p in stopped:
            os.kill(p.pid, signal.SIGCONT)
        router.stop()
        for w in workers.values():
            w.stop()


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_dead_prefill_worker_requests_still_complete(tmp_path, default_model_dir) -> None:
    pd = PrefillDecode(tmp_path, default_model_dir, token_delay_ms=2)
    body = {"model": "default", "max_tokens": 6, "messages": [{"role": "user", "content": "w " * 120}]}
    try:
        status, reply = _post(pd.base + "/v1/chat/completions", body)
        assert status == 200 and reply["usage"]["completion_tokens"] == 6
        pd.prefill.proc.kill()
        for i in range(5):  # the prefill pool is gone: the decode worker prefills locally
            body["messages"][0]["content"] = f"{i} " + "w " * 120
            status, reply = _post(pd.base + "/v1/chat/completions", body)
            assert status == 200 and reply["usage"]["completion_tokens"] == 6, reply
        assert worker_load(pd.workers[1]).kv_blocks_used == 0
    finally:
        pd.stop()


def test_request_deadline_ends_the_work(tmp_path, default_model_dir) -> None:
    port, hport = free_port(), free_port()
    worker = Proc(
        pdrouter("worker", "--engine", "mock", "--port", str(port), "--model", str(default_model_dir),
                 "--mock-token-delay-ms", "50"),
        tmp_path / "w.log",
    )  # fmt: skip
    router = Proc(
        pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()),
                 "--model", str(default_model_dir), "--worker", f"127.0.0.1:{port}"),
        tmp_path / "r.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{hport}"
    body = {"model": "default", "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]}
    try:
        wait_http_ok(base + "/ready", router, 60)
        t0 = time.monotonic()
        status, reply = _post(base + "/v1/chat/completions", body, {"x-request-timeout": "0.5"})
        assert status == 504 and time.monotonic() - t0 < 5
        assert set(reply["error"]) == {"message", "type", "param", "code"}
        assert reply["error"]["code"] == "deadline_exceeded" and "0.5 s" in reply["error"]["message"]
        wait_for(lambda: worker_load(f"127.0.0.1:{port}").kv_blocks_used == 0, what="the work cancelled")
        status, reply = _post(base + "/v1/chat/completions", body, {"x-request-timeout": "soon"})
        assert status == 400 and reply["error"]["param"] == "x-request-timeout"
    finally:
        router.stop()
        worker.stop()
