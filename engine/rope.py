"""RoPE: the inverse frequencies of each rope type, computed as transformers'
`modeling_rope_utils` computes them (default, linear, llama3, yarn), and the cos/sin tables for every
position, built once per rank (fp32 on the CPU as transformers does, then placed on the rank's device
in the model's dtype), and their application to the query and key heads (rotate-half). `dynamic`
and `longrope` are refused in launcher/model_support.py.
"""
from __future__ import annotations

import math

import torch

from contracts.model_shape import ModelShape


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_attention_factor(rope: dict) -> float:
    """YaRN's cos/sin scale, as transformers derives it when `attention_factor` is not given."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = rope["factor"], rope.get("mscale"), rope.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


def _yarn(theta: float, dim: int, rope: dict) -> torch.Tensor:
    factor, orig = rope["factor"], rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def inv_freq_and_scale(shape: ModelShape) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], the factor cos and sin are multiplied by)."""
    dim, rope, theta = shape.head_dim, shape.rope(), shape.rope_theta
    if shape.rope_type == "linear":
        return _base_inv_freq(theta, dim) / rope["factor"], 1.0
    if shape.rope_type == "llama3":
        return _llama3(_base_inv_freq(theta, dim), rope), 1.0
    if shape.rope_type == "yarn":
        return _yarn(theta, dim, rope), yarn_attention_factor(rope)
    if shape.rope_type != "default":
        raise ValueError(f"rope type {shape.rope_type!r} is not implemented")  # model_support refuses it earlier
    return _base_inv_freq(theta, dim), 1.0


def rope_tables(shape: ModelShape, max_len: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] in transformers' rotate-half convention. A model with learned
    positions (OPT) gets empty [max_len, 0] tables: the batch still indexes them by position."""
    if shape.learned_positions:
        empty = torch.empty((max_len, 0), device=device, dtype=dtype)
        return empty, empty
    inv_freq, scale = inv_freq_and_scale(shape)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(device=device, dtype=dtype), (emb.sin() * scale).to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]. q and k heads go through together."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
