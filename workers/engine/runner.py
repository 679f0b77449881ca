"""The one seam between the torch-free engine core and whatever computes tokens.

The real engine plugs in `model_runner.ModelRunner` (torch); the mock engine plugs in
`workers.mock.runner.MockRunner` (modelled time). Scheduler, block manager and events are
shared, so both report KV state identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import msgspec

from kvtransfer.layout import KvLayout
from kvtransfer.pool import Pool
from workers.engine.sequence import SampledToken, ScheduledSeq


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Facts about the model that the engine core and the worker API need."""

    name: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    layout: KvLayout


def spec_from_model_dir(model_dir: Path, block_size: int = 16, dtype: str = "float16") -> ModelSpec:
    """Model facts from a Hugging Face config.json, without loading weights."""
    cfg = json.loads((model_dir / "config.json").read_text())
    gen_path = model_dir / "generation_config.json"
    eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.exists() else None
    eos = cfg.get("eos_token_id") if eos is None else eos
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    heads = cfg["num_attention_heads"]
    layout = KvLayout(
        dtype=dtype,
        num_layers=cfg["num_hidden_layers"],
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        block_size=block_size,
    )
    return ModelSpec(
        name=cfg.get("_name_or_path") or model_dir.name,
        vocab_size=cfg["vocab_size"],
        max_model_len=cfg.get("max_position_embeddings", 4096),
        eos_token_ids=eos_ids,
        layout=layout,
    )


class Runner(Protocol):
    spec: ModelSpec
    num_blocks: int
    transfer_pool: Pool | None  # the KV pool's bytes, for kvtransfer (None: not transferable)

    def execute(self, batch: list[ScheduledSeq]) -> list[SampledToken | None]:
        """Run one engine step; return one entry per scheduled seq (None where not sampled)."""
        ...

    def free(self, request_id: str) -> None:
        """Forget per-request state (e.g. a seeded generator) once a request ends."""
        ...
