"""Continuous batching with chunked prefill; torch-free.

Each step: running sequences first (one decode token each, or their next prefill chunk),
then waiting ones join while the token budget, the sequence cap and free blocks allow.
When blocks run out, the most recently admitted running sequence is preempted by
recompute (its blocks freed; it rejoins the front of the queue with its tokens so far).
"""

from __future__ import annotations

import time
from collections import deque

import msgspec

from workers.engine.block_manager import BlockManager
from workers.engine.sequence import (
    FinishReason,
    SampledToken,
    ScheduledSeq,
    Sequence,
    SequenceStatus,
)


class SchedulerConfig(msgspec.Struct, kw_only=True):
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: list[int]
    ) -> None:
        self.config = config
        self.bm = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.importing: dict[str, Sequence] = {}  # decode legs waiting for their prompt KV
        self.new_imports: list[Sequence] = []  # admitted this step; the engine starts their pulls
        self.pinned: dict[str, Sequence] = {}  # finished prefill legs whose blocks await a pull
        self.num_preemptions = 0
        self.num_computed_prompt_tokens = 0  # prompt tokens actually run through the model

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.importing)

    def queued_prefill_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for s in self.waiting) + sum(
            s.num_tokens - s.num_computed_tokens - 1
            for s in self.running
            if s.num_computed_tokens < s.num_tokens - 1
        )

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        seq = self.importing.get(request_id)
        if seq is not None:
            # NOTE: a pull may be writing into its blocks; they are freed when the pull ends.
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = FinishReason.ABORT
            return seq
        # NOTE: finished with its blocks pinned, but its caller left before it could publish
        # them (the abort comes from a consumer that never saw the last output): unpin now
        self.unpin(request_id)
        return None

    def unpin(self, request_id: str) -> bool:
        seq = self.pinned.pop(request_id, None)
        if seq is None:
            return False
        self.bm.free(seq)
        return True

    def import_done(self, request_id: str, ok: bool) -> Sequence | None:
        """A pull ended: on success the prompt KV is in place; on failure recompute it locally."""
        seq = self.importing.pop(request_id, None)
        if seq is None:
            return None
        assert seq.kv_import is not None
        seq.kv_import.ok = ok
        if seq.is_finished:  # aborted while pulling
            self.bm.free(seq)
            return seq
        if ok:
            seq.num_computed_tokens = seq.kv_import.num_tokens
            self.bm.commit_full_blocks(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return seq

    # -- scheduling -------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
                continue
            batch.append(self._item(seq, n))
            budget -= n
            i += 1
        max_seqs = self.config.max_num_seqs
        while self.waiting and budget > 0 and len(self.running) + len(self.importing) < max_seqs:
            seq = self.waiting[0]
            if seq.kv_import is not None and seq.kv_import.ok is None:
                if not self._admit_import(seq):
                    break
                continue
            hits = self.bm.match_prefix(seq) if not seq.block_table else []
            num_cached = len(hits) * self.bm.block_size
            n = min(seq.num_tokens - num_cached, budget)
            need = -(-(num_cached + n) // self.bm.block_size) - len(hits)
            if not self.bm.can_allocate(need + sum(1 for b in hits if b.ref_count == 0)):
                break
            self.waiting.popleft()
            self.bm.allocate_prefix(seq, hits)
            if seq.status is SequenceStatus.WAITING and seq.num_output_tokens == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            self.bm.allocate(seq, need)
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.monotonic()
            self.running.append(seq)
            batch.append(self._item(seq, n))
            budget -= n
        return batch

    def _admit_import(self, seq: Sequence) -> bool:
        """Allocate blocks for the prompt KV to pull (reusing locally cached prefix blocks)."""
        imp = seq.kv_import
        assert imp is not None
        hits = self.bm.match_prefix(seq)  # at most the prompt's full blocks
        num_blocks = -(-imp.num_tokens // self.bm.block_size)
        need = num_blocks - len(hits)
        if not self.bm.can_allocate(need + sum(1 for b in hits if b.ref_count == 0)):
            return False
        self.waiting.popleft()
        self.bm.allocate_prefix(seq, hits)
        seq.num_cached_tokens = seq.num_computed_tokens
        self.bm.allocate(seq, need)
        seq.first_scheduled_time = seq.first_scheduled_time or time.monotonic()
        self.importing[seq.request_id] = seq
        self.new_imports.append(seq)
        return True

    def _item(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, start, n, start + n == seq.num_tokens)

    def _reserve(self, seq: Sequence, n: int) -> bool:
        need = self.bm.num_blocks_needed(seq, n)
        if need == 0:
            return True
        if not self.bm.can_allocate(need):
            return False
        self.bm.allocate(seq, need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the runner -------------------------------------------------------------------

    def postprocess(self, batch: list[ScheduledSeq], sampled: list[SampledToken | None]) -> list[Sequence]:
        """Advance computed counts, register full blocks, append tokens; return finished seqs."""
        finished: list[Sequence] = []
        for item, tok in zip(batch, sampled):
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            if seq.num_output_tokens == 0:
                self.num_computed_prompt_tokens += item.num_tokens
            seq.num_computed_tokens = item.start + item.num_tokens
            self.bm.commit_full_blocks(seq)
            if tok is None:
                continue
            seq.token_ids.append(tok.token_id)
            reason = self._stop_reason(seq, tok.token_id)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        p = seq.params
        if not p.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if token_id in p.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.pin_on_finish and reason is not FinishReason.ABORT:
            self.pinned[seq.request_id] = seq
            return
        self.bm.free(seq)
