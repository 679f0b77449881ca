"""Small `make_*` helpers that build real engine objects for tests."""

from __future__ import annotations

from workers.engine.block_manager import BlockManager, KvEvent
from workers.engine.engine import Engine
from workers.engine.runner import KvLayout, ModelSpec
from workers.engine.scheduler import Scheduler, SchedulerConfig
from workers.engine.sequence import SamplingParams, Sequence
from workers.mock.runner import MockRunner, TimingModel


def make_spec(block_size: int = 4, vocab: int = 1000, max_len: int = 256) -> ModelSpec:
    layout = KvLayout(dtype="float16", num_layers=2, num_kv_heads=2, head_dim=8, block_size=block_size)
    return ModelSpec(name="mock", vocab_size=vocab, max_model_len=max_len, eos_token_ids=[2], layout=layout)


def make_bm(num_blocks: int = 8, block_size: int = 4) -> tuple[BlockManager, list[KvEvent]]:
    events: list[KvEvent] = []
    return BlockManager(num_blocks, block_size, on_event=events.append), events


def make_seq(rid: str, tokens: list[int], max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens, **kw))


def make_scheduler(num_blocks: int = 8, block_size: int = 4, **cfg) -> Scheduler:
    bm, _ = make_bm(num_blocks, block_size)
    return Scheduler(SchedulerConfig(**cfg), bm, eos_token_ids=[2])


def make_engine(num_blocks: int = 64, block_size: int = 4, delay_ms: float = 0.0, **cfg) -> Engine:
    return Engine(
        MockRunner(make_spec(block_size), num_blocks, TimingModel(d=delay_ms)), SchedulerConfig(**cfg)
    )
