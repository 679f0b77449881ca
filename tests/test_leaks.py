"""Leak check: thousands of disaggregated requests, a third cancelled by the client at random:
afterwards every KV block is free, no handle is pinned, and the router's memory is flat."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest

from tests.kv_helpers import wait_for, worker_load
from tests.procs import Proc, free_port, pdrouter, wait_http_ok

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def _load(base: str, n: int, seed: int, cancel_share: float = 0.33) -> tuple[int, int]:
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    sem = asyncio.Semaphore(48)
    done = cancelled = 0

    async def one(i: int) -> None:
        nonlocal done, cancelled
        cut = rng.randint(1, 6) if rng.random() < cancel_share else None
        async with sem:
            stream = await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": f"{seed}-{i} " + "word " * 30}],
                max_tokens=8, stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            chunks = 0
            async for _ in stream:
                chunks += 1
                if cut is not None and chunks >= cut:
                    await stream.close()  # the client goes away mid-stream
                    cancelled += 1
                    return
            done += 1

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()
    return done, cancelled


def test_no_leaks_after_2000_requests_with_cancellations(tmp_path, default_model_dir) -> None:
    pport, dport, hport = free_port(), free_port(), free_port()
    common = ["--engine", "mock", "--model", str(default_model_dir), "--mock-token-delay-ms", "1"]
    prefill = Proc(pdrouter("worker", "--role", "prefill", "--port", str(pport), *common), tmp_path / "p.log")
    decode = Proc(pdrouter("worker", "--role", "decode", "--port", str(dport), *common), tmp_path / "d.log")
    router = Proc(
        pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()),
                 "--model", str(default_model_dir), "--worker", f"127.0.0.1:{pport}",
                 "--worker", f"127.0.0.1:{dport}", "--local-prefill-max-tokens", "16"),
        tmp_path / "r.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{hport}"
    workers = [f"127.0.0.1:{pport}", f"127.0.0.1:{dport}"]

    def settled() -> bool:
        loads = [worker_load(w) for w in workers]
        return all(ld.kv_blocks_used == 0 and ld.kv_transfer.handles_pinned == 0 for ld in loads)

    try:
        wait_http_ok(base + "/ready", router, 60)
        wait_for(lambda: f"127.0.0.1:{pport} is healthy" in router.log(), what="prefill worker seen")
        asyncio.run(_load(base, 2100, seed=1))  # NOTE: fills the router's ring of 2,048 timelines
        wait_for(settled, 30, "settled after warm-up")
        before = rss_kib(router.pid)
        done, cancelled = asyncio.run(_load(base, 2000, seed=2))
        assert done + cancelled == 2000 and cancelled > 400
        try:
            wait_for(settled, 30, "every block free and no handle pinned")
        except TimeoutError:
            raise AssertionError([str(worker_load(w)) for w in workers]) from None
        after = rss_kib(router.pid)
        assert after <= before * 1.05, (before, after)
        assert worker_load(workers[1]).kv_transfer.pulls > 500
    finally:
        router.stop()
        prefill.stop()
        decode.stop()
