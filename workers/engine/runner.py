"""The one seam between the torch-free engine core and whatever computes tokens.

The real engine plugs in `model_runner.ModelRunner` (torch); the mock engine plugs in
`workers.mock.runner.MockRunner` (modelled time). Scheduler, block manager and events are
shared, so both report KV state identically.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from kvtransfer.layout import KvLayout
from workers.engine.sequence import SampledToken, ScheduledSeq


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Facts about the model that the engine core and the worker API need."""

    name: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    layout: KvLayout


class Runner(Protocol):
    spec: ModelSpec
    num_blocks: int

    def execute(self, batch: list[ScheduledSeq]) -> list[SampledToken | None]:
        """Run one engine step; return one entry per scheduled seq (None where not sampled)."""
        ...

    def free(self, request_id: str) -> None:
        """Forget per-request state (e.g. a seeded generator) once a request ends."""
        ...
