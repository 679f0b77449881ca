"""Router admission: --max-in-flight, the bounded FIFO queue (--max-queued, --queue-timeout-s), drain."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from router.admission import Admission
from router.errors import ApiError
from tests import prom
from tests.procs import Stack


async def _queued(adm: Admission, n: int) -> list[asyncio.Task[None]]:
    """n acquires started, each waiting in the queue before the next starts (FIFO order known)."""
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(adm.acquire()))
        while adm.num_queued < len(tasks):
            await asyncio.sleep(0)  # NOTE: one loop turn: the task reaches its wait
    return tasks


@pytest.mark.unit
async def test_no_limit_admits_everything_at_once() -> None:
    adm = Admission()
    for _ in range(1000):
        await adm.acquire()
    assert adm.num_active == 1000 and adm.num_queued == 0


@pytest.mark.unit
async def test_queue_is_fifo_bounded_and_a_release_hands_the_slot_over() -> None:
    adm = Admission(max_in_flight=1, max_queued=2)
    await adm.acquire()
    first, second = await _queued(adm, 2)
    with pytest.raises(ApiError) as full:
        await adm.acquire()
    assert full.value.status == 429 and full.value.code == "rate_limit_exceeded"
    assert "--max-queued" in full.value.message and "1 requests in flight" in full.value.message
    adm.release()
    await first
    assert not second.done() and adm.num_active == 1 and adm.num_queued == 1
    adm.release()
    await second
    adm.release()
    assert adm.num_active == 0 and adm.num_queued == 0


@pytest.mark.unit
async def test_a_wait_past_the_queue_timeout_is_429_and_leaves_nothing_behind() -> None:
    adm = Admission(max_in_flight=1, max_queued=4, queue_timeout_s=0.05)
    await adm.acquire()
    started = time.monotonic()
    with pytest.raises(ApiError) as waited:
        await adm.acquire()
    assert 0.04 < time.monotonic() - started < 2
    assert waited.value.status == 429 and "--queue-timeout-s" in waited.value.message
    assert adm.num_queued == 0 and adm.num_active == 1
    adm.release()
    assert adm.num_active == 0


@pytest.mark.unit
async def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    adm = Admission(max_in_flight=1, max_queued=4)
    await adm.acquire()
    gone, kept = await _queued(adm, 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert adm.num_queued == 1
    adm.release()
    await kept
    adm.release()
    assert adm.num_active == 0


@pytest.mark.unit
async def test_a_slot_handed_over_as_the_waiter_is_cancelled_is_passed_on() -> None:
    adm = Admission(max_in_flight=1, max_queued=4)
    await adm.acquire()
    unlucky, next_one = await _queued(adm, 2)
    adm.release()  # the slot goes to `unlucky` ...
    unlucky.cancel()  # ... which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    await next_one  # the slot was passed on, not lost
    assert adm.num_active == 1 and adm.num_queued == 0
    adm.release()
    assert adm.num_active == 0


@pytest.mark.unit
async def test_drain_refuses_the_queued_and_new_and_waits_for_the_active() -> None:
    adm = Admission(max_in_flight=1, max_queued=4)
    await adm.acquire()
    (queued,) = await _queued(adm, 1)
    drain = asyncio.create_task(adm.drain(5))
    with pytest.raises(ApiError) as refused:
        await queued
    assert refused.value.status == 503 and refused.value.code == "draining"
    with pytest.raises(ApiError):
        await adm.acquire()
    assert not drain.done()
    adm.release()
    assert await drain is True
    assert await Admission(1).drain(0.01) is True  # nothing in flight: at once


# -- through a real router ------------------------------------------------------------------------


def _chat(base: str, max_tokens: int) -> tuple[int, dict]:
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.integration
async def test_router_queues_beyond_max_in_flight_and_serves_them_in_turn(
    tmp_path: Path, default_model_dir: Path
) -> None:
    stack = Stack(
        tmp_path, "--both", "1", "--router-arg=--max-in-flight=2", "--router-arg=--max-queued=3",
        "--router-arg=--queue-timeout-s=20", "--worker-arg=--mock-token-delay-ms=20",
    )  # fmt: skip
    try:
        results = await asyncio.gather(*(asyncio.to_thread(_chat, stack.base_url, 10) for _ in range(5)))
        assert [s for s, _ in results] == [200] * 5  # 2 at once, 3 queued: all served
        assert all(r["usage"]["completion_tokens"] == 10 for _, r in results)
        overflow = await asyncio.gather(*(asyncio.to_thread(_chat, stack.base_url, 50) for _ in range(8)))
        statuses = sorted(s for s, _ in overflow)
        assert statuses.count(200) >= 5 and statuses.count(429) >= 1  # 2 + 3 fit at once (1 s each)
        assert set(statuses) == {200, 429}
        for status, reply in overflow:
            if status == 429:
                assert "--max-queued" in reply["error"]["message"]
        with urllib.request.urlopen(stack.base_url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert "pdrouter_requests_queued 0.0" in metrics and "pdrouter_requests_in_flight 0.0" in metrics
        # NOTE: the 429s were the router's own queue overflowing: no worker call failed, none ejected
        assert list(prom.samples(metrics, "pdrouter_worker_ejections").values()) == [0.0]
        assert prom.value(metrics, "pdrouter_requests_total", endpoint="/v1/chat/completions",
                          status="429", mode="none") == statuses.count(429)  # fmt: skip
        assert prom.value(metrics, "pdrouter_requests_total", endpoint="/v1/chat/completions",
                          status="200", mode="aggregated") == 5 + statuses.count(200)  # fmt: skip
    finally:
        stack.stop()
