"""`pdrouter calibrate`: the non-negative fit recovers known coefficients, its JSON feeds
`--mock-timing PATH`, and a run on a tiny random Llama writes a usable timing model."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from workers.calibrate import Plan, calibrate, decode_x, fit, fit_nonneg, prefill_x
from workers.main import parse_timing
from workers.mock.runner import TimingModel

pytestmark = pytest.mark.unit

CHUNKS = np.array([16, 64, 128, 256, 512])
BATCHES, CONTEXTS = np.meshgrid([1, 4, 8, 16, 32], [64, 256, 1024])
BATCHES, CONTEXTS = BATCHES.ravel(), CONTEXTS.ravel()


def noisy(y: np.ndarray, rel: float, seed: int = 0) -> np.ndarray:
    return y * (1 + np.random.default_rng(seed).uniform(-rel, rel, y.shape))


def test_fit_recovers_known_coefficients() -> None:
    true = TimingModel(a=3.0, b=0.5, c=0.002, d=25.0, e=1.5, f=0.004)
    pms = prefill_x(CHUNKS) @ [true.a, true.b, true.c]
    dms = decode_x(BATCHES, CONTEXTS) @ [true.d, true.e, true.f]
    cal = fit(list(zip(CHUNKS.tolist(), pms, strict=True)), list(zip(BATCHES, CONTEXTS, dms, strict=True)))
    got = [cal.a, cal.b, cal.c, cal.d, cal.e, cal.f]
    assert got == pytest.approx([true.a, true.b, true.c, true.d, true.e, true.f], rel=1e-6)
    assert cal.prefill_r2 == pytest.approx(1.0) and cal.decode_r2 == pytest.approx(1.0)
    assert cal.prefill_max_err < 1e-9 and cal.decode_max_err < 1e-9


def test_fit_with_noise_stays_close() -> None:
    coef = np.array([25.0, 1.5, 0.004])
    y = noisy(decode_x(BATCHES, CONTEXTS) @ coef, 0.02)
    x = decode_x(BATCHES, CONTEXTS)
    got = fit_nonneg(x, y)
    assert got == pytest.approx(coef, rel=0.15)
    # NOTE: no term wants to go negative here, so the answer is the plain relative least squares
    unconstrained = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)[0]
    assert got == pytest.approx(unconstrained, rel=1e-9)


def test_negative_term_is_clamped_and_the_rest_refit() -> None:
    # NOTE: a step time that falls with n would need b < 0; the fit drops b and refits a and c.
    x = prefill_x(CHUNKS)
    y = x @ np.array([40.0, -0.05, 0.0004])
    assert (np.linalg.lstsq(x, y, rcond=None)[0] < 0).any()
    got = fit_nonneg(x, y)
    assert got[1] == 0 and got[0] > 0 and got[2] > 0
    best_two = np.linalg.lstsq(x[:, [0, 2]] / y[:, None], np.ones_like(y), rcond=None)[0]
    assert got[[0, 2]] == pytest.approx(best_two, rel=1e-6)


def test_all_zero_when_no_term_helps() -> None:
    got = fit_nonneg(np.array([[-1.0, -3.0], [-2.0, -1.0]]), np.array([1.0, 2.0]))
    assert got.tolist() == [0.0, 0.0]


def test_parse_timing_reads_calibrate_json(tmp_path: Path) -> None:
    cal = fit([(16, 10.0), (64, 20.0), (256, 70.0)], [(1, 64, 30.0), (8, 64, 40.0), (8, 1024, 60.0)])
    path = tmp_path / "timing.json"
    path.write_bytes(msgspec.json.encode(cal))
    model = parse_timing(str(path), token_delay_ms=5.0)
    assert type(model) is TimingModel
    assert (model.a, model.b, model.c, model.d, model.e, model.f) == (
        cal.a,
        cal.b,
        cal.c,
        cal.d,
        cal.e,
        cal.f,
    )
    assert parse_timing("1,2,3,4,5,6", 0.0) == TimingModel(a=1, b=2, c=3, d=4, e=5, f=6)
    (tmp_path / "bad.json").write_text('{"a": "fast"}')
    with pytest.raises(SystemExit, match="not a timing model"):
        parse_timing(str(tmp_path / "bad.json"), 0.0)


@pytest.mark.e2e
def test_calibrate_tiny_llama(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests._tiny_llama import make_tiny_llama

    make_tiny_llama(tmp_path / "model")
    plan = Plan(prefill_chunks=(4, 16, 48), decode_batches=(1, 4), decode_contexts=(8, 40), reps=2)
    out = tmp_path / "timing" / "tiny.json"
    cal, written = calibrate(tmp_path / "model", plan, threads=1, out=out)
    assert written == out and out.is_file()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"a", "b", "c", "d", "e", "f", "prefill_r2", "decode_r2"}
    assert summary == {
        "a": cal.a, "b": cal.b, "c": cal.c, "d": cal.d, "e": cal.e, "f": cal.f,
        "prefill_r2": cal.prefill_r2, "decode_r2": cal.decode_r2,
    }  # fmt: skip
    # the printed fit is the best one of the measurements it recorded, and every step took time:
    # the all-zero model (what a fit that dropped every term would give) is not it
    n, pms = np.array([p[0] for p in cal.prefill]), np.array([p[1] for p in cal.prefill])
    b, ctx, dms = (np.array([d[i] for d in cal.decode]) for i in range(3))
    assert [cal.a, cal.b, cal.c] == pytest.approx(fit_nonneg(prefill_x(n), pms).tolist(), rel=1e-9)
    assert [cal.d, cal.e, cal.f] == pytest.approx(fit_nonneg(decode_x(b, ctx), dms).tolist(), rel=1e-9)
    assert (pms > 0).all() and (dms > 0).all()
    assert cal.a + cal.b + cal.c > 0 and cal.d + cal.e + cal.f > 0
    assert [n for n, _ in cal.prefill] == [4, 16, 48] and len(cal.decode) == 4
    assert parse_timing(str(out), 0.0) == TimingModel(a=cal.a, b=cal.b, c=cal.c, d=cal.d, e=cal.e, f=cal.f)
