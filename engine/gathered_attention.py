"""Attention over keys and values gathered into plain tensors: every attention of a CPU rank, and a
CUDA rank's one-token steps where flash-attn's paged kernel cannot run (engine/attention.py holds
the CUDA kernels). Grouped matmuls with an fp32 softmax on a CPU in bf16, torch's SDPA elsewhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def hidden_keys(query_positions: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """[queries, num_keys] True where key position k is masked for the query at position q: k > q
    (causal), or k <= q - window (outside a sliding window, as transformers' sliding_window_overlay)."""
    keys = torch.arange(num_keys, device=query_positions.device)[None, :]
    hidden = keys > query_positions[:, None]
    return hidden if window is None else hidden | (keys <= query_positions[:, None] - window)


def uses_grouped_attention(q: torch.Tensor) -> bool:
    """Attention as grouped matmuls (below) rather than torch's SDPA: on a CPU in bf16, where SDPA's
    one-token path runs 1.5x (batch 1) to 5x (batch 32) slower than two batched matmuls and its
    causal prompt path (the math fallback) 1.6x slower; in fp32 its flash kernel is the faster."""
    return q.device.type == "cpu" and q.dtype != torch.float32


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """softmax(q k^T + mask) v for one-token queries q [B, heads, D] over keys/vals [B, L, kv_heads, D]
    as two batched matmuls, each KV head against its group of query heads, softmax in fp32 (as
    transformers' eager attention)."""
    B, H, D = q.shape
    kv_heads = keys.shape[2]
    scores = torch.matmul(q.view(B, kv_heads, H // kv_heads, D), keys.permute(0, 2, 3, 1)).float() * scale + mask
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, vals.transpose(1, 2)).reshape(B, H, D)


def grouped_causal_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, start: int, scale: float,
                             rows_per_chunk: int = 256, window: int | None = None) -> torch.Tensor:
    """Causal attention of one sequence's new tokens q [n, heads, D] (positions start .. start+n-1)
    over keys/vals [start + n, kv_heads, D], as grouped matmuls with an fp32 softmax; the queries go
    in chunks so the scores stay within rows_per_chunk x heads x context floats. `window`: a
    sliding window (Mistral), else None."""
    n, H, D = q.shape
    kv_heads = keys.shape[1]
    group = H // kv_heads
    keys_t, vals_t = keys.permute(1, 2, 0), vals.transpose(0, 1)  # [kv_heads, D, L], [kv_heads, L, D]
    out = torch.empty_like(q)
    for lo in range(0, n, rows_per_chunk):
        m, seen = min(rows_per_chunk, n - lo), start + min(n, lo + rows_per_chunk)  # keys any row may see
        qg = q[lo:lo + m].view(m, kv_heads, group, D).permute(1, 2, 0, 3).reshape(kv_heads, group * m, D)
        scores = torch.matmul(qg, keys_t[..., :seen]).view(kv_heads, group, m, seen).float()
        ahead = hidden_keys(torch.arange(start + lo, start + lo + m, device=q.device), seen, window)
        mask = torch.zeros(ahead.shape, device=q.device).masked_fill_(ahead, float("-inf"))
        probs = torch.softmax(torch.add(mask, scores, alpha=scale), dim=-1).to(q.dtype)  # mask + scale * scores
        o = torch.matmul(probs.view(kv_heads, group * m, seen), vals_t[:, :seen])
        out[lo:lo + m] = o.view(kv_heads, group, m, D).permute(2, 0, 1, 3).reshape(m, H, D)
    return out


def decode_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One-token queries q [B, heads, D] over gathered keys/vals [B, L, kv_heads, D], `mask` [B, 1, 1, L]
    (-inf past each context); returns [B, heads, D]."""
    if uses_grouped_attention(q):
        return grouped_decode_attention(q, keys, vals, mask, scale)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=mask,
                                       scale=scale, enable_gqa=q.shape[1] != keys.shape[2])
    return o.squeeze(2)


def prompt_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, start: int, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """Causal attention of one sequence's new tokens q [n, heads, D] (positions start .. start+n-1)
    over keys/vals [start + n, kv_heads, D]; returns [n, heads, D]. `window`: a sliding window, else None."""
    if uses_grouped_attention(q):
        return grouped_causal_attention(q, keys, vals, start, scale, window=window)
    n, ctx = q.shape[0], keys.shape[0]
    if start == 0 and (window is None or n <= window):
        mask, causal = None, True
    else:
        mask = ~hidden_keys(torch.arange(start, start + n, device=q.device), ctx, window)
        causal = False
    o = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1), attn_mask=mask,
                                       is_causal=causal, scale=scale, enable_gqa=q.shape[1] != keys.shape[1])
    return o.transpose(0, 1)
