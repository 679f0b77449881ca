"""Several "hosts" on one machine: network namespaces joined by a bridge, for multi-host tests.

Layout: a bridge in the root namespace holding 10.251.X.1/24 (the router and etcd live there);
each host is a namespace with one end of a veth pair at 10.251.X.(10+i), the other end on the
bridge. Hosts reach each other and the root namespace only through the bridge: nothing they
serve is on a shared loopback.

Names carry this process's pid (`pdr-<pid><n>-<host>`, bridge `pdrb<pid><n>`), so a run that
died before its cleanup is swept by the next one. Needs `ip` (iproute2) and CAP_NET_ADMIN (and
CAP_SYS_ADMIN for `ip netns exec`); `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import subprocess
import sys

_COUNTER = itertools.count()
_NS = re.compile(r"^pdr-(\d+)[a-z]-\w+")
_BRIDGE = re.compile(r"^\d+: (pdrb(\d+)[a-z])[:@]")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Delete namespaces and bridges left by test runs whose process is gone."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = _NS.match(line)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "del", line.split()[0], check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        m = _BRIDGE.match(line)
        if m and not _alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed (make setup installs it as root)"
    probe = f"pdr-{os.getpid()}z-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace (needs CAP_NET_ADMIN): {made.stderr.strip()}"
    try:
        run = _ip("netns", "exec", probe, "true", check=False)
        if run.returncode != 0:
            return f"cannot enter a network namespace (needs CAP_SYS_ADMIN): {run.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> str:
    used = _ip("-o", "-4", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    for _ in range(100):
        subnet = f"10.251.{random.randrange(256)}"
        if f"{subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.251.X.0/24 subnet")


class Hosts:
    """Namespaces named `names`, each an address on one bridge; `close()` removes everything."""

    def __init__(self, names: list[str]) -> None:
        sweep_stale()
        tag = f"{os.getpid()}{'abcdefghijklmnopqrstuvwxy'[next(_COUNTER) % 25]}"
        self.bridge = f"pdrb{tag}"
        subnet = _free_subnet()
        self.root_ip = f"{subnet}.1"
        self.namespaces: dict[str, str] = {}  # host -> namespace
        self.ips: dict[str, str] = {}  # host -> its address
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.root_ip}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(names):
                ns, outer, inner = f"pdr-{tag}-{name}", f"pdr{tag}{i}r", f"pdr{tag}{i}n"
                _ip("netns", "add", ns)
                self.namespaces[name] = ns
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                self.ips[name] = f"{subnet}.{10 + i}"
                _ip("-n", ns, "addr", "add", f"{self.ips[name]}/24", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def argv(self, host: str, *command: str) -> list[str]:
        """`command` run inside `host`'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[host], *command]

    def python(self, host: str, *args: str) -> list[str]:
        return self.argv(host, sys.executable, *args)

    def close(self) -> None:
        """Namespaces (their veth pairs go with them), then the bridge. Stop processes first."""
        for ns in self.namespaces.values():
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()
        _ip("link", "del", self.bridge, check=False)
