"""The full engine (loop + scheduler + block manager + torch runner) against transformers."""

from __future__ import annotations

import asyncio

import pytest

from tests._tiny_llama import hf_greedy, make_tiny_llama
from workers.engine.engine import Engine
from workers.engine.model_runner import ModelRunner
from workers.engine.scheduler import SchedulerConfig
from workers.engine.sequence import KvImport, SamplingParams

pytestmark = pytest.mark.unit

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    return path, make_tiny_llama(path)


def make_engine(path, num_blocks: int = 128, **cfg) -> Engine:
    return Engine(ModelRunner(path, num_blocks=num_blocks, block_size=16), SchedulerConfig(**cfg))


async def _gen(engine: Engine, rid: str, prompt: list[int], n: int):
    tokens, last = [], None
    async for out in engine.generate(rid, prompt, SamplingParams(max_tokens=n, **GREEDY)):
        tokens += out.token_ids
        last = out
    return tokens, last


def _prompts(k: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 290 + 5 for j in range(5 + 11 * i)] for i in range(k)]


async def test_batch8_mixed_lengths_equals_transformers(tiny) -> None:
    path, model = tiny
    engine = make_engine(path, max_num_batched_tokens=48)  # forces chunked prefill next to decodes
    engine.start()
    try:
        prompts = _prompts(8)
        got = await asyncio.gather(*[_gen(engine, f"r{i}", p, 12) for i, p in enumerate(prompts)])
        assert [g[0] for g in got] == [hf_greedy(model, p, 12) for p in prompts]
        assert engine.block_manager.num_free_blocks == 128
    finally:
        engine.stop()


async def test_shared_prefix_computes_only_new_tokens(tiny) -> None:
    path, model = tiny
    engine = make_engine(path)
    engine.start()
    try:
        prefix = [(5 * j) % 280 + 7 for j in range(64)]
        first, out1 = await _gen(engine, "a", prefix + [11, 12, 13], 6)
        before = engine.scheduler.num_computed_prompt_tokens
        second, out2 = await _gen(engine, "b", prefix + [21, 22, 23, 24], 6)
        assert out1.num_cached_tokens == 0 and out2.num_cached_tokens == 64
        assert engine.scheduler.num_computed_prompt_tokens - before == 4
        assert first == hf_greedy(model, prefix + [11, 12, 13], 6)
        assert second == hf_greedy(model, prefix + [21, 22, 23, 24], 6)
    finally:
        engine.stop()


async def test_preemption_keeps_outputs_and_frees_everything(tiny) -> None:
    path, model = tiny
    engine = make_engine(path, num_blocks=10, max_num_batched_tokens=256)
    engine.start()
    try:
        prompts = [[(11 * i + j) % 280 + 9 for j in range(20 + i)] for i in range(4)]
        got = await asyncio.gather(*[_gen(engine, f"p{i}", p, 30) for i, p in enumerate(prompts)])
        assert engine.scheduler.num_preemptions > 0
        assert [g[0] for g in got] == [hf_greedy(model, p, 30) for p in prompts]
        assert engine.block_manager.num_free_blocks == 10
    finally:
        engine.stop()


async def test_cancellations_leave_no_blocks(tiny) -> None:
    path, _ = tiny
    engine = make_engine(path, num_blocks=64)
    engine.start()
    try:

        async def cancel_after(i: int) -> None:
            async for out in engine.generate(
                f"c{i}", _prompts(6)[i], SamplingParams(max_tokens=100, **GREEDY)
            ):
                if out.token_ids:
                    break

        await asyncio.gather(*[cancel_after(i) for i in range(6)])
        await _gen(engine, "after", [5, 6, 7], 2)
        assert engine.block_manager.num_free_blocks == 64
        assert engine.load().num_running == 0
    finally:
        engine.stop()


async def _disagg(prefill: Engine, decode: Engine, rid: str, prompt: list[int], n: int, fail: bool = False):
    """Prefill on one engine (blocks pinned), pull the KV into the other, decode there."""
    first, pinned = None, None
    async for out in prefill.generate(
        rid, prompt, SamplingParams(max_tokens=1, **GREEDY), pin_on_finish=True
    ):
        first, pinned = out.token_ids[0], out.pinned_block_ids
    src_pool, dst_pool = prefill.runner.kv_pool, decode.runner.kv_pool
    pulled: list[int] = []

    async def pull(src: list[int], dst: list[int]) -> None:
        if fail:
            raise ConnectionError("injected transfer failure")
        pulled.extend(src)
        dst_pool[dst] = src_pool[src]

    imp = KvImport(pinned, len(prompt), pull)
    tokens, last = [first], None
    async for out in decode.generate(
        rid, [*prompt, first], SamplingParams(max_tokens=n - 1, **GREEDY), kv_import=imp
    ):
        tokens += out.token_ids
        last = out
    prefill.unpin(rid)
    return tokens, last, pulled


async def test_disaggregated_prefill_then_decode_equals_transformers(tiny) -> None:
    path, model = tiny
    prefill, decode = make_engine(path, num_blocks=64), make_engine(path, num_blocks=64)
    prefill.start()
    decode.start()
    try:
        prefix = [(3 * j) % 250 + 11 for j in range(40)]
        a = [*prefix, 5, 6, 7]
        tokens, last, pulled = await _disagg(prefill, decode, "a", a, 10)
        assert tokens == hf_greedy(model, a, 10)
        assert len(pulled) == 3 and last.kv_pulled_blocks == 3  # 43 tokens: 2 full blocks + a partial one
        b = [*prefix, 9, 9]  # shares 2 full blocks with `a`, which the decode engine now caches
        tokens, last, pulled = await _disagg(prefill, decode, "b", b, 8)
        assert tokens == hf_greedy(model, b, 8)
        assert len(pulled) == 1 and last.num_cached_tokens == 32  # only the partial tail block moved
        tokens, last, _ = await _disagg(prefill, decode, "c", [*prefix, 1, 2, 3, 4], 8, fail=True)
        assert tokens == hf_greedy(model, [*prefix, 1, 2, 3, 4], 8) and last.kv_pulled_blocks == -1
        await _gen(prefill, "sync", [5], 1)  # the inbox is FIFO: earlier unpins are applied by now
        assert prefill.scheduler.pinned == {}
        assert prefill.block_manager.num_free_blocks == 64 and decode.block_manager.num_free_blocks == 64
    finally:
        prefill.stop()
        decode.stop()
