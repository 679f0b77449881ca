"""Concurrent greedy chat streams with something done to the stack while they run (a worker
killed, drained, stalled): one helper for the fault, drain and supervision tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NamedTuple

import openai

from tests.kv_helpers import route_workers


class Stream(NamedTuple):
    route: dict[str, str]  # the x-pdrouter-route header, parsed
    text: str
    tokens: int  # completion tokens, from the usage chunk
    finish: str


async def run_streams(
    base: str,
    prompts: list[str],
    max_tokens: int,
    during: Callable[[list[dict[str, str]]], None] | None = None,
    min_chunks: int = 2,
) -> tuple[list[Stream], list[int]]:
    """One stream per prompt; once every stream has `min_chunks` chunks, `during(routes)` runs in a
    thread. Returns each stream, and each stream's chunk count when `during` began."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    started = asyncio.Event()
    progress = [0] * len(prompts)
    routes: list[dict[str, str]] = [{} for _ in prompts]

    async def one(i: int) -> Stream:
        raw = await client.chat.completions.with_raw_response.create(
            model="default", messages=[{"role": "user", "content": prompts[i]}],
            max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        routes[i] = route_workers(raw.headers["x-pdrouter-route"])
        text, tokens, finish = [], 0, ""
        async for chunk in raw.parse():
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                progress[i] += 1
                finish = chunk.choices[0].finish_reason or finish
                if all(p >= min_chunks for p in progress):
                    started.set()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return Stream(routes[i], "".join(text), tokens, finish)

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    at_event = [0] * len(prompts)
    try:
        if during is not None:
            await asyncio.wait_for(started.wait(), 60)
            at_event = list(progress)
            await asyncio.to_thread(during, list(routes))
        return list(await asyncio.gather(*tasks)), at_event
    finally:
        for t in tasks:
            t.cancel()
        await client.close()
