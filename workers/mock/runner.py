"""A runner that models time instead of computing: the engine core around it is the real one.

Step time (ms) = sum over prefill chunks of (a + b*n + c*n^2) + (d + e*batch + f*context)
when the step has decodes. Tokens are a hash of (prompt, position, previous token, seed), so
the same prompt and seed always give the same tokens, whatever else shares the batch.

Its KV pool is real but tiny (16 bytes per token slot): computing a token writes the token id's
low byte into its slot, and a sequence whose prompt KV was imported from another worker is
checked against its prompt on its first step, so disaggregated mock runs prove the transfer
moved the right blocks to the right places.
"""

from __future__ import annotations

import time

import msgspec
import numpy as np
import xxhash

from kvtransfer.layout import KvLayout
from kvtransfer.pool import KvPool
from workers.engine.runner import ModelSpec
from workers.engine.sequence import SampledToken, ScheduledSeq

FIRST_ORDINARY_TOKEN = 100  # NOTE: keeps mock output clear of special/control tokens


class TimingModel(msgspec.Struct, kw_only=True):
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0
    e: float = 0.0
    f: float = 0.0

    def step_ms(self, prefill_chunks: list[int], num_decodes: int, decode_context: int) -> float:
        ms = sum(self.a + self.b * n + self.c * n * n for n in prefill_chunks)
        if num_decodes:
            ms += self.d + self.e * num_decodes + self.f * decode_context
        return ms


SLOT_BYTES = 16


class MockKvMismatch(RuntimeError):
    pass


class MockRunner:
    def __init__(
        self, spec: ModelSpec, num_blocks: int, timing: TimingModel | None = None, shared_kv: bool = False
    ) -> None:
        layout = KvLayout(
            dtype="uint8", num_layers=1, num_kv_heads=1, head_dim=SLOT_BYTES // 2,
            block_size=spec.layout.block_size,
        )  # fmt: skip
        self.spec = msgspec.structs.replace(spec, layout=layout)
        self.num_blocks = num_blocks
        self.timing = timing or TimingModel()
        self._prompt_keys: dict[str, int] = {}
        self._span = spec.vocab_size - FIRST_ORDINARY_TOKEN
        self.transfer_pool = KvPool.create(layout, num_blocks, shared=shared_kv)
        self._slots = self.transfer_pool.array.reshape(num_blocks * layout.block_size, SLOT_BYTES)
        self._checked: set[str] = set()

    def _write_kv(self, item: ScheduledSeq) -> None:
        seq, bs = item.seq, self.spec.layout.block_size
        pos = np.arange(item.start, item.start + item.num_tokens)
        table = np.asarray(seq.block_table, dtype=np.int64)
        tokens = np.asarray(seq.token_ids[item.start : item.start + item.num_tokens], dtype=np.int64)
        self._slots[table[pos // bs] * bs + pos % bs, 0] = tokens & 0xFF

    def _check_imported(self, item: ScheduledSeq) -> None:
        """The imported prompt KV must hold exactly this prompt's tokens, slot by slot."""
        seq, bs = item.seq, self.spec.layout.block_size
        self._checked.add(seq.request_id)
        if not item.start:
            return  # the import failed and the prompt is being recomputed here
        pos = np.arange(item.start)
        got = self._slots[np.asarray(seq.block_table)[pos // bs] * bs + pos % bs, 0]
        want = np.asarray(seq.token_ids[: item.start], dtype=np.int64) & 0xFF
        bad = np.flatnonzero(got != want)
        if bad.size:
            raise MockKvMismatch(
                f"{seq.request_id}: imported KV differs from the prompt at {bad.size} positions "
                f"(first at {int(bad[0])})"
            )

    def execute(self, batch: list[ScheduledSeq]) -> list[SampledToken | None]:
        t0 = time.perf_counter()
        prefills: list[int] = []
        num_decodes = context = 0
        out: list[SampledToken | None] = []
        for item in batch:
            seq = item.seq
            if seq.kv_import is not None and seq.request_id not in self._checked:
                self._check_imported(item)
            self._write_kv(item)
            if item.num_tokens == 1 and item.start >= seq.num_prompt_tokens:
                num_decodes += 1
                context += item.start + 1
            else:
                prefills.append(item.num_tokens)
            out.append(self._sample(item) if item.sample else None)
        delay = self.timing.step_ms(prefills, num_decodes, context) / 1000.0 - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        return out

    def _sample(self, item: ScheduledSeq) -> SampledToken:
        seq = item.seq
        key = self._prompt_keys.get(seq.request_id)
        if key is None:
            # NOTE: a decode leg or a migrated stream carries tokens generated elsewhere after the
            # prompt; key on the user's prompt so every path gives the same tokens.
            prompt = seq.token_ids[: seq.num_user_prompt_tokens]
            key = xxhash.xxh3_64_intdigest(repr((prompt, seq.params.seed)).encode())
            self._prompt_keys[seq.request_id] = key
        pos = seq.num_tokens
        h = xxhash.xxh3_64_intdigest(b"%d:%d:%d" % (key, pos, seq.token_ids[-1]))
        token_id = FIRST_ORDINARY_TOKEN + h % self._span
        if seq.params.logprobs is None:
            return SampledToken(token_id)
        top = [(token_id, -0.5)] + [
            (FIRST_ORDINARY_TOKEN + (h >> (8 * k)) % self._span, -1.0 - k)
            for k in range(1, seq.params.logprobs)
        ]
        return SampledToken(token_id, -0.5, top[: seq.params.logprobs] or None)

    def free(self, request_id: str) -> None:
        self._prompt_keys.pop(request_id, None)
        self._checked.discard(request_id)

    def close(self) -> None:
        self.transfer_pool.close()
