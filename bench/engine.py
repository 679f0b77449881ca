"""Engine throughput: our continuous-batching engine vs transformers `generate`, same run.

    python -m bench.engine [--quick] [--model PATH] [--threads 2]

Ours: N concurrent requests (N = 1, 4, 16, 32) into one in-process Engine; aggregate tokens/s,
TTFT and ITL. Baselines on the same prompts and token counts: transformers single-stream and
one static, left-padded batch of 32. Headline ratios: ours@32 / HF static batch of 32 and
ours@1 / HF single-stream.
"""

from __future__ import annotations

import argparse
import asyncio
import time

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
        ids = torch.tensor([p])
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
        elapsed += time.perf_counter() - t0
        total += out.shape[1] - len(p)
    return total / elapsed


def hf_static_batch(model, prompts: list[list[int]], lengths: list[int], pad_id: int) -> float:
    """One padded batch runs until its longest request is done; only wanted tokens count."""
    max_new = max(lengths)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
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
    assert out.shape[1] - width == max_new
    return sum(lengths) / (time.perf_counter() - t0)


async def ours(engine, prompts: list[list[int]], lengths: list[int]) -> dict:
    from workers.engine.sequence import SamplingParams

    ttfts: list[float] = []
    itls: list[float] = []
    total = 0

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal total
        t0 = time.perf_counter()
        last = None
        params = SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
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


async def run_ours(
    model_dir, prompts: list[list[int]], levels: list[int], max_new: int, mixed: list[int], threads: int
) -> tuple[dict[int, dict], dict]:
    from workers.engine.engine import Engine
    from workers.engine.model_runner import ModelRunner
    from workers.engine.scheduler import SchedulerConfig

    engine = Engine(
        ModelRunner(model_dir, threads=threads), SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048)
    )
    engine.start()
    try:
        await ours(engine, prompts[:2], [4, 4])  # warm-up
        engine.block_manager.clear_cache()  # NOTE: no prefix-cache help from the warm-up
        results = {}
        for c in levels:
            results[c] = await ours(engine, prompts[:c], [max_new] * c)
            engine.block_manager.clear_cache()
        mixed_res = await ours(engine, prompts, mixed)
        return results, mixed_res
    finally:
        engine.stop()


def plot(path, levels: list[int], ours_res: dict[int, dict], hf1: float, hf32: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, [ours_res[c]["tok_s"] for c in levels], marker="o", label="pdrouter engine")
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.model_files import resolve_model

    model_dir = resolve_model(args.model)
    max_new = args.max_new or (24 if args.quick else 64)
    levels = [1, 4, 16, 32]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tok, 32)

    # NOTE: the realistic case for continuous batching: requests want different lengths
    # (25%..100% of max_new); the static batch runs until its longest one is done.
    mixed = [max_new * (1 + i % 4) // 4 for i in range(32)]
    ours_res, ours_mixed = asyncio.run(run_ours(model_dir, prompts, levels, max_new, mixed, args.threads))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf1 = hf_single(model, prompts[:1] if args.quick else prompts[:3], max_new)
    hf32 = hf_static_batch(model, prompts, [max_new] * 32, tok.pad_token_id or 0)
    hf32_mixed = hf_static_batch(model, prompts, mixed, tok.pad_token_id or 0)

    rows = [["transformers single stream", 1, hf1, "", "", "", ""]]
    rows.append(["transformers static batch", 32, hf32, "", "", "", ""])
    rows.append(["transformers static, mixed lengths", 32, hf32_mixed, "", "", "", ""])
    for c in levels:
        r = ours_res[c]
        rows.append(
            [
                "pdrouter engine",
                c,
                r["tok_s"],
                r["ttft_p50_ms"],
                r["ttft_p99_ms"],
                r["itl_p50_ms"],
                r["itl_p99_ms"],
            ]
        )
    rows.append(
        ["pdrouter engine, mixed lengths", 32, ours_mixed["tok_s"], ours_mixed["ttft_p50_ms"],
         ours_mixed["ttft_p99_ms"], ours_mixed["itl_p50_ms"], ours_mixed["itl_p99_ms"]]
    )  # fmt: skip
    print(
        table(
            ["system", "concurrency", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"], rows
        )
    )
    figures = {
        "ours_tok_s_c1": round(ours_res[1]["tok_s"], 2),
        "ours_tok_s_c32": round(ours_res[32]["tok_s"], 2),
        "hf_single_stream_tok_s": round(hf1, 2),
        "hf_static_batch32_tok_s": round(hf32, 2),
        "ratio_vs_hf_static_batch32": round(ours_res[32]["tok_s"] / hf32, 3),
        "ratio_vs_hf_single_stream": round(ours_res[1]["tok_s"] / hf1, 3),
        "ratio_vs_hf_static_batch32_mixed_lengths": round(ours_mixed["tok_s"] / hf32_mixed, 3),
        "ttft_p50_ms_c32": round(ours_res[32]["ttft_p50_ms"], 1),
        "itl_p50_ms_c32": round(ours_res[32]["itl_p50_ms"], 1),
    }
    path = save(
        "engine",
        {
            "max_new_tokens": max_new,
            "threads": args.threads,
            "ours": ours_res,
            "hf_single": hf1,
            "hf_static32": hf32,
            "mixed_lengths": mixed,
            "ours_mixed": ours_mixed,
            "hf_static32_mixed": hf32_mixed,
            "headline": figures,
        },
    )
    plot(path.with_suffix(".png"), levels, ours_res, hf1, hf32)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    headline(figures)


if __name__ == "__main__":
    main()
