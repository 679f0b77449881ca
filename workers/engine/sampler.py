"""Next-token choice from the last-position logits: greedy rows in one argmax, the rest one by one.

Sampled rows apply temperature -> top_k -> top_p, then draw (inverse CDF: one uniform number, a
cumsum and a binary search; no full sort of the vocabulary unless top_p needs it) from a
per-request generator when the request has a seed (created on first use, so the same prompt and
seed give the same tokens whatever shares the batch) or from the global RNG otherwise. Logprobs
are taken from the model's own distribution (log_softmax of the raw logits, before
temperature), as OpenAI reports.
"""

from __future__ import annotations

import torch

from workers.engine.sequence import SampledToken, SamplingParams


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def free(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> list[SampledToken]:
        """logits: [rows, vocab] (any float dtype); one SampledToken per row."""
        logits = logits.float()
        token_ids = logits.argmax(dim=-1).tolist()
        for i, p in enumerate(params):
            if not p.greedy:
                token_ids[i] = self._draw(logits[i], p, self._generator(request_ids[i], p, logits.device))
        out = [SampledToken(t) for t in token_ids]
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if rows:
            self._add_logprobs(logits[rows], [out[i] for i in rows], [params[i] for i in rows])
        return out

    def _generator(self, request_id: str, p: SamplingParams, device: torch.device) -> torch.Generator | None:
        if p.seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = self._generators[request_id] = torch.Generator(device=device)
            gen.manual_seed(p.seed)
        return gen

    @staticmethod
    def _draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
        row = row / p.temperature
        ids = None
        if 0 < p.top_k < row.shape[0]:
            values, ids = row.topk(p.top_k)
            probs = values.softmax(dim=-1)  # NOTE: top_p then applies within the top k, renormalised
        elif p.top_p < 1.0:
            probs, ids = _nucleus_candidates(row, p.top_p)
        else:
            probs = row.softmax(dim=-1)
        if p.top_p < 1.0:
            # NOTE: keep the smallest best-first prefix whose mass reaches top_p (always >= 1 token).
            probs = probs[: int(((probs.cumsum(dim=-1) - probs) < p.top_p).sum())]
        choice = _inverse_cdf(probs, gen)
        return choice if ids is None else int(ids[choice])

    @staticmethod
    def _add_logprobs(logits: torch.Tensor, tokens: list[SampledToken], params: list[SamplingParams]) -> None:
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.gather(1, torch.tensor([[t.token_id] for t in tokens], device=logits.device))
        for lp, t in zip(chosen.view(-1).tolist(), tokens, strict=True):
            t.logprob = lp
        k = max(p.logprobs or 0 for p in params)
        if k == 0:
            return
        top_values, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        for t, p, vals, ids in zip(tokens, params, top_values.tolist(), top_ids.tolist(), strict=True):
            if p.logprobs:
                t.top_logprobs = list(zip(ids[: p.logprobs], vals[: p.logprobs], strict=True))


NUCLEUS_CANDIDATES = 1024  # top_p looks here first: one full sort of SmolLM2's vocabulary is ~4.4 ms


def _nucleus_candidates(row: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first probabilities (of the whole row, not renormalised) and ids of the logits that
    can hold the top_p nucleus: the top 1,024 when their mass reaches top_p (the usual case,
    ~0.1 ms), else the whole row sorted."""
    log_total = torch.logsumexp(row, 0)
    if row.shape[0] > NUCLEUS_CANDIDATES:
        values, ids = row.topk(NUCLEUS_CANDIDATES)
        probs = (values - log_total).exp()
        if float(probs.sum()) >= top_p:
            return probs, ids
    values, ids = row.sort(descending=True)
    return (values - log_total).exp(), ids


def _inverse_cdf(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    """One draw from `probs` (not necessarily normalised) with one uniform number: a cumsum and a
    binary search, ~10x cheaper than torch.multinomial over a 49,152-token vocabulary."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(1, generator=gen, device=probs.device, dtype=cdf.dtype) * cdf[-1]
    choice = int(torch.searchsorted(cdf, u, right=True))
    if choice >= probs.shape[0]:  # NOTE: u rounded up to the total: take the last token with mass
        choice = int(probs.nonzero()[-1])
    return choice
