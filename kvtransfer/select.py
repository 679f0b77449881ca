"""Which backend moves KV between two workers: shared memory on one host, TCP otherwise.

`cuda_ipc` and `nixl` are names the protocol reserves; this build implements neither, so they
are never chosen automatically and asking for them explains why it cannot be done.
"""

from __future__ import annotations

import functools
import importlib.util
import socket
from pathlib import Path

IMPLEMENTED = ("shm", "tcp")
KNOWN = ("shm", "tcp", "cuda_ipc", "nixl")


@functools.cache
def host_id() -> str:
    """Hostname plus kernel boot id: equal only for processes that can share /dev/shm memory
    (a container with its own hostname, or a rebooted host, gets a different id)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def choose_backend(
    src_host_id: str,
    dst_host_id: str,
    override: str | None = None,
    *,
    src_cuda: bool = False,
    dst_cuda: bool = False,
) -> str:
    """The backend for a pull from `src_host_id` into `dst_host_id`; `override` wins if it can work.

    Raises ValueError for an override that cannot work here (unknown, shm across hosts,
    cuda_ipc without CUDA on both sides, nixl not installed, or not implemented in this build).
    """
    same_host = bool(src_host_id) and src_host_id == dst_host_id
    if override is None or override == "auto":
        return "shm" if same_host else "tcp"
    if override not in KNOWN:
        raise ValueError(f"unknown KV transfer backend {override!r}; choose one of {', '.join(KNOWN)}")
    if override in ("shm", "cuda_ipc") and not same_host:
        raise ValueError(
            f"backend {override!r} needs both workers on one host ({src_host_id} vs {dst_host_id})"
        )
    if override == "cuda_ipc" and not (src_cuda and dst_cuda):
        raise ValueError("backend 'cuda_ipc' needs a CUDA device on both workers")
    if override == "nixl" and importlib.util.find_spec("nixl") is None:
        raise ValueError("backend 'nixl' needs the nixl package, which is not installed")
    if override not in IMPLEMENTED:
        raise ValueError(f"backend {override!r} is not implemented in this build; use shm or tcp")
    return override
