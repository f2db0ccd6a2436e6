"""Next-token choice: greedy, or temperature / top-k / top-p sampling.

Sampled tokens draw from a generator seeded by (request seed, token index), so a request gives
the same output whichever instance, layout or batch produces each of its tokens.
"""
from __future__ import annotations

import torch

from launcher.protocol import SamplingParams


def _draw(logits: torch.Tensor, params: SamplingParams, index: int) -> torch.Tensor:
    """One sampled token id (a 0-dim tensor on the logits' device): the distribution is shaped on
    the device; the one uniform number comes from a CPU generator seeded by (seed, token index)
    and crosses to the device as a scalar (a CPU generator cannot drive CUDA's multinomial), so a
    request draws the same token on any device, instance, layout or batch."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator().manual_seed((params.seed * 1_000_003 + index) & 0x7FFFFFFFFFFFFFFF)
    u = torch.rand((), generator=gen, dtype=torch.float64).to(probs.device)
    cdf = torch.cumsum(probs.double(), dim=-1)
    return torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True)[0].clamp(max=probs.numel() - 1)


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """logits: [B, vocab] (full vocabulary); one token per row, read back to the host once."""
    chosen = logits.argmax(dim=-1)
    for row, (p, i) in enumerate(zip(params, indices)):
        if p.temperature != 0:
            chosen[row] = _draw(logits[row], p, i)
    return chosen.tolist()
