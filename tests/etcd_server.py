"""A real etcd for tests: free ports, a temporary data dir, always reaped.

etcd is a test dependency like openssl: `make setup` installs it (Debian's etcd-server) when it
is missing. A machine without it fails these tests with a message saying so; it never skips them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.procs import Proc, free_port, wait_http_ok

MISSING = (
    "etcd is not installed: `make setup` installs it (apt-get install etcd-server, as root), "
    "or put an etcd 3.4+ binary on PATH"
)


def etcd_binary() -> str:
    binary = shutil.which("etcd")
    if binary is None:
        pytest.fail(MISSING, pytrace=False)
    return binary


class EtcdServer:
    """One etcd member listening on HOST (loopback by default) at a free client port."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1", extra_hosts: tuple[str, ...] = ()) -> None:
        self.binary = etcd_binary()
        self.host = host
        self.hosts = (host, *extra_hosts)
        self.port, self.peer_port = free_port(), free_port()
        self.tmp = tmp
        self.data_dir = tmp / f"etcd-{self.port}"
        self.proc: Proc | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, prefix: str = "/pdrouter/workers") -> str:
        return f"etcd://{self.endpoint}{prefix}"

    def start(self) -> None:
        """Start (or start again, on the same ports and data) and wait until it answers."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        clients = ",".join(f"http://{h}:{self.port}" for h in self.hosts)
        argv = [
            self.binary, "--name", "test", "--data-dir", str(self.data_dir), "--log-level", "warn",
            "--listen-client-urls", clients, "--advertise-client-urls", clients,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
        ]  # fmt: skip
        self.proc = Proc(argv, self.tmp / f"etcd-{self.port}.log")
        try:
            wait_http_ok(f"http://{self.endpoint}/health", self.proc, 30)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log(self) -> str:
        return self.proc.log() if self.proc is not None else ""
