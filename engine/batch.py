"""Turns a step's sequence chunks into the flat tensors one forward pass needs.

A ragged batch is flat: the new tokens of every sequence concatenated ([T]). Each token gets a
position and a cache slot: (block_table[pos // block_size], pos % block_size).
Sequences with one new token (decode) are attended together over their gathered blocks (padded
to the longest, the padding masked); sequences with several (prefill) one by one. Gathering whole
blocks rather than single slots moves the same bytes in block_size times fewer rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.kv_cache import blocks_for
from engine.step import SeqChunk


@dataclass
class BatchMeta:
    token_ids: torch.Tensor
    positions: torch.Tensor
    slot_blocks: torch.Tensor                  # cache slot of each new token: its block ...
    slot_offsets: torch.Tensor                 # ... and its offset in the block
    cos: torch.Tensor
    sin: torch.Tensor
    logits_rows: torch.Tensor                  # row of each sequence's last token
    block_size: int
    decode_rows: torch.Tensor | None = None    # rows of one-token sequences
    decode_blocks: torch.Tensor | None = None  # [B, n] context blocks, padded with block 0
    decode_mask: torch.Tensor | None = None    # [B, 1, 1, n * block_size] additive: 0 on the context, -inf after
    all_decode: bool = False                   # every row is a one-token sequence, in row order
    extend_segments: list = field(default_factory=list)       # (rows slice, start position)
    extend_context_slots: dict = field(default_factory=dict)  # row start -> context (blocks, offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())


def slots(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slots of a sequence's `positions`, as (blocks, offsets in the block)."""
    return table[positions // block_size], positions % block_size


def build_batch(chunks: list[SeqChunk], block_size: int, cos: torch.Tensor, sin: torch.Tensor) -> BatchMeta:
    ids, positions, last_rows = [], [], []
    slot_blocks, slot_offsets = [], []
    decode_rows, decode_ctx, segments, extend_ctx = [], [], [], {}
    row = 0
    for c in chunks:
        n = len(c.token_ids)
        end = c.start_pos + n
        new = torch.arange(c.start_pos, end)
        table = torch.tensor(c.block_table, dtype=torch.long)
        ids.extend(c.token_ids)
        positions.append(new)
        blocks, offsets = slots(table, new, block_size)
        slot_blocks.append(blocks)
        slot_offsets.append(offsets)
        if n == 1 and c.start_pos > 0:
            decode_rows.append(row)
            decode_ctx.append((c.block_table[:blocks_for(end, block_size)], end))
        else:
            segments.append((slice(row, row + n), c.start_pos))
            if c.start_pos > 0:
                extend_ctx[row] = slots(table, torch.arange(end), block_size)
        row += n
        last_rows.append(row - 1)
    pos = torch.cat(positions)
    meta = BatchMeta(torch.tensor(ids, dtype=torch.long), pos, torch.cat(slot_blocks), torch.cat(slot_offsets),
                     cos.index_select(0, pos), sin.index_select(0, pos),
                     torch.tensor(last_rows, dtype=torch.long), block_size, extend_segments=segments,
                     extend_context_slots=extend_ctx)
    if decode_rows:
        n = max(len(table) for table, _ in decode_ctx)
        blocks = torch.zeros(len(decode_ctx), n, dtype=torch.long)
        mask = torch.full((len(decode_ctx), 1, 1, n * block_size), float("-inf"), dtype=cos.dtype)
        for i, (table, length) in enumerate(decode_ctx):
            blocks[i, :len(table)] = torch.tensor(table, dtype=torch.long)
            mask[i, 0, 0, :length] = 0.0
        meta.decode_rows = torch.tensor(decode_rows, dtype=torch.long)
        meta.decode_blocks, meta.decode_mask = blocks, mask
        meta.all_decode = not segments
    return meta
