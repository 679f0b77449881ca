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
