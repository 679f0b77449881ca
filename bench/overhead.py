"""Router overhead: TTFT added at concurrency 1 and throughput at 32, against calling the worker
directly, with the same load client for every path, measured in the same run.

    python -m bench.overhead [--quick] [--peers]

One mock worker (no modelled delay: the paths, not the model, are measured) serving both its
gRPC Worker API and its own OpenAI HTTP endpoint (`--http-port`). Paths:

- `direct`   the worker's OpenAI HTTP endpoint (baseline)
- `pdrouter` `pdrouter router` in front of the worker's gRPC API
- `sglang`   (--peers) SGLang's model gateway, round_robin, in front of the worker's HTTP endpoint
             (its own virtualenv: bench/.venvs/sglang-router, as in bench.routing)

Concurrency 1: sequential streaming chat requests of 64 tokens, TTFT p50/p99 per path; the
difference to `direct` is the TTFT the router adds. Concurrency 32: closed loop, requests/s and
tokens/s. Rounds alternate between paths so machine noise hits all of them. NVIDIA Dynamo's
frontend is not run here (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import openai

from bench.common import headline, pct, save, table
from bench.routing import Workers, start_sglang
from tests.procs import Proc, free_port, pdrouter, wait_http_ok

TOKENS = 64


async def _one(client: openai.AsyncOpenAI, i: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    ttft, tokens = 0.0, 0
    stream = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": f"overhead {i}"}], max_tokens=TOKENS,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if not ttft and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens


async def sequential(base: str, n: int) -> list[float]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    try:
        return [(await _one(client, i))[0] for i in range(n)]
    finally:
        await client.close()


async def closed_loop(base: str, n: int, concurrency: int) -> tuple[float, float]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def go(i: int) -> None:
        nonlocal tokens
        async with sem:
            _, n = await _one(client, i)
        tokens += n  # NOTE: not `tokens += await ...`: that reads `tokens` before the await

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(go(i) for i in range(n)))
    finally:
        await client.close()
    seconds = time.perf_counter() - t0
    return n / seconds, tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peers", action="store_true", help="also SGLang's model gateway")
    args = ap.parse_args()
    rounds, seq_n, loop_n = (2, 60, 128) if args.quick else (4, 150, 320)
    ttfts: dict[str, list[float]] = {}
    rates: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pdrouter-overhead-") as tmp_dir:
        tmp = Path(tmp_dir)
        workers = Workers(tmp, 1, "0,0,0,0,0,0", http=True)
        procs: list[Proc] = []
        try:
            hport = free_port()
            router = Proc(
                pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()),
                         "--worker", workers.addresses[0]),
                tmp / "router.log",
            )  # fmt: skip
            procs.append(router)
            paths = {"direct": workers.http_urls[0], "pdrouter": f"http://127.0.0.1:{hport}"}
            wait_http_ok(paths["pdrouter"] + "/ready", router, 60)
            if args.peers:
                sglang, base = start_sglang(tmp, workers, policy="round_robin")
                procs.append(sglang)
                paths["sglang"] = base
            for base in paths.values():  # warm-up
                asyncio.run(sequential(base, 5))
            for r in range(rounds):
                order = list(paths) if r % 2 == 0 else list(reversed(paths))
                for name in order:
                    ttfts.setdefault(name, []).extend(asyncio.run(sequential(paths[name], seq_n // rounds)))
                    rates.setdefault(name, []).append(
                        asyncio.run(closed_loop(paths[name], loop_n // rounds, 32))
                    )
        finally:
            for p in procs:
                p.stop()
            workers.stop()
    rows = []
    base_p50 = pct(ttfts["direct"], 50) * 1e3
    base_p99 = pct(ttfts["direct"], 99) * 1e3
    summary: dict[str, dict[str, float]] = {}
    for name in ttfts:
        p50, p99 = pct(ttfts[name], 50) * 1e3, pct(ttfts[name], 99) * 1e3
        req_s = sum(r for r, _ in rates[name]) / len(rates[name])
        tok_s = sum(t for _, t in rates[name]) / len(rates[name])
        summary[name] = {"ttft_p50_ms": p50, "ttft_p99_ms": p99, "req_s": req_s, "tok_s": tok_s}
        rows.append([name, p50, p99, p50 - base_p50, p99 - base_p99, req_s, tok_s])
    print(f"1 mock worker, {TOKENS}-token streams; TTFT at concurrency 1, throughput at 32; {rounds} rounds")
    print(
        table(
            ["path", "ttft_p50_ms", "ttft_p99_ms", "added_p50_ms", "added_p99_ms", "req/s@32", "tok/s@32"],
            rows,
        )
    )
    figures = {
        "ttft_added_ms_c1": round(summary["pdrouter"]["ttft_p50_ms"] - base_p50, 3),
        "ttft_added_p99_ms_c1": round(summary["pdrouter"]["ttft_p99_ms"] - base_p99, 3),
        "req_s_c32": round(summary["pdrouter"]["req_s"], 1),
        "req_s_ratio_vs_direct_c32": round(summary["pdrouter"]["req_s"] / summary["direct"]["req_s"], 3),
    }
    if "sglang" in summary:
        figures["ttft_added_ms_c1_sglang"] = round(summary["sglang"]["ttft_p50_ms"] - base_p50, 3)
        figures["req_s_ratio_vs_sglang_c32"] = round(
            summary["pdrouter"]["req_s"] / summary["sglang"]["req_s"], 3
        )
    path = save("overhead", {"quick": args.quick, "rounds": rounds, "summary": summary, **figures})
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
