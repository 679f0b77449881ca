"""Disaggregated serving with real processes: `pdrouter serve --engine mock --prefill 1 --decode 1`.

The mock runner writes each token's id into its KV slot and checks imported prompts slot by
slot, so a pull that moved the wrong bytes or into the wrong blocks fails the request.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import openai
import pytest

from tests import prom
from tests.kv_helpers import route_workers, wait_for, worker_load
from tests.procs import PrefillDecode, Stack

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"


def _prompt(i: int, words: int = 60) -> list[dict]:
    return [{"role": "user", "content": f"request {i}: " + " ".join(f"w{i}x{j}" for j in range(words))}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir):
    s = Stack(
        tmp_path_factory.mktemp("disagg"),
        "--prefill", "1", "--decode", "1",
        "--worker-arg=--mock-token-delay-ms=1",
        "--router-arg=--local-prefill-max-tokens=16",
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client: openai.OpenAI, messages, max_tokens: int = 8):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0
    )
    return raw.parse(), route_workers(raw.headers["x-pdrouter-route"])


def _settled(address: str) -> bool:
    load = worker_load(address)
    return load.kv_blocks_used == 0 and load.kv_transfer.handles_pinned == 0


def test_disaggregated_route_pulls_the_prompt(client) -> None:
    r, route = _chat(client, _prompt(0))
    assert route["mode"] == "disaggregated" and route["prefill"] != route["decode"]
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    wait_for(lambda: worker_load(route["decode"]).kv_transfer.pulls >= 1, what="a pull counted")
    decode = worker_load(route["decode"]).kv_transfer
    assert decode.pull_failures == 0 and decode.blocks_pulled >= r.usage.prompt_tokens // 16
    assert worker_load(route["prefill"]).kv_transfer.handles_published >= 1


def _generated(pd: PrefillDecode, address: str) -> float:
    return prom.value(
        prom.scrape(pd.metrics_urls[address]), "pdrouter_worker_generated_tokens_total", worker=address
    )


def test_streaming_first_token_comes_from_the_prefill_worker(tmp_path, default_model_dir) -> None:
    """The route names the prefill worker; it generated exactly one token for the request (the
    first, published with its handle) and the decode worker, which pulled that handle, the rest;
    the router's timeline has the prefill leg's answer; the tokens equal an aggregated run's."""
    pd = PrefillDecode(tmp_path, default_model_dir, metrics=True)
    try:
        client = openai.OpenAI(base_url=pd.base + "/v1", api_key="unused", max_retries=0, timeout=60)
        prefill, decode = pd.prefill_addresses[0], pd.decode_address
        before = {a: _generated(pd, a) for a in (prefill, decode)}
        published = worker_load(prefill).kv_transfer.handles_published
        pulls = worker_load(decode).kv_transfer.pulls
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=_prompt(1), max_tokens=6, temperature=0, stream=True, logprobs=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        route, request_id = route_workers(raw.headers["x-pdrouter-route"]), raw.headers["x-request-id"]
        chunks = list(raw.parse())
        tokens = [
            t.token
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.content
        ]
        assert route == {"mode": "disaggregated", "prefill": prefill, "decode": decode}
        assert chunks[-1].usage.completion_tokens == 6 and len(tokens) == 6

        # every token generated for it: 1 by the prefill worker, 5 by the decode worker
        assert _generated(pd, prefill) - before[prefill] == 1
        assert _generated(pd, decode) - before[decode] == 5
        assert worker_load(prefill).kv_transfer.handles_published == published + 1
        wait_for(lambda: worker_load(decode).kv_transfer.pulls == pulls + 1, what="the decode worker's pull")
        with urllib.request.urlopen(f"{pd.base}/debug/requests/{request_id}", timeout=10) as r:
            tl = json.loads(r.read())
        assert tl["mode"] == "disaggregated" and tl["route"] == raw.headers["x-pdrouter-route"]
        assert {"prefill_queue_ms", "prefill_compute_ms", "kv_transfer_ms"} <= set(tl["worker"])

        # the same prompt again: the decode worker holds it and generates all 6 itself
        before_decode = _generated(pd, decode)
        ref = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=_prompt(1), max_tokens=6, temperature=0, logprobs=True
        )
        assert route_workers(ref.headers["x-pdrouter-route"]) == {"mode": "aggregated", "decode": decode}
        assert _generated(pd, decode) - before_decode == 6
        ref_choice = ref.parse().choices[0]
        assert tokens == [t.token for t in ref_choice.logprobs.content]  # the first one included
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ref_choice.message.content
    finally:
        pd.stop()


def test_100_concurrent_then_nothing_pinned_or_used(stack, client) -> None:
    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(
                *(
                    aclient.chat.completions.with_raw_response.create(
                        model=MODEL, messages=_prompt(1000 + i), max_tokens=5, temperature=0
                    )
                    for i in range(100)
                )
            )
        finally:
            await aclient.close()

    raws = asyncio.run(run())
    routes = [route_workers(r.headers["x-pdrouter-route"]) for r in raws]
    assert all(r["mode"] == "disaggregated" for r in routes)
    assert all(r.parse().usage.completion_tokens == 5 for r in raws)
    prefill, decode = routes[0]["prefill"], routes[0]["decode"]
    wait_for(lambda: _settled(prefill) and _settled(decode), what="every block free, nothing pinned")
    assert worker_load(decode).kv_transfer.pull_failures == 0


def test_partial_prefix_pulls_only_missing_blocks(client) -> None:
    base = " ".join(f"shared{j}" for j in range(120))
    first, route1 = _chat(client, [{"role": "user", "content": base}])
    decode = route1["decode"]
    wait_for(lambda: worker_load(decode).kv_transfer.pulls >= 1, what="first pull counted")
    before = worker_load(decode).kv_transfer.blocks_pulled
    longer = [{"role": "user", "content": base + " " + " ".join(f"tail{j}" for j in range(60))}]
    second, route2 = _chat(client, longer)
    assert route2["mode"] == "disaggregated" and route2["decode"] == decode
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 16 * 16 - 16
    wait_for(lambda: worker_load(decode).kv_transfer.blocks_pulled > before, what="second pull counted")
    pulled = worker_load(decode).kv_transfer.blocks_pulled - before
    assert 0 < pulled < second.usage.prompt_tokens // 16  # only the blocks it did not hold


def test_expired_handles_fall_back_to_local_recompute(tmp_path) -> None:
    s = Stack(
        tmp_path, "--prefill", "1", "--decode", "1",
        "--worker-arg=--kv-handle-ttl-s=0",
        "--router-arg=--local-prefill-max-tokens=16",
    )  # fmt: skip
    try:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r, route = _chat(c, _prompt(7))
        assert route["mode"] == "disaggregated" and r.usage.completion_tokens == 8
        wait_for(lambda: worker_load(route["decode"]).kv_transfer.pull_failures >= 1, what="failure counted")
        wait_for(lambda: _settled(route["prefill"]), what="prefill blocks unpinned")
    finally:
        s.stop()
    assert "expired" in s.proc.log()


def test_approx_kv_index_routes_a_shared_prefix_to_one_worker(tmp_path) -> None:
    """--kv-index approx ignores KV events: the router's own routes keep a conversation's
    prefix on the worker that computed it."""
    s = Stack(tmp_path, "--both", "3", "--router-arg=--kv-index=approx")
    try:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        base = [{"role": "user", "content": " ".join(f"doc{j}" for j in range(200))}]
        routes = [
            _chat(c, [*base, {"role": "user", "content": f"question {i}"}])[1]["decode"] for i in range(6)
        ]
        assert len(set(routes)) == 1
    finally:
        s.stop()
