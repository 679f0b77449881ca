"""Soak: a steady stream of requests, random client cancellations and a worker restart.

    python -m bench.soak [--quick] [--minutes M] [--rate R]

One router over one prefill and two decode mock workers (disaggregated: long prompts), each
started as its own process. Poisson arrivals at `--rate` req/s of streaming chat requests
(`max_tokens` 32, `ignore_eos`, `logprobs`, usage included); a fifth of them are cancelled by
the client after a few chunks; half-way through, one decode worker is killed with SIGKILL and
started again on the same port (its streams migrate).

Every stream the client did not cancel is checked: it completed only if it ended with
finish_reason "length" after exactly `max_tokens` tokens, or with finish_reason "stop" after at
most `max_tokens` (a legitimate stop; with `ignore_eos` and no stop strings none is expected), the
tokens counted on the client (one logprobs entry per token) and agreeing with the final usage
chunk. Anything else (no finish_reason, an early end, a wrong count, no usage) is a broken
stream. Lost = errors (the request raised) + broken streams: the goal is 0. Also reports latency
percentiles of completed requests and the router's RSS over time. Default 5 minutes;
`--quick`: 45 s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import openai

from bench.common import headline, pct, save, table
from tests.kv_helpers import worker_load
from tests.procs import Proc, free_port, pdrouter, rss_kib, wait_http_ok
from workers.model_files import resolve_model

MAX_TOKENS = 32


def check_stream(finish: str | None, tokens: int, usage_tokens: int | None) -> str:
    """The outcome of a stream that ran to its end: "completed ..." or "broken: why"."""
    if finish is None:
        return "broken: no finish_reason"
    if usage_tokens is None:
        return "broken: no usage chunk"
    if usage_tokens != tokens:
        return "broken: usage disagrees with tokens received"
    if finish == "length":
        return "completed" if tokens == MAX_TOKENS else "broken: wrong token count"
    if finish == "stop":
        return "completed (stop)" if 0 < tokens <= MAX_TOKENS else "broken: wrong token count"
    return f"broken: finish_reason {finish}"


class Fleet:
    def __init__(self, tmp: Path, model: str) -> None:
        self.tmp, self.model = tmp, model
        self.common = ["--engine", "mock", "--model", model, "--mock-timing", "2,0.05,0,5,0.1,0"]
        self.ports = {"prefill": free_port(), "decode-a": free_port(), "decode-b": free_port()}
        self.procs = {name: self._worker(name) for name in self.ports}
        hport = free_port()
        argv = pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()), "--model", model,
                        "--local-prefill-max-tokens", "16", "--stream-idle-timeout-s", "5")  # fmt: skip
        for port in self.ports.values():
            argv += ["--worker", f"127.0.0.1:{port}"]
        self.router = Proc(argv, tmp / "router.log")
        self.base = f"http://127.0.0.1:{hport}"
        wait_http_ok(self.base + "/ready", self.router, 60)

    def _worker(self, name: str) -> Proc:
        role = "prefill" if name == "prefill" else "decode"
        argv = pdrouter("worker", "--role", role, "--port", str(self.ports[name]), *self.common)
        return Proc(argv, self.tmp / f"{name}-{time.monotonic_ns()}.log")

    def restart(self, name: str) -> None:
        self.procs[name].proc.kill()
        self.procs[name].stop()
        self.procs[name] = self._worker(name)

    def stop(self) -> None:
        self.router.stop()
        for p in self.procs.values():
            p.stop()


async def soak(fleet: Fleet, seconds: float, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=fleet.base + "/v1", api_key="x", max_retries=0, timeout=120)
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    rss: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    tasks = []

    async def one(i: int, cancel_after: int | None) -> None:
        start = time.perf_counter()
        try:
            stream = await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": f"soak {seed} {i} " + "w " * 60}],
                max_tokens=MAX_TOKENS, stream=True, logprobs=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            chunks = tokens = 0
            finish: str | None = None
            usage_tokens: int | None = None
            async for chunk in stream:
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after and finish is None:
                    await stream.close()
                    outcomes["cancelled by client"] += 1
                    return
                if chunk.usage is not None:
                    usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.logprobs is not None and choice.logprobs.content:
                        tokens += len(choice.logprobs.content)
                    if choice.finish_reason:
                        finish = choice.finish_reason
            verdict = check_stream(finish, tokens, usage_tokens)
            outcomes[verdict] += 1
            if verdict.startswith("completed"):
                latencies.append(time.perf_counter() - start)
        except openai.APIStatusError as e:
            outcomes[f"error {e.status_code}"] += 1
        except Exception as e:
            outcomes[f"error {type(e).__name__}"] += 1

    restarted = False
    i = 0
    next_sample = 0.0
    arrival = 0.0  # NOTE: an absolute schedule: a late wake-up does not lower the rate sent
    while (now := time.perf_counter() - t0) < seconds:
        if now >= next_sample:
            rss.append((round(now, 1), round(rss_kib(fleet.router.pid) / 1024, 1)))
            next_sample += 5
        if not restarted and now >= seconds / 2:
            fleet.restart("decode-a")
            restarted = True
        cancel = rng.randint(2, 10) if rng.random() < 0.2 else None
        tasks.append(asyncio.create_task(one(i, cancel)))
        i += 1
        arrival += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
    await asyncio.gather(*tasks)
    await client.close()
    rss.append((round(time.perf_counter() - t0, 1), round(rss_kib(fleet.router.pid) / 1024, 1)))
    return {"sent": i, "outcomes": dict(outcomes), "latencies": latencies, "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--minutes", type=float, default=0.0)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seconds = 60 * (args.minutes or (0.75 if args.quick else 5))
    with tempfile.TemporaryDirectory(prefix="pdrouter-soak-") as tmp:
        fleet = Fleet(Path(tmp), str(resolve_model("default")))
        try:
            result = asyncio.run(soak(fleet, seconds, args.rate, args.seed))
            time.sleep(1)  # NOTE: let releases land before reading the workers' state
            leftovers = {name: worker_load(f"127.0.0.1:{port}") for name, port in fleet.ports.items()}
        finally:
            fleet.stop()
    out = result["outcomes"]
    errors = sum(v for k, v in out.items() if k.startswith("error"))
    broken = sum(v for k, v in out.items() if k.startswith("broken"))
    lat = result["latencies"]
    used = sum(ld.kv_blocks_used for ld in leftovers.values())
    pinned = sum(ld.kv_transfer.handles_pinned for ld in leftovers.values())
    print(f"{seconds:g} s at {args.rate:g} req/s ({result['sent'] / seconds:.1f} sent per s), 20% cancelled "
          f"by the client, decode-a restarted half-way; completed = finish_reason length with exactly "
          f"{MAX_TOKENS} tokens (or stop)")  # fmt: skip
    print(table(["outcome", "requests"], [[k, v] for k, v in sorted(out.items())]))
    print(f"lost: {errors + broken} ({errors} errors, {broken} broken streams)")
    print(f"e2e latency of completed: p50 {pct(lat, 50) * 1e3:.0f} ms, p99 {pct(lat, 99) * 1e3:.0f} ms")
    print("router RSS MiB over time: " + ", ".join(f"{t:g}s {m:g}" for t, m in result["rss"]))
    print(f"afterwards: {used} KV blocks used, {pinned} handles pinned")
    rss = [m for _, m in result["rss"]]
    figures = {
        "sent": result["sent"],
        "sent_per_s": round(result["sent"] / seconds, 1),
        "completed": sum(v for k, v in out.items() if k.startswith("completed")),
        "completed_stop": out.get("completed (stop)", 0),
        "cancelled_by_client": out.get("cancelled by client", 0),
        "lost": errors + broken,
        "errors": errors,
        "broken_streams": broken,
        "p99_e2e_ms": round(pct(lat, 99) * 1e3, 1),
        "rss_start_mib": rss[0],
        "rss_end_mib": rss[-1],
        "blocks_used_after": used,
        "handles_pinned_after": pinned,
    }
    path = save("soak", {"seconds": seconds, "rate": args.rate, **result, **figures})
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
