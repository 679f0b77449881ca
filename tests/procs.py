"""Start real processes on 127.0.0.1 for tests and always reap them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """A base port with n free ports in a row (for --num-workers N, which takes PORT..PORT+N-1)."""
    for _ in range(50):
        base = free_port()
        if base + n < 65000 and all(_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no run of {n} free ports")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Proc:
    """A child process whose output goes to a log file we can show when a test fails."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM the whole process group, then SIGKILL what is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group
        self._log.close()
        return self.proc.returncode


def pdrouter(*args: str) -> list[str]:
    return [sys.executable, "-m", "router.cli", *args]


def wait_http_ok(url: str, proc: Proc, timeout: float) -> None:
    """Poll a readiness URL until it answers 200; fail fast if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"process exited with {proc.proc.returncode} before {url} was ready:\n{proc.log()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # readiness poll interval
    raise TimeoutError(f"{url} not ready after {timeout} s:\n{proc.log()[-4000:]}")


class Stack:
    """`pdrouter serve` on free ports."""

    def __init__(
        self,
        tmp: Path,
        *extra: str,
        engine: str = "mock",
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.proc = Proc(
            pdrouter(
                "serve",
                "--engine",
                engine,
                "--port",
                str(self.port),
                "--grpc-port",
                str(self.grpc_port),
                *extra,
            ),
            tmp / f"serve-{self.port}.log",
            env,
        )
        self.base_url = f"http://127.0.0.1:{self.port}"
        wait_http_ok(self.base_url + "/ready", self.proc, timeout)

    def stop(self) -> int:
        return self.proc.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class PrefillDecode:
    """A router over `prefills` prefill workers and one decode mock worker, each its own process
    (so a test can kill one), every request with a longer prompt than 16 tokens disaggregated.

    `workers` lists the prefill addresses, then the decode address (`decode_address`);
    `prefills[i]` is the process serving `workers[i]`. With `metrics`, each worker serves
    Prometheus /metrics on a port of its own: `metrics_urls[address]`."""

    def __init__(
        self,
        tmp: Path,
        model_dir: Path,
        token_delay_ms: float = 1.0,
        *,
        prefills: int = 1,
        router_args: tuple[str, ...] = (),
        metrics: bool = False,
    ) -> None:
        pports, dport, hport = [free_port() for _ in range(prefills)], free_port(), free_port()
        model = str(model_dir)
        common = ["--engine", "mock", "--model", str(model_dir), "--mock-token-delay-ms", str(token_delay_ms)]
        self.metrics_urls: dict[str, str] = {}

        def worker(role: str, port: int, log: str) -> Proc:
            extra: list[str] = []
            if metrics:
                mport = free_port()
                extra = ["--metrics-port", str(mport)]
                self.metrics_urls[f"127.0.0.1:{port}"] = f"http://127.0.0.1:{mport}/metrics"
            return Proc(pdrouter("worker", "--role", role, "--port", str(port), *common, *extra), tmp / log)

        self.prefills = [
            worker("prefill", port, "p.log" if i == 0 else f"p{i}.log") for i, port in enumerate(pports)
        ]
        self.prefill = self.prefills[0]
        self.decode = worker("decode", dport, "d.log")
        self.prefill_addresses = [f"127.0.0.1:{port}" for port in pports]
        self.decode_address = f"127.0.0.1:{dport}"
        self.workers = [*self.prefill_addresses, self.decode_address]
        self.router = Proc(
            pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()), "--model", model,
                     *(arg for address in self.workers for arg in ("--worker", address)),
                     "--local-prefill-max-tokens", "16", *router_args),
            tmp / "r.log",
        )  # fmt: skip
        self.base = f"http://127.0.0.1:{hport}"
        try:
            wait_http_ok(self.base + "/ready", self.router, 60)
            deadline = time.monotonic() + 30
            for address in self.prefill_addresses:  # NOTE: /ready needs decode only
                while f"{address} is healthy" not in self.router.log():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the router never saw the prefill worker {address}")
                    time.sleep(0.05)  # readiness poll
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in (self.router, *self.prefills, self.decode):
            p.stop()
