import random

import pytest

from pdrouter_proto import worker_pb2 as pb
from router.kv_index import ApproxKvIndex, KvIndex

pytestmark = pytest.mark.unit


def stored(*hashes: int, parent: int | None = None) -> pb.WorkerEvent:
    return pb.WorkerEvent(stored=pb.KvStored(block_hashes=hashes, parent_hash=parent))


def removed(*hashes: int) -> pb.WorkerEvent:
    return pb.WorkerEvent(removed=pb.KvRemoved(block_hashes=hashes))


def snapshot(*hashes: int) -> pb.WorkerEvent:
    return pb.WorkerEvent(snapshot=pb.Snapshot(instance_id=7, block_hashes=hashes))


def cleared() -> pb.WorkerEvent:
    return pb.WorkerEvent(cleared=pb.KvCleared())


def make_index(**held: list[int]) -> KvIndex:
    index = KvIndex()
    for worker_id, hashes in held.items():
        index.apply(worker_id, stored(*hashes))
    return index


def test_overlap_counts_leading_blocks_per_worker() -> None:
    index = make_index(a=[1, 2, 3], b=[1, 2], c=[2, 3])
    assert index.overlaps([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.overlaps([2, 3]) == {"c": 2, "a": 2, "b": 1}
    assert index.overlaps([9, 1, 2]) == {}
    assert index.overlaps([]) == {}


def test_stored_events_accumulate_and_parent_is_informational() -> None:
    index = KvIndex()
    index.apply("a", stored(1, 2))
    index.apply("a", stored(3, parent=2))
    assert index.overlaps([1, 2, 3]) == {"a": 3}


def test_snapshot_replaces_that_workers_entries_only() -> None:
    index = make_index(a=[1, 2, 3], b=[1, 2, 3])
    index.apply("a", snapshot(5, 6))
    assert index.overlaps([1, 2, 3]) == {"b": 3}
    assert index.overlaps([5, 6, 7]) == {"a": 2}
    assert index.num_blocks_of("a") == 2


def test_removed_in_the_middle_of_a_prefix_cuts_the_overlap_there() -> None:
    index = make_index(a=[1, 2, 3, 4], b=[1, 2, 3, 4])
    index.apply("a", removed(2))
    assert index.overlaps([1, 2, 3, 4]) == {"a": 1, "b": 4}
    index.apply("a", removed(99))  # unknown hashes are ignored
    assert index.num_blocks_of("a") == 3


def test_cleared_empties_one_worker() -> None:
    index = make_index(a=[1, 2], b=[1])
    index.apply("a", cleared())
    assert index.overlaps([1, 2]) == {"b": 1}
    assert index.num_blocks_of("a") == 0


def test_load_reports_do_not_touch_the_index() -> None:
    index = make_index(a=[1])
    index.apply("a", pb.WorkerEvent(load=pb.LoadReport(num_running=3)))
    assert index.overlaps([1]) == {"a": 1}


def test_remove_worker_drops_everything_and_memory_returns_to_zero() -> None:
    index = make_index(a=[1, 2, 3], b=[2, 3, 4], c=[1])
    assert (index.num_blocks, index.num_entries) == (4, 7)
    index.remove_worker("b")
    assert index.overlaps([2, 3, 4]) == {"a": 2}
    assert index.overlaps([4]) == {}
    assert (index.num_blocks, index.num_entries) == (3, 4)
    index.remove_worker("a")
    index.remove_worker("c")
    index.remove_worker("never-seen")
    assert (index.num_blocks, index.num_entries, index.worker_ids) == (0, 0, [])


def test_a_reused_slot_does_not_inherit_blocks() -> None:
    index = make_index(a=[1, 2], b=[1])
    index.remove_worker("a")
    index.apply("d", stored(3))
    assert index.overlaps([1, 2]) == {"b": 1}
    assert index.overlaps([3]) == {"d": 1}


def naive_overlaps(held: dict[str, set[int]], request: list[int]) -> dict[str, int]:
    out = {}
    for worker_id, hashes in held.items():
        n = 0
        while n < len(request) and request[n] in hashes:
            n += 1
        if n:
            out[worker_id] = n
    return out


def test_matches_a_naive_walk_at_300_workers_with_holes() -> None:
    rng = random.Random(5)
    chain = list(range(1000, 1064))
    index, held = KvIndex(), {}
    for i in range(300):
        hashes = set(chain[: rng.randint(0, 64)]) - {rng.choice(chain)} | {rng.randint(0, 999)}
        held[f"w{i}"] = hashes
        index.apply(f"w{i}", snapshot(*hashes))
    for cut in (1, 7, 33, 64):
        assert index.overlaps(chain[:cut]) == naive_overlaps(held, chain[:cut])


def test_approx_records_decisions_and_expires_them_after_the_ttl() -> None:
    index = ApproxKvIndex(ttl_s=10.0)
    index.record("a", [1, 2, 3], now=100.0)
    index.record("b", [1, 2], now=105.0)
    assert index.overlaps([1, 2, 3], now=109.9) == {"a": 3, "b": 2}
    assert index.overlaps([1, 2, 3], now=110.0) == {"b": 2}
    assert index.overlaps([1, 2, 3], now=115.0) == {}
    assert (index.num_blocks, index.num_entries) == (0, 0)


def test_approx_rerecord_refreshes_the_ttl() -> None:
    index = ApproxKvIndex(ttl_s=10.0)
    index.record("a", [1, 2, 3], now=0.0)
    index.record("a", [1, 2], now=8.0)
    assert index.overlaps([1, 2, 3], now=12.0) == {"a": 2}
    assert index.overlaps([1, 2, 3], now=18.0) == {}


def test_approx_cap_evicts_the_oldest_tails_first() -> None:
    index = ApproxKvIndex(ttl_s=100.0, max_blocks_per_worker=4)
    index.record("a", [1, 2, 3], now=0.0)
    index.record("a", [7, 8], now=1.0)
    # the oldest request's tail (3) went first; its prefix still counts
    assert index.overlaps([1, 2, 3], now=2.0) == {"a": 2}
    assert index.overlaps([7, 8], now=2.0) == {"a": 2}
    assert index.num_entries == 4


def test_approx_remove_worker_and_slot_reuse() -> None:
    index = ApproxKvIndex(ttl_s=10.0)
    index.record("a", [1, 2], now=0.0)
    index.remove_worker("a")
    index.record("b", [3], now=5.0)
    assert index.overlaps([1, 2], now=6.0) == {}
    assert index.overlaps([3], now=14.0) == {"b": 1}
    assert index.overlaps([3], now=15.0) == {}
    assert index.num_blocks == 0


def test_pending_routes_count_until_events_arrive() -> None:
    """A burst sharing a new prefix: the router's own routes stand in for the events to come."""
    from router.kv_index import PendingKvIndex

    exact = KvIndex()
    index = PendingKvIndex(exact, ttl_s=10.0)
    hashes = [11, 12, 13, 14]
    assert index.overlaps(hashes) == {}
    index.record("w1", hashes[:3])
    assert index.overlaps(hashes) == {"w1": 3}
    exact.store("w2", hashes)  # events from another worker: the max per worker wins
    assert index.overlaps(hashes) == {"w1": 3, "w2": 4}
    index.remove_worker("w1")
    assert index.overlaps(hashes) == {"w2": 4}


async def test_a_worker_going_down_is_forgotten_by_the_index() -> None:
    """Its entries and bookings go; when it comes back, its Subscribe snapshot refills them."""
    from router.worker_pool import WorkerPool

    exact = KvIndex()
    forgotten: list[str] = []
    pool = WorkerPool(
        ["127.0.0.1:1"], on_down=lambda w: (exact.remove_worker(w.worker_id), forgotten.append(w.worker_id))
    )
    w = pool.workers[0]
    exact.store(w.worker_id, [1, 2, 3])
    pool._set_stream(w, True)
    assert exact.overlaps([1, 2, 3]) == {w.worker_id: 3} and not forgotten
    pool._set_stream(w, False)
    assert exact.overlaps([1, 2, 3]) == {} and forgotten == [w.worker_id]
    pool._set_stream(w, False)  # already down: nothing more to forget
    assert forgotten == [w.worker_id]
    await w.close()
