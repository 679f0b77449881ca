"""Routing policies: pick a prefill or decode worker among healthy candidates.

Per request: look up every candidate's cached prefix (`KvIndex.overlaps`) -> score each
candidate with its active load -> pick (lowest cost, ties random, or softmax sampling) ->
the caller books the request in `ActiveLoad.add` -> `prefill_done` at the first token ->
`free` at completion. Every policy returns a `Decision` carrying the scores, for tracing.

Load is counted in KV blocks, the unit of the prefill cost, so one number compares workers:
load_blocks(w) = active_prefill_tokens(w) / block_size + active_decode_blocks(w).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvtransfer.blocks import DEFAULT_BLOCK_SIZE
from router.kv_index import OverlapIndex

SESSION_HEADER = "x-session-id"
POLICY_NAMES = ("kv", "round_robin", "random", "power_of_two", "least_loaded")
# NOTE: the kv policy's weight of a request's own prefill against KV blocks in use; 4 matched the
# oracle's prefix hit rate on the shared-prefix workload where 1 reached 0.75x (docs/routing.md)
DEFAULT_OVERLAP_WEIGHT = 4.0
_RNG = random.Random()


class LoadLike(Protocol):
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    queued_prefill_tokens: int


class Candidate(Protocol):
    @property
    def worker_id(self) -> str: ...
    @property
    def load(self) -> LoadLike: ...


class Policy(Protocol):
    name: str

    def select(
        self,
        candidates: Sequence[Candidate],
        block_hashes: Sequence[int] = (),
        prompt_tokens: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        session_id: str | None = None,
    ) -> Decision: ...


@dataclass(slots=True)
class Decision:
    """What a policy chose and why; `scores` are every candidate's cost (lower is better)."""

    worker: Any
    worker_id: str
    policy: str
    overlap_blocks: int = 0  # 0 also when the policy does not consult the index
    cost: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    overlaps: Mapping[str, int] = field(default_factory=dict)
    decision_us: float = 0.0


@dataclass(slots=True)
class _Booking:
    worker_id: str
    request_id: str
    prefill_tokens: int
    decode_blocks: int


class ActiveLoad:
    """The router's own account of what it sent where, corrected by the workers' reports.

    Own accounting reacts at once (a burst sees each earlier pick); reports see what other
    routers sent and what our accounting cannot know. The blend is max(own, reported) per
    worker: never below either, so a stale low report cannot hide a burst and requests from
    other router replicas are not ignored.
    """

    def __init__(self) -> None:
        self._prefill: dict[str, int] = {}
        self._decode: dict[str, int] = {}
        self._bookings: dict[str, list[_Booking]] = {}
        self._by_worker: dict[str, dict[str, None]] = {}

    @property
    def num_requests(self) -> int:
        return len(self._bookings)

    def add(self, worker_id: str, request_id: str, prefill_tokens: int, decode_blocks: int) -> None:
        """Book a routed request; one request may be booked on several workers (prefill + decode)."""
        booking = _Booking(worker_id, request_id, prefill_tokens, decode_blocks)
        self._bookings.setdefault(request_id, []).append(booking)
        self._by_worker.setdefault(worker_id, {})[request_id] = None
        self._prefill[worker_id] = self._prefill.get(worker_id, 0) + prefill_tokens
        self._decode[worker_id] = self._decode.get(worker_id, 0) + decode_blocks

    def prefill_done(self, request_id: str) -> None:
        for b in self._bookings.get(request_id, ()):
            self._prefill[b.worker_id] -= b.prefill_tokens
            b.prefill_tokens = 0

    def free(self, request_id: str) -> None:
        for b in self._bookings.pop(request_id, ()):
            self._prefill[b.worker_id] -= b.prefill_tokens
            self._decode[b.worker_id] -= b.decode_blocks
            self._by_worker[b.worker_id].pop(request_id, None)

    def drop_worker(self, worker_id: str) -> None:
        """Forget a worker's bookings (it died: its requests are gone with it)."""
        self._prefill.pop(worker_id, None)
        self._decode.pop(worker_id, None)
        for request_id in self._by_worker.pop(worker_id, {}):
            rest = [b for b in self._bookings.get(request_id, ()) if b.worker_id != worker_id]
            if rest:
                self._bookings[request_id] = rest
            else:
                self._bookings.pop(request_id, None)

    def active_prefill_tokens(self, worker_id: str, load: LoadLike | None = None) -> int:
        own = self._prefill.get(worker_id, 0)
        return own if load is None else max(own, load.queued_prefill_tokens)

    def active_decode_blocks(self, worker_id: str, load: LoadLike | None = None) -> int:
        own = self._decode.get(worker_id, 0)
        return own if load is None else max(own, load.kv_blocks_used)

    def load_blocks(self, worker: Candidate, block_size: int) -> float:
        wid, load = worker.worker_id, worker.load
        return self.active_prefill_tokens(wid, load) / block_size + self.active_decode_blocks(wid, load)

    def costs(
        self,
        candidates: Sequence[Candidate],
        per_prefill_token: float,
        base: float = 0.0,
        overlaps: Mapping[str, int] | None = None,
        per_held_block: float = 0.0,
    ) -> tuple[list[float], dict[str, float]]:
        """cost(w) = per_prefill_token * prefill(w) + decode(w) + base - per_held_block * overlap(w).

        The one per-candidate loop every load-aware policy runs (the routing hot path): the
        blend is inlined, and comparisons instead of max() halve its time (bench.routing).
        """
        own_prefill, own_decode = self._prefill.get, self._decode.get
        held = (overlaps or {}).get
        costs: list[float] = []
        scores: dict[str, float] = {}
        for w in candidates:
            wid, load = w.worker_id, w.load
            prefill = own_prefill(wid, 0)
            reported = load.queued_prefill_tokens
            if reported > prefill:
                prefill = reported
            decode = own_decode(wid, 0)
            reported = load.kv_blocks_used
            if reported > decode:
                decode = reported
            cost = per_prefill_token * prefill + decode + base - per_held_block * held(wid, 0)
            costs.append(cost)
            scores[wid] = cost
        return costs, scores


def _lowest(scores: list[float], rng: random.Random) -> int:
    best = min(scores)
    ties = [i for i, s in enumerate(scores) if s == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


def _softmax_pick(scores: list[float], temperature: float, rng: random.Random) -> int:
    """Sample softmax(-cost / range / T); equal costs (range 0) sample uniformly."""
    lo, hi = min(scores), max(scores)
    span = (hi - lo) or 1.0
    weights = [math.exp(-(s - lo) / span / temperature) for s in scores]
    return rng.choices(range(len(scores)), weights=weights)[0]


def _require(candidates: Sequence[Any]) -> None:
    if not candidates:
        raise ValueError("no candidate workers to route to")


def pick_decode(
    candidates: Sequence[Candidate],
    block_hashes: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    index: OverlapIndex | None = None,
    active: ActiveLoad | None = None,
    transfer_weight: float = 1.0,
    rng: random.Random | None = None,
    overlaps: Mapping[str, int] | None = None,
) -> Decision:
    """Decode worker: least load, with a bonus for the prompt blocks it already holds.

    cost(w) = load_blocks(w) + transfer_weight * (len(block_hashes) - overlap(w)):
    the blocks it would hold after admitting the request (with weight 1), so each block
    already held offsets one block of load and is one block fewer to pull. Pass the prefill
    Decision's `overlaps` to skip a second index lookup (one index covers both pools).
    """
    t0 = time.perf_counter_ns()
    _require(candidates)
    active = active if active is not None else ActiveLoad()
    if overlaps is None:
        overlaps = index.overlaps(block_hashes) if index is not None and block_hashes else {}
    costs, scores = active.costs(
        candidates, 1 / block_size, transfer_weight * len(block_hashes), overlaps, transfer_weight
    )
    i = _lowest(costs, rng or _RNG)
    chosen = candidates[i]
    wid = chosen.worker_id
    return Decision(
        chosen, wid, "kv_decode", overlaps.get(wid, 0), costs[i], scores, overlaps,
        (time.perf_counter_ns() - t0) / 1000,
    )  # fmt: skip


class KvPolicy:
    """Prefill choice by Dynamo's KV-router cost (docs/routing.md), with two refinements.

    queued(w) = active_prefill_tokens(w) / block_size
    new(w) = (prompt_tokens - overlap(w) * block_size) / block_size     this request's own prefill
    new_blocks(w) = ceil(prompt_tokens / block_size) - overlap(w)        the KV it would add to w
    cost(w) = queued(w) + overlap_weight * new(w) + active_decode_blocks(w) + new_blocks(w)

    With overlap_weight 1 this is Dynamo's cost plus new_blocks (Dynamo's "potential" active
    blocks: a shared prefix already held costs nothing again). The weight applies to the
    request's own prefill only, not to other requests' queued prefill: a prefix holder that is
    busy for a moment must still beat an idle worker that would compute the whole prefix (and
    then hold a second copy). Measured on the shared-prefix workload in docs/routing.md.
    """

    name = "kv"

    def __init__(
        self,
        overlap_weight: float = DEFAULT_OVERLAP_WEIGHT,
        temperature: float = 0.0,
        seed: int | None = None,
        index: OverlapIndex | None = None,
        active: ActiveLoad | None = None,
    ) -> None:
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.rng = random.Random(seed)
        self.index = index
        self.active = active if active is not None else ActiveLoad()

    def select(
        self,
        candidates: Sequence[Candidate],
        block_hashes: Sequence[int] = (),
        prompt_tokens: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        session_id: str | None = None,
    ) -> Decision:
        t0 = time.perf_counter_ns()
        _require(candidates)
        overlaps = self.index.overlaps(block_hashes) if self.index is not None and block_hashes else {}
        # NOTE: the cost above, expanded into the linear form ActiveLoad.costs evaluates
        ow = self.overlap_weight
        prompt_blocks = -(-prompt_tokens // block_size)
        costs, scores = self.active.costs(
            candidates, 1 / block_size, ow * prompt_tokens / block_size + prompt_blocks, overlaps, ow + 1
        )
        if self.temperature > 0 and len(costs) > 1:
            i = _softmax_pick(costs, self.temperature, self.rng)
        else:
            i = _lowest(costs, self.rng)
        chosen = candidates[i]
        wid = chosen.worker_id
        return Decision(
            chosen, wid, self.name, overlaps.get(wid, 0), costs[i], scores, overlaps,
            (time.perf_counter_ns() - t0) / 1000,
        )  # fmt: skip

    def pick_decode(
        self,
        candidates: Sequence[Candidate],
        block_hashes: Sequence[int],
        block_size: int = DEFAULT_BLOCK_SIZE,
        overlaps: Mapping[str, int] | None = None,
    ) -> Decision:
        return pick_decode(
            candidates, block_hashes, block_size, self.index, self.active, rng=self.rng, overlaps=overlaps
        )


class _LoadPolicy:
    """Shared by the policies that ignore the KV index."""

    name = ""

    def __init__(self, seed: int | None = None, active: ActiveLoad | None = None) -> None:
        self.rng = random.Random(seed)
        self.active = active if active is not None else ActiveLoad()

    def select(
        self,
        candidates: Sequence[Candidate],
        block_hashes: Sequence[int] = (),
        prompt_tokens: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        session_id: str | None = None,
    ) -> Decision:
        t0 = time.perf_counter_ns()
        _require(candidates)
        chosen, scores = self._choose(candidates, block_size)
        wid = chosen.worker_id
        return Decision(
            chosen, wid, self.name, cost=scores.get(wid, 0.0), scores=scores,
            decision_us=(time.perf_counter_ns() - t0) / 1000,
        )  # fmt: skip

    def _choose(self, candidates: Sequence[Candidate], block_size: int) -> tuple[Any, dict[str, float]]:
        raise NotImplementedError


class RoundRobinPolicy(_LoadPolicy):
    name = "round_robin"

    def __init__(self, seed: int | None = None, active: ActiveLoad | None = None) -> None:
        super().__init__(seed, active)
        self._counter = itertools.count()

    def _choose(self, candidates: Sequence[Candidate], block_size: int) -> tuple[Any, dict[str, float]]:
        return candidates[next(self._counter) % len(candidates)], {}


class RandomPolicy(_LoadPolicy):
    name = "random"

    def _choose(self, candidates: Sequence[Candidate], block_size: int) -> tuple[Any, dict[str, float]]:
        return self.rng.choice(candidates), {}


class PowerOfTwoPolicy(_LoadPolicy):
    """Two random candidates, the less loaded wins: near least-loaded quality, no herding."""

    name = "power_of_two"

    def _choose(self, candidates: Sequence[Candidate], block_size: int) -> tuple[Any, dict[str, float]]:
        if len(candidates) == 1:
            return candidates[0], {}
        pair = self.rng.sample(candidates, 2)
        scores = {w.worker_id: self.active.load_blocks(w, block_size) for w in pair}
        a, b = pair
        return (b if scores[b.worker_id] < scores[a.worker_id] else a), scores


class LeastLoadedPolicy(_LoadPolicy):
    name = "least_loaded"

    def _choose(self, candidates: Sequence[Candidate], block_size: int) -> tuple[Any, dict[str, float]]:
        costs, scores = self.active.costs(candidates, 1 / block_size)
        return candidates[_lowest(costs, self.rng)], scores


class SessionAffinity:
    """Requests of one session stick to the worker the session got first, while it is a
    healthy candidate (its KV cache holds the conversation); otherwise the inner policy
    chooses and the session moves. Sessions are kept in a bounded LRU map."""

    def __init__(
        self, inner: Policy, max_sessions: int = 65_536, sessions: OrderedDict[str, str] | None = None
    ) -> None:
        self.inner = inner
        self.name = f"{inner.name}+session"
        self.max_sessions = max_sessions
        # NOTE: pass another SessionAffinity's map to share sessions between two inner policies
        self._sessions: OrderedDict[str, str] = OrderedDict() if sessions is None else sessions

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def select(
        self,
        candidates: Sequence[Candidate],
        block_hashes: Sequence[int] = (),
        prompt_tokens: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        session_id: str | None = None,
    ) -> Decision:
        t0 = time.perf_counter_ns()
        if session_id:
            sticky = self._sessions.get(session_id)
            if sticky is not None:
                for w in candidates:
                    if w.worker_id == sticky and getattr(w, "healthy", True):
                        self._sessions.move_to_end(session_id)
                        return Decision(
                            w, sticky, "session", decision_us=(time.perf_counter_ns() - t0) / 1000
                        )
        decision = self.inner.select(candidates, block_hashes, prompt_tokens, block_size)
        if session_id:
            self._sessions[session_id] = decision.worker_id
            self._sessions.move_to_end(session_id)
            if len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return decision

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


def session_id_from_headers(headers: Mapping[str, str]) -> str | None:
    """The session id of a request (HTTP headers or gRPC metadata), if it carries one."""
    return headers.get(SESSION_HEADER) or None


def make_policy(
    name: str,
    *,
    index: OverlapIndex | None = None,
    active: ActiveLoad | None = None,
    seed: int | None = None,
    overlap_weight: float = DEFAULT_OVERLAP_WEIGHT,
    temperature: float = 0.0,
    session_affinity: bool = False,
    max_sessions: int = 65_536,
) -> Policy:
    """A policy by its configuration name (`--policy`), optionally with session affinity."""
    policy: Policy
    if name == "kv":
        policy = KvPolicy(overlap_weight, temperature, seed, index=index, active=active)
    elif name == "round_robin":
        policy = RoundRobinPolicy(seed, active)
    elif name == "random":
        policy = RandomPolicy(seed, active)
    elif name == "power_of_two":
        policy = PowerOfTwoPolicy(seed, active)
    elif name == "least_loaded":
        policy = LeastLoadedPolicy(seed, active)
    else:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return SessionAffinity(policy, max_sessions) if session_affinity else policy
