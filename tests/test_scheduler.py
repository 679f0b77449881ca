import pytest

from tests.engine_helpers import make_scheduler, make_seq
from workers.engine.sequence import FinishReason, SampledToken

pytestmark = pytest.mark.unit


def _step(sch, token: int = 7):
    batch = sch.schedule()
    return batch, sch.postprocess(batch, [SampledToken(token) if it.sample else None for it in batch])


def test_chunked_prefill_under_token_budget() -> None:
    sch = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=6)
    seq = make_seq("a", list(range(10, 24)))  # 14 tokens
    sch.add(seq)
    batch, _ = _step(sch)
    assert [(b.start, b.num_tokens, b.sample) for b in batch] == [(0, 6, False)]
    batch, _ = _step(sch)
    assert [(b.start, b.num_tokens, b.sample) for b in batch] == [(6, 6, False)]
    batch, _ = _step(sch)
    assert [(b.start, b.num_tokens, b.sample) for b in batch] == [(12, 2, True)]
    assert seq.output_token_ids == [7]


def test_decodes_and_new_prefill_share_a_step() -> None:
    sch = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=8)
    a = make_seq("a", [10, 11, 12], max_tokens=5)
    sch.add(a)
    _step(sch)
    b = make_seq("b", [20, 21, 22, 23, 24])
    sch.add(b)
    batch, _ = _step(sch)
    assert [(x.seq.request_id, x.num_tokens) for x in batch] == [("a", 1), ("b", 5)]


def test_stop_reasons() -> None:
    sch = make_scheduler()
    a = make_seq("a", [10, 11], max_tokens=2)
    b = make_seq("b", [10, 12], max_tokens=9, stop_token_ids=[7])
    sch.add(a)
    sch.add(b)
    _, finished = _step(sch, token=7)
    assert [s.request_id for s in finished] == ["b"] and b.finish_reason is FinishReason.STOP
    _, finished = _step(sch, token=5)
    assert a.finish_reason is FinishReason.LENGTH and a.output_token_ids == [7, 5]
    eos = make_seq("e", [10], max_tokens=9)
    sch.add(eos)
    _, finished = _step(sch, token=2)
    assert eos.finish_reason is FinishReason.STOP
    assert sch.bm.num_free_blocks == sch.bm.num_blocks


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    sch = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a = make_seq("a", [10, 11, 12, 13, 14, 15, 16], max_tokens=8)  # 2 blocks
    b = make_seq("b", [20, 21, 22, 23, 24, 25, 26], max_tokens=8)  # 2 blocks
    sch.add(a)
    sch.add(b)
    _step(sch)
    _step(sch)  # position 7 still fits in 2 blocks
    assert sch.bm.num_free_blocks == 0 and sch.num_preemptions == 0
    batch, _ = _step(sch)  # both need a 3rd block for position 8: b (admitted last) is preempted
    assert sch.num_preemptions == 1 and [x.seq.request_id for x in batch] == ["a"]
    assert b.block_table == [] and sch.waiting[0] is b and b.output_token_ids == [7, 7]
    while sch.num_unfinished:
        _step(sch)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert sch.bm.num_free_blocks == 4


def test_abort_frees_blocks() -> None:
    sch = make_scheduler(num_blocks=8)
    a = make_seq("a", list(range(10, 20)))
    sch.add(a)
    _step(sch)
    assert sch.bm.num_free_blocks < 8
    assert sch.abort("a") is a and a.finish_reason is FinishReason.ABORT
    assert sch.bm.num_free_blocks == 8 and sch.abort("a") is None


def test_abort_of_a_finished_pinned_sequence_unpins_it() -> None:
    """The prefill leg finished (blocks pinned) but its caller left before publishing them."""
    from tests.engine_helpers import make_scheduler
    from workers.engine.sequence import SamplingParams, Sequence

    sched = make_scheduler(num_blocks=8, block_size=4)
    seq = Sequence("p1", list(range(10, 20)), SamplingParams(max_tokens=1))
    seq.pin_on_finish = True
    sched.add(seq)
    batch = sched.schedule()
    from workers.engine.sequence import SampledToken

    sched.postprocess(batch, [SampledToken(5)])
    assert "p1" in sched.pinned and sched.bm.num_free_blocks < 8
    assert sched.abort("p1") is None
    assert "p1" not in sched.pinned and sched.bm.num_free_blocks == 8
