"""Next-token choice: greedy, or temperature / top-k / top-p sampling.

Sampled tokens draw from a generator seeded by (request seed, token index), so a request gives
the same output whichever instance, layout or batch produces each of its tokens.
"""
from __future__ import annotations

import torch

from engine.step import SamplingParams


def _sample_one(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
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
    return int(torch.multinomial(probs, 1, generator=gen))


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """logits: [B, vocab] (full vocabulary); one token per row."""
    greedy = logits.argmax(dim=-1).tolist()
    return [g if p.temperature == 0 else _sample_one(row, p, i)
            for g, row, p, i in zip(greedy, logits, params, indices)]
