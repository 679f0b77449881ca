"""Linear layers packed once, at load, for the fastest GEMM the device has.

`auto` on CPU measures: oneDNN and MKL's GEMM (`blas`) are timed on the model's own projection
shapes at decode and prefill token counts (interleaved, best of several), and the one with the
lower geometric mean of time ratios wins (each token count weighs the same). Which is faster
depends on the CPU: oneDNN on the AMD EPYC VM below, blas at one token on an Intel Xeon.

On CPU that is oneDNN with the weight reordered into its blocked layout ahead of time: on the
2-vCPU AMD EPYC VM it runs SmolLM2's projections 2-3x faster than MKL's sgemm (which is what
`F.linear` and `torch.mm` call there) at decode shapes (M = 1..32) and ~2.2x at prefill shapes
(M ~ 1,500); see `python -m bench.engine`, whose `blas` row is the engine with MKL instead. Both
are exact fp32 GEMMs that differ only in summation order. `blas` keeps the weight [in, out] for
`torch.mm` (15-45% faster than F.linear's [out, in] at small batches on Intel's MKL, measured);
CUDA uses F.linear (cuBLAS).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Gemm = Literal["auto", "onednn", "blas"]
GEMMS: tuple[Gemm, ...] = ("auto", "onednn", "blas")
TOKEN_COUNTS = (1, 16, 256)  # a single stream's decode, a batched decode, a prefill chunk

log = logging.getLogger("pdrouter.engine")


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU run oneDNN linear layers in `dtype` (fp16 needs AVX512-FP16)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), None)
        return bool(_onednn(torch.ones(2, 8, dtype=dtype), w, None).eq(8).all())
    except RuntimeError:
        return False


def check_gemm(gemm: Gemm, device: torch.device) -> None:
    """The checks that need no torch work (see workers/engine/model_runner.py on threads)."""
    if gemm not in GEMMS:
        raise ValueError(f"unknown gemm {gemm!r} (choose from {', '.join(GEMMS)})")
    if gemm == "onednn" and device.type != "cpu":
        raise ValueError(f"gemm 'onednn' runs on the CPU only, not on {device.type}")


def resolve_gemm(gemm: Gemm, device: torch.device, dtype: torch.dtype = torch.float32) -> Gemm:
    """The GEMM the layers will use: `auto` is oneDNN where it runs `dtype` on this CPU, else blas."""
    check_gemm(gemm, device)
    if device.type != "cpu":
        return "blas"
    if gemm == "auto":
        return "onednn" if onednn_available(dtype) else "blas"
    if gemm == "onednn" and not onednn_available(dtype):
        raise ValueError(f"gemm 'onednn' cannot run {dtype} on this CPU with this torch build")
    return gemm


def measure_gemm(
    weights: Sequence[torch.Tensor],
    token_counts: Sequence[int] = TOKEN_COUNTS,
    reps: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Gemm, dict[int, float]]:
    """Time oneDNN against blas on these [out, in] weights; (the faster, oneDNN/blas time ratio
    per token count). Both run in turns, best of `reps`, so load on the machine hits both alike."""
    layers = {g: [Linear(w, None, g) for w in weights] for g in ("onednn", "blas")}
    ratios: dict[int, float] = {}
    for m in token_counts:
        xs = [torch.randn(m, w.shape[1], dtype=w.dtype) for w in weights]
        best = {"onednn": math.inf, "blas": math.inf}
        for rep in range(reps + 1):
            for gemm, ls in layers.items():
                t0 = clock()
                for layer, x in zip(ls, xs):
                    layer(x)
                if rep:  # NOTE: the first turn warms caches and oneDNN's primitive cache
                    best[gemm] = min(best[gemm], clock() - t0)
        ratios[m] = best["onednn"] / max(best["blas"], 1e-12)
    geomean = math.exp(sum(math.log(max(r, 1e-12)) for r in ratios.values()) / len(ratios))
    return ("onednn" if geomean < 1.0 else "blas"), ratios


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _mm(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = torch.mm(x, w_t)
    return out if b is None else out.add_(b)


class Linear:
    """y = x @ weight.T + bias, for x [tokens, in]; the weight is given [out, in] as checkpoints store it."""

    __slots__ = ("bias", "op", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gemm: Gemm) -> None:
        self.bias = bias
        self.op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
        if gemm == "onednn":
            # NOTE: no batch-size hint: one blocked layout serves every step's token count.
            self.weight, self.op = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None), _onednn
        elif weight.device.type == "cpu":
            self.weight, self.op = weight.t().contiguous(), _mm
        else:
            self.weight, self.op = weight.contiguous(), F.linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.bias)
