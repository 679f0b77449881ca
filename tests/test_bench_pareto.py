"""bench.pareto's arithmetic: the Pareto frontier, SLO checks and goodput, the steady-state
throughput window, cost per million tokens, and the workload's prompt lengths."""

from __future__ import annotations

import math

import pytest

from bench.pareto import (
    PROMPT_MAX,
    PROMPT_MIN,
    Point,
    Sample,
    Slo,
    best_by_layout,
    cost_per_mtok,
    meets_slo,
    pareto_frontier,
    steady_tok_s,
    summarize,
    user_messages,
)

pytestmark = pytest.mark.unit


def sample(user: int, start: float, ttft: float, gap: float, tokens: int = 5, mode: str = "") -> Sample:
    """A request whose `tokens` tokens arrive one per chunk, `gap` apart after the first."""
    return Sample(user, start, [start + ttft + k * gap for k in range(tokens)], tokens, 100, mode)


def test_frontier_keeps_only_undominated_points_in_order_of_x() -> None:
    points = [(1, 10), (2, 8), (1.5, 7), (3, 3), (2, 9), (0.5, 10)]
    assert pareto_frontier(points) == [0, 4, 3]  # (1,10), (2,9), (3,3)


def test_frontier_edge_cases() -> None:
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1, 1)]) == [0]
    assert pareto_frontier([(1, 1), (1, 1)]) == [0]  # NOTE: a duplicate adds nothing
    assert pareto_frontier([(1, 3), (2, 2), (3, 1)]) == [0, 1, 2]  # all trade off


def test_sample_ttft_tpot_and_slo() -> None:
    s = sample(0, 10.0, ttft=0.5, gap=0.1)
    assert s.ttft == pytest.approx(0.5)
    assert s.tpot == pytest.approx(0.1)
    assert meets_slo(s, Slo(0.51, 0.11))
    assert not meets_slo(s, Slo(0.49, 0.11))
    assert not meets_slo(s, Slo(0.51, 0.09))


def test_steady_window_ignores_ramp() -> None:
    # user 0 runs alone for 10 s, user 1 joins; both stream 1 token/s until user 0 stops at 20
    a = [Sample(0, 0.0, [float(t) for t in range(1, 21)], 20)]
    b = [Sample(1, 10.0, [float(t) for t in range(11, 31)], 20)]
    assert steady_tok_s(a + b) == pytest.approx(21 / 10)  # 10..20 of user 0, 11..20 of user 1


def test_steady_window_falls_back_to_the_whole_span() -> None:
    # user 1 starts after user 0 finished: no window with both active
    s = [Sample(0, 0.0, [1.0, 2.0], 2), Sample(1, 3.0, [4.0, 5.0], 2)]
    assert steady_tok_s(s) == pytest.approx(4 / 5)


def test_steady_window_counts_tokens_not_chunks() -> None:
    s = [Sample(0, 0.0, [1.0, 2.0, 3.0, 4.0], 8)]  # two tokens per chunk
    assert steady_tok_s(s) == pytest.approx(8 / 4)


def test_cost_per_million_tokens() -> None:
    # 2 workers at $1/h serving 100 tok/s: $2 per 360,000 tokens
    assert cost_per_mtok(1.0, 2, 100.0) == pytest.approx(2 / 0.36)
    assert cost_per_mtok(1.0, 2, 0.0) == math.inf


def test_summarize_goodput_per_worker_and_cost() -> None:
    slo = Slo(ttft_s=1.0, tpot_s=0.2, attainment=0.75)
    good = [sample(u, 0.0, 0.5, 0.1, mode="disaggregated") for u in range(3)]
    late = [sample(3, 0.0, 1.5, 0.1)]
    row = summarize(Point("x", 2, 4, good + late), 5, slo, price=1.0)
    assert row["requests"] == 4
    assert row["good_fraction"] == 0.75
    assert row["meets_slo"]
    assert row["tok_s_per_worker"] == pytest.approx(row["tok_s"] / 2)
    assert row["goodput_req_s"] == pytest.approx(row["tok_s"] / 5 * 0.75)
    assert row["cost_per_mtok"] == pytest.approx(cost_per_mtok(1.0, 2, row["tok_s"]))
    assert row["tok_s_per_user"] == pytest.approx(10.0)
    assert row["itl_p50_ms"] == pytest.approx(100.0)
    assert row["disaggregated_fraction"] == 0.75
    assert row["tokens_per_chunk"] == 1.0


def test_best_by_layout() -> None:
    rows = [
        {"layout": "a", "v": 1.0, "ok": True},
        {"layout": "a", "v": 3.0, "ok": False},
        {"layout": "b", "v": 2.0, "ok": False},
    ]
    assert best_by_layout(rows, "v") == {"a": 3.0, "b": 2.0}
    assert best_by_layout(rows, "v", min) == {"a": 1.0, "b": 2.0}
    assert best_by_layout(rows, "v", where=lambda r: r["ok"]) == {"a": 1.0, "b": None}


def test_user_messages_lengths_and_determinism() -> None:
    msgs = user_messages(200, seed=1)
    lengths = sorted(len(m.split()) for m in msgs)
    assert lengths[0] >= PROMPT_MIN and lengths[-1] <= PROMPT_MAX
    assert 180 <= lengths[100] <= 360  # median near 256 words
    assert msgs == user_messages(200, seed=1)
    assert msgs != user_messages(200, seed=2)
