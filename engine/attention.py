"""Attention kernels for CUDA ranks (never run on a GPU here: README, "What has run where").

Prompts go through SDPA with 4-D [1, heads, n, head_dim] tensors, the shape its fused kernels
(flash, memory-efficient) take, so no fp32 [heads, n, n] score matrix is built: a fresh prompt
with is_causal (flash or memory-efficient kernel); a prompt continuing a cached context with a
boolean [n, context] mask, broadcast over heads (the memory-efficient kernel takes masks; torch's
lower-right CausalBias would reach flash too, but as a tensor subclass it cannot be traced on the
meta device, tests/test_device_placement.py). GQA: SDPA's enable_gqa where its flash kernel runs
(fp16/bf16, plain causal); elsewhere the KV heads are expanded to the query heads (the
memory-efficient kernel has no GQA), which costs n x heads x head_dim, never n^2.

One-token steps read the paged cache in place with flash-attn's flash_attn_with_kvcache where the
package is installed and the block size is a multiple of 256 (its paged-KV requirement); otherwise
`paged_decode_attention` returns None and the caller gathers blocks as on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: pip install flash-attn (CUDA only)
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - not installable without CUDA
    flash_attn_with_kvcache = None

FLASH_PAGE_MULTIPLE = 256
HALF = (torch.float16, torch.bfloat16)


def on_cuda(t: torch.Tensor) -> bool:
    """Whether attention on `t` takes this module's kernels (the CPU keeps engine.model's)."""
    return t.device.type == "cuda"


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[n, heads, D] -> [1, heads, n, D] (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[1, kv_heads, L, D] -> [1, kv_heads * group, L, D], each KV head next to its query heads."""
    _, kv, length, dim = x.shape
    return x[:, :, None].expand(1, kv, group, length, dim).reshape(1, kv * group, length, dim)


def prompt_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, start: int, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """Causal attention of one sequence's new tokens q [n, heads, D] (positions start ..
    start+n-1) over keys/vals [start + n, kv_heads, D]; returns [n, heads, D]. `window`: a sliding
    window (a query sees its last `window` positions), else None."""
    n, heads, _ = q.shape
    group = heads // keys.shape[1]
    qs, ks, vs = _heads_first(q), _heads_first(keys), _heads_first(vals)
    plain_causal = start == 0 and (window is None or n <= window)
    gqa = group > 1 and plain_causal and q.dtype in HALF
    if group > 1 and not gqa:
        ks, vs = _expand_kv(ks, group), _expand_kv(vs, group)
    if plain_causal:
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
    else:  # row i sees keys [0, start + i] (and within the window): a boolean [n, start + n] mask, over heads
        seen = torch.ones(n, keys.shape[0], dtype=torch.bool, device=q.device).tril_(start)
        if window is not None:
            seen.triu_(start - window + 1)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seen, scale=scale)
    return o[0].transpose(0, 1)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           lengths: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor | None:
    """One new token per sequence, q [B, heads, D], over its context in the paged cache (k_cache,
    v_cache: [num_blocks, block_size, kv_heads, D], the new token's K/V already written; block_table
    [B, n]; lengths [B] tokens including the new one), read in place by flash-attn; None where
    flash-attn is missing, the block size is not a multiple of 256, or a sliding window applies (the
    gather path masks it)."""
    if flash_attn_with_kvcache is None or k_cache.shape[1] % FLASH_PAGE_MULTIPLE or window is not None:
        return None
    out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=lengths.to(torch.int32),
                                  block_table=block_table.to(torch.int32), softmax_scale=scale, causal=True)
    return out.squeeze(1)
