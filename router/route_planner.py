"""Where a request goes: aggregated on one worker, or prefill on one and decode on another.

Plan: hash the prompt's blocks -> pick the decode worker (load, plus a bonus for blocks it
already holds) -> if the tokens it would still have to compute are few, or no prefill
worker is healthy, it prefills locally (aggregated) -> else pick the prefill worker by
Dynamo's KV-router cost (docs/routing.md) -> book the expected load on both, so a burst does
not pile onto one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvtransfer.blocks import sequence_block_hashes
from router.errors import ApiError
from router.kv_index import KvIndex, PendingKvIndex
from router.routing import (
    DEFAULT_OVERLAP_WEIGHT,
    ActiveLoad,
    Decision,
    KvPolicy,
    Policy,
    SessionAffinity,
    make_policy,
    pick_decode,
)
from router.worker_pool import WorkerClient, WorkerPool


@dataclass(slots=True)
class Route:
    mode: str  # "aggregated" | "disaggregated"
    decode: WorkerClient
    prefill: WorkerClient | None = None
    overlap_blocks: int = 0  # prompt blocks the chosen prefiller (or aggregated worker) holds
    decode_overlap_blocks: int = 0
    decision_us: float = 0.0

    def header(self) -> str:
        if self.prefill is None:
            return f"mode={self.mode};decode={self.decode.worker_id}"
        return f"mode={self.mode};prefill={self.prefill.worker_id};decode={self.decode.worker_id}"


def no_worker(role: str) -> ApiError:
    return ApiError(
        503,
        f"No healthy {role} worker is available to serve this request; try again shortly.",
        None,
        "no_healthy_worker",
    )


log = logging.getLogger("pdrouter.router.planner")


class KvDecodePolicy:
    """The decode pool's `kv` policy: least load, with a bonus for prompt blocks already held."""

    name = "kv_decode"

    def __init__(self, index: KvIndex, active: ActiveLoad) -> None:
        self.index = index
        self.active = active

    def select(
        self, candidates, block_hashes=(), prompt_tokens=0, block_size=16, session_id=None
    ) -> Decision:
        return pick_decode(candidates, block_hashes, block_size, self.index, self.active)


class RoutePlanner:
    def __init__(
        self,
        pool: WorkerPool,
        index: KvIndex,
        active: ActiveLoad,
        *,
        prefill_policy: str = "kv",
        decode_policy: str = "kv",
        local_prefill_max_tokens: int = 512,
        session_affinity: bool = True,
        seed: int | None = None,
        overlap_weight: float = DEFAULT_OVERLAP_WEIGHT,
        pending_ttl_s: float = 10.0,
    ) -> None:
        self.pool = pool
        self.index = PendingKvIndex(index, pending_ttl_s)
        index = self.index  # type: ignore[assignment]  # NOTE: every policy sees pending routes too
        self.active = active
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.prefill_policy: Policy = make_policy(
            prefill_policy, index=index, active=active, seed=seed, overlap_weight=overlap_weight
        )
        # NOTE: with `kv`, a decode worker that will also prefill (no prefill pool to hand the
        # prompt to) is chosen by the prefill cost: computing the prompt is most of its work.
        decode: Policy
        local: Policy
        if decode_policy == "kv":
            decode = KvDecodePolicy(index, active)
            local = KvPolicy(overlap_weight, seed=seed, index=index, active=active)
        else:
            decode = local = make_policy(decode_policy, index=index, active=active, seed=seed)
        if session_affinity:
            decode = SessionAffinity(decode)
            local = SessionAffinity(local, sessions=decode._sessions)
        self.decode_policy: Policy = decode
        self.local_policy: Policy = local

    def block_hashes(self, prompt: list[int]) -> list[int]:
        return sequence_block_hashes(prompt, self.pool.block_size)

    def plan(self, request_id: str, prompt: list[int], max_tokens: int, session_id: str = "") -> Route:
        bs = self.pool.block_size
        hashes = self.block_hashes(prompt)
        decoders = self.pool.healthy("decode")
        if not decoders:
            raise no_worker("decode")
        prefillers = [w for w in self.pool.healthy("prefill") if w.role == "prefill"]
        policy = self.decode_policy if prefillers else self.local_policy
        decode = policy.select(decoders, hashes, len(prompt), bs, session_id or None)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s -> %s by %s, overlaps %s, scores %s",
                request_id,
                decode.worker_id,
                decode.policy,
                decode.overlaps,
                decode.scores,
            )
        held = decode.overlap_blocks
        local_tokens = len(prompt) - held * bs
        decode_blocks = -(-(len(prompt) + max_tokens) // bs) - held  # NOTE: held blocks are shared
        us = decode.decision_us
        if local_tokens <= self.local_prefill_max_tokens or not prefillers:
            self.index.record(decode.worker_id, hashes)
            self.active.add(decode.worker_id, request_id, local_tokens, decode_blocks)
            return Route("aggregated", decode.worker, None, held, held, us)
        pre = self.prefill_policy.select(prefillers, hashes, len(prompt), bs)
        self.index.record(pre.worker_id, hashes)
        if max_tokens > 1:
            # NOTE: only a decode leg imports the prompt's KV: a request that ends with the prefill's
            # first token never reaches the decode worker, which must not look as if it held it
            self.index.record(decode.worker_id, hashes)
        new_tokens = len(prompt) - pre.overlap_blocks * bs
        self.active.add(pre.worker_id, request_id, new_tokens, 0)
        self.active.add(decode.worker_id, request_id, 0, decode_blocks)
        return Route(
            "disaggregated", decode.worker, pre.worker, pre.overlap_blocks, held, us + pre.decision_us
        )

    def first_token(self, request_id: str) -> None:
        self.active.prefill_done(request_id)

    def finished(self, request_id: str) -> None:
        self.active.free(request_id)
