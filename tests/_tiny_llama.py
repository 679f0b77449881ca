"""Helpers for runner tests: a tiny random Llama saved like a real checkpoint, and a toy step driver.

The driver stands in for the scheduler: it hands out blocks from a counter, runs every
unfinished sequence in each step (a prefill chunk or a one-token decode), and appends the
sampled tokens, so the runner is exercised exactly through its `execute` contract.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers.engine.model_runner import ModelRunner
from workers.engine.sequence import SampledToken, SamplingParams, ScheduledSeq, Sequence


def make_tiny_llama(
    path: Path, *, tie_word_embeddings: bool = True, seed: int = 0, **overrides: object
) -> LlamaForCausalLM:
    fields: dict = {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": 0.1,  # NOTE: livelier logits than 0.02, so greedy text is less repetitive
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    config = LlamaConfig(**(fields | overrides))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation of one unpadded prompt (EOS does not stop it)."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


class Driver:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.next_block = 0

    def new_seq(self, rid: str, prompt: list[int], params: SamplingParams | None = None) -> Sequence:
        return Sequence(rid, prompt, params or SamplingParams(temperature=0.0))

    def step(self, seqs: list[Sequence], chunk: int | None = None) -> list[SampledToken | None]:
        bs = self.runner.block_size
        batch = []
        for seq in seqs:
            start = seq.num_computed_tokens
            n = seq.num_tokens - start if chunk is None else min(seq.num_tokens - start, chunk)
            while len(seq.block_table) * bs < start + n:
                seq.block_table.append(self.next_block)
                self.next_block += 1
            batch.append(ScheduledSeq(seq, start, n, start + n == seq.num_tokens))
        out = self.runner.execute(batch)
        for item, tok in zip(batch, out, strict=True):
            item.seq.num_computed_tokens = item.start + item.num_tokens
            if tok is not None:
                item.seq.token_ids.append(tok.token_id)
        return out

    def generate(
        self, seqs: list[Sequence], max_new_tokens: int, chunk: int | None = None
    ) -> list[list[int]]:
        """Step all sequences together until each has `max_new_tokens` outputs."""
        while True:
            active = [s for s in seqs if s.num_output_tokens < max_new_tokens]
            if not active:
                return [s.output_token_ids for s in seqs]
            self.step(active, chunk)
