"""Engine throughput: our continuous-batching engine vs transformers `generate`, same run.

    python -m bench.engine [--quick] [--model PATH] [--threads 2] [--rounds N] [--device cpu|cuda]
                           [--dtype float32|bfloat16]

Ours: N concurrent requests (N = 1, 4, 16, 32) into one in-process Engine; aggregate tokens/s,
TTFT and ITL. Baselines on the same prompts, token counts and dtype: transformers single-stream
(the same one prompt as ours at concurrency 1) and one static, left-padded batch of 32.
Headline ratios: ours@32 / HF static batch of 32 and ours@1 / HF single-stream.

Every measurement runs in a fresh process of its own (one thread doing torch work, as in a
worker: see workers/engine/model_runner.py on OpenMP teams), the systems alternate round by
round, and each figure is the best of its rounds, so load elsewhere on the machine does not land
on one side. A third system is our engine on the same GEMM as transformers (`gemm="blas"`, MKL's
sgemm on CPU), so the share of the gain that is the GEMM and the share that is the engine show
apart (`ratio_vs_hf_static_batch32_same_gemm`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import msgspec
import torch

from bench.common import headline, pct, save, table

TOPICS = [
    "the history of the printing press",
    "how bees communicate",
    "why the sky is blue",
    "the rules of chess",
    "how a compiler works",
    "the water cycle",
    "the French revolution",
    "how vaccines work",
    "the life of a star",
    "what makes bread rise",
    "how tides work",
    "the invention of the telephone",
    "why cats purr",
    "how rainbows form",
    "the Roman empire",
    "how airplanes fly",
]


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        detail = " Please be thorough and give examples." * (i % 4)
        msg = [{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in simple words.{detail}"}]
        ids = tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append(list(ids["input_ids"]))
    return prompts


def hf_single(model, prompts: list[list[int]], max_new: int) -> float:
    total, elapsed = 0, 0.0
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                pad_token_id=0,
            )
        _sync(model.device)
        elapsed += time.perf_counter() - t0
        total += out.shape[1] - len(p)
    return total / elapsed


def hf_static_batch(model, prompts: list[list[int]], lengths: list[int], pad_id: int) -> float:
    """One padded batch runs until its longest request is done; only wanted tokens count."""
    max_new = max(lengths)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
        )
    _sync(model.device)
    assert out.shape[1] - width == max_new
    return sum(lengths) / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def ours(engine, prompts: list[list[int]], lengths: list[int], temperature: float = 0.0) -> dict:
    from workers.engine.sequence import SamplingParams

    ttfts: list[float] = []
    itls: list[float] = []
    total = 0

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal total
        t0 = time.perf_counter()
        last = None
        params = SamplingParams(
            max_tokens=lengths[i],
            temperature=temperature,
            top_p=0.95 if temperature else 1.0,
            ignore_eos=True,
        )
        async for out in engine.generate(f"b{i}-{time.monotonic_ns()}", prompt, params):
            now = time.perf_counter()
            if last is None:
                ttfts.append(now - t0)
            else:
                itls.extend([(now - last) / len(out.token_ids)] * len(out.token_ids))
            last = now
            total += len(out.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    return {
        "tok_s": total / wall,
        "ttft_p50_ms": pct(ttfts, 50) * 1e3,
        "ttft_p99_ms": pct(ttfts, 99) * 1e3,
        "itl_p50_ms": pct(itls, 50) * 1e3,
        "itl_p99_ms": pct(itls, 99) * 1e3,
    }


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One measurement, run in a process of its own (`measure`)."""

    system: str  # "ours" | "hf"
    model_dir: str
    threads: int
    device: str
    max_new: int
    levels: list[int]  # ours: concurrency levels, each with max_new tokens per request
    mixed: list[int]  # per-request lengths of the mixed run (empty: none)
    gemm: str = "auto"
    dtype: str = "float32"  # both systems run this dtype


def measure(job: Job) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    prompts = make_prompts(tokenizer, 32)
    if job.system == "ours":
        # NOTE: the runner sets its threads on the engine thread, the only one doing torch work
        return asyncio.run(_measure_ours(job, prompts))
    torch.set_num_threads(job.threads)
    return _measure_hf(job, prompts, tokenizer.pad_token_id or 0)


async def _measure_ours(job: Job, prompts: list[list[int]]) -> dict:
    from workers.engine.engine import Engine
    from workers.engine.model_runner import ModelRunner
    from workers.engine.scheduler import SchedulerConfig

    runner = ModelRunner(
        job.model_dir,
        threads=job.threads,
        device=job.device,
        gemm=job.gemm,
        dtype=job.dtype,  # type: ignore[arg-type]
    )
    engine = Engine(runner, SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048))
    engine.start()
    try:
        await ours(engine, prompts[:2], [4, 4])  # warm-up
        engine.block_manager.clear_cache()  # NOTE: no prefix-cache help from the warm-up
        results: dict = {}
        for c in job.levels:
            results[str(c)] = await ours(engine, prompts[:c], [job.max_new] * c)
            engine.block_manager.clear_cache()
        if job.mixed:
            results["mixed"] = await ours(engine, prompts, job.mixed)
            engine.block_manager.clear_cache()
            # NOTE: what sampling costs: the same 32 requests at temperature 1, top_p 0.95
            results["sampled"] = await ours(engine, prompts, [job.max_new] * 32, temperature=1.0)
        return results
    finally:
        engine.stop()


def _measure_hf(job: Job, prompts: list[list[int]], pad: int) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, job.dtype)
    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=dtype).to(job.device).eval()
    hf_static_batch(model, prompts[:2], [4, 4], pad)  # warm-up
    return {
        # NOTE: the same one prompt our engine's single stream (concurrency 1) runs
        "single": hf_single(model, prompts[:1], job.max_new),
        "static32": hf_static_batch(model, prompts, [job.max_new] * 32, pad),
        "static32_mixed": hf_static_batch(model, prompts, job.mixed, pad),
    }


def run_in_process(job: Job) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, job).result()


def best(rounds: list[dict], key: str) -> dict:
    """The round with the highest tokens/s for one entry of `ours` results."""
    return max((r[key] for r in rounds), key=lambda m: m["tok_s"])


def plot(
    path: Path, levels: list[int], ours_res: dict[int, dict], blas: dict[int, dict], hf1: float, hf32: float
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, [ours_res[c]["tok_s"] for c in levels], marker="o", label="pdrouter engine")
    if blas:
        ax.plot(list(blas), [r["tok_s"] for r in blas.values()], "s--", label="pdrouter engine, blas GEMM")
    ax.axhline(hf32, color="tab:red", linestyle="--", label="transformers static batch 32")
    ax.axhline(hf1, color="tab:gray", linestyle=":", label="transformers single stream")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("tokens/s")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.set_title("Engine throughput (same prompts, same run)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=0)
    ap.add_argument(
        "--rounds", type=int, default=0, help="alternating rounds per system (default 2; quick 1)"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--dtype", default="", choices=["", "float32", "bfloat16"],
        help="both systems (default: float32 on CPU, bfloat16 on CUDA)",
    )  # fmt: skip
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    from workers.model_files import resolve_model

    model_dir = str(resolve_model(args.model))
    max_new = args.max_new or (24 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 2)
    levels = [1, 4, 16, 32]
    # NOTE: the realistic case for continuous batching: requests want different lengths
    # (25%..100% of max_new); the static batch runs until its longest one is done.
    mixed = [max_new * (1 + i % 4) // 4 for i in range(32)]
    common = {"model_dir": model_dir, "threads": args.threads, "device": args.device, "max_new": max_new}
    common["dtype"] = dtype
    jobs = {
        "ours": Job(system="ours", levels=levels, mixed=mixed, **common),
        "hf": Job(system="hf", levels=[], mixed=mixed, **common),
    }
    if args.device == "cpu":  # NOTE: on CUDA both sides already use cuBLAS
        jobs["ours_blas"] = Job(system="ours", levels=[1, 32], mixed=[], gemm="blas", **common)
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            runs[name].append(run_in_process(job))
            print(f"round {r + 1}/{rounds}: {name} in {time.perf_counter() - t0:.0f} s", flush=True)

    ours_res = {c: best(runs["ours"], str(c)) for c in levels}
    ours_mixed = best(runs["ours"], "mixed")
    hf1, hf32, hf32_mixed = (max(r[k] for r in runs["hf"]) for k in ("single", "static32", "static32_mixed"))
    blas = {c: best(runs["ours_blas"], str(c)) for c in (1, 32)} if "ours_blas" in runs else {}

    def row(name: str, c: int, r: dict) -> list:
        return [name, c, r["tok_s"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["itl_p50_ms"], r["itl_p99_ms"]]

    rows = [["transformers single stream", 1, hf1, "", "", "", ""]]
    rows.append(["transformers static batch", 32, hf32, "", "", "", ""])
    rows.append(["transformers static, mixed lengths", 32, hf32_mixed, "", "", "", ""])
    rows += [row("pdrouter engine", c, ours_res[c]) for c in levels]
    rows.append(row("pdrouter engine, mixed lengths", 32, ours_mixed))
    ours_sampled = best(runs["ours"], "sampled")
    rows.append(row("pdrouter engine, temperature 1, top_p 0.95", 32, ours_sampled))
    rows += [row("pdrouter engine, blas GEMM", c, r) for c, r in blas.items()]
    headers = ["system", "concurrency", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    print(f"{args.device} {dtype}, {args.threads} threads, {max_new} new tokens, best of {rounds} round(s)")
    print(table(headers, rows))
    figures = {
        "ours_tok_s_c1": round(ours_res[1]["tok_s"], 2),
        "ours_tok_s_c32": round(ours_res[32]["tok_s"], 2),
        "hf_single_stream_tok_s": round(hf1, 2),
        "hf_static_batch32_tok_s": round(hf32, 2),
        "ratio_vs_hf_static_batch32": round(ours_res[32]["tok_s"] / hf32, 3),
        "ratio_vs_hf_single_stream": round(ours_res[1]["tok_s"] / hf1, 3),
        "ratio_vs_hf_static_batch32_mixed_lengths": round(ours_mixed["tok_s"] / hf32_mixed, 3),
        "ratio_sampled_vs_greedy_c32": round(ours_sampled["tok_s"] / ours_res[32]["tok_s"], 3),
        "ttft_p50_ms_c32": round(ours_res[32]["ttft_p50_ms"], 1),
        "itl_p50_ms_c32": round(ours_res[32]["itl_p50_ms"], 1),
        "device": args.device,
        "dtype": dtype,
    }
    if blas:
        figures["ratio_vs_hf_static_batch32_same_gemm"] = round(blas[32]["tok_s"] / hf32, 3)
        figures["ratio_vs_hf_single_stream_same_gemm"] = round(blas[1]["tok_s"] / hf1, 3)
    path = save(
        "engine"
        + ("" if args.device == "cpu" else f"_{args.device}")
        + ("" if args.dtype == "" else f"_{dtype}"),
        {
            "max_new_tokens": max_new,
            "threads": args.threads,
            "rounds": runs,
            "mixed_lengths": mixed,
            "headline": figures,
        },
    )
    plot(path.with_suffix(".png"), levels, ours_res, blas, hf1, hf32)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    headline(figures)


if __name__ == "__main__":
    main()
