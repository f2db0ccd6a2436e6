"""Paged KV cache: fixed-size blocks, free-block accounting on the leader, tensors on every rank.

The leader owns the BlockAllocator (engine.blocks, pure Python) and hands block tables to its ranks
in the step plan; every rank of an instance holds the same block ids for its own (layers of its
stage) x (its KV heads).
The cache is one block-major tensor, kv: [num_blocks, K|V, layers, block_size, kv_heads, head_dim],
so a run of consecutive blocks holds a request's K and V of every layer in one piece of memory,
which moves between instances as one message (engine.kv_transfer). k and v are views of it; a
layer's view, k[:, layer], is [num_blocks, block_size, kv_heads, head_dim], whole blocks contiguous.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.kv = torch.zeros((num_blocks, 2, num_layers, block_size, kv_heads, head_dim), dtype=dtype, device=device)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]
        self.block_size = block_size

    def bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
