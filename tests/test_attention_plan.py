"""Step planning for paged attention: decodes grouped by context length, each group padded to its longest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.engine.attention import group_decodes, paged_attention, plan_step

pytestmark = pytest.mark.unit


def test_equal_widths_stay_one_group() -> None:
    assert group_decodes([5] * 32) == [0]
    assert group_decodes([]) == [0]


def test_a_long_outlier_gets_its_own_group() -> None:
    # NOTE: padding 15 short decodes to 88 blocks wastes far more than one more call costs
    assert group_decodes([88] + [10] * 15, group_cost=10) == [0, 1]


def test_split_only_where_the_waste_outweighs_the_cost() -> None:
    widths = [16, 10, 6, 5, 3, 2, 1, 1]
    assert group_decodes(widths, group_cost=10) == [0, 1, 2, 4]
    assert group_decodes(widths, group_cost=1000) == [0]


def test_plan_step_groups_decodes_and_masks_each_to_its_own_contexts() -> None:
    bs = 4
    # decodes longest first (contexts 40, 9, 8), then one chunk of 3 tokens from position 0
    entries = [(39, 1, list(range(10))), (8, 1, [20, 21, 22]), (7, 1, [30, 31]), (0, 3, [40])]
    step = plan_step(entries, bs, torch.device("cpu"))
    assert [(g.begin, g.end) for g in step.decode_groups] == [(0, 1), (1, 3)]  # NOTE: 3 decodes
    long, short = step.decode_groups
    assert long.tables.tolist() == list(range(10)) and long.mask.shape == (1, 1, 1, 40)
    assert short.tables.tolist() == [20, 21, 22, 30, 31, 0] and short.mask.shape == (2, 1, 1, 12)
    assert short.mask.view(2, 12).sum(dim=1).tolist() == [9, 8]
    assert step.positions.tolist() == [39, 8, 7, 0, 1, 2]
    assert step.slot_blocks.tolist() == [9, 22, 31, 40, 40, 40]


def test_grouped_decodes_equal_attention_over_each_sequence_alone() -> None:
    g = torch.Generator().manual_seed(0)
    bs, kv_heads, heads, d = 4, 2, 4, 8
    k_cache, v_cache = (torch.randn(64, bs, kv_heads, d, generator=g) for _ in range(2))
    contexts = [37, 9, 8, 2]
    tables = [list(range(i * 10, i * 10 + -(-c // bs))) for i, c in enumerate(contexts)]
    step = plan_step([(c - 1, 1, t) for c, t in zip(contexts, tables, strict=True)], bs, torch.device("cpu"))
    assert len(step.decode_groups) > 1
    q, k, v = (
        torch.randn(4, heads, d, generator=g),
        *(torch.randn(4, kv_heads, d, generator=g) for _ in range(2)),
    )
    got = paged_attention(q, k, v, k_cache, v_cache, step, d**-0.5).view(4, heads, d)
    for i, (c, t) in enumerate(zip(contexts, tables, strict=True)):
        keys = k_cache[t].reshape(-1, kv_heads, d)[:c].transpose(0, 1)
        values = v_cache[t].reshape(-1, kv_heads, d)[:c].transpose(0, 1)
        want = F.scaled_dot_product_attention(
            q[i].view(heads, 1, d),
            keys.repeat_interleave(2, 0),
            values.repeat_interleave(2, 0),
            scale=d**-0.5,
        )
        torch.testing.assert_close(got[i], want.view(heads, d), rtol=1e-5, atol=1e-5)
