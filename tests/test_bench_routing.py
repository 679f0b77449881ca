"""bench.workloads: the routing bench's workload generators and metrics (pure functions)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from bench.workloads import (
    Result,
    chat_prompt_tokens,
    first_prompt,
    multi_turn,
    next_prompt,
    offered_rate,
    pick_weight,
    request_ms,
    shared_prefix,
    start_rate,
    summarize,
    words_to_tokens,
)


def encode(text: str) -> list[int]:
    """One token per word: enough to check lengths without the model's tokenizer."""
    return list(range(len(text.split())))


TEXT = words_to_tokens(encode)


def test_words_to_tokens_hits_the_length() -> None:
    rng = random.Random(1)
    for n in (1, 17, 100):
        assert len(encode(TEXT(rng, n))) == n


def test_shared_prefix_groups_share_their_prefix_and_arrive_in_order() -> None:
    reqs = shared_prefix(TEXT, groups=3, per_group=4, rate=10.0, seed=0, prefix_tokens=50, question_tokens=5)
    assert len(reqs) == 12
    assert sorted(r.group for r in reqs) == [g for g in range(3) for _ in range(4)]
    assert all(a.at < b.at for a, b in itertools.pairwise(reqs))
    for g in range(3):
        prefixes = {r.prompt.split("\n\nQuestion: ")[0] for r in reqs if r.group == g}
        assert len(prefixes) == 1
    assert shared_prefix(TEXT, 3, 4, 10.0, 0, 50, 5) == reqs  # the seed fixes the workload


def test_multi_turn_shape() -> None:
    w = multi_turn(TEXT, systems=3, conversations=10, turns=4, rate=1.0, seed=2, system_tokens=(20, 30),
                   user_tokens=(2, 5), think_s=1.5)  # fmt: skip
    assert len(w.systems) == 3 and len(w.chats) == 10 and w.num_requests == 40
    assert all(20 <= len(encode(s)) <= 30 for s in w.systems)
    assert len({c.system for c in w.chats}) > 1  # several system prompts in use
    for chat in w.chats:
        assert chat.turns[0].think_s == 0.0 and all(t.think_s > 0 for t in chat.turns[1:])
        assert all(2 <= len(encode(t.user)) <= 5 for t in chat.turns)
    starts = [c.at for c in w.chats]
    assert starts == sorted(starts)


def test_prompts_grow_by_the_previous_reply() -> None:
    p1 = first_prompt("SYSTEM", "hello")
    p2 = next_prompt(p1, " a reply", "next question")
    assert p1.startswith("SYSTEM") and p2.startswith(p1)  # the previous prompt is a prefix
    assert p2 == p1 + " a reply" + "\n\nUser: next question\n\nAssistant:"


def test_start_rate_rescales_start_times_only() -> None:
    w = multi_turn(TEXT, 2, 5, 2, 1.0, 3, (5, 8), (1, 3))
    fast = start_rate(w, 4.0)
    assert [c.at * 4.0 for c in fast.chats] == pytest.approx([c.at for c in w.chats])
    assert [c.turns for c in fast.chats] == [c.turns for c in w.chats] and fast.systems == w.systems


def test_chat_prompt_tokens_accumulate() -> None:
    w = multi_turn(TEXT, 1, 1, 3, 1.0, 4, (10, 10), (3, 3))
    lengths = chat_prompt_tokens(w, lambda s: len(encode(s)), reply_tokens=7)
    # system 10 + 8 framing, then each turn adds its user message (3) + 8 framing, later turns + a reply
    assert lengths == [10 + 8 + 3 + 8, 10 + 8 + 2 * (3 + 8) + 7, 10 + 8 + 3 * (3 + 8) + 2 * 7]


def test_request_ms_and_rate() -> None:
    timing = (2.0, 0.1, 0.0, 8.0, 0.5, 0.01)
    # 1,000 uncached tokens in chunks 512 + 488; then 2 decode tokens at batch 4
    prefill = (2 + 0.1 * 512) + (2 + 0.1 * 488)
    decode = (8 / 4 + 0.5 + 0.01 * 1001) + (8 / 4 + 0.5 + 0.01 * 1002)
    assert request_ms(timing, 1000, 2) == pytest.approx(prefill + decode)
    assert request_ms(timing, 1000, 2, cached_tokens=1000) == pytest.approx(decode)
    assert offered_rate(0.5, 8, 400.0) == pytest.approx(10.0)  # 8 workers x 50% / 0.4 s


def _result(key: int, turn: int, worker: str, ttft: float, cached: int = 0) -> Result:
    return Result(key, turn, worker, ttft, ttft * 2, 100, cached, 10)


def test_summarize() -> None:
    results = [
        _result(0, 0, "w0", 0.1),
        _result(0, 1, "w0", 0.2, cached=80),
        _result(0, 2, "w1", 0.3, cached=50),
        _result(1, 0, "w1", 0.4),
    ]
    row = summarize("p", results, num_workers=2, time_scale=4.0)
    assert row["requests"] == 4
    assert row["hit_rate"] == pytest.approx(130 / 400)
    assert row["ttft_p50_ms"] == pytest.approx(0.25 * 1e3 * 4)  # scaled back to modelled time
    assert row["max_share"] == 1.0 and row["workers_used"] == 2
    assert row["workers_per_key"] == pytest.approx((2 + 1) / 2)
    assert row["same_worker"] == pytest.approx(1 / 2)  # turn 1 stayed on w0, turn 2 moved
    assert math.isnan(summarize("q", [_result(0, 0, "w0", 0.1)], 1)["same_worker"])


def test_pick_weight() -> None:
    rows = [
        {"weight": 1.0, "ttft_p50_ms": 120.0},
        {"weight": 4.0, "ttft_p50_ms": 100.5},
        {"weight": 8.0, "ttft_p50_ms": 100.0},
    ]
    assert pick_weight(rows, default=4.0) == 4.0  # within 1% of the best: the default wins
    assert pick_weight(rows, default=2.0) == 4.0  # else the smaller of the near-best weights
    rows[1]["ttft_p50_ms"] = 110.0
    assert pick_weight(rows, default=4.0) == 8.0
