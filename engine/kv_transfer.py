"""Moves a request's KV cache between a prefill and a decode instance with point-to-point ops.

Per (request, peer pair) the data is the rectangle the pair shares (engine.reshard) of the
request's whole blocks, sent as one message per (layer, K|V), in layer order, one tag (the request
id). Each side alone decides where its messages live: when the request's blocks are consecutive
and the pair covers all of this rank's KV heads, a message is a view of the cache itself (no copy);
otherwise it is a slice of a pooled staging buffer that the sender gathers layer by layer while
earlier layers are on the wire, and that the receiver's helper thread scatters layer by layer as
they land. Sends and receives are asynchronous (isend/irecv on the world group: gloo on CPU, NCCL
on GPU, where the helper thread's copies are untested); the decode side keeps stepping while they
are in flight.
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
        self.receiving: dict[int, list] = {}   # req_id -> [(transfer, staging buffer, message, work)]
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

    def _buffer(self, t: Transfer, num_blocks: int) -> torch.Tensor:
        (l0, l1), (h0, h1) = t.rect.layers, t.rect.heads
        return self.pool.take((l1 - l0, 2, num_blocks, self.cache.block_size, h1 - h0, self.shape.head_dim),
                              self.cache.k.dtype, self.cache.k.device)

    def _block_ids(self, block_table: list[int], num_tokens: int) -> list[int]:
        """Whole blocks move (the tail past num_tokens is rewritten by decode before it is read)."""
        return block_table[:blocks_for(num_tokens, self.cache.block_size)]

    def _in_place(self, t: Transfer, ids: list[int]) -> bool:
        """Messages can be views of the cache: consecutive blocks and all of this rank's heads."""
        (h0, h1) = t.rect.heads
        return h1 - h0 == self.cache.k.shape[2] and ids == list(range(ids[0], ids[0] + len(ids)))

    def _messages(self, t: Transfer, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The pair's messages in order ((layer, K), (layer, V), ...), and the staging buffer they
        are slices of (None when they are views of the cache)."""
        layers, _ = self._local(t)
        if self._in_place(t, ids):
            slots = slice(ids[0] * self.cache.block_size, (ids[-1] + 1) * self.cache.block_size)
            return [cache[layer, slots] for layer in range(layers.start, layers.stop)
                    for cache in (self.cache.k, self.cache.v)], None
        buf = self._buffer(t, len(ids))
        return [buf[i, j] for i in range(buf.shape[0]) for j in (0, 1)], buf

    def _copy(self, t: Transfer, buf: torch.Tensor, ids: torch.Tensor, layer: int, to_cache: bool) -> None:
        """Copies one layer (index within the pair's rectangle) of the staging buffer from (sender)
        or into (receiver) this rank's blocks `ids`."""
        layers, heads = self._local(t)
        for i, cache in enumerate((self.cache.k, self.cache.v)):
            part = buf[layer, i]  # [blocks, block_size, pair's heads, head_dim]
            blocks = cache[layers.start + layer].view(-1, self.cache.block_size, *cache.shape[2:])
            whole = part.shape[2] == blocks.shape[2]
            if to_cache:
                if whole:
                    blocks.index_copy_(0, ids, part)
                else:
                    blocks[ids, :, heads] = part
            elif whole:
                torch.index_select(blocks, 0, ids, out=part)
            else:
                part.copy_(blocks.index_select(0, ids)[:, :, heads])

    def post_sends(self, req_id: int, block_table: list[int], num_tokens: int, dst_instance: int) -> None:
        ids = self._block_ids(block_table, num_tokens)
        index = torch.tensor(ids, dtype=torch.long)
        works, buffers = [], []
        for t in self._plan(self.ctx.instance.id, dst_instance):
            if t.src_rank != self.ctx.rank:
                continue
            messages, buf = self._messages(t, ids)
            for i, message in enumerate(messages):
                if buf is not None and i % 2 == 0:  # gather layer i // 2 while earlier ones are sent
                    self._copy(t, buf, index, i // 2, to_cache=False)
                works.append(dist.isend(message, t.dst_rank, tag=req_id))
            if buf is not None:
                buffers.append(buf)
        self.sending[req_id] = (works, buffers)

    def post_recvs(self, req_id: int, block_table: list[int], num_tokens: int, src_instance: int) -> None:
        """Posts every message's receive; a helper thread scatters staged layers as they land."""
        ids = self._block_ids(block_table, num_tokens)
        posted = []  # (transfer, staging buffer or None, message index, work)
        for t in self._plan(src_instance, self.ctx.instance.id):
            if t.dst_rank != self.ctx.rank:
                continue
            messages, buf = self._messages(t, ids)
            posted += [(t, buf, i, dist.irecv(m, t.src_rank, tag=req_id)) for i, m in enumerate(messages)]
        self.receiving[req_id] = posted
        self.waiters[req_id] = self._land(posted, torch.tensor(ids, dtype=torch.long))

    def _land(self, posted: list, ids: torch.Tensor) -> threading.Event:
        """gloo's recv works report completion only through wait(): wait on a helper thread (which
        releases the GIL) and scatter each staged layer once its K and V landed, so the rank keeps
        stepping."""
        done = threading.Event()

        def land_all():
            for t, buf, i, work in posted:
                work.wait()
                if buf is not None and i % 2 == 1:
                    self._copy(t, buf, ids, i // 2, to_cache=True)
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
        posted = self.receiving.pop(req_id)
        for buf in {id(buf): buf for _, buf, _, _ in posted if buf is not None}.values():
            self.pool.give(buf)
        self.reported.discard(req_id)

    def release(self, req_id: int) -> None:
        works, buffers = self.sending.pop(req_id, ([], []))
        for work in works:
            work.wait()
        for buf in buffers:
            self.pool.give(buf)
