"""Decode steps over sequences of mixed context lengths: grouped by length vs one padded group.

    python -m bench.decode_groups [--quick] [--threads 2] [--batch 16]

A batch of decodes whose contexts follow bench.pareto's prompt lengths (log-normal, median ~400
tokens, a tail past 1,000) runs decode steps on the real model's runner. `grouped`
is the engine's default (attention.group_decodes: similar lengths share one padded SDPA call);
`one group` pads every decode to the longest context, as the engine did before. Both run in
the same process on the same sequences, alternating step by step, so load elsewhere on the
machine lands on both. A batch of equal contexts (the same total) shows what grouping costs
where there is nothing to gain.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

from bench.common import headline, save, table
from bench.pareto import PROMPT_MAX, PROMPT_MEDIAN, PROMPT_MIN, PROMPT_SIGMA

ONE_GROUP = 1 << 30  # a group cost no padding outweighs


def contexts(batch: int, seed: int = 7) -> list[int]:
    """bench.pareto's prompt lengths (its ~130-token system prompt and template + a log-normal
    user message) plus up to 64 tokens already decoded."""
    rng = random.Random(seed)
    out = []
    for _ in range(batch):
        words = round(rng.lognormvariate(math.log(PROMPT_MEDIAN), PROMPT_SIGMA))
        out.append(130 + max(PROMPT_MIN, min(PROMPT_MAX, words)) + rng.randrange(64))
    return sorted(out, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    from workers.engine.model_runner import ModelRunner
    from workers.engine.sequence import SamplingParams, ScheduledSeq, Sequence
    from workers.model_files import resolve_model

    steps = 8 if args.quick else 24
    mixed = contexts(args.batch)
    equal = [sum(mixed) // len(mixed)] * len(mixed)
    need = sum(-(-(c + 2 * steps + 16) // 16) for c in mixed + equal)
    runner = ModelRunner(resolve_model(args.model), threads=args.threads, num_blocks=need)
    next_block = 0

    def prefill(lengths: list[int], tag: str) -> list[Sequence]:
        nonlocal next_block
        seqs = []
        for i, n in enumerate(lengths):
            seq = Sequence(
                f"{tag}{i}",
                [(31 * i + j) % 5000 + 10 for j in range(n)],
                SamplingParams(temperature=0.0),
                0.0,
            )
            k = -(-(n + 2 * steps + 1) // 16)
            seq.block_table = list(range(next_block, next_block + k))
            next_block += k
            seq.token_ids.append(runner.execute([ScheduledSeq(seq, 0, n, True)])[0].token_id)  # type: ignore[union-attr]
            seqs.append(seq)
        return seqs

    def step(seqs: list[Sequence], cost: int) -> float:
        runner.decode_group_cost = cost
        batch = [ScheduledSeq(s, len(s.token_ids) - 1, 1, True) for s in seqs]
        t0 = time.perf_counter()
        out = runner.execute(batch)
        elapsed = time.perf_counter() - t0
        for s, tok in zip(seqs, out, strict=True):
            s.token_ids.append(tok.token_id)  # type: ignore[union-attr]
        return elapsed

    t_start = time.perf_counter()
    workloads = {"mixed": prefill(mixed, "m"), "equal": prefill(equal, "e")}
    from workers.engine.attention import GROUP_COST_BLOCKS

    times: dict[tuple[str, str], list[float]] = {}
    for name, seqs in workloads.items():
        for _ in range(steps):  # NOTE: alternate, so a burst of other load hits both variants
            for variant, cost in (("grouped", GROUP_COST_BLOCKS), ("one group", ONE_GROUP)):
                times.setdefault((name, variant), []).append(step(seqs, cost))
    med = {key: statistics.median(v[1:]) * 1e3 for key, v in times.items()}
    rows = []
    for name, lengths in (("mixed", mixed), ("equal", equal)):
        rows += [
            [name, len(lengths), min(lengths), max(lengths), sum(lengths) // len(lengths), v, med[(name, v)]]
            for v in ("one group", "grouped")
        ]
    print(f"{args.batch} decodes, {args.threads} threads, median of {steps - 1} steps each")
    print(table(["contexts", "batch", "min", "max", "mean", "attention", "step ms"], rows))
    figures = {
        "mixed_step_ms_grouped": round(med[("mixed", "grouped")], 1),
        "mixed_step_ms_one_group": round(med[("mixed", "one group")], 1),
        "speedup_mixed": round(med[("mixed", "one group")] / med[("mixed", "grouped")], 3),
        "ratio_equal_grouped_vs_one_group": round(med[("equal", "grouped")] / med[("equal", "one group")], 3),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    path = save(
        "decode_groups", {"contexts": mixed, "times_s": {f"{k[0]}/{k[1]}": v for k, v in times.items()}}
    )
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
