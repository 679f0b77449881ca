"""KV-aware routing on SGLang's "generated shared prefix" workload, policy against policy.

    python -m bench.routing [--quick] [--sglang] [--workers 8] [--rate R]

Workload (SGLang's shape, scaled to this machine): G groups x P prompts; each group shares a
1,024-token prefix (a system prompt / document) and each prompt adds its own ~64-token question
(random words, as text: SGLang's gateway routes on text);
64 output tokens each; Poisson arrivals at `--rate` requests/s, groups interleaved at random.
Served by `--workers` mock workers in one process (`pdrouter worker --engine mock --num-workers N`:
the real scheduler, block manager and prefix cache, with modelled step times) behind one
`pdrouter router`, a fresh stack per policy so no policy inherits another's caches:

- `kv`           the default: DESIGN.md's cost over the exact KV index from worker events
- `round_robin`  and `random`: the baselines
- `oracle`       round robin over groups, then pinned (x-session-id = group): every group's
                 prefix is computed once, on one worker, and the groups are spread evenly
- `sglang`       (--sglang) SGLang's model gateway, `cache_aware` policy, in its own virtualenv
                 (bench/.venvs/sglang-router), in front of the same workers' OpenAI HTTP ports

Per policy: prefix hit rate (cached prompt tokens / prompt tokens, from `usage`), TTFT p50/p99
and end-to-end latency measured by the client (streaming), and balance (the busiest worker's
requests / a fair share). The mock's step times default to a GPU-like model (prefill 2 ms +
0.08 ms per token, decode step 8 ms + 0.15 ms per sequence) so a run takes seconds; pass
`--mock-timing` (e.g. the output of `pdrouter calibrate`) to model this machine instead.
Also reported: the routing decision time at 256 workers with ~10k cached blocks each
(bench.routing_decision's index, the workload's 1k-token prompts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import openai

from bench.common import headline, pct, peer_venv, save, table
from bench.routing_decision import run_case
from router.tokenizer import Tokenizer
from tests.procs import Proc, free_port, free_port_run, pdrouter, wait_http_ok
from workers.model_files import resolve_model

PREFIX_TOKENS = 1024
QUESTION_TOKENS = 64
OUTPUT_TOKENS = 64  # --output-tokens
GPU_LIKE_TIMING = "2,0.08,0,8,0.15,0"
POLICIES = ("oracle", "kv", "round_robin", "random")
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "do", "zu", "ra", "fe", "gi", "ho", "wa")
SGLANG_ROUTER = "sglang-router==0.3.2"  # the version docs/benchmarks.md measured


@dataclass(slots=True)
class Request:
    group: int
    prompt: str
    at: float  # seconds after the start


@dataclass(slots=True)
class Result:
    group: int
    worker: str
    ttft: float
    e2e: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


def _text(rng: random.Random, tokenizer: Tokenizer, num_tokens: int) -> str:
    """Random words up to about `num_tokens` tokens (text: SGLang's gateway routes on text)."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words))) < num_tokens:
        words += [f"{rng.choice(SYLLABLES)}{rng.choice(SYLLABLES)}" for _ in range(16)]
    while len(tokenizer.encode(" ".join(words))) > num_tokens:
        words.pop()
    return " ".join(words)


def workload(groups: int, per_group: int, rate: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    tokenizer = Tokenizer.from_dir(resolve_model("default"))
    prefixes = [_text(rng, tokenizer, PREFIX_TOKENS) for _ in range(groups)]
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    t, out = 0.0, []
    for g in order:
        t += rng.expovariate(rate)
        out.append(Request(g, prefixes[g] + "\n\nQuestion: " + _text(rng, tokenizer, QUESTION_TOKENS), t))
    return out


class Workers:
    """The workers on consecutive ports (gRPC; OpenAI HTTP when asked): N mock workers in one
    process, or N real-model workers, one process each, sharing this machine's cores."""

    def __init__(self, tmp: Path, n: int, timing: str, http: bool, engine: str = "mock") -> None:
        self.grpc = free_port_run(n)
        self.http = free_port_run(n) if http else 0
        self.procs: list[Proc] = []
        if engine == "mock":
            argv = pdrouter(
                "worker", "--engine", "mock", "--num-workers", str(n), "--port", str(self.grpc),
                "--mock-timing", timing, "--mock-num-blocks", "8192",
            )  # fmt: skip
            self.procs.append(Proc(argv + self._http_args(0, http), tmp / "workers.log"))
        else:
            threads = str(max(1, (os.cpu_count() or 1) // n))
            for i in range(n):
                argv = pdrouter(
                    "worker", "--engine", engine, "--port", str(self.grpc + i), "--threads", threads
                )
                self.procs.append(Proc(argv + self._http_args(i, http), tmp / f"worker-{i}.log"))
        self.addresses = [f"127.0.0.1:{self.grpc + i}" for i in range(n)]
        self.http_urls = [f"http://127.0.0.1:{self.http + i}" for i in range(n)] if http else []
        word = " http http://" if http else " ready ("
        for proc in self.procs:
            _wait_log(proc, word, n if engine == "mock" else 1, 300)

    def _http_args(self, i: int, http: bool) -> list[str]:
        return ["--http-port", str(self.http + i)] if http else []

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def _wait_log(proc: Proc, word: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while proc.log().count(word) < count:
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"workers did not get ready:\n{proc.log()[-3000:]}")
        time.sleep(0.05)  # readiness poll


def start_router(tmp: Path, workers: Workers, policy: str, extra: list[str]) -> tuple[Proc, str]:
    port = free_port()
    argv = pdrouter("router", "--port", str(port), "--grpc-port", str(free_port()), *extra)
    for a in workers.addresses:
        argv += ["--worker", a]
    argv += ["--decode-policy", "round_robin" if policy == "oracle" else policy]
    proc = Proc(argv, tmp / f"router-{policy}.log")
    base = f"http://127.0.0.1:{port}"
    wait_http_ok(base + "/ready", proc, 60)
    # NOTE: /ready means one healthy worker; wait for all of them (the pool's health gauge)
    deadline = time.monotonic() + 30
    while _get(base + "/metrics").count("pdrouter_worker_healthy{") < len(workers.addresses):
        if time.monotonic() > deadline:
            raise RuntimeError("router did not see every worker")
        time.sleep(0.05)
    return proc, base


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def start_sglang(tmp: Path, workers: Workers, policy: str = "cache_aware") -> tuple[Proc, str]:
    py = peer_venv("sglang-router", SGLANG_ROUTER) / "python"
    port = free_port()
    argv = [str(py), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--policy", policy, "--prometheus-port", str(free_port()),
            "--worker-urls", *workers.http_urls]  # fmt: skip
    proc = Proc(argv, tmp / "sglang-router.log")
    base = f"http://127.0.0.1:{port}"
    # NOTE: it registers workers in the background: ready once /workers lists them all healthy
    deadline = time.monotonic() + 90
    while True:
        try:
            listed = json.loads(_get(base + "/workers")).get("workers", [])
            if sum(1 for w in listed if w.get("is_healthy")) == len(workers.http_urls):
                break
        except (OSError, ValueError):
            pass
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"sglang-router did not get ready:\n{proc.log()[-3000:]}")
        time.sleep(0.2)  # readiness poll
    return proc, base


async def run(
    base: str, requests: list[Request], pin_groups: bool, worker_of: dict[str, str], output_tokens: int
) -> list[Result]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    t0 = time.perf_counter()

    async def one(r: Request) -> Result:
        await asyncio.sleep(max(0.0, t0 + r.at - time.perf_counter()))  # the arrival schedule
        start = time.perf_counter()
        raw = await client.completions.with_raw_response.create(
            model="default", prompt=r.prompt, max_tokens=output_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            extra_headers={"x-session-id": f"group-{r.group}"} if pin_groups else None,
        )  # fmt: skip
        route = raw.headers.get("x-pdrouter-route", "")
        ttft, usage = 0.0, None
        async for chunk in raw.parse():
            if not ttft and chunk.choices and chunk.choices[0].text:
                ttft = time.perf_counter() - start
            usage = chunk.usage or usage
        worker = dict(p.split("=", 1) for p in route.split(";") if "=" in p).get("decode", "")
        details = usage.prompt_tokens_details if usage is not None else None
        return Result(
            r.group, worker_of.get(worker, worker), ttft, time.perf_counter() - start,
            usage.prompt_tokens if usage else 0, (details.cached_tokens or 0) if details else 0,
            usage.completion_tokens if usage else 0,
        )  # fmt: skip

    try:
        return await asyncio.gather(*(one(r) for r in requests))
    finally:
        await client.close()


def summarize(name: str, results: list[Result], num_workers: int) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    counts = Counter(r.worker for r in results if r.worker)
    fair = len(results) / num_workers
    spread: dict[int, set[str]] = {}
    for r in results:
        if r.worker:
            spread.setdefault(r.group, set()).add(r.worker)
    return {
        "policy": name,
        "requests": len(results),
        "hit_rate": cached / prompt if prompt else 0.0,
        "ttft_p50_ms": pct([r.ttft for r in results], 50) * 1e3,
        "ttft_p99_ms": pct([r.ttft for r in results], 99) * 1e3,
        "e2e_p50_ms": pct([r.e2e for r in results], 50) * 1e3,
        "max_share": max(counts.values()) / fair if counts else float("nan"),
        "workers_used": len(counts),
        "workers_per_group": sum(map(len, spread.values())) / len(spread) if spread else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (about a minute)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=0, help="prompts per group (default 8; --quick 6)")
    ap.add_argument("--rate", type=float, default=0.0, help="arrivals per second (default: ~70%% load)")
    ap.add_argument("--mock-timing", default=GPU_LIKE_TIMING)
    ap.add_argument("--sglang", action="store_true", help="also run SGLang's model gateway (cache_aware)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", choices=["mock", "hf"], default="mock", help="hf: real-model workers")
    ap.add_argument("--output-tokens", type=int, default=OUTPUT_TOKENS)
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset to run")
    ap.add_argument("--router-arg", action="append", default=[], help="extra argument for pdrouter router")
    args = ap.parse_args()
    per_group = args.per_group or (6 if args.quick else 8)
    rate = args.rate or 24.0
    requests = workload(args.groups, per_group, rate, args.seed)
    policies = [*args.policies.split(","), *(["sglang"] if args.sglang else [])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdrouter-bench-routing-") as tmp_dir:
        tmp = Path(tmp_dir)
        for policy in policies:
            workers = Workers(tmp, args.workers, args.mock_timing, policy == "sglang", args.engine)
            try:
                if policy == "sglang":
                    proc, base = start_sglang(tmp, workers)
                else:
                    proc, base = start_router(tmp, workers, policy, args.router_arg)
                worker_of = {a: f"w{i}" for i, a in enumerate(workers.addresses)}
                try:
                    results = asyncio.run(
                        run(base, requests, policy == "oracle", worker_of, args.output_tokens)
                    )
                finally:
                    proc.stop()
            finally:
                workers.stop()
            rows.append(summarize(policy, results, args.workers))
            print(f"{policy}: done", file=sys.stderr)
    decision = run_case(
        256, PREFIX_TOKENS // 16 + QUESTION_TOKENS // 16, 300 if args.quick else 2000, args.seed
    )
    headers = ["policy", "requests", "hit_rate", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "max_share",
               "workers_used", "workers_per_group"]  # fmt: skip
    print(
        f"{args.groups} groups x {per_group} prompts, {PREFIX_TOKENS}+{QUESTION_TOKENS} tokens in, "
        f"{args.output_tokens} out, {rate:g} req/s Poisson, {args.workers} {args.engine} workers"
        + (f" ({args.mock_timing})" if args.engine == "mock" else "")
    )
    print(table(headers, [[r[h] for h in headers] for r in rows]))
    print(
        "routing decision, 256 workers x ~10k blocks, 1k-token prompt: "
        f"p50 {decision['decision_p50_us']:.0f} us, p99 {decision['decision_p99_us']:.0f} us"
    )
    by = {r["policy"]: r for r in rows}
    figures: dict[str, float] = {"decision_p99_us_256_workers": round(decision["decision_p99_us"], 1)}
    if "kv" in by:
        kv = by["kv"]
        figures |= {"hit_rate_kv": round(kv["hit_rate"], 4), "max_share_kv": round(kv["max_share"], 2)}
        if "oracle" in by:
            figures["hit_rate_oracle"] = round(by["oracle"]["hit_rate"], 4)
            figures["hit_rate_vs_oracle"] = round(kv["hit_rate"] / by["oracle"]["hit_rate"], 3)
        for other in ("round_robin", "random", "sglang"):
            if other in by:
                figures[f"ttft_p50_speedup_vs_{other}"] = round(
                    by[other]["ttft_p50_ms"] / kv["ttft_p50_ms"], 2
                )
        if "sglang" in by:
            figures["hit_rate_vs_sglang"] = round(kv["hit_rate"] / max(by["sglang"]["hit_rate"], 1e-9), 3)
    name = "routing" if args.engine == "mock" else f"routing_{args.engine}"
    meta = {"quick": args.quick, "engine": args.engine, "rate": rate, "timing": args.mock_timing}
    path = save(name, {**meta, "rows": rows, **figures})
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
