"""Why a KV pull failed. Every transfer failure is a `TransferError`, so the decode side can
catch one type and fall back to recomputing the prompt locally."""

from __future__ import annotations


class TransferError(Exception):
    """A pull did not complete: connection lost, timed out, bad block ids, backend failure."""


class TransferRefused(TransferError):
    """The prefill side refused the handle (unknown, wrong token, reused, expired, released)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LayoutMismatch(TransferError):
    """The two pools do not hold the same KV shape; copying would corrupt silently."""

    def __init__(self, local: str, remote: str) -> None:
        super().__init__(f"KV layout mismatch: local pool has {local}; remote pool has {remote}")
        self.local = local
        self.remote = remote
