"""Packed linear layers: every GEMM path computes x @ W.T + b, and a bad choice fails clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.engine.linear import Linear, check_gemm, onednn_available, resolve_gemm

pytestmark = pytest.mark.unit

CPU_GEMMS = ["blas", *(["onednn"] if onednn_available() else [])]


@pytest.mark.parametrize("gemm", CPU_GEMMS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_linear_matches_f_linear(gemm: str, bias: bool, tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    w = torch.randn(96, 48, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(tokens, 48, generator=g)
    layer = Linear(w, b, gemm)  # type: ignore[arg-type]
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = layer(x)
    assert got.shape == (tokens, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer(x), got, rtol=0, atol=0)  # NOTE: the packed weight is reusable


@pytest.mark.skipif(not onednn_available(torch.bfloat16), reason="no oneDNN bfloat16 on this CPU")
def test_onednn_runs_bfloat16() -> None:
    w, x = torch.randn(96, 48), torch.randn(5, 48)
    got = Linear(w.bfloat16(), None, "onednn")(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(
        got.float(), F.linear(x.bfloat16().float(), w.bfloat16().float()), rtol=2e-2, atol=0.1
    )


def test_auto_picks_onednn_on_cpu_when_available_and_blas_elsewhere() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_gemm("auto", cpu) == ("onednn" if onednn_available() else "blas")
    assert resolve_gemm("blas", cpu) == "blas"
    assert resolve_gemm("auto", cuda) == "blas"


@pytest.mark.skipif(onednn_available(torch.float16), reason="this CPU runs oneDNN in float16")
def test_auto_falls_back_to_blas_for_a_dtype_onednn_cannot_run_here() -> None:
    assert resolve_gemm("auto", torch.device("cpu"), torch.float16) == "blas"
    with pytest.raises(ValueError, match=r"cannot run torch\.float16 on this CPU"):
        resolve_gemm("onednn", torch.device("cpu"), torch.float16)


def test_bad_gemm_choices_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown gemm 'fast' \(choose from auto, onednn, blas\)"):
        resolve_gemm("fast", torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'onednn' runs on the CPU only, not on cuda"):
        resolve_gemm("onednn", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown gemm 'mkl'"):
        check_gemm("mkl", torch.device("cpu"))  # type: ignore[arg-type]


class _Clock:
    """Advanced only by the GEMM calls below, by the cost the test sets: measure_gemm's
    decision alone is under test, whatever the machine does."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_measure_gemm_picks_by_geometric_mean_of_ratios(monkeypatch) -> None:
    import workers.engine.linear as linear

    clock = _Clock()
    cost = {"onednn": {1: 3.0, 16: 0.5, 256: 0.5}, "blas": {1: 1.0, 16: 1.0, 256: 1.0}}

    def timed(op, kind: str):
        def run(x, w, b):
            clock.now += cost[kind][x.shape[0]]
            return op(x, w, b)

        return run

    monkeypatch.setattr(linear, "_onednn", timed(linear._onednn, "onednn"))
    monkeypatch.setattr(linear, "_mm", timed(linear._mm, "blas"))
    weights = [torch.randn(32, 16), torch.randn(16, 32)]
    chosen, ratios = linear.measure_gemm(weights, clock=clock)
    assert ratios == {1: 3.0, 16: 0.5, 256: 0.5}  # oneDNN 3x slower at one token, 2x faster after
    assert chosen == "onednn"  # geometric mean 0.91
    cost["onednn"][1] = 5.0  # geometric mean 1.08: blas
    assert linear.measure_gemm(weights, clock=clock)[0] == "blas"


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN on this CPU")
def test_auto_measures_on_the_model_shapes_and_records_the_ratios(tmp_path) -> None:
    from tests._tiny_llama import make_tiny_llama
    from workers.engine.llama import LlamaModel

    make_tiny_llama(tmp_path)
    model_dir = tmp_path
    model = LlamaModel.load(model_dir, torch.device("cpu"), torch.float32, "auto")
    assert set(model.gemm_ratios) == {1, 16, 256} and all(r > 0 for r in model.gemm_ratios.values())
    assert model.gemm in ("onednn", "blas")
    assert LlamaModel.load(model_dir, torch.device("cpu"), torch.float32, "blas").gemm_ratios == {}
