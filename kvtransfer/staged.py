"""GPU pools between any two workers when neither cuda_ipc nor NIXL can run: device -> pinned
host memory -> the tcp stream -> pinned host memory -> device, in chunks (kvtransfer/device_pool.py
does the staging; the wire protocol is tcp's)."""

from __future__ import annotations

from kvtransfer.pool import KvPool, Pool
from kvtransfer.tcp import TcpTransport
from kvtransfer.transport import Control


class StagedTransport(TcpTransport):
    backend = "staged"

    @classmethod
    def unavailable(cls, pool: Pool) -> str | None:
        return "staged is for pools on a device; a host pool uses tcp" if isinstance(pool, KvPool) else None

    @classmethod
    def create(cls, setup, control: Control) -> StagedTransport:
        return cls(setup.pool, setup.compat_hash, tls=setup.tls)
