"""Turns a step's sequence chunks into the flat tensors one forward pass needs.

A ragged batch is flat: the new tokens of every sequence concatenated ([T]). Each token gets a
position and a cache slot: (block_table[pos // block_size], pos % block_size).
Sequences with one new token (decode) are attended together over their gathered blocks (padded
to the longest, the padding masked); sequences with several (prefill) one by one. Gathering whole
blocks rather than single slots moves the same bytes in block_size times fewer rows.
The index lists are built in Python and become tensors on the device of the rope tables (the
rank's device) together, in one copy from one host buffer (`to_device`): nothing built on the CPU
meets a CUDA tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from contracts.protocol import SeqChunk
from engine.blocks import blocks_for


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
    decode_mask: torch.Tensor | None = None    # [B, 1, 1, n * block_size] additive: 0 on the context, -inf elsewhere
    decode_lengths: torch.Tensor | None = None  # [B] context tokens of each one-token sequence, the new one included
    all_decode: bool = False                   # every row is a one-token sequence, in row order
    extend_segments: list = field(default_factory=list)       # (rows slice, start position)
    extend_context_slots: dict = field(default_factory=dict)  # row start -> context (blocks, offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())


def slot_blocks(block_table: tuple[int, ...], start: int, end: int, block_size: int) -> list[int]:
    """The cache block of each position in [start, end) (its offset in the block: pos % block_size)."""
    return [block_table[p // block_size] for p in range(start, end)]


def to_device(lists: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Integer lists as 1-D int64 tensors on `device`, in one host-to-device copy: one flat host
    buffer (pinned on CUDA, from torch's caching host allocator, so the copy is asynchronous and
    the buffer is not reused before it ends), split into views on the device."""
    flat = torch.tensor([v for values in lists for v in values], dtype=torch.long,
                        pin_memory=device.type == "cuda")
    return list(flat.to(device, non_blocking=True).split([len(values) for values in lists]))


def build_batch(chunks: list[SeqChunk], block_size: int, cos: torch.Tensor, sin: torch.Tensor,
                window: int | None = None) -> BatchMeta:
    """`window`: the model's sliding window (a decode token sees its last `window` positions), or None."""
    dev = cos.device
    ids, positions, last_rows, tables = [], [], [], []
    decode_rows, decode_ctx, segments, extend_ctx = [], [], [], {}
    row = 0
    for c in chunks:
        n = len(c.token_ids)
        end = c.start_pos + n
        ids.extend(c.token_ids)
        positions.extend(range(c.start_pos, end))
        tables.extend(slot_blocks(c.block_table, c.start_pos, end, block_size))
        if n == 1 and c.start_pos > 0:
            decode_rows.append(row)
            decode_ctx.append((c.block_table[:blocks_for(end, block_size)], end))
        else:
            segments.append((slice(row, row + n), c.start_pos))
            if c.start_pos > 0:
                extend_ctx[row] = slot_blocks(c.block_table, 0, end, block_size)
        row += n
        last_rows.append(row - 1)
    width = max((len(table) for table, _ in decode_ctx), default=0)
    padded = [v for table, _ in decode_ctx for v in (*table, *[0] * (width - len(table)))]
    ids_t, pos, tables_t, last_t, rows_t, blocks, lengths, *context = to_device(
        [ids, positions, tables, last_rows, decode_rows, padded, [length for _, length in decode_ctx],
         *extend_ctx.values()], dev)
    extend_slots = {r: (blocks_of, torch.arange(len(blocks_of), device=dev) % block_size)
                    for r, blocks_of in zip(extend_ctx, context)}
    meta = BatchMeta(ids_t, pos, tables_t, pos % block_size, cos.index_select(0, pos),
                     sin.index_select(0, pos), last_t, block_size, extend_segments=segments,
                     extend_context_slots=extend_slots)
    if decode_rows:
        keys = torch.arange(width * block_size, device=dev)[None, :]
        visible = keys < lengths[:, None]
        if window is not None:
            visible &= keys >= lengths[:, None] - window
        mask = torch.zeros(visible.shape, dtype=cos.dtype, device=dev).masked_fill_(~visible, float("-inf"))
        meta.decode_rows = rows_t
        meta.decode_blocks = blocks.view(len(decode_ctx), width)
        meta.decode_mask = mask.view(len(decode_ctx), 1, 1, width * block_size)
        meta.decode_lengths = lengths
        meta.all_decode = not segments
    return meta
