"""Which host a worker runs on, as far as sharing memory goes."""

from __future__ import annotations

import functools
import socket
from pathlib import Path


@functools.cache
def host_id() -> str:
    """Hostname plus kernel boot id: equal only for processes that can share /dev/shm memory
    (a container with its own hostname, or a rebooted host, gets a different id)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
