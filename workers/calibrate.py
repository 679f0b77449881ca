"""`pdrouter calibrate`: fit the mock engine's TimingModel to the real engine on this machine.

Stages: load the model (on this thread) -> warm up -> time prefill-only steps (one sequence, a
chunk of n tokens from position 0) -> time decode-only steps (`batch` sequences, one token each
at position ctx) -> fit a,b,c and d,e,f by non-negative least squares -> print measured vs
modelled -> write the JSON that `--mock-timing PATH` reads.

Torch work stays on the calling thread (see workers/engine/model_runner.py for why).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import sys
import time
from pathlib import Path

import msgspec
import numpy as np

from workers.mock.runner import TimingModel
from workers.model_files import cache_dir, resolve_model

BUSY_LOAD = 0.5  # NOTE: another busy process on the CPUs skews every step (OpenMP teams wait on each other)
KV_BYTES_CAP = 1 << 30  # NOTE: past this, block ids wrap: the gather cost is the same, the RAM is not


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    prefill_chunks: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    reps: int  # timed steps per point (the median is kept), after one warm-up step


FULL = Plan(
    prefill_chunks=(16, 64, 128, 256, 512),
    decode_batches=(1, 4, 8, 16, 32),
    decode_contexts=(64, 256, 1024),
    reps=7,
)
QUICK = Plan(
    prefill_chunks=(16, 128, 256, 512), decode_batches=(1, 8, 32), decode_contexts=(64, 256, 1024), reps=5
)


class Calibration(TimingModel, kw_only=True):
    """A TimingModel plus how well it fits and what it was measured on (`--mock-timing PATH` reads it)."""

    prefill_r2: float = 0.0
    decode_r2: float = 0.0
    prefill_max_err: float = 0.0  # max |model - measured| / measured
    decode_max_err: float = 0.0
    model: str = ""
    device: str = ""
    threads: int = 0
    prefill: list[tuple[int, float]] = []  # (n, ms)
    decode: list[tuple[int, int, float]] = []  # (batch, ctx, ms)


def fit_nonneg(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients >= 0 minimising the relative error of x @ coef against y (all y > 0).

    Exact non-negative least squares for a few columns: the optimum is the unconstrained fit on
    its own support, so try every subset of columns and keep the best fit with no negative term.
    """
    # NOTE: relative error, so a 10 ms step counts as much as a 1 s one
    xw, yw = x / y[:, None], np.ones_like(y)
    scale = np.linalg.norm(xw, axis=0)
    scale[scale == 0] = 1.0
    xs = xw / scale
    best, best_err = np.zeros(x.shape[1]), float(yw @ yw)
    for mask in itertools.product((False, True), repeat=x.shape[1]):
        cols = np.flatnonzero(mask)
        if not len(cols):
            continue
        sol = np.linalg.lstsq(xs[:, cols], yw, rcond=None)[0]
        if (sol < 0).any():
            continue
        coef = np.zeros(x.shape[1])
        coef[cols] = sol
        err = float(np.sum((xs @ coef - yw) ** 2))
        if err < best_err:
            best, best_err = coef, err
    return best / scale


def r2(model: np.ndarray, measured: np.ndarray) -> float:
    ss_res = float(np.sum((measured - model) ** 2))
    ss_tot = float(np.sum((measured - measured.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res == 0)


def prefill_x(chunks: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(chunks), chunks, chunks**2], axis=1).astype(float)


def decode_x(batches: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    # NOTE: the mock counts a decode at position ctx as ctx + 1 context tokens (workers/mock/runner.py)
    return np.stack([np.ones_like(batches), batches, batches * (contexts + 1)], axis=1).astype(float)


def fit(prefill: list[tuple[int, float]], decode: list[tuple[int, int, float]], **meta) -> Calibration:
    n, pms = np.array([p[0] for p in prefill]), np.array([p[1] for p in prefill])
    b, ctx, dms = (np.array([d[i] for d in decode]) for i in range(3))
    px, dx = prefill_x(n), decode_x(b, ctx)
    a_b_c, d_e_f = fit_nonneg(px, pms), fit_nonneg(dx, dms)
    pmod, dmod = px @ a_b_c, dx @ d_e_f
    a, b_, c = (float(v) for v in a_b_c)
    d, e, f = (float(v) for v in d_e_f)
    return Calibration(
        a=a, b=b_, c=c, d=d, e=e, f=f,
        prefill_r2=r2(pmod, pms), decode_r2=r2(dmod, dms),
        prefill_max_err=float(np.max(np.abs(pmod - pms) / pms)),
        decode_max_err=float(np.max(np.abs(dmod - dms) / dms)),
        prefill=prefill, decode=decode, **meta,
    )  # fmt: skip


def measure(
    model_dir: Path, plan: Plan, *, threads: int, device: str = "cpu", block_size: int = 16
) -> tuple[list[tuple[int, float]], list[tuple[int, int, float]], str]:
    """Median ms of prefill-only and decode-only steps of the real runner, and the model's name."""
    import torch

    from workers.engine.model_runner import ModelRunner
    from workers.engine.sequence import SamplingParams, ScheduledSeq, Sequence

    runner = ModelRunner(
        model_dir, block_size=block_size, device=device, threads=threads, kv_cache_bytes=KV_BYTES_CAP
    )
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else lambda: None
    params = SamplingParams(temperature=0.0)

    def batch(contexts: list[int], num_tokens: int) -> list[ScheduledSeq]:
        """One sequence per context, each computing its last `num_tokens` tokens; distinct blocks."""
        out, next_block = [], 0
        for i, ctx in enumerate(contexts):
            total = ctx + num_tokens
            s = Sequence(f"cal{i}", [(7 + 13 * t) % runner.spec.vocab_size for t in range(total)], params)
            num = -(-total // block_size)
            s.block_table = [(next_block + j) % runner.num_blocks for j in range(num)]
            next_block += num
            out.append(ScheduledSeq(s, ctx, num_tokens, True))
        return out

    def timed_ms(items: list[ScheduledSeq]) -> float:
        sync()
        t0 = time.perf_counter()
        runner.execute(items)
        sync()
        return (time.perf_counter() - t0) * 1e3

    if runner.device.type == "cpu" and os.getloadavg()[0] > BUSY_LOAD:
        print(
            f"warning: load average {os.getloadavg()[0]:.1f}: timings may be high and noisy", file=sys.stderr
        )
    t0 = time.perf_counter()
    runner.execute(batch([0], 4))  # loads weights and pool on this thread
    print(f"loaded {runner.spec.name} in {time.perf_counter() - t0:.1f} s; measuring ...", file=sys.stderr)
    decode_points = list(itertools.product(plan.decode_batches, plan.decode_contexts))
    steps = [batch([0], n) for n in plan.prefill_chunks] + [batch([ctx] * b, 1) for b, ctx in decode_points]
    for items in steps:
        runner.execute(items)  # NOTE: warm-up, the first step of a shape allocates
    # NOTE: repetitions go round-robin over the points, so a burst of other load spoils one
    # sample of many points (which the median drops) rather than every sample of one point.
    times = [[timed_ms(items) for items in steps] for _ in range(plan.reps)]
    ms = [statistics.median(col) for col in zip(*times, strict=True)]
    k = len(plan.prefill_chunks)
    prefill = list(zip(plan.prefill_chunks, ms[:k], strict=True))
    decode = [(b, ctx, t) for (b, ctx), t in zip(decode_points, ms[k:], strict=True)]
    runner.close()
    return prefill, decode, runner.spec.name


def default_out_path(model: str, device: str, threads: int) -> Path:
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(model).name}-{device}-{threads}t")
    return cache_dir() / "timing" / f"{label}.json"


def table(cal: Calibration) -> str:
    model = TimingModel(a=cal.a, b=cal.b, c=cal.c, d=cal.d, e=cal.e, f=cal.f)
    lines = [
        "prefill: one sequence, n tokens from position 0",
        f"{'n':>6} {'measured ms':>12} {'model ms':>9}",
    ]
    for n, ms in cal.prefill:
        lines.append(f"{n:>6} {ms:>12.2f} {model.step_ms([n], 0, 0):>9.2f}")
    lines.append(f"  R^2 {cal.prefill_r2:.4f}, max error {cal.prefill_max_err:.1%}")
    lines.append("decode: `batch` sequences, one token each at position ctx")
    lines.append(f"{'batch':>6} {'ctx':>6} {'measured ms':>12} {'model ms':>9}")
    for b, ctx, ms in cal.decode:
        lines.append(f"{b:>6} {ctx:>6} {ms:>12.2f} {model.step_ms([], b, b * (ctx + 1)):>9.2f}")
    lines.append(f"  R^2 {cal.decode_r2:.4f}, max error {cal.decode_max_err:.1%}")
    return "\n".join(lines)


def calibrate(
    model_dir: Path, plan: Plan, *, threads: int, device: str = "cpu", out: Path | None = None
) -> tuple[Calibration, Path]:
    """Measure -> fit -> print the table -> write the JSON; the last stdout line is the summary."""
    prefill, decode, name = measure(model_dir, plan, threads=threads, device=device)
    cal = fit(prefill, decode, model=name, device=device, threads=threads)
    out = out or default_out_path(name, device, threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(msgspec.json.format(msgspec.json.encode(cal)) + b"\n")
    coefs = [cal.a, cal.b, cal.c, cal.d, cal.e, cal.f]
    print(table(cal))
    print(f"prefill ms = {cal.a:.4g} + {cal.b:.4g}*n + {cal.c:.4g}*n^2")
    print(f"decode step ms = {cal.d:.4g} + {cal.e:.4g}*batch + {cal.f:.4g}*context_tokens")
    print(f"wrote {out}")
    print(f"use: --mock-timing {out}   (or --mock-timing {','.join(f'{v:.6g}' for v in coefs)})")
    summary = dict(zip("abcdef", coefs, strict=True)) | {
        "prefill_r2": cal.prefill_r2,
        "decode_r2": cal.decode_r2,
    }
    print(msgspec.json.encode(summary).decode(), flush=True)
    return cal, out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdrouter calibrate",
        description="Time the real engine's steps on this machine and fit the mock engine's --mock-timing.",
    )
    p.add_argument(
        "--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF directory"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: all cores); match the worker's"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="fewer points and repetitions (under a minute)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: CACHE/timing/MODEL-DEVICE-Nt.json)"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    threads = args.threads or max(1, os.cpu_count() or 1)
    calibrate(
        resolve_model(args.model),
        QUICK if args.quick else FULL,
        threads=threads,
        device=args.device,
        out=args.out,
    )


if __name__ == "__main__":
    main()
