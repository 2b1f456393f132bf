"""Turns last-token logits into next tokens per request: grammar mask, greedy, temperature, top-k, top-p,
seed, logprobs."""
from __future__ import annotations

import torch

from hybridserve.engine.guided import TokenMasker
from hybridserve.engine.outputs import TokenLogprob


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.masker: TokenMasker | None = None  # made at the first guided row

    @property
    def mask_seconds(self) -> float:
        return self.masker.seconds if self.masker is not None else 0.0

    def __call__(self, logits: torch.Tensor, seqs) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [S, V] fp32 (any device) → one token id and optional logprob record per sequence."""
        logits = logits.float()
        guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if guided:
            # on the logits' device, before any choice and before logprobs: like vLLM, a guided
            # request's logprobs are those of the masked distribution (forbidden tokens at -inf)
            self.masker = self.masker or TokenMasker()
            self.masker.apply(logits, guided, [seqs[i].matcher for i in guided])
        logits = logits.cpu()
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        for i in sampled:
            tokens[i] = self._sample_row(logits[i], seqs[i])
        token_list = tokens.tolist()
        want = [s.params.logprobs is not None for s in seqs]
        records: list[TokenLogprob | None] = [None] * len(seqs)
        if any(want):
            logp = torch.log_softmax(logits, dim=-1)
            for i, s in enumerate(seqs):
                if want[i]:
                    records[i] = _record(logp[i], token_list[i], s.params.logprobs)
        return token_list, records

    def _sample_row(self, row: torch.Tensor, seq) -> int:
        p = seq.params
        row = row / max(p.temperature, 1e-5)
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        gen = seq.generator or self.generator
        return int(torch.multinomial(probs, 1, generator=gen).item())


# A token a grammar forbids has logprob -inf, which JSON cannot carry; like vLLM, report it as this.
MIN_LOGPROB = -9999.0


def _record(logp_row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, ids = torch.topk(logp_row, k)
        top = list(zip(ids.tolist(), vals.clamp(min=MIN_LOGPROB).tolist()))
    return TokenLogprob(token_id=token, logprob=max(float(logp_row[token]), MIN_LOGPROB), top=top)
