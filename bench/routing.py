"""KV-aware routing, policy against policy: tuned on one workload, reported on another.

    python -m bench.routing [--quick] [--timing cpu|h100-8b|calibrate|A,B,C,D,E,F|PATH]
                            [--speedup X] [--kv-weight W] [--rounds N] [--check-weights]
                            [--sglang] [--engine mock|hf]

1. Tune: the `kv` policy's `--kv-overlap-weight` (router flag) is swept over `--tune-weights` on
   SGLang's "generated shared prefix" workload (G groups x P prompts sharing a 1,024-token prefix,
   ~64-token questions; bench/workloads.py: shared_prefix); the weight with the lowest TTFT p50
   is kept (bench.workloads.pick_weight). Round robin and the oracle run on it too, for reference
   (--quick: round robin only). `--kv-weight W` skips the sweep and uses W (reported as given).
2. Report, on a held-out workload the weight never saw: multi-turn chats over several distinct
   shared system prompts; each turn's prompt is the previous prompt + the reply the model gave
   + a new user message, so prompts grow by the model's own output (workloads.multi_turn).
   Policies: `kv` at the chosen weight; `sticky` (round robin for a conversation's first turn,
   then pinned by `x-session-id`: session affinity); `round_robin`; `random`; `sglang` with
   `--sglang` (SGLang's model gateway, cache_aware, in bench/.venvs/sglang-router).
   `--check-weights` also runs kv at the other weights there, after the choice (marked *).

Served by `--workers` mock workers in one process (`pdrouter worker --engine mock --num-workers
N`: the real scheduler, block manager and prefix cache; each step sleeps a step-time model
instead of computing) behind one `pdrouter router`, a fresh stack per run so no run inherits
another's caches. The step-time model (`--timing`) is one of:

- `cpu` (default): `pdrouter calibrate --threads 2` fitted to the real engine (SmolLM2-135M,
  oneDNN GEMMs) on the 2-vCPU AMD EPYC dev VM while idle, 2026-12-02; the fit bench.pareto uses.
  It models each worker as this VM, i.e. the hardware of the real-model run (`--engine hf`).
- `calibrate`: run `pdrouter calibrate --quick` now and use its fit (meaningless on a busy machine:
  other processes inflate every step; it warns when the load average is high).
- `h100-8b`: a roofline, not a measurement: Llama-3.1-8B in BF16 (8.03e9 parameters, 32 layers,
  8 KV heads x 128) on one H100 SXM at its datasheet peaks (989 TFLOPS dense BF16, 3.35 TB/s HBM3)
  times assumed efficiencies of 50% (FLOPs) and 80% (bandwidth); see TIMINGS.
- six numbers a,b,c,d,e,f or the JSON file `pdrouter calibrate` writes.

Arrival rates follow the timing: `--load` (default 0.7) of the workers' modelled capacity if
nothing were cached (workloads.request_ms), so no policy is measured in overload. The modelled
clock runs `--speedup` times as fast as the wall clock (default 1 for `cpu`, 0.25 for `h100-8b`;
x4 with --quick): step times, arrivals and think times are divided by it and the latencies
reported are multiplied back (modelled ms). The mock's steps cannot run faster than this
machine's per-step overhead (scheduler, streaming, client; much more on a loaded machine), so
after each run one fresh prompt is sent alone and `fid_ttft` / `fid_tpot` report its measured /
modelled TTFT and time per output token: near 1, the run is what the model says; well above 1,
this machine, not the model, set the pace (raise the clock's slack with a lower --speedup).

Per policy: prefix hit rate (cached prompt tokens / prompt tokens, from `usage`), TTFT p50/p99 and
end-to-end p50 measured by the client (streaming), balance (the busiest worker's requests / a fair
share), workers per group/conversation, and (chats) the share of turns served by the worker that
served the conversation's previous turn. Runs go one after another; `--rounds N` repeats them
in turns (ABC, CBA, ...) and pools each policy's requests, so that load elsewhere on the machine
lands on every policy alike. Also the routing decision time at 256 workers with ~10k cached
blocks each (bench.routing_decision's index, 1k-token prompts).

`--engine hf`: real-model workers, one process each, sharing this machine's cores; latencies in
wall-clock ms; the arrival rate still comes from the `cpu` fit (set --load to suit). Tuning on
the real model is slow: pass the weight the mock tuning chose with --kv-weight, and --rounds 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import openai

from bench.common import headline, peer_venv, save, table
from bench.routing_decision import run_case
from bench.workloads import (
    ChatWorkload,
    Request,
    Result,
    TextFn,
    chat_prompt_tokens,
    first_prompt,
    multi_turn,
    next_prompt,
    offered_rate,
    pick_weight,
    request_ms,
    shared_prefix,
    start_rate,
    summarize,
    words_to_tokens,
)
from router.routing import DEFAULT_OVERLAP_WEIGHT
from router.tokenizer import Tokenizer
from tests.procs import Proc, free_port, free_port_run, pdrouter, wait_http_ok
from workers.model_files import resolve_model

PREFIX_TOKENS = 1024
QUESTION_TOKENS = 64
OUTPUT_TOKENS = 64  # --output-tokens
TUNE_POLICIES = ("oracle", "round_robin")  # beside the weight sweep, for reference (--quick: the last)
CHAT_POLICIES = ("kv", "sticky", "round_robin", "random")  # --quick: the first three
SGLANG_ROUTER = "sglang-router==0.3.2"  # the version docs/benchmarks.md measured


@dataclass(frozen=True, slots=True)
class Timing:
    name: str
    coefs: tuple[float, float, float, float, float, float]  # prefill a+b*n+c*n^2, decode d+e*batch+f*ctx
    source: str
    speedup: float  # default for --speedup


def _roofline_h100_8b() -> tuple[float, ...]:
    params, layers, d_model, kv_heads, head_dim = 8.03e9, 32, 4096, 8, 128
    flops, hbm = 989.4e12 * 0.5, 3.35e12 * 0.8  # H100 SXM dense BF16, HBM3; assumed efficiencies
    weights_ms = params * 2 / hbm * 1e3  # every forward pass reads the BF16 weights once
    per_token_ms = 2 * params / flops * 1e3  # 2 FLOPs per parameter per token
    attention_ms = 2 * layers * d_model / flops * 1e3  # causal QK^T + PV of n tokens: 2*L*d*n^2 FLOPs
    kv_ms = 2 * layers * kv_heads * head_dim * 2 / hbm * 1e3  # K and V in BF16, per context token
    return (weights_ms, per_token_ms, attention_ms, weights_ms, per_token_ms, kv_ms)


TIMINGS = {
    "cpu": Timing(
        "cpu",
        (22.3, 0.702, 0.000329, 19.6, 0.738, 0.00670),
        "calibrated: pdrouter calibrate --threads 2, SmolLM2-135M on the 2-vCPU AMD EPYC VM (idle), "
        "2026-12-02",
        1.0,
    ),
    "h100-8b": Timing(
        "h100-8b",
        tuple(round(v, 9) for v in _roofline_h100_8b()),  # type: ignore[arg-type]
        "roofline, not measured: Llama-3.1-8B BF16 on one H100 SXM at 50% of 989 TFLOPS, 80% of 3.35 TB/s",
        0.25,  # NOTE: ~6 ms decode steps run 4x slow, so this machine's per-step overhead stays small
    ),
}


def resolve_timing(spec: str, tmp: Path) -> Timing:
    """A named profile, `calibrate` (run it now), six numbers, or a `pdrouter calibrate` JSON file."""
    if spec in TIMINGS:
        return TIMINGS[spec]
    if spec == "calibrate":
        out = tmp / "calibration.json"
        threads = str(os.cpu_count() or 1)
        argv = pdrouter("calibrate", "--quick", "--threads", threads, "--out", str(out))
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=sys.stderr)
        spec_file = out
        took = f", {time.perf_counter() - t0:.0f} s"
    else:
        spec_file, took = Path(os.path.expanduser(spec)), ""
    if spec_file.is_file():
        cal = json.loads(spec_file.read_text())
        coefs = tuple(float(cal[k]) for k in "abcdef")
        what = f"{cal.get('model', '?')} on {cal.get('device', '?')}, {cal.get('threads', '?')} threads"
        r2 = [float(cal.get(k, "nan")) for k in ("prefill_r2", "decode_r2")]
        fit = f"R^2 prefill {r2[0]:.3f} decode {r2[1]:.3f}"
        name = "calibrated now" if spec == "calibrate" else str(spec_file)
        return Timing(name, coefs, f"calibrated: pdrouter calibrate, {what}, {fit}{took}", 1.0)  # type: ignore[arg-type]
    try:
        a, b, c, d, e, f = (float(x) for x in spec.split(","))
    except ValueError as exc:
        raise SystemExit(
            f"--timing {spec!r}: a profile ({', '.join(TIMINGS)}), calibrate, a,b,c,d,e,f or a JSON file"
        ) from exc
    return Timing(spec, (a, b, c, d, e, f), "given on the command line", 1.0)


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


def start_router(tmp: Path, workers: Workers, name: str, policy: str, extra: list[str]) -> tuple[Proc, str]:
    port = free_port()
    argv = pdrouter("router", "--port", str(port), "--grpc-port", str(free_port()), *extra)
    for a in workers.addresses:
        argv += ["--worker", a]
    argv += ["--decode-policy", policy]
    proc = Proc(argv, tmp / f"router-{name}.log")
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


class Client:
    """Streams one completion and times it; `worker_of` names workers w0.. by address."""

    def __init__(self, base: str, worker_of: dict[str, str], output_tokens: int) -> None:
        self.api = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
        self.worker_of = worker_of
        self.output_tokens = output_tokens

    async def complete(
        self, prompt: str, key: int, turn: int, session: str | None, max_tokens: int = 0
    ) -> tuple[Result, str]:
        start = time.perf_counter()
        raw = await self.api.completions.with_raw_response.create(
            model="default", prompt=prompt, max_tokens=max_tokens or self.output_tokens, temperature=0,
            stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            extra_headers={"x-session-id": session} if session else None,
        )  # fmt: skip
        route = raw.headers.get("x-pdrouter-route", "")
        ttft, usage, text = 0.0, None, []
        async for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].text:
                ttft = ttft or time.perf_counter() - start
                text.append(chunk.choices[0].text)
            usage = chunk.usage or usage
        worker = dict(p.split("=", 1) for p in route.split(";") if "=" in p).get("decode", "")
        details = usage.prompt_tokens_details if usage is not None else None
        result = Result(
            key, turn, self.worker_of.get(worker, worker), ttft, time.perf_counter() - start,
            usage.prompt_tokens if usage else 0, (details.cached_tokens or 0) if details else 0,
            usage.completion_tokens if usage else 0,
        )  # fmt: skip
        return result, "".join(text)

    async def close(self) -> None:
        await self.api.close()


async def run_shared_prefix(client: Client, requests: list[Request], pin: bool, clock: float) -> list[Result]:
    """Every request at its arrival time (`clock`: wall seconds per workload second)."""
    t0 = time.perf_counter()

    async def one(r: Request) -> Result:
        await asyncio.sleep(max(0.0, t0 + r.at * clock - time.perf_counter()))
        return (await client.complete(r.prompt, r.group, 0, f"group-{r.group}" if pin else None))[0]

    return await asyncio.gather(*(one(r) for r in requests))


async def run_chats(client: Client, workload: ChatWorkload, pin: bool, clock: float) -> list[Result]:
    """Each conversation from its start time, turn after turn: a turn is sent `think_s` after the
    previous reply arrived, and its prompt carries that reply (`clock`: wall s per workload s)."""
    t0 = time.perf_counter()

    async def conversation(chat) -> list[Result]:
        await asyncio.sleep(max(0.0, t0 + chat.at * clock - time.perf_counter()))
        out, prompt, reply = [], "", ""
        for k, turn in enumerate(chat.turns):
            if k:
                await asyncio.sleep(turn.think_s * clock)
                prompt = next_prompt(prompt, reply, turn.user)
            else:
                prompt = first_prompt(workload.systems[chat.system], turn.user)
            session = f"chat-{chat.conversation}" if pin else None
            result, reply = await client.complete(prompt, chat.conversation, k, session)
            out.append(result)
        return out

    per_chat = await asyncio.gather(*(conversation(c) for c in workload.chats))
    return [r for results in per_chat for r in results]


@dataclass(frozen=True, slots=True)
class Run:
    name: str  # row label
    policy: str  # the router's --decode-policy, or "sglang"
    pin: bool  # send x-session-id (group / conversation)
    router_args: tuple[str, ...] = ()


PROBE_TOKENS = 16  # output tokens of the fidelity probe


@dataclass(slots=True)
class Bench:
    """What every run shares: the options, the step-time model and how fast its clock runs."""

    tmp: Path
    args: argparse.Namespace
    timing: Timing
    speedup: float  # modelled seconds per wall second
    text: TextFn
    probes: int = 0

    def run(self, run: Run, workload: list[Request] | ChatWorkload) -> tuple[dict, list[Result]]:
        """A fresh stack (workers + router), the workload through it, then (mock) one fresh prompt
        alone to see how far this machine stretches the modelled step times; the stack stopped."""
        args, clock = self.args, 1 / self.speedup
        step_times = ",".join(f"{v / self.speedup:.6g}" for v in self.timing.coefs)
        workers = Workers(self.tmp, args.workers, step_times, run.policy == "sglang", args.engine)
        self.probes += 1
        probe = self.text(random.Random(f"probe-{self.probes}"), PREFIX_TOKENS + QUESTION_TOKENS)
        try:
            if run.policy == "sglang":
                proc, base = start_sglang(self.tmp, workers)
            else:
                extra = [*run.router_args, *args.router_arg]
                proc, base = start_router(self.tmp, workers, run.name, run.policy, extra)
            client = Client(base, {a: f"w{i}" for i, a in enumerate(workers.addresses)}, args.output_tokens)

            async def go() -> tuple[list[Result], Result | None]:
                try:
                    if isinstance(workload, ChatWorkload):
                        results = await run_chats(client, workload, run.pin, clock)
                    else:
                        results = await run_shared_prefix(client, workload, run.pin, clock)
                    alone = None
                    if args.engine == "mock":
                        alone = (await client.complete(probe, -1, 0, None, PROBE_TOKENS))[0]
                    return results, alone
                finally:
                    await client.close()

            try:
                results, alone = asyncio.run(go())
            finally:
                proc.stop()
        finally:
            workers.stop()
        print(f"{run.name}: done ({time.strftime('%H:%M:%S')})", file=sys.stderr)
        row = summarize(run.name, results, args.workers, self.speedup)
        if alone is not None:
            row |= self.fidelity(alone)
        return row, results

    def runs(self, runs: list[Run], workload: list[Request] | ChatWorkload) -> list[dict]:
        """Every run `--rounds` times, in turns (ABC, CBA, ...) so that load elsewhere on the
        machine lands on every run alike; a run's row pools its rounds (fidelity: the worst)."""
        pooled: dict[str, list[Result]] = {r.name: [] for r in runs}
        fids: dict[str, list[dict]] = {r.name: [] for r in runs}
        for i in range(self.args.rounds):
            for run in runs if i % 2 == 0 else runs[::-1]:
                row, results = self.run(run, workload)
                pooled[run.name] += results
                fids[run.name].append({k: v for k, v in row.items() if k.startswith("fidelity_")})
        rows = []
        for run in runs:
            row = summarize(run.name, pooled[run.name], self.args.workers, self.speedup)
            for key in fids[run.name][0]:
                row[key] = max(f[key] for f in fids[run.name])
            rows.append(row)
        return rows

    def fidelity(self, alone: Result) -> dict:
        """Measured / modelled, for one request alone on an idle stack: TTFT (its prefill) and
        the time per output token after the first (one decode step at batch 1)."""
        d, e, f = self.timing.coefs[3:]
        prompt, scale = alone.prompt_tokens - alone.cached_tokens, self.speedup
        ttft_model = request_ms(self.timing.coefs, prompt, 0)
        step_model = d + e + f * (alone.prompt_tokens + PROBE_TOKENS / 2)
        tpot = (alone.e2e - alone.ttft) / max(1, alone.output_tokens - 1)
        return {
            "fidelity_ttft": alone.ttft * 1e3 * scale / ttft_model,
            "fidelity_tpot": tpot * 1e3 * scale / step_model,
        }


def _weights(text: str) -> list[float]:
    return [float(w) for w in text.split(",") if w]


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--quick", action="store_true", help="smaller workloads, 3 weights, clock x4 (a minute or two)")
    add("--workers", type=int, default=8)
    add("--engine", choices=["mock", "hf"], default="mock", help="hf: real-model workers")
    add("--timing", default="cpu", help="mock: cpu | h100-8b | calibrate | a,b,c,d,e,f | PATH")
    add(
        "--speedup", type=float, default=0.0, help="modelled clock speed (default: the profile's; x4 --quick)"
    )
    add("--load", type=float, default=0.7, help="offered load, of the capacity with nothing cached")
    add("--kv-weight", type=float, default=None, help="skip tuning: use this --kv-overlap-weight")
    add("--tune-weights", default="", help="weights to sweep (1,2,4,8,16; --quick 1,4,16)")
    add("--groups", type=int, default=0, help="tuning workload: groups (16; --quick 12)")
    add("--per-group", type=int, default=0, help="tuning workload: prompts per group (6; --quick 4)")
    add("--systems", type=int, default=0, help="chats: distinct system prompts (6; --quick 4)")
    add("--conversations", type=int, default=0, help="chats: conversations (32; --quick 16)")
    add("--turns", type=int, default=0, help="chats: turns per conversation (4; --quick 3)")
    add("--system-tokens", type=_pair, default=(512, 1536), help="chats: system prompt length range")
    add("--user-tokens", type=_pair, default=(32, 128), help="chats: user message length range")
    add("--think-s", type=float, default=2.0, help="chats: mean pause before the next turn (modelled s)")
    add("--output-tokens", type=int, default=OUTPUT_TOKENS)
    add("--policies", default="", help="held-out policies, comma-separated (default: see CHAT_POLICIES)")
    add("--sglang", action="store_true", help="also run SGLang's model gateway (cache_aware)")
    add(
        "--check-weights",
        action="store_true",
        help="also run kv at the other tuning weights on the held-out chats (marked *, not used to choose)",
    )
    add("--rounds", type=int, default=1, help="run every policy N times, in turns (ABC CBA ...), pooled")
    add("--seed", type=int, default=0)
    add("--router-arg", action="append", default=[], help="extra argument for pdrouter router")
    args = ap.parse_args()
    q = args.quick
    args.groups = args.groups or (12 if q else 16)
    args.per_group = args.per_group or (4 if q else 6)
    args.systems = args.systems or (4 if q else 6)
    args.conversations = args.conversations or (16 if q else 32)
    args.turns = args.turns or (3 if q else 4)
    args.tune_weights = _weights(args.tune_weights or ("1,4,16" if q else "1,2,4,8,16"))
    args.policies = (args.policies or ",".join(CHAT_POLICIES[: 3 if q else 4])).split(",")
    args.policies += ["sglang"] if args.sglang else []
    return args


def tune(bench: Bench) -> tuple[float, list[dict], float]:
    """Sweep the kv weight on the shared-prefix workload (+ reference policies): (weight, rows, rate)."""
    args = bench.args
    prompt_len = PREFIX_TOKENS + QUESTION_TOKENS + 4
    rate = offered_rate(
        args.load, args.workers, request_ms(bench.timing.coefs, prompt_len, args.output_tokens)
    )
    requests = shared_prefix(
        bench.text, args.groups, args.per_group, rate, args.seed, PREFIX_TOKENS, QUESTION_TOKENS
    )
    runs = [Run(f"kv w={w:g}", "kv", False, ("--kv-overlap-weight", f"{w:g}")) for w in args.tune_weights]
    runs += [
        Run(p, "round_robin", p == "oracle") for p in (TUNE_POLICIES[1:] if args.quick else TUNE_POLICIES)
    ]
    rows = bench.runs(runs, requests)
    for row, w in zip(rows, args.tune_weights, strict=False):
        row["weight"] = w
    weight = pick_weight(rows[: len(args.tune_weights)], DEFAULT_OVERLAP_WEIGHT)
    return weight, rows, rate


def held_out(bench: Bench, count: Callable[[str], int], weight: float) -> tuple[list[dict], float]:
    """The policies on the multi-turn chats, kv at `weight`: (rows, requests/s offered)."""
    args = bench.args
    chats = multi_turn(
        bench.text, args.systems, args.conversations, args.turns, 1.0, args.seed + 1,
        args.system_tokens, args.user_tokens, args.think_s,
    )  # fmt: skip
    lengths = chat_prompt_tokens(chats, count, args.output_tokens)
    mean_ms = sum(request_ms(bench.timing.coefs, n, args.output_tokens) for n in lengths) / len(lengths)
    rate = offered_rate(args.load, args.workers, mean_ms)
    chats = start_rate(chats, rate / args.turns)
    runs = {
        "kv": Run("kv", "kv", False, ("--kv-overlap-weight", f"{weight:g}")),
        "sticky": Run("sticky", "round_robin", True),
        "round_robin": Run("round_robin", "round_robin", False),
        "random": Run("random", "random", False),
        "sglang": Run("sglang", "sglang", False),
    }
    todo = [runs[p] for p in args.policies]
    if args.check_weights:
        # NOTE: after the fact, to see whether the tuned weight transfers; never used to choose
        todo += [
            Run(f"kv w={w:g}*", "kv", False, ("--kv-overlap-weight", f"{w:g}"))
            for w in args.tune_weights
            if w != weight
        ]
    return bench.runs(todo, chats), rate


def figures_of(
    weight_source: str, weight: float, timing: str, tune_rows: list[dict], chat_rows: list[dict]
) -> dict:
    figures: dict[str, object] = {"timing": timing, "kv_weight": weight, "kv_weight_source": weight_source}
    by = {r["policy"]: r for r in chat_rows}
    if "kv" in by:
        kv = by["kv"]
        figures |= {
            "chat_hit_rate_kv": round(kv["hit_rate"], 3),
            "chat_max_share_kv": round(kv["max_share"], 2),
        }
        for other in ("sticky", "round_robin", "random", "sglang"):
            if other in by:
                figures[f"chat_hit_rate_{other}"] = round(by[other]["hit_rate"], 3)
                for metric in ("ttft_p50", "ttft_p99", "e2e_p50"):
                    ratio = by[other][f"{metric}_ms"] / kv[f"{metric}_ms"]
                    figures[f"chat_{metric}_speedup_vs_{other}"] = round(ratio, 2)
    tuned = {r["policy"]: r for r in tune_rows}
    chosen = tuned.get(f"kv w={weight:g}")
    if chosen and "round_robin" in tuned:
        figures["tune_ttft_p50_speedup_vs_round_robin"] = round(
            tuned["round_robin"]["ttft_p50_ms"] / chosen["ttft_p50_ms"], 2
        )
    fid = [r["fidelity_tpot"] for r in [*tune_rows, *chat_rows] if "fidelity_tpot" in r]
    if fid:
        figures["fidelity_tpot_max"] = round(max(fid), 2)
    return figures


def _print_table(rows: list[dict], key_col: str, extra: tuple[str, ...] = ()) -> None:
    cols = ["policy", "requests", "hit_rate", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "max_share"]
    cols += ["workers_used", "workers_per_key", *extra]
    fid = ("fidelity_ttft", "fidelity_tpot") if any("fidelity_ttft" in r for r in rows) else ()
    names = {"workers_per_key": key_col, "fidelity_ttft": "fid_ttft", "fidelity_tpot": "fid_tpot"}
    headers = [names.get(c, c) for c in [*cols, *fid]]
    print(table(headers, [[r.get(c, float("nan")) for c in [*cols, *fid]] for r in rows]))


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    tokenizer = Tokenizer.from_dir(resolve_model("default"))

    def count(s: str) -> int:
        return len(tokenizer.encode(s))

    with tempfile.TemporaryDirectory(prefix="pdrouter-bench-routing-") as tmp_dir:
        tmp = Path(tmp_dir)
        if args.engine == "mock":
            timing = resolve_timing(args.timing, tmp)
            speedup = args.speedup or timing.speedup * (4 if args.quick else 1)
        else:
            # NOTE: real workers take the time they take; the arrival rate still comes from the CPU fit
            timing, speedup = TIMINGS["cpu"], 1.0
        bench = Bench(tmp, args, timing, speedup, words_to_tokens(tokenizer.encode))
        tune_rows: list[dict] = []
        tune_rate = 0.0
        if args.kv_weight is None:
            weight, tune_rows, tune_rate = tune(bench)
            weight_source = "tuned on shared_prefix"
        else:
            weight, weight_source = args.kv_weight, "given (--kv-weight), not tuned"
        chat_rows, chat_rate = held_out(bench, count, weight)
    decision = run_case(
        256, PREFIX_TOKENS // 16 + QUESTION_TOKENS // 16, 300 if args.quick else 2000, args.seed
    )
    elapsed = time.perf_counter() - t_start

    if args.engine == "mock":
        coefs = ",".join(f"{v:.4g}" for v in timing.coefs)
        print(f"{args.workers} mock workers, timing {timing.name}: {timing.source}")
        print(f"  a..f = {coefs}; modelled clock x{speedup:g}; latencies in modelled ms")
        print(
            "  fid_ttft / fid_tpot: measured / modelled TTFT and time per output token of one fresh "
            f"{PREFIX_TOKENS + QUESTION_TOKENS}-token prompt sent alone after the run (1.00 = as modelled)"
        )
    else:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        print(f"{args.workers} real-model workers (SmolLM2-135M, {threads} thread(s) each); wall-clock ms")
    if tune_rows:
        print(
            f"\ntuning: shared prefix, {args.groups} groups x {args.per_group} prompts, "
            f"{PREFIX_TOKENS}+{QUESTION_TOKENS} tokens in, {args.output_tokens} out, "
            f"{tune_rate:.3g} req/s Poisson; chosen --kv-overlap-weight {weight:g} (lowest TTFT p50)"
        )
        _print_table(tune_rows, "workers_per_group")
    print(
        f"\nheld out: {args.conversations} chats x {args.turns} turns over {args.systems} system prompts "
        f"({args.system_tokens[0]}-{args.system_tokens[1]} tokens), user messages "
        f"{args.user_tokens[0]}-{args.user_tokens[1]} tokens, {args.output_tokens} out, "
        f"think {args.think_s:g} s, {chat_rate:.3g} req/s offered; "
        f"kv at --kv-overlap-weight {weight:g} ({weight_source})"
        + (f"; {args.rounds} rounds in turns, pooled" if args.rounds > 1 else "")
    )
    _print_table(chat_rows, "workers_per_chat", ("same_worker",))
    if args.check_weights:
        print("* kv at the other tuning weights, run after the choice to check it; not used to choose")
    print(
        "routing decision, 256 workers x ~10k blocks, 1k-token prompt: "
        f"p50 {decision['decision_p50_us']:.0f} us, p99 {decision['decision_p99_us']:.0f} us"
    )
    print(f"{elapsed:.0f} s")

    figures = figures_of(
        weight_source, weight, timing.name if args.engine == "mock" else "real", tune_rows, chat_rows
    )
    figures["decision_p99_us_256_workers"] = round(decision["decision_p99_us"], 1)
    name = f"routing_{args.engine}" if args.engine != "mock" else "routing"
    name += (
        f"_{timing.name}" if args.engine == "mock" and timing.name in TIMINGS and timing.name != "cpu" else ""
    )
    meta = {
        "quick": args.quick, "engine": args.engine, "timing": timing.name, "timing_source": timing.source,
        "timing_coefs": timing.coefs, "speedup": speedup, "load": args.load, "tune_rate": tune_rate,
        "chat_rate": chat_rate, "seconds": elapsed, "workers": args.workers, "rounds": args.rounds,
    }  # fmt: skip
    path = save(name, {**meta, "tune_rows": tune_rows, "chat_rows": chat_rows, **figures})
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
