"""Interference: decode ITL while long prompts keep arriving, aggregated vs disaggregated.

    python -m bench.interference [--quick] [--engine hf|mock]

The same two workers on the real model, laid out two ways: `--both 2` (aggregated: every
worker prefills and decodes) and `--prefill 1 --decode 1` (disaggregated). In each, a few
streaming "chat" requests decode 64 tokens while long prompts (~1,500 tokens, 1 output token)
arrive at a steady rate; every chat token's inter-token latency is recorded by the client. In
the aggregated layout a long prompt's prefill chunks share steps with the decodes and stall
them; disaggregated, the decode worker never prefills a long prompt. Goal: disaggregated ITL
p99 <= 1.5x its p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import openai

from bench.common import headline, pct, save, table
from tests.procs import Stack

CHATS = 4
CHAT_TOKENS = 64
LONG_WORDS = 1500  # common English words: about one token each, so ~1,500 tokens
_WORDS = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "her", "an", "were", "are", "which", "this", "be", "or", "had", "not", "but",
    "one", "all", "their", "they", "she", "there", "been", "has", "more", "who", "its", "when",
    "would", "into", "new", "some", "out", "time", "two", "other", "these", "first", "over",
    "after", "also", "many", "most", "people", "may", "only", "year", "city", "state", "world",
]  # fmt: skip


def long_prompt(k: int) -> str:
    """~1,500 tokens; `k` opens it, so no two share a first block (no prefix-cache hits)."""
    n = len(_WORDS)
    return f"document {k}: " + " ".join(_WORDS[(j * (k + 7) + k) % n] for j in range(LONG_WORDS))


async def run(base: str, seconds: float, long_every_s: float) -> dict:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
    gaps: list[float] = []
    longs = 0
    errors: list[str] = []
    stop = asyncio.Event()

    async def chat(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            stream = await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": f"chat {i}.{n}: tell me a story"}],
                max_tokens=CHAT_TOKENS, stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            last = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    pending: set[asyncio.Future] = set()

    def failed(task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            errors.append(repr(task.exception()))

    async def long_prompts() -> None:
        nonlocal longs
        k = 0
        while not stop.is_set():
            k += 1
            task = asyncio.ensure_future(
                client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": long_prompt(k)}], max_tokens=1
                )
            )
            task.add_done_callback(failed)
            pending.add(task)
            task.add_done_callback(pending.discard)
            longs += 1
            with contextlib.suppress(TimeoutError):  # NOTE: the arrival schedule, cut short by stop
                await asyncio.wait_for(stop.wait(), long_every_s)

    tasks = [asyncio.create_task(chat(i)) for i in range(CHATS)] + [asyncio.create_task(long_prompts())]
    await asyncio.sleep(seconds)
    stop.set()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Exception):
            errors.append(repr(result))
    await asyncio.gather(*pending, return_exceptions=True)  # their errors: `failed`
    await client.close()
    if errors:  # NOTE: a refused long prompt would make the layouts look better than they are
        raise SystemExit(f"bench.interference: {len(errors)} requests failed, first: {errors[0]}")
    return {"itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3, "tokens": len(gaps),
            "long_prompts": longs}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engine", choices=["hf", "mock"], default="hf")
    ap.add_argument("--long-every-s", type=float, default=3.0)
    args = ap.parse_args()
    seconds = 25 if args.quick else 90
    layouts = {"aggregated": ["--both", "2"], "disaggregated": ["--prefill", "1", "--decode", "1"]}
    extra = [] if args.engine == "hf" else ["--worker-arg=--mock-timing=20,1,0,20,1,0"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="pdrouter-interference-") as tmp:
        for name, layout in layouts.items():
            stack = Stack(Path(tmp), *layout, *extra, engine=args.engine, timeout=300)
            try:
                asyncio.run(run(stack.base_url, 3, 10))  # warm-up
                results[name] = asyncio.run(run(stack.base_url, seconds, args.long_every_s))
            finally:
                stack.stop()
    rows = [
        [
            name,
            r["tokens"],
            r["long_prompts"],
            r["itl_p50_ms"],
            r["itl_p99_ms"],
            r["itl_p99_ms"] / r["itl_p50_ms"],
        ]
        for name, r in results.items()
    ]
    print(f"{CHATS} chat streams decoding while ~1,500-token prompts arrive every {args.long_every_s:g} s, "
          f"{seconds} s per layout, 2 {args.engine} workers")  # fmt: skip
    print(table(["layout", "itl samples", "long prompts", "itl_p50_ms", "itl_p99_ms", "p99/p50"], rows))
    d, a = results["disaggregated"], results["aggregated"]
    figures = {
        "disagg_itl_p99_over_p50": round(d["itl_p99_ms"] / d["itl_p50_ms"], 2),
        "agg_itl_p99_over_p50": round(a["itl_p99_ms"] / a["itl_p50_ms"], 2),
        "itl_p99_ms_disagg": round(d["itl_p99_ms"], 1),
        "itl_p99_ms_agg": round(a["itl_p99_ms"], 1),
    }
    path = save("interference", {"quick": args.quick, "engine": args.engine, "results": results, **figures})
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
