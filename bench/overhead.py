"""Router overhead: TTFT added at concurrency 1 and throughput at 32, against calling the worker
directly, with the same load client for every path, measured in the same run.

    python -m bench.overhead [--quick] [--peers | --sglang | --dynamo] [--mock-decode-ms MS]

One mock worker (no modelled delay: the paths, not the model, are measured) serving both its
gRPC Worker API and its own OpenAI HTTP endpoint (`--http-port`). Paths:

- `direct`   the worker's OpenAI HTTP endpoint (baseline)
- `pdrouter` `pdrouter router` in front of the worker's gRPC API
- `sglang`   (--sglang, --peers) SGLang's model gateway, round_robin, in front of the worker's
             HTTP endpoint (its own virtualenv: bench/.venvs/sglang-router, as in bench.routing)
- `dynamo`   (--dynamo, --peers) NVIDIA Dynamo 1.6.1's frontend (round-robin) in front of its own
             mocker engine with a huge --speedup-ratio: Dynamo cannot front our worker, so this
             row is its whole stack against ours (bench.dynamo: bench/.venvs/dynamo, loopback,
             file discovery)

Concurrency 1: sequential streaming chat requests of 64 tokens (`ignore_eos`), TTFT p50/p99 per
path; the difference to `direct` is the TTFT the router adds. Concurrency 32: closed loop,
requests/s and tokens/s. Rounds alternate between paths so machine noise hits all of them.

Also per path: completion tokens per request (every path must stream all 64), SSE chunks per
stream at 32, and CPU milliseconds per request at 32 of the path's server processes (with their
children) and of this load client. With no decode delay our worker has every token ready at once
and streams coalesce into a few chunks, while Dynamo's mocker sends one chunk per token; the
client parses each chunk, and on a small machine it is the bottleneck. `--mock-decode-ms 0.2`
gives our worker a decode step so it too streams one token per chunk (like for like; saved as
overhead_decode_step.json).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from pathlib import Path

import openai

from bench import dynamo
from bench.common import headline, pct, save, table
from bench.routing import Workers, start_sglang
from tests.procs import Proc, free_port, pdrouter, wait_http_ok
from workers.model_files import resolve_model

TOKENS = 64
CONCURRENCY = 32


async def _one(client: openai.AsyncOpenAI, i: int) -> tuple[float, int, int]:
    """(TTFT, completion tokens, SSE chunks) of one streaming chat request."""
    t0 = time.perf_counter()
    ttft, tokens, chunks = 0.0, 0, 0
    stream = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": f"overhead {i}"}], max_tokens=TOKENS,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        chunks += 1
        if not ttft and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens, chunks


async def sequential(base: str, n: int) -> list[tuple[float, int, int]]:
    """n requests one after another."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    try:
        return [await _one(client, i) for i in range(n)]
    finally:
        await client.close()


async def closed_loop(base: str, n: int, concurrency: int) -> tuple[float, list[tuple[float, int, int]]]:
    """Wall seconds for n requests, `concurrency` at a time, and each one's result."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    sem = asyncio.Semaphore(concurrency)

    async def go(i: int) -> tuple[float, int, int]:
        async with sem:
            return await _one(client, i)

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(go(i) for i in range(n)))
    finally:
        await client.close()
    return time.perf_counter() - t0, list(results)


def cpu_seconds(roots: list[int]) -> float:
    """User + system CPU seconds so far of these processes and their descendants (Linux /proc)."""
    info: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # NOTE: gone since the listing
                continue
            info[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in info.items():
        children.setdefault(ppid, []).append(pid)
    ticks, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in info:
            continue
        seen.add(pid)
        ticks += info[pid][1]
        todo += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peers", action="store_true", help="also the peers: --sglang and --dynamo")
    ap.add_argument("--sglang", action="store_true", help="also SGLang's model gateway")
    ap.add_argument("--dynamo", action="store_true", help="also NVIDIA Dynamo's frontend + mocker")
    ap.add_argument(
        "--mock-decode-ms", type=float, default=0.0,
        help="our mock worker's decode step (default 0: ready tokens leave together, a few chunks "
             "per stream; 0.2: one token per chunk, as Dynamo's mocker streams)",
    )  # fmt: skip
    args = ap.parse_args()
    rounds, seq_n, loop_n = (2, 60, 128) if args.quick else (4, 150, 320)
    ttfts: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    chunks: dict[str, list[int]] = {}
    loop_s: dict[str, float] = {}
    loop_tokens: dict[str, int] = {}
    server_cpu: dict[str, float] = {}
    client_cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pdrouter-overhead-") as tmp_dir:
        tmp = Path(tmp_dir)
        workers = Workers(tmp, 1, f"0,0,0,{args.mock_decode_ms:g},0,0", http=True)
        procs: list[Proc] = []
        try:
            hport = free_port()
            router = Proc(
                pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()),
                         "--worker", workers.addresses[0]),
                tmp / "router.log",
            )  # fmt: skip
            procs.append(router)
            worker_pids = [p.pid for p in workers.procs]
            paths = {"direct": workers.http_urls[0], "pdrouter": f"http://127.0.0.1:{hport}"}
            servers = {"direct": worker_pids, "pdrouter": [router.pid, *worker_pids]}
            wait_http_ok(paths["pdrouter"] + "/ready", router, 60)
            if args.peers or args.sglang:
                sglang, base = start_sglang(tmp, workers, policy="round_robin")
                procs.append(sglang)
                paths["sglang"], servers["sglang"] = base, [sglang.pid, *worker_pids]
            if args.peers or args.dynamo:
                dynamo_procs, base = dynamo.start(tmp, resolve_model("default"))
                procs += dynamo_procs
                paths["dynamo"], servers["dynamo"] = base, [p.pid for p in dynamo_procs]
            for base in paths.values():  # warm-up
                asyncio.run(sequential(base, 5))
            for r in range(rounds):
                order = list(paths) if r % 2 == 0 else list(reversed(paths))
                for name in order:
                    seq = asyncio.run(sequential(paths[name], seq_n // rounds))
                    ttfts.setdefault(name, []).extend(t for t, _, _ in seq)
                    tokens.setdefault(name, []).extend(n for _, n, _ in seq)
                    cpu0, self0 = cpu_seconds(servers[name]), _self_cpu()
                    seconds, results = asyncio.run(closed_loop(paths[name], loop_n // rounds, CONCURRENCY))
                    server_cpu[name] = server_cpu.get(name, 0.0) + cpu_seconds(servers[name]) - cpu0
                    client_cpu[name] = client_cpu.get(name, 0.0) + _self_cpu() - self0
                    loop_s[name] = loop_s.get(name, 0.0) + seconds
                    loop_tokens[name] = loop_tokens.get(name, 0) + sum(n for _, n, _ in results)
                    tokens[name].extend(n for _, n, _ in results)
                    chunks.setdefault(name, []).extend(c for _, _, c in results)
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
        n = len(chunks[name])  # requests in the closed loops
        s = summary[name] = {
            "ttft_p50_ms": p50, "ttft_p99_ms": p99, "req_s": n / loop_s[name],
            "tok_s": loop_tokens[name] / loop_s[name],
            "tokens_min": min(tokens[name]), "tokens_max": max(tokens[name]),
            "chunks_per_req": sum(chunks[name]) / n,
            "server_cpu_ms_per_req": server_cpu[name] / n * 1e3,
            "client_cpu_ms_per_req": client_cpu[name] / n * 1e3,
        }  # fmt: skip
        rows.append([name, p50, p99, p50 - base_p50, p99 - base_p99, s["req_s"], s["tok_s"],
                     _span(tokens[name]), s["chunks_per_req"], s["server_cpu_ms_per_req"],
                     s["client_cpu_ms_per_req"]])  # fmt: skip
    print(
        f"1 mock worker (decode step {args.mock_decode_ms:g} ms), {TOKENS}-token streams; TTFT at "
        f"concurrency 1, the rest at {CONCURRENCY}; {rounds} rounds"
    )
    headers = ["path", "ttft_p50_ms", "ttft_p99_ms", "added_p50_ms", "added_p99_ms", "req/s", "tok/s",
               "tokens/req", "chunks/req", "server_cpu_ms/req", "client_cpu_ms/req"]  # fmt: skip
    print(table(headers, rows))
    for name, got in tokens.items():
        if set(got) != {TOKENS}:
            print(f"WARNING: {name} streamed {_span(got)} completion tokens per request, not {TOKENS}")
    ours = summary["pdrouter"]
    figures = {
        "ttft_added_ms_c1": round(ours["ttft_p50_ms"] - base_p50, 3),
        "ttft_added_p99_ms_c1": round(ours["ttft_p99_ms"] - base_p99, 3),
        "req_s_c32": round(ours["req_s"], 1),
        "req_s_ratio_vs_direct_c32": round(ours["req_s"] / summary["direct"]["req_s"], 3),
    }
    for peer in ("sglang", "dynamo"):
        if peer in summary:
            figures[f"ttft_added_ms_c1_{peer}"] = round(summary[peer]["ttft_p50_ms"] - base_p50, 3)
            figures[f"req_s_ratio_vs_{peer}_c32"] = round(ours["req_s"] / summary[peer]["req_s"], 3)
    meta = {
        "quick": args.quick, "rounds": rounds, "mock_decode_ms": args.mock_decode_ms,
        "dynamo": dynamo.VERSION if "dynamo" in summary else None,
    }  # fmt: skip
    name = "overhead" if not args.mock_decode_ms else "overhead_decode_step"
    path = save(name, {**meta, "summary": summary, **figures})
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
