"""Attention over the paged KV pool for one mixed step: write new K/V -> decodes -> prefill chunks.

A step's tokens are laid out single-token entries (decodes) first, longest context first, then
multi-token chunks. Decodes run in a few padded SDPA calls per layer, one per group of similar
context lengths (`group_decodes`): each sequence's blocks are gathered into
[batch, kv_heads, context, head_dim] and the query heads sharing a KV head ride in the query
length dimension (no repeated K/V for GQA). Chunks run one SDPA call each; a chunk with no
cached prefix attends only to its own new K/V and skips the gather.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    begin: int  # token index range of the chunk within the step
    end: int
    context_len: int  # start + num_tokens: keys [0, context_len) are attended
    block_table: torch.Tensor | None  # blocks covering the context; None when start == 0
    mask: torch.Tensor | None  # [num_tokens, context_len] causal mask; None when start == 0


@dataclass(slots=True)
class DecodeGroup:
    begin: int  # token index range of the group's decodes within the step
    end: int
    tables: torch.Tensor  # [decodes * max blocks]: block ids, row-major, padded with block 0
    mask: torch.Tensor  # [decodes, 1, 1, max blocks * block_size]


@dataclass(slots=True)
class StepAttention:
    positions: torch.Tensor  # [tokens]
    slot_blocks: torch.Tensor  # [tokens]: block id that receives each token's K/V
    slot_offsets: torch.Tensor  # [tokens]: offset inside that block
    decode_groups: list[DecodeGroup]  # the step's decodes, tokens [0, decode_groups[-1].end)
    chunks: list[PrefillChunk]


# NOTE: the fixed cost of one more decode group per layer (a gather, an SDPA call, their setup),
# in padded blocks of one sequence it saves (~3.6 us each for SmolLM2 on 2 cores, measured).
GROUP_COST_BLOCKS = 10


def group_decodes(widths: list[int], group_cost: int = GROUP_COST_BLOCKS) -> list[int]:
    """Split points of `widths` (blocks per decode, descending) into padded groups.

    A new group starts at i when every decode from i on would otherwise pad to the current
    group's width and that waste outweighs one more group's fixed cost.
    """
    starts = [0]
    for i in range(1, len(widths)):
        if (len(widths) - i) * (widths[starts[-1]] - widths[i]) > group_cost:
            starts.append(i)
    return starts


def plan_step(
    entries: list[tuple[int, int, list[int]]],
    block_size: int,
    device: torch.device,
    group_cost: int = GROUP_COST_BLOCKS,
) -> StepAttention:
    """What every layer of one step shares; entries = (start, num_tokens, block_table), decodes
    first, longest context first."""
    starts = [s for s, _, _ in entries]
    counts = [n for _, n, _ in entries]
    ends = [s + n for s, n in zip(starts, counts, strict=True)]
    begins = [0, *itertools.accumulate(counts)]
    nblks = [-(-e // block_size) for e in ends]
    width = max(nblks)
    rows = [t[:k] + [0] * (width - k) for (_, _, t), k in zip(entries, nblks, strict=True)]
    tables = torch.tensor(rows, dtype=torch.long)
    counts_t = torch.tensor(counts)
    shift = torch.tensor([s - b for s, b in zip(starts, begins[:-1], strict=True)])
    positions = torch.arange(begins[-1]) + shift.repeat_interleave(counts_t)
    entry = torch.arange(len(entries)).repeat_interleave(counts_t)
    slot_blocks = tables[entry, positions // block_size]

    num_decodes = next((i for i, n in enumerate(counts) if n != 1), len(counts))
    groups = []
    if num_decodes:
        starts_g = group_decodes(nblks[:num_decodes], group_cost)
        ends_t = torch.tensor(ends[:num_decodes])
        for lo, hi in zip(starts_g, [*starts_g[1:], num_decodes], strict=True):
            w = nblks[lo]
            visible = torch.arange(w * block_size)[None, :] < ends_t[lo:hi, None]
            groups.append(
                DecodeGroup(
                    lo, hi, tables[lo:hi, :w].flatten().to(device), visible.view(hi - lo, 1, 1, -1).to(device)
                )
            )
    chunks = []
    for i in range(num_decodes, len(entries)):
        start, end = starts[i], ends[i]
        table = mask = None
        if start:
            table = tables[i, : nblks[i]].to(device)
            mask = (torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]).to(device)
        chunks.append(PrefillChunk(begins[i], begins[i + 1], end, table, mask))
    return StepAttention(
        positions=positions.to(device),
        slot_blocks=slot_blocks.to(device),
        slot_offsets=(positions % block_size).to(device),
        decode_groups=groups,
        chunks=chunks,
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    step: StepAttention,
    scale: float,
) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d]; caches: [blocks, block_size, kv_heads, d].

    Returns [tokens, heads * d].
    """
    k_cache[step.slot_blocks, step.slot_offsets] = k
    v_cache[step.slot_blocks, step.slot_offsets] = v
    n, heads, d = q.shape
    groups = step.decode_groups
    if len(groups) == 1 and groups[0].end == n:
        return _decode(q, k_cache, v_cache, groups[0], scale).view(n, heads * d)
    out = torch.empty((n, heads, d), dtype=q.dtype, device=q.device)
    for g in groups:
        out[g.begin : g.end] = _decode(q[g.begin : g.end], k_cache, v_cache, g, scale)
    for c in step.chunks:
        out[c.begin : c.end] = _chunk(q, k, v, k_cache, v_cache, c, scale)
    return out.view(n, heads * d)


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup, scale: float
) -> torch.Tensor:
    b, heads, d = q.shape
    kv_heads = k_cache.shape[2]
    # NOTE: index_select, not k_cache[tables]: advanced indexing of a strided view is ~4x slower.
    tables = group.tables
    keys = k_cache.index_select(0, tables).view(b, -1, kv_heads, d).transpose(1, 2)
    values = v_cache.index_select(0, tables).view(b, -1, kv_heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(
        q.view(b, kv_heads, heads // kv_heads, d), keys, values, attn_mask=group.mask, scale=scale
    )
    return o.view(b, heads, d)


def _chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    c: PrefillChunk,
    scale: float,
) -> torch.Tensor:
    # NOTE: 4-D inputs: with 3-D ones SDPA on CPU falls back to the ~4x slower math kernel.
    qc = q[c.begin : c.end].transpose(0, 1)[None]
    if c.block_table is None:
        keys, values = k[c.begin : c.end], v[c.begin : c.end]
    else:
        kv_heads, d = k_cache.shape[2], k_cache.shape[3]
        keys = k_cache.index_select(0, c.block_table).view(-1, kv_heads, d)[: c.context_len]
        values = v_cache.index_select(0, c.block_table).view(-1, kv_heads, d)[: c.context_len]
    o = F.scaled_dot_product_attention(
        qc,
        keys.transpose(0, 1)[None],
        values.transpose(0, 1)[None],
        attn_mask=c.mask,
        is_causal=c.mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return o[0].transpose(0, 1)
