"""The sampler draws from the right distribution on every path: plain, top_k, top_p in the top
1,024 candidates, and top_p wider than that (the full-sort fallback)."""

from __future__ import annotations

import pytest
import torch

from workers.engine.sampler import NUCLEUS_CANDIDATES, Sampler
from workers.engine.sequence import SamplingParams

pytestmark = pytest.mark.unit

PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])


def frequencies(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    sampler = Sampler()
    ids = [sampler.sample(logits[None], ["r"], [params])[0].token_id for _ in range(n)]
    return torch.bincount(torch.tensor(ids), minlength=logits.shape[0]).double() / n


@pytest.mark.parametrize(
    ("params", "want"),
    [
        (SamplingParams(seed=1), PROBS),
        (SamplingParams(temperature=0.5, seed=2), PROBS**2 / (PROBS**2).sum()),
        (SamplingParams(top_k=2, seed=3), torch.tensor([4 / 7, 3 / 7, 0, 0])),
        (SamplingParams(top_p=0.65, seed=4), torch.tensor([4 / 7, 3 / 7, 0, 0])),
    ],
    ids=["plain", "temperature", "top_k", "top_p"],
)
def test_draws_follow_the_distribution(params: SamplingParams, want: torch.Tensor) -> None:
    # NOTE: 4,000 draws: each frequency's standard error is at most 0.008; 0.035 is > 4 of them
    got = frequencies(PROBS.log(), params, 4000)
    torch.testing.assert_close(got, want.double(), rtol=0, atol=0.035)


def test_a_nucleus_wider_than_the_candidates_falls_back_to_the_whole_row() -> None:
    vocab = 4 * NUCLEUS_CANDIDATES
    logits = torch.linspace(0.0, -1.0, vocab)  # NOTE: nearly flat: half the mass needs ~1,800 tokens
    params = SamplingParams(top_p=0.5, seed=5)
    sampler = Sampler()
    ids = torch.tensor([sampler.sample(logits[None], ["r"], [params])[0].token_id for _ in range(400)])
    mass = logits.softmax(0).cumsum(0)
    nucleus = int((mass - logits.softmax(0) < 0.5).sum())
    assert nucleus > NUCLEUS_CANDIDATES
    assert int(ids.max()) < nucleus and int((ids >= NUCLEUS_CANDIDATES).sum()) > 50


def test_a_narrow_nucleus_in_a_large_vocabulary_stays_in_it() -> None:
    logits = torch.full((49152,), -20.0)
    logits[[7, 700, 7000]] = torch.tensor([3.0, 2.0, 1.0])
    got = {
        Sampler().sample(logits[None], ["r"], [SamplingParams(top_p=0.8, seed=s)])[0].token_id
        for s in range(60)
    }
    assert got == {7, 700}


def test_the_nucleus_is_measured_against_the_whole_vocabulary() -> None:
    """The top 1,024 hold ~92.5% of the mass here; renormalising them would drop token 2."""
    vocab = 4 * NUCLEUS_CANDIDATES
    probs = torch.full((vocab,), 0.1 / (vocab - 3))
    probs[:3] = torch.tensor([0.5, 0.3, 0.1])
    params = SamplingParams(top_p=0.85, seed=6)
    got = frequencies(probs.log(), params, 900)
    assert set(got.nonzero().view(-1).tolist()) == {0, 1, 2}
    torch.testing.assert_close(
        got[:3], torch.tensor([5 / 9, 3 / 9, 1 / 9], dtype=got.dtype), rtol=0, atol=0.06
    )
