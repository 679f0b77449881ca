"""`pdrouter serve`: the whole stack on one machine as child processes.

Lifecycle: resolve the model (convert once) -> start workers -> start the router over
them -> wait for GET /ready (a child that dies before it stops the stack: a bad flag fails
fast) -> print URLs -> supervise: a worker that exits is restarted with the same argv (role,
port, flags) after a back-off, at most `--max-restarts` times within `--restart-window-s`,
then left down (the rest keep serving); the router re-subscribes to it on its own -> on
Ctrl-C/SIGTERM, or when the router dies or no worker is left, stop every child (router first).

Shared memory: a prefill worker's KV pool is /dev/shm/pdrouter-kv-<its pid>-<hex>. serve
removes a dead worker's segments itself and, at its own exit, any its children left. The
worker's own multiprocessing resource tracker (a child of the worker, outliving it) would also
unlink them and warn "leaked shared_memory objects" on stderr; under serve that warning says
nothing serve does not say already, so serve's workers run with it filtered (WORKER_WARNINGS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from router.auth import add_api_key_flags
from workers.config import env_names, parse_args
from workers.config import tables as config_tables
from workers.model_files import resolve_model
from workers.tls import all_or_none

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "pdrouter-kv-"  # kvtransfer/pool.py: pdrouter-kv-<creator pid>-<hex>
BACKOFF_MAX_S = 30.0  # a restart back-off doubles up to this
# NOTE: the resource tracker's messages in a worker and in the tracker itself (it inherits the
# worker's environment and -W flags); serve removes a dead worker's segments and reports the exit
WORKER_WARNINGS = "ignore::UserWarning:multiprocessing.resource_tracker"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Children get SIGTERM if serve itself is killed, so nothing is ever orphaned."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdrouter serve", description="Start router + workers on this machine.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="router HTTP port")
    p.add_argument("--grpc-port", type=int, default=50051, help="router gRPC port")
    p.add_argument("--engine", choices=["hf", "mock"], default="hf")
    p.add_argument("--model", default="default")
    p.add_argument(
        "--prefill", type=int, default=None, help="prefill-only workers (default: 1 when no pool is sized)"
    )
    p.add_argument(
        "--decode", type=int, default=None, help="decode-only workers (default: 1 when no pool is sized)"
    )
    p.add_argument("--both", type=int, default=0, help="workers doing both prefill and decode")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--worker-arg", action="append", default=[], help="extra argument passed to every worker")
    p.add_argument("--router-arg", action="append", default=[], help="extra argument passed to the router")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM: the router, then the workers, get this long to finish requests in flight",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="a worker that exits is restarted at most this many times within --restart-window-s, "
        "then left down while the rest keep serving (0: never restarted)",
    )
    p.add_argument("--restart-window-s", type=float, default=300.0, help="the window of --max-restarts")
    p.add_argument(
        "--restart-backoff-s",
        type=float,
        default=0.5,
        help="wait before a worker's first restart in the window; doubles with each restart, "
        f"at most {BACKOFF_MAX_S:.0f} s",
    )
    p.add_argument("--tls-cert", default="", help="the router serves HTTPS and gRPC over TLS (certificate)")
    p.add_argument("--tls-key", default="", help="the private key of --tls-cert")
    add_api_key_flags(p, "the router")
    return p


class RestartBudget:
    """One worker's restarts: at most `max_restarts` within `window_s`; the wait before one is
    `backoff_s` doubled per restart still in the window, at most `backoff_max_s` (so a worker
    that has run well for a window starts again from `backoff_s`)."""

    def __init__(
        self, max_restarts: int, window_s: float, backoff_s: float = 0.5, backoff_max_s: float = BACKOFF_MAX_S
    ) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.restarts: deque[float] = deque()  # when each restart in the window was granted

    def next_delay(self, now: float) -> float | None:
        """The worker exited at `now`: seconds to wait before restarting it (the restart counts
        from now on), or None when the budget is spent."""
        while self.restarts and now - self.restarts[0] >= self.window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            return None
        delay = min(self.backoff_s * 2 ** len(self.restarts), self.backoff_max_s)
        self.restarts.append(now)
        return delay


@dataclass(eq=False)
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    budget: RestartBudget | None  # None: never restarted (the router: its death stops the stack)
    proc: subprocess.Popen | None = None  # None: exited, waiting for its restart or given up
    restart_at: float | None = None  # time.monotonic() of its pending restart
    pids: list[int] = field(default_factory=list)  # every process it ran as


def remove_segments(pid: int, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink the KV pool segments process `pid` created (it died without closing them)."""
    removed = []
    for path in shm_dir.glob(f"{SHM_PREFIX}{pid}-*"):
        with contextlib.suppress(FileNotFoundError):  # NOTE: its resource tracker may be first
            path.unlink()
            removed.append(path.name)
    return removed


def _log(message: str) -> None:
    print(f"pdrouter serve: {message}", file=sys.stderr, flush=True)


class Stack:
    def __init__(self, budget: tuple[int, float, float] = (0, 300.0, 0.5)) -> None:
        self.children: list[Child] = []
        self.budget = budget  # a worker's (max restarts, window, first back-off)
        # NOTE: serve's own PDROUTER_* options are for serve (it passes children what they need);
        # the others (e.g. PDROUTER_MOCK_TOKEN_DELAY_MS) reach the router and workers
        own = env_names(build_parser())
        self.env = {k: v for k, v in os.environ.items() if k not in own}

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, worker: bool = False
    ) -> Child:
        env = {**self.env, **(env or {})}
        if worker:
            env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), WORKER_WARNINGS]))
        child = Child(name, argv, env, RestartBudget(*self.budget) if worker else None)
        self._start(child)
        self.children.append(child)
        return child

    def _start(self, child: Child) -> None:
        # NOTE: from the main thread only: PR_SET_PDEATHSIG fires when the thread that forked exits
        child.proc = subprocess.Popen(child.argv, preexec_fn=_die_with_parent, env=child.env)
        child.pids.append(child.proc.pid)

    def dead(self) -> tuple[str, int] | None:
        for child in self.children:
            code = None if child.proc is None else child.proc.poll()
            if code is not None:
                return child.name, code
        return None

    def supervise(self, now: float) -> str | None:
        """Reap children that exited and restart workers whose back-off is over; returns why the
        stack must stop (the router died, no worker is left), or None."""
        for child in self.children:
            code = None if child.proc is None else child.proc.poll()
            if code is not None:
                remove_segments(child.proc.pid)
                child.proc = None
                if child.budget is None:
                    return f"{child.name} exited with code {code}; stopping the stack"
                delay = child.budget.next_delay(now)
                b = child.budget
                limit = f"--max-restarts {b.max_restarts} within {b.window_s:g} s"
                if delay is None:
                    _log(
                        f"{child.name} exited with code {code}; not restarting it ({limit} reached); "
                        "serving with the rest"
                    )
                else:
                    child.restart_at = now + delay
                    _log(
                        f"{child.name} exited with code {code}; restarting it in {delay:g} s "
                        f"(restart {len(b.restarts)} of {limit})"
                    )
            elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                self._start(child)
                _log(f"{child.name} restarted (pid {child.proc.pid})")
        if not any(c.proc is not None or c.restart_at is not None for c in self.children if c.budget):
            return "no worker left; stopping the stack"
        return None

    def next_restart(self) -> float | None:
        pending = [c.restart_at for c in self.children if c.restart_at is not None]
        return min(pending, default=None)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the router first (its streams in flight still need the workers), then the
        workers; whatever outlives `grace` is killed. Then no KV segment of any child is left."""
        procs = [(c.budget is None, c.proc) for c in self.children if c.proc is not None]
        for group in ([p for r, p in procs if r], [p for r, p in procs if not r]):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for child in self.children:
            child.restart_at = None
            for pid in child.pids:
                remove_segments(pid)


def _ready(url: str) -> bool:
    # NOTE: our own child on this host: its certificate need not name the address we poll
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return r.status == 200
    except OSError:
        return False


async def run(args: argparse.Namespace) -> int:
    sized = args.prefill is not None or args.decode is not None or args.both
    prefill = args.prefill if args.prefill is not None else (0 if sized else 1)
    decode = args.decode if args.decode is not None else (0 if sized else 1)
    both = args.both
    roles = ["prefill"] * prefill + ["decode"] * decode + ["both"] * both
    if not roles:
        raise SystemExit("pdrouter serve: no workers requested")
    if prefill and not (decode or both):
        raise SystemExit("pdrouter serve: prefill workers need at least one decode or both worker")
    if any("," in k for k in args.api_key):
        raise SystemExit("pdrouter serve: an --api-key with a comma: put it in an --api-key-file")
    # NOTE: the keys go in the router's environment, not its argv (which `ps` shows)
    router_env = {"PDROUTER_API_KEY": ",".join(args.api_key)} if args.api_key else {}
    model = str(resolve_model(args.model))
    exe = [sys.executable, "-m", "router.cli"]
    common = ["--drain-seconds", str(args.drain_seconds)]
    shared = config_tables(args.config) if args.config else set()
    threads = max(1, (os.cpu_count() or 1) // len(roles))
    if args.max_restarts < 0 or args.restart_window_s <= 0 or args.restart_backoff_s < 0:
        raise SystemExit(
            "pdrouter serve: --max-restarts must be >= 0, --restart-window-s > 0, --restart-backoff-s >= 0"
        )
    stack = Stack((args.max_restarts, args.restart_window_s, args.restart_backoff_s))
    addresses = []
    for i, role in enumerate(roles):
        port = free_port(args.host)
        addresses.append(f"{args.host}:{port}")
        argv = [*exe, "worker", "--host", args.host, "--port", str(port), "--role", role]
        argv += ["--engine", args.engine, "--model", model, "--threads", str(threads), *common]
        argv += (["--config", args.config] if "worker" in shared else []) + args.worker_arg
        stack.spawn(f"worker {i} ({role}, {args.host}:{port})", argv, worker=True)
    router_argv = [
        *exe,
        "router",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--grpc-port",
        str(args.grpc_port),
    ]
    router_argv += ["--model", model, *common, *(["--config", args.config] if "router" in shared else [])]
    # NOTE: ready means the stack as asked for: a prefill worker still loading would turn the
    # first disaggregated requests into aggregated ones
    router_argv += ["--ready-min-workers", str(len(roles))]
    if all_or_none(args, "tls_cert", "tls_key"):
        router_argv += ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key]
    if args.api_key_file:
        router_argv += ["--api-key-file", os.path.abspath(args.api_key_file)]
    router_argv += args.router_arg
    for a in addresses:
        router_argv += ["--worker", a]
    stack.spawn("router", router_argv, router_env)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if args.tls_cert else "http"
    ready_url = f"{scheme}://{args.host}:{args.port}/ready"
    code = 0
    try:
        async with asyncio.timeout(args.ready_timeout):
            while not await asyncio.to_thread(_ready, ready_url):
                if stack.dead() or stop.is_set():
                    break
                await asyncio.sleep(0.2)  # readiness poll of child processes
        if dead := stack.dead():
            # NOTE: before ready, a child's death is a setup error (a bad flag, no memory): fail fast
            _log(f"{dead[0]} exited with code {dead[1]}; stopping the stack")
            code = 1
        elif not stop.is_set():
            print(
                f"pdrouter serve: ready\n  OpenAI HTTP  {scheme}://{args.host}:{args.port}/v1\n"
                f"  gRPC         {args.host}:{args.grpc_port}\n  workers      {', '.join(addresses)}",
                flush=True,
            )
        while not stop.is_set() and not code:
            now = time.monotonic()
            if reason := stack.supervise(now):
                _log(reason)
                code = 1
                break
            wait = 0.5  # NOTE: the poll of the children; sooner when a restart is due
            if (due := stack.next_restart()) is not None:
                wait = min(wait, max(0.0, due - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
    except TimeoutError:
        _log(f"not ready after {args.ready_timeout:.0f} s; stopping")
        code = 1
    finally:
        await asyncio.to_thread(stack.stop, args.drain_seconds + 10)
    return code


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv, "serve")
    raise SystemExit(asyncio.run(run(args)))
