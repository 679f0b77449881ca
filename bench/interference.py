"""Interference: decode ITL while long prompts keep arriving, aggregated vs disaggregated.

    python -m bench.interference [--quick] [--engine hf|mock] [--rounds N]

The same two workers on the real model, laid out two ways: `--both 2` (aggregated: every
worker prefills and decodes) and `--prefill 1 --decode 1` (disaggregated). In each, a few
streaming "chat" requests decode 64 tokens while long prompts (~1,500 tokens, 1 output token)
arrive at a steady rate; every chat token's inter-token latency is recorded by the client. In
the aggregated layout a long prompt's prefill chunks share steps with the decodes and stall
them; disaggregated, the decode worker never prefills a long prompt. Goal: disaggregated ITL
p99 <= 1.5x its p50.

Both stacks are up at once, as in bench.pareto, and the layouts alternate as in bench.engine: N
rounds (default 3 of 30 s; `--quick` 2 of 15 s), each layout once per round, the order swapped
every round, so load from other processes on a shared machine spreads over both layouts instead
of landing on one. Unlike bench.engine's best round, each layout's p50 and p99 are over the ITL
samples of all its rounds pooled (as bench.overhead pools its rounds): the stalls this bench
measures are a handful of gaps per round, right at a round's 1% tail, so a best (lowest-p99)
round would be the one where the fewest stalls happened to land, not the least disturbed one.
The table also gives each round's p99/p50. Every long prompt in a stack's life is a new
document, so none hits the prefix cache (the warm-up's included).
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


async def run(base: str, seconds: float, long_every_s: float, first_doc: int, tag: str) -> dict:
    """One measurement on one stack; long prompts are documents `first_doc`, `first_doc + 1`, ..."""
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
                model="default", messages=[{"role": "user", "content": f"chat {tag}.{i}.{n}: tell a story"}],
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
        k = first_doc
        while not stop.is_set():
            task = asyncio.ensure_future(
                client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": long_prompt(k)}], max_tokens=1
                )
            )
            task.add_done_callback(failed)
            pending.add(task)
            task.add_done_callback(pending.discard)
            longs += 1
            k += 1
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
            "long_prompts": longs, "gaps": gaps}  # fmt: skip


class Layout:
    """One layout's stack, up for the whole run; `measure` runs one round on it."""

    def __init__(self, name: str, flags: list[str], tmp: Path, engine: str, extra: list[str]) -> None:
        self.name = name
        self.stack = Stack(tmp, *flags, *extra, engine=engine, timeout=300)
        self.docs = 0  # long prompts sent so far: the next round's documents start after them
        self.rounds: list[dict] = []  # per round, without its samples
        self.gaps: list[float] = []  # every measured round's ITL samples, pooled

    def pooled(self) -> dict:
        longs = sum(r["long_prompts"] for r in self.rounds)
        return {"itl_p50_ms": pct(self.gaps, 50) * 1e3, "itl_p99_ms": pct(self.gaps, 99) * 1e3,
                "tokens": len(self.gaps), "long_prompts": longs}  # fmt: skip

    def measure(self, seconds: float, long_every_s: float, tag: str) -> dict:
        try:
            r = asyncio.run(run(self.stack.base_url, seconds, long_every_s, self.docs, tag))
        except SystemExit as exc:  # NOTE: the stack's log says why a request failed
            raise SystemExit(f"{exc} ({self.name}, {tag})\n{self.stack.proc.log()[-4000:]}") from None
        self.docs += r["long_prompts"]
        gaps = r.pop("gaps")
        if tag != "warm-up":
            self.gaps += gaps
            self.rounds.append(r)
        return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engine", choices=["hf", "mock"], default="hf")
    ap.add_argument("--long-every-s", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 3; quick 2)")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = 15 if args.quick else 30  # per layout per round
    flags = {"aggregated": ["--both", "2"], "disaggregated": ["--prefill", "1", "--decode", "1"]}
    extra = [] if args.engine == "hf" else ["--worker-arg=--mock-timing=20,1,0,20,1,0"]
    tmpdir = tempfile.TemporaryDirectory(prefix="pdrouter-interference-")
    with tmpdir as tmp, contextlib.ExitStack() as stacks:
        layouts = []
        for name, layout_flags in flags.items():
            layouts.append(Layout(name, layout_flags, Path(tmp), args.engine, extra))
            stacks.callback(layouts[-1].stack.stop)
        for layout in layouts:
            layout.measure(3, 10, "warm-up")
        for r in range(rounds):
            for layout in layouts if r % 2 == 0 else layouts[::-1]:
                last = layout.measure(seconds, args.long_every_s, f"r{r}")
                print(f"round {r + 1}/{rounds}: {layout.name} itl p50 {last['itl_p50_ms']:.1f} ms, "
                      f"p99 {last['itl_p99_ms']:.1f} ms", flush=True)  # fmt: skip
    results = {layout.name: layout.pooled() for layout in layouts}
    spread = {layout.name: [m["itl_p99_ms"] / m["itl_p50_ms"] for m in layout.rounds] for layout in layouts}
    rows = [
        [
            name,
            r["tokens"],
            r["long_prompts"],
            r["itl_p50_ms"],
            r["itl_p99_ms"],
            r["itl_p99_ms"] / r["itl_p50_ms"],
            ", ".join(f"{v:.2f}" for v in spread[name]),
        ]
        for name, r in results.items()
    ]
    print(f"{CHATS} chat streams decoding while ~1,500-token prompts arrive every {args.long_every_s:g} s, "
          f"{rounds} alternating rounds of {seconds} s per layout, ITL samples of all rounds pooled, "
          f"2 {args.engine} workers")  # fmt: skip
    headers = ["layout", "itl samples", "long prompts", "itl_p50_ms", "itl_p99_ms", "p99/p50"]
    headers.append("p99/p50 per round")
    print(table(headers, rows))
    d, a = results["disaggregated"], results["aggregated"]
    figures = {
        "disagg_itl_p99_over_p50": round(d["itl_p99_ms"] / d["itl_p50_ms"], 2),
        "agg_itl_p99_over_p50": round(a["itl_p99_ms"] / a["itl_p50_ms"], 2),
        "itl_p99_ms_disagg": round(d["itl_p99_ms"], 1),
        "itl_p99_ms_agg": round(a["itl_p99_ms"], 1),
        "rounds": rounds,
    }
    rounds_out = {layout.name: layout.rounds for layout in layouts}
    payload = {"quick": args.quick, "engine": args.engine, "seconds_per_round": seconds, "results": results,
               "rounds_by_layout": rounds_out, **figures}  # fmt: skip
    path = save("interference", payload)
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
