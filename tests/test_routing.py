import math
from collections import Counter
from dataclasses import dataclass, field

import pytest

from pdrouter_proto import worker_pb2 as pb
from router.kv_index import KvIndex
from router.routing import (
    POLICY_NAMES,
    ActiveLoad,
    KvPolicy,
    LeastLoadedPolicy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    SessionAffinity,
    make_policy,
    pick_decode,
    session_id_from_headers,
)

pytestmark = pytest.mark.unit

BS = 16


@dataclass
class FakeWorker:
    worker_id: str
    load: pb.LoadReport = field(default_factory=pb.LoadReport)
    healthy: bool = True


def make_workers(n: int) -> list[FakeWorker]:
    return [FakeWorker(f"w{i}") for i in range(n)]


def make_index(**held: list[int]) -> KvIndex:
    index = KvIndex()
    for worker_id, hashes in held.items():
        index.store(worker_id, hashes)
    return index


def test_active_load_lifecycle_and_report_blend() -> None:
    active = ActiveLoad()
    active.add("a", "r1", prefill_tokens=100, decode_blocks=10)
    active.add("a", "r2", prefill_tokens=50, decode_blocks=5)
    active.add("b", "r2", prefill_tokens=0, decode_blocks=7)  # same request, decode leg
    assert (active.active_prefill_tokens("a"), active.active_decode_blocks("a")) == (150, 15)
    active.prefill_done("r1")
    assert (active.active_prefill_tokens("a"), active.active_decode_blocks("a")) == (50, 15)
    # reports correct the own accounting upwards only: max(own, reported)
    report = pb.LoadReport(queued_prefill_tokens=80, kv_blocks_used=3)
    assert (active.active_prefill_tokens("a", report), active.active_decode_blocks("a", report)) == (80, 15)
    active.free("r2")
    assert (active.active_prefill_tokens("a"), active.active_decode_blocks("a")) == (0, 10)
    assert active.active_decode_blocks("b") == 0
    active.free("r2")  # twice is harmless
    active.drop_worker("a")
    active.free("r1")
    assert (active.active_decode_blocks("a"), active.num_requests) == (0, 0)


def test_drop_worker_keeps_the_other_leg_of_a_request() -> None:
    active = ActiveLoad()
    active.add("p", "r", prefill_tokens=64, decode_blocks=0)
    active.add("d", "r", prefill_tokens=0, decode_blocks=9)
    active.drop_worker("p")
    active.add("p", "r3", prefill_tokens=16, decode_blocks=1)
    active.free("r")
    assert (active.active_prefill_tokens("p"), active.active_decode_blocks("d")) == (16, 0)


def test_kv_cost_formula_on_hand_computed_numbers() -> None:
    a, b = FakeWorker("a"), FakeWorker("b", pb.LoadReport(queued_prefill_tokens=16, kv_blocks_used=2))
    active = ActiveLoad()
    active.add("a", "r0", prefill_tokens=32, decode_blocks=10)
    index = make_index(a=[1, 2, 3, 4])
    hashes, prompt = [1, 2, 3, 4, 5, 6], 100  # 7 blocks
    # a: (32 + 100 - 4*16) / 16 + 10 + (7 - 4) = 17.25;  b: (16 + 100 - 0) / 16 + 2 + 7 = 16.25
    d = KvPolicy(overlap_weight=1.0, index=index, active=active).select([a, b], hashes, prompt, BS)
    assert (d.worker_id, d.cost, d.overlap_blocks) == ("b", 16.25, 0)
    assert d.scores == {"a": 17.25, "b": 16.25} and d.overlaps == {"a": 4}
    assert d.decision_us > 0 and d.policy == "kv"
    # overlap_weight 3 weighs the request's own prefill only:
    # a = 32/16 + 3 * (100 - 64)/16 + 10 + 3 = 21.75;  b = 16/16 + 3 * 100/16 + 2 + 7 = 28.75
    d = KvPolicy(overlap_weight=3.0, index=index, active=active).select([a, b], hashes, prompt, BS)
    assert (d.worker_id, d.cost, d.overlap_blocks, d.scores["b"]) == ("a", 21.75, 4, 28.75)


def test_prefix_holder_keeps_its_group_while_busy_with_it() -> None:
    """A shared 64-block prefix + 4 own blocks: the holder, busy with 3 requests of the group
    (64 + 3 * 8 unique blocks in use), still beats an idle worker that would compute all 68."""
    hashes = list(range(500, 568))
    holder = FakeWorker("holder", pb.LoadReport(kv_blocks_used=64 + 3 * 8))
    idle = FakeWorker("idle")
    d = KvPolicy(overlap_weight=1.0, index=make_index(holder=hashes[:64])).select(
        [holder, idle], hashes, 68 * BS, BS
    )
    # holder: 4 + 88 + 4 = 96;  idle: 68 + 0 + 68 = 136
    assert (d.worker_id, d.scores) == ("holder", {"holder": 96.0, "idle": 136.0})


def test_with_no_load_the_longest_cached_prefix_wins() -> None:
    hashes = list(range(100, 164))
    index = make_index(w1=hashes[:32], w2=hashes, w3=hashes[:63])
    d = KvPolicy(seed=0, index=index).select(make_workers(8), hashes, 64 * BS, BS)
    assert (d.worker_id, d.overlap_blocks, d.cost) == ("w2", 64, 0.0)


def test_burst_of_identical_prefixes_spreads_once_load_outweighs_the_cache() -> None:
    """64 requests of 1024 cached tokens (64 blocks) + 128 output tokens -> 72 decode blocks.

    With overlap_weight 1: the cached worker w0 computes nothing and adds no blocks, so its
    cost after k requests is 72k; any other worker's is 64 (prefill) + 64 (new blocks) +
    (64 + 72)k. Greedy lowest-cost picks keep every worker's cost before its last pick at or
    below every other worker's final cost; with 64 requests that allows only w0 in [13, 17]
    and the others in [6, 8] (the fluid optimum is 15.0 vs 7.0).
    """
    workers, hashes = make_workers(8), list(range(100, 164))
    active = ActiveLoad()
    policy = KvPolicy(overlap_weight=1.0, seed=1, index=make_index(w0=hashes), active=active)
    counts: Counter[str] = Counter()
    for r in range(64):
        d = policy.select(workers, hashes, 64 * BS, BS)
        active.add(d.worker_id, f"r{r}", 64 * BS - d.overlap_blocks * BS, 72)
        counts[d.worker_id] += 1

    def cost(worker_id: str, k: int) -> int:
        return 72 * k if worker_id == "w0" else 128 + 136 * k

    assert 13 <= counts["w0"] <= 17
    assert all(6 <= counts[w.worker_id] <= 8 for w in workers[1:])
    for w, kw in counts.items():
        assert all(cost(w, kw - 1) <= cost(v, counts[v]) for v in counts)


def test_ties_are_broken_at_random() -> None:
    policy = KvPolicy(seed=3)
    picks = {policy.select(make_workers(4), [1, 2], 32, BS).worker_id for _ in range(100)}
    assert picks == {"w0", "w1", "w2", "w3"}


def test_temperature_sampling_is_reproducible_with_a_seed_and_prefers_low_cost() -> None:
    workers = [FakeWorker(f"w{i}", pb.LoadReport(kv_blocks_used=10 * i)) for i in range(4)]

    def run(seed: int, temperature: float) -> list[str]:
        policy = KvPolicy(temperature=temperature, seed=seed)
        return [policy.select(workers, [], 64, BS).worker_id for _ in range(400)]

    assert run(7, 0.5) == run(7, 0.5)
    assert run(7, 0.5) != run(8, 0.5)
    counts = Counter(run(7, 0.5))
    # weights exp(-i/3/0.5) for costs 4 + 10i: p(w0) = 1 / (1 + e^-2/3 + e^-4/3 + e^-2) ~ 0.53
    p0 = 1 / sum(math.exp(-i / 1.5) for i in range(4))
    assert abs(counts["w0"] / 400 - p0) < 0.08
    assert counts["w0"] > counts["w1"] > counts["w2"] > counts["w3"] > 0
    # equal costs: range 0 must not divide by zero
    assert {KvPolicy(temperature=1.0, seed=1).select(make_workers(2), [], 16, BS).worker_id} <= {"w0", "w1"}


def test_pick_decode_prefers_held_blocks_when_loads_are_close() -> None:
    hashes = list(range(10))
    index = make_index(a=hashes[:8])
    active = ActiveLoad()
    active.add("a", "r1", 0, 20)
    active.add("b", "r2", 0, 15)
    a, b = FakeWorker("a"), FakeWorker("b")
    # a: 20 + (10 - 8) = 22;  b: 15 + 10 = 25
    d = pick_decode([a, b], hashes, BS, index, active)
    assert (d.worker_id, d.overlap_blocks, d.scores) == ("a", 8, {"a": 22.0, "b": 25.0})
    reused = pick_decode([a, b], hashes, BS, None, active, overlaps=d.overlaps)  # no second lookup
    assert (reused.worker_id, reused.scores) == ("a", d.scores)
    active.add("a", "r3", 0, 10)  # a: 32 vs b: 25 -> load wins over the held blocks
    assert pick_decode([a, b], hashes, BS, index, active).worker_id == "b"
    assert KvPolicy(index=index, active=active).pick_decode([a, b], hashes, BS).worker_id == "b"


def test_round_robin_cycles() -> None:
    workers = make_workers(3)
    policy = RoundRobinPolicy()
    assert [policy.select(workers).worker_id for _ in range(4)] == ["w0", "w1", "w2", "w0"]


def test_random_is_seeded_and_covers_all() -> None:
    workers = make_workers(3)
    a, b = RandomPolicy(seed=4), RandomPolicy(seed=4)
    picks = [a.select(workers).worker_id for _ in range(60)]
    assert picks == [b.select(workers).worker_id for _ in range(60)]
    assert set(picks) == {"w0", "w1", "w2"}


def test_power_of_two_takes_the_less_loaded_of_two() -> None:
    light = FakeWorker("light", pb.LoadReport(kv_blocks_used=1))
    heavy = FakeWorker("heavy", pb.LoadReport(kv_blocks_used=50))
    policy = PowerOfTwoPolicy(seed=0)
    assert {policy.select([heavy, light]).worker_id for _ in range(20)} == {"light"}
    assert policy.select([heavy]).worker_id == "heavy"
    # among many, the most loaded never wins a pair
    crowd = [FakeWorker(f"w{i}", pb.LoadReport(kv_blocks_used=i)) for i in range(5)]
    assert "w4" not in {policy.select(crowd).worker_id for _ in range(200)}


def test_least_loaded_counts_prefill_tokens_and_decode_blocks() -> None:
    active = ActiveLoad()
    active.add("w0", "r", prefill_tokens=160, decode_blocks=0)  # 10 blocks of prefill
    workers = [FakeWorker("w0"), FakeWorker("w1", pb.LoadReport(kv_blocks_used=9))]
    d = LeastLoadedPolicy(active=active).select(workers, block_size=BS)
    assert (d.worker_id, d.scores) == ("w1", {"w0": 10.0, "w1": 9.0})


def test_make_policy_names() -> None:
    for name in POLICY_NAMES:
        policy = make_policy(name, seed=0)
        assert policy.name == name
        assert policy.select(make_workers(2), [1], 16, BS).worker_id in {"w0", "w1"}
    assert make_policy("kv", session_affinity=True).name == "kv+session"
    with pytest.raises(ValueError, match="least_loaded"):
        make_policy("fastest")
    with pytest.raises(ValueError):
        make_policy("kv").select([])


def test_session_affinity_sticks_while_the_worker_is_healthy() -> None:
    workers = make_workers(3)
    policy = SessionAffinity(RoundRobinPolicy(), max_sessions=2)
    first = policy.select(workers, session_id="s1")
    assert first.worker_id == "w0"
    assert [policy.select(workers, session_id="s1").worker_id for _ in range(3)] == ["w0"] * 3
    assert policy.select(workers).worker_id == "w1"  # no session: the inner policy
    workers[0].healthy = False
    assert policy.select(workers, session_id="s1").worker_id == "w2"  # moved ...
    workers[0].healthy = True
    assert policy.select(workers, session_id="s1").worker_id == "w2"  # ... and sticks there
    assert policy.select(workers[:2], session_id="s1").worker_id == "w1"  # absent: falls back


def test_session_map_is_a_bounded_lru() -> None:
    policy = SessionAffinity(RoundRobinPolicy(), max_sessions=2)
    workers = make_workers(4)
    for s in ("a", "b", "a", "c"):
        policy.select(workers, session_id=s)
    assert policy.num_sessions == 2
    assert policy.select(workers, session_id="a").worker_id == "w0"  # "a" was used recently
    assert policy.select(workers, session_id="b").worker_id != "w1"  # "b" was evicted


def test_session_id_from_headers() -> None:
    assert session_id_from_headers({"x-session-id": "abc"}) == "abc"
    assert session_id_from_headers({"x-session-id": ""}) is None
    assert session_id_from_headers({}) is None


@dataclass
class _RoleWorker(FakeWorker):
    role: str = "both"

    @property
    def address(self) -> str:
        return self.worker_id


class _FakePool:
    block_size = BS

    def __init__(self, *workers: _RoleWorker) -> None:
        self.workers = list(workers)

    def healthy(self, role: str | None = None) -> list[_RoleWorker]:
        return [w for w in self.workers if role is None or w.role in (role, "both")]


@pytest.mark.parametrize(("max_tokens", "decode_predicted"), [(1, False), (16, True)])
def test_disaggregated_route_predicts_the_decode_worker_only_when_a_decode_leg_runs(
    max_tokens: int, decode_predicted: bool
) -> None:
    """A request that ends with the prefill's first token never reaches the decode worker; if the
    router still expected its KV there, a repeat of the prompt would prefill it on the decode worker
    (the stall bench.interference found)."""
    from router.route_planner import RoutePlanner

    pool = _FakePool(_RoleWorker("pre", role="prefill"), _RoleWorker("dec", role="decode"))
    planner = RoutePlanner(pool, KvIndex(), ActiveLoad())  # type: ignore[arg-type]
    prompt = list(range(100, 100 + 40 * BS))  # 640 tokens: over the local-prefill limit
    assert planner.plan("r1", prompt, max_tokens).mode == "disaggregated"
    overlaps = planner.index.overlaps(planner.block_hashes(prompt))
    assert overlaps["pre"] == 40 and ("dec" in overlaps) is decode_predicted
    planner.finished("r1")
    repeat = planner.plan("r2", prompt, max_tokens).mode  # the decode worker holds it only after a pull
    assert repeat == ("aggregated" if decode_predicted else "disaggregated")
