"""Turns a step's sequence chunks into the flat tensors one forward pass needs.

A ragged batch is flat: the new tokens of every sequence concatenated ([T]). Each token gets a
position and a cache slot (block_table[pos // block_size] * block_size + pos % block_size).
Sequences with one new token (decode) are attended together over padded gathered contexts;
sequences with several (prefill) one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.step import SeqChunk


@dataclass
class BatchMeta:
    token_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    logits_rows: torch.Tensor                  # row of each sequence's last token
    decode_rows: torch.Tensor | None = None    # rows of one-token sequences
    decode_slots: torch.Tensor | None = None   # [B, L] context slots, padded with slot 0
    decode_mask: torch.Tensor | None = None    # [B, 1, 1, L] True where a slot is real
    extend_segments: list = field(default_factory=list)       # (rows slice, start position)
    extend_context_slots: dict = field(default_factory=dict)  # row start -> context slots

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())


def context_slots(block_table: list[int], length: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions [0, length) of a sequence."""
    pos = torch.arange(length)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def build_batch(chunks: list[SeqChunk], block_size: int, cos: torch.Tensor, sin: torch.Tensor) -> BatchMeta:
    ids, positions, slots, last_rows = [], [], [], []
    decode_rows, decode_ctx, segments, extend_ctx = [], [], [], {}
    row = 0
    for c in chunks:
        n = len(c.token_ids)
        end = c.start_pos + n
        ctx = context_slots(c.block_table, end, block_size)
        ids.extend(c.token_ids)
        positions.append(torch.arange(c.start_pos, end))
        slots.append(ctx[c.start_pos:])
        if n == 1 and c.start_pos > 0:
            decode_rows.append(row)
            decode_ctx.append(ctx)
        else:
            segments.append((slice(row, row + n), c.start_pos))
            if c.start_pos > 0:
                extend_ctx[row] = ctx
        row += n
        last_rows.append(row - 1)
    pos = torch.cat(positions)
    meta = BatchMeta(torch.tensor(ids, dtype=torch.long), pos, torch.cat(slots),
                     cos.index_select(0, pos), sin.index_select(0, pos),
                     torch.tensor(last_rows, dtype=torch.long), extend_segments=segments,
                     extend_context_slots=extend_ctx)
    if decode_rows:
        L = max(int(x.numel()) for x in decode_ctx)
        padded = torch.zeros(len(decode_ctx), L, dtype=torch.long)
        mask = torch.zeros(len(decode_ctx), 1, 1, L, dtype=torch.bool)
        for i, ctx in enumerate(decode_ctx):
            padded[i, :ctx.numel()] = ctx
            mask[i, 0, 0, :ctx.numel()] = True
        meta.decode_rows = torch.tensor(decode_rows, dtype=torch.long)
        meta.decode_slots, meta.decode_mask = padded, mask
    return meta
