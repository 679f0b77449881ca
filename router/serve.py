"""`pdrouter serve`: the whole stack on one machine as child processes.

Lifecycle: resolve the model (convert once) -> start workers -> start the router over
them -> wait for GET /ready -> print URLs -> on Ctrl-C/SIGTERM stop every child; if any
child dies, say which and stop the rest instead of hanging.
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
import urllib.request

from router.auth import add_api_key_flags
from workers.config import env_names, parse_args
from workers.config import tables as config_tables
from workers.model_files import resolve_model
from workers.tls import all_or_none


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
    p.add_argument("--tls-cert", default="", help="the router serves HTTPS and gRPC over TLS (certificate)")
    p.add_argument("--tls-key", default="", help="the private key of --tls-cert")
    add_api_key_flags(p, "the router")
    return p


class Stack:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []
        # NOTE: serve's own PDROUTER_* options are for serve (it passes children what they need);
        # the others (e.g. PDROUTER_MOCK_TOKEN_DELAY_MS) reach the router and workers
        own = env_names(build_parser())
        self.env = {k: v for k, v in os.environ.items() if k not in own}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        proc = subprocess.Popen(argv, preexec_fn=_die_with_parent, env={**self.env, **(env or {})})
        self.children.append((name, proc))

    def dead(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the router first (its streams in flight still need the workers), then the
        workers; whatever outlives `grace` is killed."""
        router = [p for name, p in self.children if name == "router"]
        for group in (router, [p for name, p in self.children if name != "router"]):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


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
    stack = Stack()
    addresses = []
    for i, role in enumerate(roles):
        port = free_port(args.host)
        addresses.append(f"{args.host}:{port}")
        argv = [*exe, "worker", "--host", args.host, "--port", str(port), "--role", role]
        argv += ["--engine", args.engine, "--model", model, "--threads", str(threads), *common]
        argv += (["--config", args.config] if "worker" in shared else []) + args.worker_arg
        stack.spawn(f"worker {i} ({role}, {args.host}:{port})", argv)
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
                if (dead := stack.dead()) or stop.is_set():
                    break
                await asyncio.sleep(0.2)  # readiness poll of child processes
        if not stack.dead() and not stop.is_set():
            print(
                f"pdrouter serve: ready\n  OpenAI HTTP  {scheme}://{args.host}:{args.port}/v1\n"
                f"  gRPC         {args.host}:{args.grpc_port}\n  workers      {', '.join(addresses)}",
                flush=True,
            )
        while not stop.is_set():
            if dead := stack.dead():
                print(
                    f"pdrouter serve: {dead[0]} exited with code {dead[1]}; stopping the stack",
                    file=sys.stderr,
                    flush=True,
                )
                code = 1
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    except TimeoutError:
        print(
            f"pdrouter serve: not ready after {args.ready_timeout:.0f} s; stopping",
            file=sys.stderr,
            flush=True,
        )
        code = 1
    finally:
        await asyncio.to_thread(stack.stop, args.drain_seconds + 10)
    return code


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv, "serve")
    raise SystemExit(asyncio.run(run(args)))
