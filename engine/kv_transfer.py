"""Moves a request's KV cache between a prefill and a decode instance with point-to-point ops.

One contiguous buffer per (request, peer pair): [layers, k|v, blocks, block_size, heads, head_dim]
of the rectangle the pair shares (engine.reshard), gathered and scattered a whole block at a time.
The buffer travels as a few messages of consecutive layers (about CHUNK_BYTES each, in order, one
tag), so copying and sending overlap: the sender gathers chunk i+1 while chunk i is on the wire,
and the receiver's helper thread scatters chunk i into the request's blocks (allocated when the
pull was posted) while chunk i+1 arrives. Sends and receives are asynchronous (isend/irecv on the
world group: gloo on CPU, NCCL on GPU, where the helper thread's copies are untested) and tagged
with the request id; the decode side keeps stepping while they are in flight.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.distributed as dist

from engine.comm import RankContext
from engine.kv_cache import KVCache, blocks_for
from engine.reshard import Transfer, transfer_plan
from launcher.model_files import ModelShape

CHUNK_BYTES = 4 << 20
POOL_BYTES = 256 << 20


class StagingPool:
    """Reused transfer buffers: on the CPU a fresh 100 MB buffer costs about as much in page faults
    as the copy into it. Free buffers are kept up to POOL_BYTES (bounded memory)."""

    def __init__(self, limit_bytes: int = POOL_BYTES):
        self.limit = limit_bytes
        self.free: list[torch.Tensor] = []
        self.lent: dict[int, torch.Tensor] = {}  # id(view handed out) -> its flat buffer

    def take(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        fits = [i for i, b in enumerate(self.free)
                if numel <= b.numel() <= 2 * numel and b.dtype == dtype and b.device == device]
        if fits:
            flat = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        else:
            flat = torch.empty(1 << max(numel - 1, 1).bit_length(), dtype=dtype, device=device)
        view = flat[:numel].view(shape)
        self.lent[id(view)] = flat
        return view

    def give(self, buf: torch.Tensor) -> None:
        self.free.append(self.lent.pop(id(buf)))
        while sum(b.numel() * b.element_size() for b in self.free) > self.limit:
            self.free.pop(max(range(len(self.free)), key=lambda i: self.free[i].numel()))


class KVTransfer:
    def __init__(self, ctx: RankContext, cache: KVCache, shape: ModelShape, layer_offset: int, head_offset: int):
        self.ctx, self.cache, self.shape = ctx, cache, shape
        self.layer_offset, self.head_offset = layer_offset, head_offset
        self.sending: dict[int, tuple] = {}    # req_id -> ([work], [buffer])
        self.receiving: dict[int, list] = {}   # req_id -> [(transfer, buffer, layer chunk, work)]
        self.waiters: dict[int, threading.Event] = {}
        self.reported: set[int] = set()
        self.pool = StagingPool()

    def _plan(self, src_id: int, dst_id: int) -> list[Transfer]:
        insts = self.ctx.plan.instances
        return transfer_plan(insts[src_id], insts[dst_id], self.shape.num_layers, self.shape.num_kv_heads)

    def _local(self, t: Transfer) -> tuple[slice, slice]:
        (l0, l1), (h0, h1) = t.rect.layers, t.rect.heads
        return (slice(l0 - self.layer_offset, l1 - self.layer_offset),
                slice(h0 - self.head_offset, h1 - self.head_offset))

    def _blocks(self, cache: torch.Tensor, layers: slice) -> torch.Tensor:
        """[layers, blocks, block_size, heads, head_dim] view of a cache tensor."""
        part = cache[layers]
        return part.view(part.shape[0], -1, self.cache.block_size, *part.shape[2:])

    def _buffer(self, t: Transfer, num_blocks: int) -> torch.Tensor:
        (l0, l1), (h0, h1) = t.rect.layers, t.rect.heads
        return self.pool.take((l1 - l0, 2, num_blocks, self.cache.block_size, h1 - h0, self.shape.head_dim),
                              self.cache.k.dtype, self.cache.k.device)

    @staticmethod
    def _chunks(buf: torch.Tensor) -> list[tuple[int, int]]:
        """Ranges of consecutive layers of about CHUNK_BYTES each (at least one layer)."""
        per_layer = buf[0].numel() * buf.element_size()
        step = max(1, CHUNK_BYTES // max(per_layer, 1))
        return [(i, min(i + step, buf.shape[0])) for i in range(0, buf.shape[0], step)]

    def _block_ids(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Whole blocks move (the tail past num_tokens is rewritten by decode before it is read)."""
        return torch.tensor(block_table[:blocks_for(num_tokens, self.cache.block_size)], dtype=torch.long)

    def _copy(self, t: Transfer, buf: torch.Tensor, ids: torch.Tensor, chunk: tuple[int, int], to_cache: bool) -> None:
        """Copies layers chunk of the buffer from (sender) or into (receiver) this rank's blocks `ids`."""
        layers, heads = self._local(t)
        a, b = chunk
        layers = slice(layers.start + a, layers.start + b)
        part = buf[a:b]
        for i, cache in enumerate((self.cache.k, self.cache.v)):
            blocks = self._blocks(cache, layers)
            whole = part.shape[4] == blocks.shape[3]  # all of this rank's heads: no head slicing
            if to_cache:
                if whole:
                    blocks.index_copy_(1, ids, part[:, i])
                else:
                    blocks[:, ids, :, heads] = part[:, i]
            elif whole:
                torch.index_select(blocks, 1, ids, out=part[:, i])
            else:
                part[:, i].copy_(blocks.index_select(1, ids)[:, :, :, heads])

    def post_sends(self, req_id: int, block_table: list[int], num_tokens: int, dst_instance: int) -> None:
        ids = self._block_ids(block_table, num_tokens)
        works, buffers = [], []
        for t in self._plan(self.ctx.instance.id, dst_instance):
            if t.src_rank != self.ctx.rank:
                continue
            buf = self._buffer(t, ids.numel())
            for a, b in self._chunks(buf):
                self._copy(t, buf, ids, (a, b), to_cache=False)
                works.append(dist.isend(buf[a:b], t.dst_rank, tag=req_id))
            buffers.append(buf)
        self.sending[req_id] = (works, buffers)

    def post_recvs(self, req_id: int, block_table: list[int], num_tokens: int, src_instance: int) -> None:
        """Posts every chunk's receive; a helper thread scatters chunks into `block_table` as they land."""
        ids = self._block_ids(block_table, num_tokens)
        chunks = []
        for t in self._plan(src_instance, self.ctx.instance.id):
            if t.dst_rank != self.ctx.rank:
                continue
            buf = self._buffer(t, ids.numel())
            for chunk in self._chunks(buf):
                a, b = chunk
                chunks.append((t, buf, chunk, dist.irecv(buf[a:b], t.src_rank, tag=req_id)))
        self.receiving[req_id] = chunks
        self.waiters[req_id] = self._land(chunks, ids)

    def _land(self, chunks: list, ids: torch.Tensor) -> threading.Event:
        """gloo's recv works report completion only through wait(): wait on a helper thread (which
        releases the GIL) and scatter each chunk as it completes, so the rank keeps stepping."""
        done = threading.Event()

        def land_all():
            for t, buf, chunk, work in chunks:
                work.wait()
                self._copy(t, buf, ids, chunk, to_cache=True)
            done.set()

        threading.Thread(target=land_all, daemon=True).start()
        return done

    def newly_arrived(self) -> list[int]:
        """Requests whose KV landed in this rank's blocks since the last call."""
        done = [r for r, event in self.waiters.items() if r not in self.reported and event.is_set()]
        self.reported.update(done)
        return done

    def join(self, req_id: int) -> None:
        """The request's KV is in this rank's blocks once its helper thread is done."""
        self.waiters.pop(req_id).wait()
        chunks = self.receiving.pop(req_id)
        for buf in {id(buf): buf for _, buf, _, _ in chunks}.values():
            self.pool.give(buf)
        self.reported.discard(req_id)

    def release(self, req_id: int) -> None:
        works, buffers = self.sending.pop(req_id, ([], []))
        for work in works:
            work.wait()
        for buf in buffers:
            self.pool.give(buf)
