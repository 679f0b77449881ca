"""Request migration: a decode worker killed mid-stream; its streams finish on another worker,
token for token what a fault-free run gives (the mock engine is deterministic per prompt)."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import openai
import pytest

from tests.procs import Proc, free_port, pdrouter, wait_http_ok
from tests.streams import run_streams

pytestmark = pytest.mark.integration

STREAMS = 20
TOKENS = 40


def _start(tmp_path, default_model_dir, *router_args: str) -> tuple[dict[str, Proc], Proc, str]:
    workers = {}
    for _ in range(2):
        port = free_port()
        workers[f"127.0.0.1:{port}"] = Proc(
            pdrouter("worker", "--engine", "mock", "--port", str(port), "--mock-token-delay-ms", "25",
                     "--model", str(default_model_dir)),
            tmp_path / f"worker-{port}.log",
        )  # fmt: skip
    hport = free_port()
    argv = pdrouter(
        "router", "--port", str(hport), "--grpc-port", str(free_port()), "--model", str(default_model_dir)
    )
    for address in workers:
        argv += ["--worker", address]
    router = Proc([*argv, "--decode-policy", "round_robin", *router_args], tmp_path / "router.log")
    base = f"http://127.0.0.1:{hport}"
    wait_http_ok(base + "/ready", router, 60)
    deadline = time.monotonic() + 30
    while True:  # NOTE: /ready needs one worker; wait until the router sees both healthy
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            healthy = [
                ln for ln in r.read().decode().splitlines() if ln.startswith("pdrouter_worker_healthy{")
            ]
        if len(healthy) == 2 and all(ln.endswith(" 1.0") for ln in healthy):
            break
        if time.monotonic() > deadline:
            raise TimeoutError("router did not see both workers")
        time.sleep(0.05)  # readiness poll
    return workers, router, base


async def _streams(base: str, kill=None) -> list[tuple[str, int, str]]:
    """STREAMS greedy streams; `kill(decode workers)` runs once every stream has a few tokens."""
    prompts = [f"stream {i} about migration" for i in range(STREAMS)]
    during = None if kill is None else (lambda routes: kill([r["decode"] for r in routes]))
    streams, _ = await run_streams(base, prompts, TOKENS, during, min_chunks=4)
    return [(s.text, s.tokens, s.finish) for s in streams]


def test_killed_decode_worker_streams_migrate_and_match(tmp_path, default_model_dir) -> None:
    workers, router, base = _start(tmp_path, default_model_dir)
    try:
        reference = asyncio.run(_streams(base))
        assert all(t == TOKENS for _, t, _ in reference)
        victims: list[str] = []

        def kill(routes: list[str]) -> None:
            victim = routes[0]
            assert routes.count(victim) >= STREAMS // 4  # round robin: the victim holds its share
            victims.append(victim)
            workers[victim].proc.kill()  # SIGKILL mid-stream

        faulty = asyncio.run(_streams(base, kill))
        assert victims and faulty == reference  # every stream complete, same text, same count
        assert "migrating" in router.log()
    finally:
        router.stop()
        for w in workers.values():
            w.stop()


def test_without_migration_the_client_gets_a_clear_error(tmp_path, default_model_dir) -> None:
    workers, router, base = _start(tmp_path, default_model_dir, "--migration-limit", "0")
    try:

        def kill(routes: list[str]) -> None:
            workers[routes[0]].proc.kill()

        with pytest.raises(openai.APIError, match="no migration was possible"):
            asyncio.run(_streams(base, kill))
    finally:
        router.stop()
        for w in workers.values():
            w.stop()
