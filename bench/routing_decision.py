"""Routing decision time: KvPolicy (index lookup + cost over every candidate) per request.

    python -m bench.routing_decision [--quick]

A realistic exact index: 32 shared prefix families (system prompts / documents, 512 blocks
each); every worker holds 4 families to a random depth plus unique blocks, ~10k cached
blocks per worker (2.6M index entries at 256 workers). Requests follow a family for a
random share of their blocks, then diverge. Candidates are shaped like WorkerClient
(worker_id a property over a protobuf InfoResponse, protobuf LoadReports) and the router's
ActiveLoad has bookings.

Reported at 8, 64 and 256 workers, 1k-token (64-block) and 8k-token (512-block) prompts:
p50/p99 of `Decision.decision_us` (KvPolicy.select: index lookup + cost), of `overlaps()`
alone, and of `pick_decode` reusing the prefill Decision's overlaps; plus the cost of folding
KV events in (`KvIndex.store`) and the approximate index's record + lookup.
Goals: well under 1 ms at 256 workers (docs/routing.md); p99 <= 200 us at 256 workers for the 1k-token
prompt of the routing workload (bench.routing).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

from bench.common import headline, pct, save, table
from pdrouter_proto import worker_pb2 as pb
from router.kv_index import ApproxKvIndex, KvIndex
from router.routing import ActiveLoad, KvPolicy

BLOCK_SIZE = 16
NUM_FAMILIES = 32
FAMILY_BLOCKS = 512
FAMILIES_PER_WORKER = 4
UNIQUE_BLOCKS_PER_WORKER = 9000  # + ~1,150 family blocks: ~10k cached blocks per worker


@dataclass(slots=True)
class FakeWorker:
    """Shaped like router.worker_pool.WorkerClient: worker_id is a property over Info."""

    info: pb.InfoResponse
    load: pb.LoadReport

    @property
    def worker_id(self) -> str:
        return self.info.worker_id if self.info is not None else ""


def build(num_workers: int, rng: random.Random) -> tuple[KvIndex, list[FakeWorker], list[list[int]]]:
    families = [[rng.getrandbits(64) for _ in range(FAMILY_BLOCKS)] for _ in range(NUM_FAMILIES)]
    index = KvIndex()
    workers = []
    for i in range(num_workers):
        wid = f"worker-{i:03d}"
        for f in rng.sample(range(NUM_FAMILIES), FAMILIES_PER_WORKER):
            index.store(wid, families[f][: rng.randint(64, FAMILY_BLOCKS)])
        index.store(wid, [rng.getrandbits(64) for _ in range(UNIQUE_BLOCKS_PER_WORKER)])
        load = pb.LoadReport(
            num_running=rng.randint(0, 32),
            kv_blocks_used=rng.randint(0, 4000),
            kv_blocks_total=8192,
            queued_prefill_tokens=rng.randint(0, 8192),
        )
        workers.append(FakeWorker(pb.InfoResponse(worker_id=wid), load))
    return index, workers, families


def make_request(families: list[list[int]], num_blocks: int, rng: random.Random) -> list[int]:
    family = rng.choice(families)
    shared = rng.randint(num_blocks // 2, num_blocks)
    return family[:shared] + [rng.getrandbits(64) for _ in range(num_blocks - shared)]


def run_case(num_workers: int, num_blocks: int, iters: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    index, workers, families = build(num_workers, rng)
    active = ActiveLoad()
    for r in range(num_workers * 4):
        active.add(rng.choice(workers).worker_id, f"bg-{r}", rng.randint(0, 4096), rng.randint(8, 600))
    policy = KvPolicy(seed=seed, index=index, active=active)
    requests = [make_request(families, num_blocks, rng) for _ in range(64)]
    prompt_tokens = num_blocks * BLOCK_SIZE + 7
    for req in requests[:8]:  # warm-up
        policy.select(workers, req, prompt_tokens, BLOCK_SIZE)
    decision, decode, lookup, overlap = [], [], [], []
    for i in range(iters):
        req = requests[i % len(requests)]
        d = policy.select(workers, req, prompt_tokens, BLOCK_SIZE)
        decision.append(d.decision_us)
        overlap.append(d.overlap_blocks)
        decode.append(policy.pick_decode(workers, req, BLOCK_SIZE, overlaps=d.overlaps).decision_us)
        t0 = time.perf_counter_ns()
        index.overlaps(req)
        lookup.append((time.perf_counter_ns() - t0) / 1000)
    return {
        "workers": num_workers,
        "prompt_tokens": prompt_tokens,
        "blocks": num_blocks,
        "index_blocks": index.num_blocks,
        "index_entries": index.num_entries,
        "decision_p50_us": pct(decision, 50),
        "decision_p99_us": pct(decision, 99),
        "decode_p50_us": pct(decode, 50),
        "decode_p99_us": pct(decode, 99),
        "overlaps_p50_us": pct(lookup, 50),
        "overlaps_p99_us": pct(lookup, 99),
        "mean_chosen_overlap": sum(overlap) / len(overlap),
    }


def bench_events(iters: int, seed: int) -> float:
    """ns per hash folded in through `store` (a `stored` event of 32 blocks)."""
    rng = random.Random(seed)
    index = KvIndex()
    batches = [[rng.getrandbits(64) for _ in range(32)] for _ in range(iters)]
    t0 = time.perf_counter_ns()
    for i, batch in enumerate(batches):
        index.store(f"worker-{i % 64:03d}", batch)
    return (time.perf_counter_ns() - t0) / (iters * 32)


def bench_approx(iters: int, seed: int) -> dict[str, float]:
    """ApproxKvIndex at 256 workers, 8k-token prompts, 100 decisions/s with a 120 s TTL."""
    rng = random.Random(seed)
    index = ApproxKvIndex(ttl_s=120.0)
    families = [[rng.getrandbits(64) for _ in range(FAMILY_BLOCKS)] for _ in range(NUM_FAMILIES)]
    requests = [make_request(families, FAMILY_BLOCKS, rng) for _ in range(256)]
    record, lookup = [], []
    for i in range(3 * iters):
        now = i * 0.01
        req = requests[i % len(requests)]
        t0 = time.perf_counter_ns()
        index.record(f"worker-{rng.randrange(256):03d}", req, now)
        t1 = time.perf_counter_ns()
        index.overlaps(req, now)
        if i >= 2 * iters:  # NOTE: after warm-up, once entries have started to expire
            record.append((t1 - t0) / 1000)
            lookup.append((time.perf_counter_ns() - t1) / 1000)
    return {
        "approx_record_p50_us": pct(record, 50),
        "approx_record_p99_us": pct(record, 99),
        "approx_overlaps_p50_us": pct(lookup, 50),
        "approx_overlaps_p99_us": pct(lookup, 99),
        "approx_entries": index.num_entries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    iters = 300 if args.quick else 3000
    rows = [
        run_case(w, blocks, iters, args.seed) for w in (8, 64, 256) for blocks in (64, 512)
    ]  # fmt: skip
    headers = ["workers", "prompt_tokens", "index_entries", "decision_p50_us", "decision_p99_us",
               "overlaps_p50_us", "overlaps_p99_us", "decode_p50_us", "decode_p99_us",
               "mean_chosen_overlap"]  # fmt: skip
    print(table(headers, [[r[h] for h in headers] for r in rows]))
    store_ns = bench_events(2000 if args.quick else 20000, args.seed)
    print(f"KvIndex.store: {store_ns:.0f} ns per block hash")
    approx = bench_approx(2000 if args.quick else 6000, args.seed)
    print(
        "ApproxKvIndex, 256 workers, 8k-token prompts: "
        + ", ".join(f"{k} {v:.1f}" for k, v in approx.items())
    )
    at_256 = [r for r in rows if r["workers"] == 256]
    figures = {
        "decision_p50_us_256_workers": max(r["decision_p50_us"] for r in at_256),
        "decision_p99_us_256_workers": max(r["decision_p99_us"] for r in at_256),
        "decision_p99_us_256_workers_1k": at_256[0]["decision_p99_us"],
        "decision_p99_us_256_workers_8k": at_256[1]["decision_p99_us"],
        "store_ns_per_block": round(store_ns, 1),
    }
    path = save("routing_decision", {"quick": args.quick, "iters": iters, "rows": rows, **approx, **figures})
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()
