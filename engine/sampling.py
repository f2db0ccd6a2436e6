"""Next-token choice: greedy, or temperature / top-k / top-p sampling.

Sampled tokens draw from a generator seeded by (request seed, token index), so a request gives
the same output whichever instance, layout or batch produces each of its tokens. The sampled rows
are shaped and drawn together on the logits' device (their parameters and uniform numbers cross
to it in one copy) and the step's tokens come back to the host in one copy.
"""
from __future__ import annotations

import torch

from contracts.sampling_params import SamplingParams


def _uniform(params: SamplingParams, index: int) -> float:
    """The one uniform number of a draw, from a CPU generator seeded by (seed, token index): a CPU
    generator cannot drive CUDA's multinomial, and this way a request draws the same number on
    any device, instance, layout or batch."""
    gen = torch.Generator().manual_seed((params.seed * 1_000_003 + index) & 0x7FFFFFFFFFFFFFFF)
    return torch.rand((), generator=gen, dtype=torch.float64).item()


def _draw(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> torch.Tensor:
    """One sampled token id per row of logits [R, vocab] (a tensor on the logits' device): top-k
    keeps the k largest (k = 0: all), top-p the smallest set of most likely tokens reaching p."""
    vocab = logits.shape[-1]
    per_row = torch.tensor([[p.temperature, p.top_k, p.top_p, _uniform(p, i)] for p, i in zip(params, indices)],
                           dtype=torch.float64, device=logits.device)
    temperature, top_k, top_p, u = per_row.unbind(1)
    scaled = logits.float() / temperature.float()[:, None]
    k = top_k.long().clamp(min=0, max=vocab)
    kth = torch.sort(scaled, dim=-1, descending=True).values.gather(1, (k.clamp(min=1) - 1)[:, None])
    kth = kth.masked_fill(k[:, None] == 0, float("-inf"))
    probs = torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p.float()[:, None]) & (top_p < 1.0)[:, None]
    probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0))
    cdf = torch.cumsum(probs.double(), dim=-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=vocab - 1)


def choose(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> torch.Tensor:
    """logits: [B, vocab] (full vocabulary); one token id per row, on the logits' device."""
    chosen = logits.argmax(dim=-1)
    rows = [r for r, p in enumerate(params) if p.temperature != 0]
    if rows:
        picked = torch.tensor(rows, dtype=torch.long, device=logits.device)
        chosen.index_copy_(0, picked, _draw(logits.index_select(0, picked), [params[r] for r in rows],
                                            [indices[r] for r in rows]))
    return chosen


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """`choose`, read back to the host in one copy."""
    return choose(logits, params, indices).tolist()
