"""Every KV transfer backend by name, in one place: how a worker builds its transports and how
a decode worker picks one for a handle.

A backend is a `Transport` subclass in its own module, named here. `build` makes the ones that
can run with this worker's pool (the others come back with the reason); `choose` picks, for one
handle, the first of `AUTO_ORDER` that can reach it, or the operator's choice when it can.
"""

from __future__ import annotations

import importlib
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from kvtransfer.pool import Pool
from kvtransfer.transport import Control, HandleRef, Transport

log = logging.getLogger(__name__)

# name -> "module:Class"; the order is auto's preference: the GPU's own copy engine on one node,
# a memcpy on one host, NIXL (RDMA/UCX) between nodes, then a plain stream (staged through host
# memory for a device pool).
BACKENDS: dict[str, str] = {
    "cuda_ipc": "kvtransfer.cuda_ipc:CudaIpcTransport",
    "shm": "kvtransfer.shm:ShmTransport",
    "nixl": "kvtransfer.nixl:NixlTransport",
    "staged": "kvtransfer.staged:StagedTransport",
    "tcp": "kvtransfer.tcp:TcpTransport",
}
AUTO_ORDER = tuple(BACKENDS)
CHOICES = ("auto", *BACKENDS)


@dataclass(frozen=True, slots=True)
class Setup:
    """What every backend may need to build itself in a worker."""

    pool: Pool  # this worker's own pool: pulls write into it, peers read from it
    compat_hash: str | None = None
    tls: ssl.SSLContext | None = None  # client side of mutual TLS for tcp/staged
    name: str = ""  # this worker's name (NIXL agent names start with it)


def load(name: str) -> type[Transport]:
    """The backend class registered as `name` (ValueError naming the choices when unknown)."""
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(
            f"unknown KV transfer backend {name!r}; choose one of {', '.join(CHOICES)}"
        ) from None
    return getattr(importlib.import_module(module), cls)


class Transports:
    """A worker's transports by name (in the order auto tries them), the control channel that
    claims and releases handles at a prefill worker, and why the other backends are absent."""

    def __init__(
        self, by_name: dict[str, Transport], control: Control, missing: dict[str, str] | None = None
    ) -> None:
        self.by_name = by_name
        self.control = control
        self.missing = missing or {}

    def offer(self) -> dict[str, object]:
        """HandleRef fields every handle this worker publishes carries (each backend's part)."""
        fields: dict[str, object] = {}
        for t in self.by_name.values():
            fields.update(t.offer())
        return fields

    def choose(self, handle: HandleRef, override: str | None = None) -> tuple[Transport, str]:
        """The transport for this handle, and a note when `override` could not be honoured.

        Raises ValueError when none here can reach the handle (then the prompt is recomputed).
        """
        note = ""
        if override and override != "auto":
            t = self.by_name.get(override)
            why = self.missing.get(override, "not built in this worker") if t is None else t.reach(handle)
            if why is None:
                return t, note  # type: ignore[return-value]
            note = f"--kv-transfer {override} cannot pull this handle ({why}); chose automatically"
        reasons = []
        for name, t in self.by_name.items():
            why = t.reach(handle)
            if why is None:
                return t, note
            reasons.append(f"{name}: {why}")
        raise ValueError("no KV transfer backend here can reach this handle (" + "; ".join(reasons) + ")")

    async def close(self) -> None:
        for t in {id(t): t for t in [*self.by_name.values(), self.control]}.values():
            close = getattr(t, "close", None)
            if close is not None:
                await close()


def build(setup: Setup, names: Iterable[str] = AUTO_ORDER) -> Transports:
    """This worker's transports; a backend that cannot run here is left out with its reason.

    The tcp client is built first whatever the pool: it is the control channel (claim, release)
    through which every backend reaches a prefill worker's handles, and tcp's data path too.
    """
    from kvtransfer.tcp import TcpTransport

    classes = {name: load(name) for name in names}  # NOTE: an unknown name fails before anything opens
    control = TcpTransport(setup.pool, setup.compat_hash, tls=setup.tls)
    built: dict[str, Transport] = {}
    missing: dict[str, str] = {}
    for name, cls in classes.items():
        why = cls.unavailable(setup.pool)
        if why is not None:
            missing[name] = why
            continue
        if cls is TcpTransport:
            built[name] = control
            continue
        try:
            built[name] = cls.create(setup, control)
        except Exception as exc:  # NOTE: a backend that fails to start must not stop the worker
            missing[name] = f"{type(exc).__name__}: {exc}"
            log.warning("KV transfer backend %s is off: %s", name, missing[name])
    return Transports(built, control, missing)
