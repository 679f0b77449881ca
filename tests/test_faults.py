"""Faults: a stalled worker (SIGSTOP), a dead prefill worker, a request deadline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import pytest

from tests.kv_helpers import route_workers, wait_for, worker_load
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


def _chat(base: str, content: str) -> tuple[int, dict, dict[str, str]]:
    body = {"model": "default", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    req = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, json.loads(r.read()), route_workers(r.headers["x-pdrouter-route"])


PROMPT = "prompt {}: " + " ".join(f"w{j}" for j in range(60))


def _two_prefill_workers(tmp_path, model_dir) -> PrefillDecode:
    """Round robin over two prefill workers; checked: each takes one of the first two requests."""
    pd = PrefillDecode(
        tmp_path, model_dir, token_delay_ms=2, prefills=2, router_args=("--prefill-policy", "round_robin")
    )
    try:
        used = set()
        for i in range(2):
            status, _, route = _chat(pd.base, PROMPT.format(f"before{i}"))
            assert status == 200 and route["mode"] == "disaggregated" and route["decode"] == pd.decode_address
            used.add(route["prefill"])
        assert used == set(pd.prefill_addresses)
    except BaseException:
        pd.stop()
        raise
    return pd


def _kill_with_a_prefill_leg_on_it(pd: PrefillDecode) -> dict[str, tuple[int, dict, dict[str, str]]]:
    """SIGSTOP the first prefill worker, send two requests (round robin: one prefill leg hangs on the
    stopped worker, the other is served by the second), then SIGKILL it: the hung leg fails over.
    Returns each prompt's (status, reply, route header)."""
    alive = pd.prefill_addresses[1]
    published = worker_load(alive).kv_transfer.handles_published
    os.kill(pd.prefills[0].pid, signal.SIGSTOP)  # connected and silent: a prefill leg there hangs
    with ThreadPoolExecutor(2) as pool:
        try:
            futures = {pool.submit(_chat, pd.base, PROMPT.format(f"stopped{i}")): PROMPT.format(f"stopped{i}")
                       for i in range(2)}  # fmt: skip
            done, _ = wait(futures, timeout=30, return_when=FIRST_COMPLETED)
            assert len(done) == 1
            # the other one has not been prefilled by the live worker: it waits on the stopped one
            assert worker_load(alive).kv_transfer.handles_published == published + 1
            assert sum(f.done() for f in futures) == 1
        finally:
            pd.prefills[0].proc.kill()  # SIGKILL (a stopped process dies too; a hung request ends)
        results = {futures[f]: f.result(timeout=60) for f in futures}
    assert worker_load(alive).kv_transfer.handles_published == published + 2  # both prefilled there
    return results


def test_dead_prefill_worker_fails_over_to_the_other_prefill_worker(tmp_path, default_model_dir) -> None:
    """Two prefill workers, one decode worker. A request whose prefill leg is on a worker that is
    then SIGKILLed is prefilled by the other one; once the router has seen it die, every request
    goes disaggregated through the survivor, named by the route header. Each answer equals the
    same prompt served again (aggregated, from the decode worker's cache)."""
    pd = _two_prefill_workers(tmp_path, default_model_dir)
    dead, alive = pd.prefill_addresses
    decode = pd.decode_address
    answers: dict[str, str] = {}
    try:
        load = worker_load(decode).kv_transfer
        for content, (status, reply, route) in _kill_with_a_prefill_leg_on_it(pd).items():
            assert status == 200 and reply["usage"]["completion_tokens"] == 6, reply
            assert route["mode"] == "disaggregated" and route["decode"] == decode
            answers[content] = reply["choices"][0]["message"]["content"]
        wait_for(lambda: worker_load(decode).kv_transfer.pulls == load.pulls + 2, what="both pulled")
        assert worker_load(decode).kv_transfer.pull_failures == load.pull_failures

        wait_for(lambda: f"{dead} is unhealthy" in pd.router.log(), what="the router seeing it dead")
        published = worker_load(alive).kv_transfer.handles_published
        for i in range(4):
            status, reply, route = _chat(pd.base, PROMPT.format(f"after{i}"))
            assert status == 200 and reply["usage"]["completion_tokens"] == 6, reply
            assert route == {"mode": "disaggregated", "prefill": alive, "decode": decode}
            answers[PROMPT.format(f"after{i}")] = reply["choices"][0]["message"]["content"]
        assert worker_load(alive).kv_transfer.handles_published == published + 4
        wait_for(lambda: worker_load(decode).kv_transfer.pulls == load.pulls + 6, what="every prompt pulled")

        for content, answer in answers.items():
            status, reply, route = _chat(pd.base, content)
            assert route == {"mode": "aggregated", "decode": decode}
            assert reply["choices"][0]["message"]["content"] == answer
    finally:
        pd.stop()


def test_route_header_names_the_prefill_worker_that_served_after_a_failover(
    tmp_path, default_model_dir
) -> None:
    """README: "The header says what happened". A non-streaming reply's headers go out after the
    whole answer, so after a prefill leg failed over they can name the worker that prefilled."""
    pd = _two_prefill_workers(tmp_path, default_model_dir)
    try:
        routes = [route for _, _, route in _kill_with_a_prefill_leg_on_it(pd).values()]
        assert [r["prefill"] for r in routes] == [pd.prefill_addresses[1]] * 2, routes
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
