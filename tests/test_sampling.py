"""Sampling: greedy, top-k/top-p limits, and seeds that make a request's draws independent of batching."""
from __future__ import annotations

import torch

from contracts.sampling_params import SamplingParams
from engine.sampling import sample


def test_greedy_and_degenerate_limits_pick_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams()] * 4, [0] * 4) == best
    assert sample(logits, [SamplingParams(temperature=1.0, top_k=1, seed=3)] * 4, [0] * 4) == best
    assert sample(logits, [SamplingParams(temperature=1.0, top_p=1e-6, seed=3)] * 4, [0] * 4) == best


def test_seeded_draws_do_not_depend_on_the_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=i) for i in range(6)]
    together = sample(logits, params, list(range(6)))
    alone = [sample(logits[i:i + 1], [params[i]], [i])[0] for i in range(6)]
    assert together == alone
    again = sample(logits, params, list(range(6)))
    assert again == together


def test_top_k_and_top_p_only_draw_from_the_allowed_set():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    draws = {sample(logits, [SamplingParams(temperature=1.0, top_k=2, seed=s)], [0])[0] for s in range(200)}
    assert draws == {0, 1}
    probs = torch.softmax(logits, -1)[0]  # ~0.665, 0.245, 0.090
    draws = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.8, seed=s)], [0])[0] for s in range(200)}
    assert draws == {0, 1} and probs[0] < 0.8 < probs[0] + probs[1]
