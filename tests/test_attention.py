"""The CUDA prompt attention (engine.attention.prompt_attention: 4-D SDPA, fused-kernel shapes,
GQA by enable_gqa or expanded KV heads, lower-right causal bias for a continued prompt) computes
what the CPU path computes; its math runs on the CPU too, so it is checked here against
engine.gathered_attention's grouped attention (the token-exact CPU path)."""
from __future__ import annotations

import pytest
import torch

from engine.attention import _expand_kv, paged_decode_attention, prompt_attention
from engine.gathered_attention import grouped_causal_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 5])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("window", [None, 3, 9])  # a sliding window (Mistral) inside and beyond the prompt
def test_prompt_attention_matches_the_cpu_path(dtype, start, kv_heads, window):
    torch.manual_seed(start + kv_heads)
    n, heads, dim = 7, 4, 16
    q = torch.randn(n, heads, dim, dtype=dtype)
    keys, vals = (torch.randn(start + n, kv_heads, dim, dtype=dtype) for _ in range(2))
    got = prompt_attention(q, keys, vals, start, dim ** -0.5, window)
    want = grouped_causal_attention(q, keys, vals, start, dim ** -0.5, window=window)
    assert got.shape == (n, heads, dim) and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want.float()).abs().max().item() < tolerance


def test_expanded_kv_heads_sit_next_to_their_query_heads():
    kv = torch.arange(2 * 3 * 1, dtype=torch.float32).view(1, 2, 3, 1)
    assert torch.equal(_expand_kv(kv, 2)[0, :, 0, 0], torch.tensor([0.0, 0.0, 3.0, 3.0]))


def test_paged_decode_kernel_is_skipped_without_flash_attn_a_256_multiple_block_or_with_a_window():
    cache = torch.zeros(4, 16, 2, 8)
    assert paged_decode_attention(torch.zeros(1, 4, 8), cache, cache, torch.zeros(1, 1, dtype=torch.long),
                                  torch.ones(1, dtype=torch.long), 1.0) is None
    big = torch.zeros(1, 256, 2, 8)
    assert paged_decode_attention(torch.zeros(1, 4, 8), big, big, torch.zeros(1, 1, dtype=torch.long),
                                  torch.ones(1, dtype=torch.long), 1.0, window=4) is None
