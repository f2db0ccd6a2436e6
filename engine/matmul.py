"""Projection weights laid out once for the device's fastest matmul.

On a CPU rank, MKL's gemm on [tokens, K] x [N, K]^T reads the weight in its row-major layout and at
decode batch sizes streams it at 4-10 GB/s (one thread, SmolLM2's matrices; batch 2-8 is slower
than batch 1). oneDNN's linear with the weight reordered once into its blocked layout streams the
same bytes at 11-15 GB/s in fp32 and bf16 alike: 1.3-2x a decode step's matmuls
(`benchmarks/ceilings.py`). So a CPU stage packs every projection after its weights are loaded and
frees the row-major copy (the packed one is the same size). Elsewhere (CUDA, the meta device, a
torch without oneDNN) the weight stays as it is and `F.linear` runs it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN picks its blocked layout for this many input rows; one layout serves every batch size
# (measured at decode batch 1-64: hints 8 and 32 are alike, 1 is slower above batch 2).
PACK_ROWS_HINT = 16
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def packs(weight: torch.Tensor) -> bool:
    """oneDNN packs fp32 on any x86 CPU, bf16 only where it has the instructions (AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT): on an AVX2-only CPU an explicit `model.dtype: bfloat16` keeps F.linear."""
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a [N, K] CPU weight, for `linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)


def prepare(weight: torch.nn.Parameter) -> torch.Tensor:
    """The weight as the matmul runs it: a packed copy on a CPU, after which the parameter's own
    storage is released; the parameter itself elsewhere."""
    if not packs(weight):
        return weight
    packed = pack(weight.detach())
    weight.data = weight.data.new_empty(0)
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for a weight from `prepare`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def nbytes(weight: torch.Tensor) -> int:
    return weight.numel() * weight.element_size()
