"""Pareto: output tokens/s per worker against tokens/s per user, aggregated vs disaggregated layouts,
with goodput under a TTFT + ITL SLO and the cost per million output tokens.

    python -m bench.pareto [--quick] [--engine hf|mock] [--ttft-slo-ms X] [--itl-slo-ms Y]
                           [--price-per-worker-hour P] [--concurrency 1,2,4,8] [--layouts a,b]

Layouts (`pdrouter serve`, a stack each, all up at once): `agg-2` (`--both 2`), `disagg-1p1d`
(`--prefill 1 --decode 1`), `agg-3` (`--both 3`), `disagg-1p2d` (`--prefill 1 --decode 2`):
the same worker counts side by side, and every throughput is divided by the layout's workers.
The disaggregated layouts run the router with `--local-prefill-max-tokens 0` (bench flag of the
same name) so every request really takes the prefill worker; with the router's default (512)
most of these prompts would be prefilled on the decode worker and the prefill worker would idle.
Each point records which share of its requests went disaggregated (`x-pdrouter-route`).

Workload: streaming chat requests, one shared ~100-token system prompt (the prefix cache keeps
it) and a user message of common English words (about one token each) whose length follows a
log-normal distribution, median 256 tokens, clipped to 64..1,024; every request opens with its
own number, so nothing else is shared, not even across points. Output: exactly `--output-tokens`
(64) per request (`ignore_eos`). Per concurrency c: c closed-loop users, each sending its
requests back to back; their first requests are spread over the previous point's mean request
time so the users do not run in lockstep. Throughput counts the tokens that arrived while all c
users were active (the last user's first send to the first user's last token), so the ramp up
and down do not dilute it. The points go level by level, the layouts' order alternating, so a
burst of other work on this shared machine does not land on one layout; each point also records
how many cores other processes kept busy meanwhile (`others_cores`: machine minus this bench's
process tree, from /proc).

Per point: tokens/s per worker; tokens/s per user (1 / mean time per output token after the
first, TPOT); TTFT and ITL (gaps between SSE content chunks, one token each here) p50/p99;
goodput: requests/s that meet both SLOs (TTFT <= --ttft-slo-ms and the request's TPOT <=
--itl-slo-ms), and that fraction; a point "meets the SLO" when >= --slo-attainment (90%) of its
requests do; cost per million output tokens = price * workers / (tokens/s * 3600) * 1e6.

--quick: the mock engine (unless --engine is given), whose workers sleep a step-time model
fitted on this 2-vCPU VM (`pdrouter calibrate`, 2 threads) instead of computing; c = 1, 4, 16
on the two 2-worker layouts; about a minute. It checks the pipeline and shows the shape, but mock
workers do not compete for cores, which is the whole story of the real model on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from bench.common import headline, pct, save, table
from bench.interference import _WORDS as WORDS
from bench.overhead import cpu_seconds
from tests.procs import Stack

LAYOUTS = {
    "agg-2": ["--both", "2"],
    "disagg-1p1d": ["--prefill", "1", "--decode", "1"],
    "agg-3": ["--both", "3"],
    "disagg-1p2d": ["--prefill", "1", "--decode", "2"],
}
QUICK_LAYOUTS = ("agg-2", "disagg-1p1d")
# NOTE: `pdrouter calibrate --threads 2` on the 2-vCPU dev VM (AMD EPYC, oneDNN GEMMs, 2026-12-02):
# prefill 22 ms + 0.70 ms/token, decode step 20 ms + 0.74 ms/sequence + 0.0067 ms/context token
CPU_LIKE_TIMING = "22.3,0.702,0.000329,19.6,0.738,0.00670"
SYSTEM_PROMPT = (
    "You are a helpful assistant for a city library. Answer questions about opening hours, "
    "borrowing rules, events and the catalogue. Be friendly and concise, use plain words, and "
    "when you are not sure, say so and point the reader to the front desk. Never invent book "
    "titles or dates. If a question is about something other than the library, answer briefly "
    "and politely steer back to the library and what it offers to its readers."
)
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_MIN, PROMPT_MAX = 256, 0.6, 64, 1024


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9  # the share of requests that must meet both for a point to count


@dataclass(slots=True)
class Sample:
    """One request as the client saw it; times are time.perf_counter() seconds."""

    user: int
    start: float
    times: list[float]  # arrival of each SSE chunk with content; times[0] is the first token
    tokens: int  # completion tokens (usage)
    prompt_tokens: int = 0
    mode: str = ""  # x-pdrouter-route mode: aggregated | disaggregated

    @property
    def ttft(self) -> float:
        return self.times[0] - self.start

    @property
    def end(self) -> float:
        return self.times[-1]

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.end - self.times[0]) / max(1, self.tokens - 1)


@dataclass(slots=True)
class Point:
    layout: str
    workers: int
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    others_cores: float = 0.0  # CPU other processes on the machine used meanwhile, in cores


def meets_slo(s: Sample, slo: Slo) -> bool:
    return s.ttft <= slo.ttft_s and s.tpot <= slo.tpot_s


def steady_tok_s(samples: list[Sample]) -> float:
    """Output tokens/s while every user was active: from the last user's first send to the first
    user's last token. A chunk stands for tokens/chunks of its request's tokens. Falls back to all
    tokens over the whole span when that window is empty (e.g. one request per user)."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for s in samples:
        first[s.user] = min(first.get(s.user, s.start), s.start)
        last[s.user] = max(last.get(s.user, s.end), s.end)
    a, b = max(first.values()), min(last.values())
    if b - a <= 0:
        span = max(last.values()) - min(first.values())
        return sum(s.tokens for s in samples) / span
    counted = sum(s.tokens / len(s.times) * sum(a <= t <= b for t in s.times) for s in samples)
    return counted / (b - a)


def cost_per_mtok(price_per_worker_hour: float, workers: int, tok_s: float) -> float:
    """Dollars per million output tokens for `workers` workers serving `tok_s` tokens/s."""
    if tok_s <= 0:
        return math.inf
    return price_per_worker_hour * workers / (tok_s * 3600) * 1e6


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both),
    in order of rising x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    frontier: list[int] = []
    best_y = -math.inf
    for i in order:  # NOTE: from the highest x down, a point is kept when its y beats all seen so far
        if points[i][1] > best_y:
            frontier.append(i)
            best_y = points[i][1]
    return frontier[::-1]


def summarize(point: Point, output_tokens: int, slo: Slo, price: float) -> dict[str, Any]:
    s = point.samples
    tok_s = steady_tok_s(s)
    gaps = [b - a for x in s for a, b in zip(x.times, x.times[1:])]
    good = sum(meets_slo(x, slo) for x in s) / len(s)
    req_s = tok_s / output_tokens
    tpot_mean = sum(x.tpot for x in s) / len(s)
    return {
        "layout": point.layout,
        "workers": point.workers,
        "concurrency": point.concurrency,
        "requests": len(s),
        "tok_s": tok_s,
        "tok_s_per_worker": tok_s / point.workers,
        "tok_s_per_user": 1 / tpot_mean,
        "ttft_p50_ms": pct([x.ttft for x in s], 50) * 1e3,
        "ttft_p99_ms": pct([x.ttft for x in s], 99) * 1e3,
        "itl_p50_ms": pct(gaps, 50) * 1e3,
        "itl_p99_ms": pct(gaps, 99) * 1e3,
        "tpot_p50_ms": pct([x.tpot for x in s], 50) * 1e3,
        "goodput_req_s": req_s * good,
        "goodput_req_s_per_worker": req_s * good / point.workers,
        "good_fraction": good,
        "meets_slo": good >= slo.attainment,
        "cost_per_mtok": cost_per_mtok(price, point.workers, tok_s),
        "disaggregated_fraction": sum(x.mode == "disaggregated" for x in s) / len(s),
        "prompt_tokens_p50": pct([float(x.prompt_tokens) for x in s], 50),
        "tokens_per_chunk": sum(x.tokens for x in s) / sum(len(x.times) for x in s),
        "tokens_min": min(x.tokens for x in s),
        "others_cores": point.others_cores,
    }


def best_by_layout(rows: list[dict[str, Any]], key: str, pick=max, where=None) -> dict[str, Any]:
    """Per layout, the best `key` over its points (those passing `where`); None where none pass."""
    out: dict[str, Any] = {}
    for r in rows:
        out.setdefault(r["layout"], None)
        if where is None or where(r):
            v = r[key]
            out[r["layout"]] = v if out[r["layout"]] is None else pick(out[r["layout"]], v)
    return out


def user_messages(n: int, seed: int) -> list[str]:
    """n user messages of common words, log-normal lengths (in words, about tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = round(rng.lognormvariate(math.log(PROMPT_MEDIAN), PROMPT_SIGMA))
        words = max(PROMPT_MIN, min(PROMPT_MAX, words))
        out.append(" ".join(rng.choice(WORDS) for _ in range(words)))
    return out


async def one(client: openai.AsyncOpenAI, user: int, text: str, output_tokens: int) -> Sample:
    start = time.perf_counter()
    raw = await client.chat.completions.with_raw_response.create(
        model="default",
        messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
        max_tokens=output_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    route = raw.headers.get("x-pdrouter-route", "")
    mode = dict(p.split("=", 1) for p in route.split(";") if "=" in p).get("mode", "")
    sample = Sample(user, start, [], 0, mode=mode)
    async for chunk in raw.parse():  # type: ignore[attr-defined]
        if chunk.choices and chunk.choices[0].delta.content:
            sample.times.append(time.perf_counter())
        if chunk.usage:
            sample.tokens, sample.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    if not sample.times:
        raise RuntimeError(f"request of user {user} streamed no content")
    return sample


async def run_point(
    base: str, texts: list[str], concurrency: int, per_user: int, spread_s: float, output_tokens: int
) -> list[Sample]:
    """`concurrency` closed-loop users, `per_user` requests each; user i starts at i/c * spread_s."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=600)
    queue = iter(texts)

    async def user(i: int) -> list[Sample]:
        await asyncio.sleep(i / concurrency * spread_s)
        return [await one(client, i, next(queue), output_tokens) for _ in range(per_user)]

    try:
        per = await asyncio.gather(*(user(i) for i in range(concurrency)))
    finally:
        await client.close()
    return [s for samples in per for s in samples]


def numbered(texts: list[str], start: int) -> list[str]:
    """Each message opens with its own number: no prefix-cache hit beyond the system prompt."""
    return [f"Request {start + i}. {t}" for i, t in enumerate(texts)]


class Layout:
    """One layout's stack and its share of the workload; points run one at a time."""

    def __init__(self, name: str, tmp: Path, engine: str, extra: list[str], args: argparse.Namespace) -> None:
        flags = LAYOUTS[name]
        if "--prefill" in flags:
            flags = [*flags, f"--router-arg=--local-prefill-max-tokens={args.local_prefill_max_tokens}"]
        self.name = name
        self.workers = sum(int(x) for x in LAYOUTS[name][1::2])
        self.output_tokens = args.output_tokens
        self.pool = user_messages(256, args.seed)
        self.counter, self.spread = 0, 0.0
        self.stack = Stack(tmp, *flags, *extra, engine=engine, timeout=300)

    def warm_up(self) -> None:
        asyncio.run(
            run_point(self.stack.base_url, numbered(self.pool[:2], 10**6), 2, 1, 0.0, self.output_tokens)
        )

    def point(self, c: int, min_requests: int) -> Point:
        """c users, at least min_requests requests (at least 2 per user); their first requests are
        spread over this layout's previous mean request time."""
        per_user = max(2, -(-min_requests // c))
        n = c * per_user
        texts = numbered([self.pool[(self.counter + i) % len(self.pool)] for i in range(n)], self.counter)
        self.counter += n
        t0, busy0, own0 = time.perf_counter(), machine_busy_s(), cpu_seconds([os.getpid()])
        samples = asyncio.run(
            run_point(self.stack.base_url, texts, c, per_user, self.spread, self.output_tokens)
        )
        wall = time.perf_counter() - t0
        others = (machine_busy_s() - busy0 - (cpu_seconds([os.getpid()]) - own0)) / wall
        self.spread = sum(s.end - s.start for s in samples) / len(samples)
        print(f"{self.name} c={c}: {n} requests in {wall:.1f} s, others {others:.2f} cores", file=sys.stderr)
        return Point(self.name, self.workers, c, samples, others)


def machine_busy_s() -> float:
    """CPU seconds all cores have been busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def plot(path: Path, rows: list[dict[str, Any]], slo: Slo, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7.5, 5))
    allxy = [(r["tok_s_per_user"], r["tok_s_per_worker"]) for r in rows]
    front = pareto_frontier(allxy)
    ax.plot([allxy[i][0] for i in front], [allxy[i][1] for i in front], "-", color="grey", lw=6, alpha=0.3,
            label="frontier, all layouts")  # fmt: skip
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    for k, name in enumerate(layouts):
        mine = [r for r in rows if r["layout"] == name]
        xy = [(r["tok_s_per_user"], r["tok_s_per_worker"]) for r in mine]
        color = f"C{k}"
        front = pareto_frontier(xy)
        label = f"{name} (its frontier)"
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "-", color=color, label=label)
        for r, (x, y) in zip(mine, xy):
            ax.plot(x, y, "o", color=color, markerfacecolor=color if r["meets_slo"] else "white", ms=7)
            ax.annotate(f"c{r['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(1 / slo.tpot_s, color="grey", lw=0.8, ls=":", label=f"ITL SLO {slo.tpot_s * 1e3:g} ms")
    ax.set_xlabel("tokens/s per user (1 / mean TPOT)")
    ax.set_ylabel("output tokens/s per worker")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, title=f"filled: >= {slo.attainment:.0%} meet TTFT + ITL SLO", title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _round(v: Any) -> Any:
    return round(v, 3) if isinstance(v, float) and math.isfinite(v) else v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="mock engine, c = 1, 4, 16, two layouts (~1 min)")
    ap.add_argument("--engine", choices=["hf", "mock"], default=None, help="default: hf; mock with --quick")
    ap.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    ap.add_argument("--itl-slo-ms", type=float, default=150.0, help="on each request's mean ITL (TPOT)")
    ap.add_argument("--slo-attainment", type=float, default=0.9)
    ap.add_argument("--price-per-worker-hour", type=float, default=0.05, help="dollars (~1 cloud vCPU-hour)")
    ap.add_argument("--concurrency", default="", help="comma-separated (default 1,2,4,8,16; --quick 1,4,16)")
    ap.add_argument("--layouts", default="", help=f"comma-separated subset of {','.join(LAYOUTS)}")
    ap.add_argument("--min-requests", type=int, default=0, help="per point, at least (default 4; --quick 2)")
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--local-prefill-max-tokens", type=int, default=0, help="router flag, disagg layouts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    engine = args.engine or ("mock" if args.quick else "hf")
    levels = [int(c) for c in (args.concurrency or ("1,4,16" if args.quick else "1,2,4,8,16")).split(",")]
    layouts = args.layouts.split(",") if args.layouts else list(QUICK_LAYOUTS if args.quick else LAYOUTS)
    min_requests = args.min_requests or (2 if args.quick else 4)
    slo = Slo(args.ttft_slo_ms / 1e3, args.itl_slo_ms / 1e3, args.slo_attainment)
    extra = [] if engine == "hf" else [f"--worker-arg=--mock-timing={CPU_LIKE_TIMING}"]
    t_start = time.perf_counter()
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="pdrouter-pareto-") as tmp, contextlib.ExitStack() as stacks:
        # NOTE: every layout's stack is up at once (an idle hf stack uses ~1% of a core) and the
        # points go level by level, the layout order alternating, so load from other processes
        # on this shared machine spreads over the layouts instead of landing on one of them
        running = []
        for name in layouts:
            running.append(Layout(name, Path(tmp), engine, extra, args))
            stacks.callback(running[-1].stack.stop)
        for layout in running:
            layout.warm_up()
        for k, c in enumerate(levels):
            for layout in running if k % 2 == 0 else running[::-1]:
                points.append(layout.point(c, min_requests))
    points.sort(key=lambda p: layouts.index(p.layout))
    elapsed = time.perf_counter() - t_start
    rows = [summarize(p, args.output_tokens, slo, args.price_per_worker_hour) for p in points]
    short = [r for r in rows if r["tokens_min"] != args.output_tokens]
    if short:  # NOTE: every point must produce the same tokens per request, or the layouts differ
        raise SystemExit(f"bench.pareto: {short[0]['layout']} c={short[0]['concurrency']} streamed "
                         f"{short[0]['tokens_min']} tokens, not {args.output_tokens}")  # fmt: skip
    prompt_p50 = pct([float(s.prompt_tokens) for p in points for s in p.samples], 50)
    print(
        f"{engine} engine; streaming chat, prompt tokens p50 {prompt_p50:.0f} (system ~100 shared + "
        f"log-normal user message), {args.output_tokens} out; SLO TTFT <= {args.ttft_slo_ms:g} ms and "
        f"TPOT <= {args.itl_slo_ms:g} ms; ${args.price_per_worker_hour:g}/worker-hour; {elapsed:.0f} s"
    )
    headers = ["layout", "workers", "c", "requests", "tok/s/worker", "tok/s/user", "ttft_p50_ms",
               "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "goodput_req_s", "good_%", "$/Mtok",
               "disagg_%", "others_cores"]  # fmt: skip
    keys = ["layout", "workers", "concurrency", "requests", "tok_s_per_worker", "tok_s_per_user",
            "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "goodput_req_s"]  # fmt: skip
    cells = [[*(r[k] for k in keys), round(100 * r["good_fraction"]), r["cost_per_mtok"],
              round(100 * r["disaggregated_fraction"]), r["others_cores"]] for r in rows]  # fmt: skip
    print(table(headers, cells))
    per_worker = best_by_layout(rows, "goodput_req_s_per_worker")
    figures = {
        "best_goodput_layout": max(per_worker, key=lambda k: per_worker[k]),
        "goodput_req_s": {k: _round(v) for k, v in best_by_layout(rows, "goodput_req_s").items()},
        "goodput_req_s_per_worker": {k: _round(v) for k, v in per_worker.items()},
        "max_tok_s_per_worker": {k: _round(v) for k, v in best_by_layout(rows, "tok_s_per_worker").items()},
        "cost_per_mtok": {
            k: _round(v)
            for k, v in best_by_layout(rows, "cost_per_mtok", min, lambda r: r["meets_slo"]).items()
        },
        "slo": {"ttft_ms": args.ttft_slo_ms, "itl_ms": args.itl_slo_ms, "attainment": args.slo_attainment},
    }
    name = "pareto" + ("_quick" if args.quick else "") + ("_mock" if engine == "mock" else "")
    meta = {
        "quick": args.quick, "engine": engine, "concurrency": levels,
        "layouts": {k: LAYOUTS[k] for k in layouts},
        "output_tokens": args.output_tokens, "price_per_worker_hour": args.price_per_worker_hour,
        "local_prefill_max_tokens": args.local_prefill_max_tokens, "timing": extra, "seconds": elapsed,
        "loadavg_after": os.getloadavg(), "prompt_tokens_p50": prompt_p50,
    }  # fmt: skip
    path = save(name, {**meta, "rows": rows, **figures})
    png = path.with_suffix(".png")
    plot(png, rows, slo, f"pdrouter, {engine} engine, {args.output_tokens} output tokens, c = {levels}")
    print(f"wrote {path} and {png}")
    headline(figures)


if __name__ == "__main__":
    main()
