"""One disaggregated request end to end on the GPU: two `pdrouter serve` stacks on this machine.

    python -m bench.gpu_e2e [--device cuda|cpu] [--expect-backend NAME] [--log-dir DIR]

- disaggregated: a prefill and a decode worker (`--engine hf --device cuda`, default model, each
  its own process on the same GPU) behind a router with the default `--local-prefill-max-tokens`
  (512); a greedy chat request whose prompt is longer than that must come back
  `x-pdrouter-route: mode=disaggregated;...`;
- aggregated: one `--both 1` worker; the same request.

Checks: the disaggregated answer equals the aggregated one token for token (greedy); the decode
worker's load report (`kv_transfer`, the snapshot that opens its Subscribe stream) counts one
pull, no failure, all of the prompt's full blocks, and the backend that moved them
(`pulls_by_backend`: cuda_ipc expected on one GPU); the prefill worker unpins the handle. Ends
with one JSON line of figures; exit status 0 when every check passed, 1 otherwise, 2 when the
machine has no CUDA device (`--device cpu` runs the same checks on the CPU: shm expected).
Both stacks start at once (each worker's KV pool capped with `--kv-cache-mb`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOGS = ROOT / "bench" / "results" / "gpu_check"
LOCAL_PREFILL_MAX_TOKENS = 512  # the router's default: longer prompts go to a prefill worker
MAX_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_prompt() -> str:
    """~850 tokens of plain facts and one question about them (deterministic)."""
    cities = ["Paris", "Rome", "Madrid", "Berlin", "Vienna", "Lisbon", "Oslo", "Prague", "Dublin", "Athens"]
    animals = ["fox", "owl", "otter", "lynx", "heron", "badger", "stork", "beaver", "marten", "crane"]
    lines = [
        f"{i}. The {animals[i % 10]} with tag {i} lives in {cities[(i * 7) % 10]} "
        f"and eats {i % 5 + 1} meals a day."
        for i in range(36)
    ]
    question = "Where does the animal with tag 21 live, and what animal is it? Answer in one sentence."
    return "Read these notes carefully.\n" + "\n".join(lines) + "\n\nQuestion: " + question


class Stack:
    """`pdrouter serve` on free ports; its output goes to a log file."""

    def __init__(self, name: str, log_dir: Path, serve_args: list[str]) -> None:
        self.name = name
        self.port, self.grpc_port = free_port(), free_port()
        self.log_path = log_dir / f"gpu_e2e_{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "router.cli", "serve", "--port", str(self.port),
                "--grpc-port", str(self.grpc_port), *serve_args]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.base = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()

    def wait_ready(self, deadline: float) -> float:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} stack exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.base + "/ready", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - self.started
            time.sleep(0.2)  # readiness poll
        raise TimeoutError(f"{self.name} stack not ready in time:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group
        self._log.close()


def chat(base: str, prompt: str) -> tuple[dict, str, float]:
    """(response JSON, x-pdrouter-route, seconds) of one greedy, non-streamed chat request."""
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS, "temperature": 0}  # fmt: skip
    req = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            data = json.loads(r.read())
            route = r.headers.get("x-pdrouter-route", "")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{base}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
    return data, route, time.perf_counter() - t0


def route_parts(header: str) -> dict[str, str]:
    """'mode=disaggregated;prefill=A;decode=B' -> {'mode': ..., 'prefill': A, 'decode': B}."""
    return dict(part.split("=", 1) for part in header.split(";") if "=" in part)


def kv_stats(address: str):
    """The worker's KvTransferStats now (the snapshot that opens its Subscribe stream)."""
    import grpc

    from pdrouter_proto import worker_pb2 as wpb
    from pdrouter_proto import worker_pb2_grpc as wpb_grpc

    with grpc.insecure_channel(address) as ch:
        stream = wpb_grpc.WorkerStub(ch).Subscribe(wpb.SubscribeRequest(subscriber_id="gpu-e2e"), timeout=10)
        try:
            event = next(stream)
        finally:
            stream.cancel()
    return event.snapshot.load.kv_transfer


def poll(fn, until, timeout: float = 15.0):
    """fn() until `until(value)` or the timeout; returns the last value."""
    deadline = time.monotonic() + timeout
    value = fn()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(0.1)  # the workers count pulls and unpin asynchronously
        value = fn()
    return value


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--expect-backend", default="", help="default: cuda_ipc on cuda, shm on cpu")
    ap.add_argument("--kv-cache-mb", type=int, default=2048, help="each worker's KV pool (cuda)")
    ap.add_argument("--ready-timeout", type=float, default=240.0)
    ap.add_argument("--log-dir", type=Path, default=DEFAULT_LOGS)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _terminated)  # NOTE: a timeout's SIGTERM still stops both stacks
    expect = args.expect_backend or ("cuda_ipc" if args.device == "cuda" else "shm")
    if args.device == "cuda" and not has_cuda():
        print("bench.gpu_e2e: no CUDA device here (torch sees none); nothing to check", file=sys.stderr)
        return 2
    args.log_dir.mkdir(parents=True, exist_ok=True)
    worker = ["--engine", "hf", "--drain-seconds", "2", f"--worker-arg=--device={args.device}"]
    if args.device == "cuda":
        worker.append(f"--worker-arg=--kv-cache-mb={args.kv_cache_mb}")
    figures: dict[str, object] = {"e2e_device": args.device, "e2e_expect_backend": expect}
    problems: list[str] = []
    stacks = [
        Stack("disagg", args.log_dir, [*worker, "--prefill", "1", "--decode", "1"]),
        Stack("agg", args.log_dir, [*worker, "--both", "1"]),
    ]
    try:
        deadline = time.monotonic() + args.ready_timeout
        for s in stacks:
            figures[f"e2e_ready_s_{s.name}"] = round(s.wait_ready(deadline), 1)
        disagg, agg = stacks
        prompt = long_prompt()
        chat(agg.base, "Say hi.")  # NOTE: first request of each stack warms up; not measured
        chat(disagg.base, "Say hi.")
        got, route_header, secs = chat(disagg.base, prompt)
        want, agg_route, agg_secs = chat(agg.base, prompt)
        route = route_parts(route_header)
        prompt_tokens = got["usage"]["prompt_tokens"]
        text, ref = got["choices"][0]["message"]["content"], want["choices"][0]["message"]["content"]
        figures.update(
            e2e_prompt_tokens=prompt_tokens, e2e_route=route_header, e2e_agg_route=agg_route,
            e2e_seconds_disagg=round(secs, 3), e2e_seconds_agg=round(agg_secs, 3),
            e2e_match_aggregated=text == ref,
        )  # fmt: skip
        if prompt_tokens <= LOCAL_PREFILL_MAX_TOKENS:
            problems.append(f"prompt of {prompt_tokens} tokens is not above {LOCAL_PREFILL_MAX_TOKENS}")
        if route.get("mode") != "disaggregated":
            problems.append(f"route {route_header!r} is not disaggregated")
        if text != ref:
            n = next((i for i, (a, b) in enumerate(zip(text, ref)) if a != b), min(len(text), len(ref)))
            problems.append(f"answers differ from character {n}: {text!r} vs aggregated {ref!r}")
        if "decode" in route and "prefill" in route:
            full_blocks = prompt_tokens // 16
            stats = poll(lambda: kv_stats(route["decode"]), lambda s: s.pulls + s.pull_failures >= 1)
            by_backend = dict(getattr(stats, "pulls_by_backend", {}) or {})
            figures.update(
                e2e_pulls=stats.pulls, e2e_pull_failures=stats.pull_failures,
                e2e_blocks_pulled=stats.blocks_pulled, e2e_bytes_pulled=stats.bytes_pulled,
                e2e_pulls_by_backend=by_backend,
                e2e_backend=",".join(sorted(by_backend)) or "unknown",
            )  # fmt: skip
            if stats.pulls != 1 or stats.pull_failures:
                problems.append(f"decode worker counts {stats.pulls} pulls, {stats.pull_failures} failures")
            if stats.blocks_pulled < full_blocks:
                problems.append(f"{stats.blocks_pulled} blocks pulled; the prompt has {full_blocks} full")
            if by_backend != {expect: 1}:
                problems.append(f"pulls by backend {by_backend}, expected {{{expect!r}: 1}}")
            pinned = poll(lambda: kv_stats(route["prefill"]).handles_pinned, lambda n: n == 0)
            figures["e2e_prefill_handles_pinned"] = pinned
            if pinned:
                problems.append(f"the prefill worker still pins {pinned} handle(s)")
    except Exception as exc:  # NOTE: any failure ends as a FAIL with its reason, stacks stopped
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        for s in stacks:
            s.stop()
    figures["e2e_ok"] = not problems
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print(f"logs: {', '.join(str(s.log_path) for s in stacks)}")
    print(json.dumps(figures), flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
