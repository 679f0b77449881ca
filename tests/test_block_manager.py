import pytest

from tests.engine_helpers import make_bm, make_seq

pytestmark = pytest.mark.unit


def _fill(bm, seq):
    bm.allocate(seq, -(-seq.num_tokens // bm.block_size))
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_full_blocks(seq)


def test_allocate_commit_and_prefix_hit() -> None:
    bm, events = make_bm(8, 4)
    a = make_seq("a", list(range(10)))
    _fill(bm, a)
    assert a.block_table == [0, 1, 2]
    assert [e.kind for e in events] == ["stored"] and len(events[0].block_hashes) == 2
    assert events[0].parent_hash is None
    b = make_seq("b", list(range(8)) + [99, 98, 97])
    hits = bm.match_prefix(b)
    assert [h.block_id for h in hits] == [0, 1]
    bm.allocate_prefix(b, hits)
    assert b.num_computed_tokens == 8 and bm.blocks[0].ref_count == 2


def test_whole_prompt_cached_still_computes_last_token() -> None:
    bm, _ = make_bm(8, 4)
    a = make_seq("a", list(range(8)))
    _fill(bm, a)
    b = make_seq("b", list(range(8)))
    assert [h.block_id for h in bm.match_prefix(b)] == [0]


def test_hit_confirmed_by_token_ids() -> None:
    bm, _ = make_bm(8, 4)
    a = make_seq("a", list(range(9)))
    _fill(bm, a)
    b = make_seq("b", list(range(9)))
    bm.update_hashes(b, 9)
    bm.blocks[0].token_ids = (42, 42, 42, 42)  # a forged collision must not be trusted
    assert bm.match_prefix(b) == []


def test_free_reverse_order_and_lazy_eviction_emits_removed() -> None:
    bm, events = make_bm(4, 4)
    a = make_seq("a", list(range(12)))
    _fill(bm, a)
    bm.free(a)
    assert [b.block_id for b in bm.free_queue] == [3, 2, 1, 0]
    assert bm.num_free_blocks == 4 and len(bm.cached) == 3
    c = make_seq("c", [500, 501])
    bm.allocate(c, 2)  # takes block 3 (never cached), then block 2 (cached: evicted)
    assert c.block_table == [3, 2]
    assert events[-1].kind == "removed" and events[-1].block_hashes == [a.block_hashes[2]]
    assert len(bm.cached) == 2


def test_reused_cached_block_leaves_free_queue() -> None:
    bm, _ = make_bm(4, 4)
    a = make_seq("a", list(range(9)))
    _fill(bm, a)
    bm.free(a)
    b = make_seq("b", list(range(9)))
    hits = bm.match_prefix(b)
    bm.allocate_prefix(b, hits)
    assert bm.num_free_blocks == 2 and 0 not in [x.block_id for x in bm.free_queue]


def test_clear_cache() -> None:
    bm, events = make_bm(4, 4)
    a = make_seq("a", list(range(8)))
    _fill(bm, a)
    bm.clear_cache()
    assert bm.cached == {} and events[-1].kind == "cleared"
