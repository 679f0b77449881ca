"""A runner that models time instead of computing: the engine core around it is the real one.

Step time (ms) = sum over prefill chunks of (a + b*n + c*n^2) + (d + e*batch + f*context)
when the step has decodes. Tokens are a hash of (prompt, position, previous token, seed), so
the same prompt and seed always give the same tokens, whatever else shares the batch.
"""

from __future__ import annotations

import time

import msgspec
import xxhash

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


class MockRunner:
    def __init__(self, spec: ModelSpec, num_blocks: int, timing: TimingModel | None = None) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.timing = timing or TimingModel()
        self._prompt_keys: dict[str, int] = {}
        self._span = spec.vocab_size - FIRST_ORDINARY_TOKEN

    def execute(self, batch: list[ScheduledSeq]) -> list[SampledToken | None]:
        t0 = time.perf_counter()
        prefills: list[int] = []
        num_decodes = context = 0
        out: list[SampledToken | None] = []
        for item in batch:
            seq = item.seq
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
            prompt = seq.token_ids[: seq.num_prompt_tokens]
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
