"""Graceful drain on SIGTERM: a worker or the router under streams finishes them all, takes no
new work meanwhile (readiness off, new requests elsewhere or a clear 503) and exits 0; `pdrouter
serve` forwards the signal and waits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdrouter_proto import inference_pb2 as ipb
from pdrouter_proto import inference_pb2_grpc as ipb_grpc
from pdrouter_proto import worker_pb2 as wpb
from pdrouter_proto import worker_pb2_grpc as wpb_grpc
from tests.kv_helpers import route_workers, wait_for
from tests.procs import Proc, Stack, free_port, pdrouter, wait_http_ok
from tests.streams import run_streams

pytestmark = pytest.mark.integration

STREAMS = 10
TOKENS = 60
DELAY_MS = "50"  # 60 tokens: ~3 s per stream, time enough to look at a draining process


def _worker(tmp_path, model_dir, port: int) -> Proc:
    return Proc(
        pdrouter("worker", "--engine", "mock", "--port", str(port), "--model", str(model_dir),
                 "--mock-token-delay-ms", DELAY_MS),
        tmp_path / f"worker-{port}.log",
    )  # fmt: skip


def _router(tmp_path, model_dir, workers: list[str], grpc_port: int = 0) -> tuple[Proc, str]:
    hport = free_port()
    argv = pdrouter("router", "--port", str(hport), "--grpc-port", str(grpc_port or free_port()),
                    "--model", str(model_dir), "--decode-policy", "round_robin")  # fmt: skip
    for address in workers:
        argv += ["--worker", address]
    router = Proc(argv, tmp_path / "router.log")
    base = f"http://127.0.0.1:{hport}"
    wait_http_ok(base + "/ready", router, 60)
    for address in workers:
        wait_for(lambda a=address: f"worker {a} is healthy" in router.log(), 30, f"router sees {address}")
    return router, base


async def _streams(base: str, during) -> list[tuple[str, int, str]]:
    """STREAMS streams of TOKENS tokens; `during(decode workers)` runs (in a thread) once all have
    started. Returns (decode worker, completion tokens, finish reason) per stream."""
    prompts = [f"drain stream {i}" for i in range(STREAMS)]
    streams, _ = await run_streams(
        base, prompts, TOKENS, lambda routes: during([r["decode"] for r in routes])
    )
    return [(s.route["decode"], s.tokens, s.finish) for s in streams]


def _post(base: str, content: str) -> tuple[int, dict, dict]:
    body = {"model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    req = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as ch:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(ch).Check(request, timeout=5).status


def test_worker_drain_finishes_its_streams_and_new_requests_go_elsewhere(tmp_path, default_model_dir) -> None:
    ports = [free_port(), free_port()]
    workers = {f"127.0.0.1:{p}": _worker(tmp_path, default_model_dir, p) for p in ports}
    router = None
    try:
        router, base = _router(tmp_path, default_model_dir, list(workers))
        seen: dict[str, object] = {}

        def drain_one(routes: list[str]) -> None:
            victim = routes[0]
            other = next(a for a in workers if a != victim)
            assert routes.count(victim) >= STREAMS // 2 - 1  # round robin: it holds about half
            os.kill(workers[victim].pid, signal.SIGTERM)
            readiness = wpb.DESCRIPTOR.services_by_name["Worker"].full_name
            wait_for(lambda: _health(victim, readiness) == health_pb2.HealthCheckResponse.NOT_SERVING,
                     10, "the draining worker's readiness NOT_SERVING")  # fmt: skip
            with grpc.insecure_channel(victim) as ch, pytest.raises(grpc.RpcError) as refused:
                request = wpb.DecodeRequest(request_id="late", prompt_token_ids=[1, 2, 3])
                list(wpb_grpc.WorkerStub(ch).Decode(request, timeout=10))
            seen["refused"] = (refused.value.code(), refused.value.details())
            wait_for(lambda: f"worker {victim} is unhealthy" in router.log(), 10, "router marks it unhealthy")
            seen["new"] = [_post(base, f"new request {i}") for i in range(4)]
            seen["victim"], seen["other"] = victim, other
            assert workers[victim].alive()  # its streams are still running

        results = asyncio.run(_streams(base, drain_one))
        assert [(t, f) for _, t, f in results] == [(TOKENS, "length")] * STREAMS
        assert sum(r == seen["victim"] for r, _, _ in results) >= STREAMS // 2 - 1
        assert "migrating" not in router.log()  # finished where they ran, not moved
        code, details = seen["refused"]
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
        for status, headers, reply in seen["new"]:
            assert status == 200 and reply["usage"]["completion_tokens"] == 4
            assert route_workers(headers["x-pdrouter-route"])["decode"] == seen["other"]
        assert workers[seen["victim"]].proc.wait(timeout=30) == 0
    finally:
        if router is not None:
            router.stop()
        for w in workers.values():
            w.stop()


def test_router_drain_finishes_streams_refuses_new_ones_and_exits_0(tmp_path, default_model_dir) -> None:
    port = free_port()
    worker = _worker(tmp_path, default_model_dir, port)
    router = None
    try:
        grpc_port = free_port()
        router, base = _router(tmp_path, default_model_dir, [f"127.0.0.1:{port}"], grpc_port)
        seen: dict[str, object] = {}

        def drain_router(routes: list[str]) -> None:
            os.kill(router.pid, signal.SIGTERM)
            wait_for(lambda: _status(base + "/ready") == 503, 10, "GET /ready 503")
            seen["new"] = _post(base, "too late")
            seen["health"] = _status(base + "/health")
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch, pytest.raises(grpc.RpcError) as late:
                list(ipb_grpc.InferenceStub(ch).Generate(ipb.GenerateRequest(prompt="late"), timeout=10))
            seen["grpc"] = (late.value.code(), late.value.details())
            assert router.alive()

        results = asyncio.run(_streams(base, drain_router))
        assert [(t, f) for _, t, f in results] == [(TOKENS, "length")] * STREAMS
        status, headers, reply = seen["new"]
        assert status == 503 and headers.get("retry-after") == "1"
        assert reply["error"]["code"] == "draining" and "draining" in reply["error"]["message"]
        assert seen["health"] == 200  # liveness stays up while it drains
        assert seen["grpc"][0] == grpc.StatusCode.UNAVAILABLE and "draining" in seen["grpc"][1]
        assert router.proc.wait(timeout=30) == 0
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def test_serve_forwards_sigterm_and_waits_for_the_streams(tmp_path, default_model_dir) -> None:
    stack = Stack(tmp_path, "--both", "1", "--model", str(default_model_dir),
                  f"--worker-arg=--mock-token-delay-ms={DELAY_MS}")  # fmt: skip
    try:

        def stop_serve(routes: list[str]) -> None:
            os.kill(stack.proc.pid, signal.SIGTERM)  # serve alone: it must pass it on
            wait_for(lambda: _status(stack.base_url + "/ready") == 503, 10, "the router draining")

        results = asyncio.run(_streams(stack.base_url, stop_serve))
        assert [(t, f) for _, t, f in results] == [(TOKENS, "length")] * STREAMS
        assert stack.proc.proc.wait(timeout=60) == 0
    finally:
        stack.stop()
