"""Leak check: thousands of disaggregated requests, a third cancelled by the client at random:
afterwards every KV block is free, no handle is pinned, and the router's memory is flat."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest

from tests.kv_helpers import wait_for, worker_load
from tests.procs import PrefillDecode, rss_kib

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
    pd = PrefillDecode(tmp_path, default_model_dir)
    base, workers, router = pd.base, pd.workers, pd.router

    def settled() -> bool:
        loads = [worker_load(w) for w in workers]
        return all(ld.kv_blocks_used == 0 and ld.kv_transfer.handles_pinned == 0 for ld in loads)

    try:
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
        pd.stop()
