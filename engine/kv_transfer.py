"""Moves a request's KV cache between a prefill and a decode instance with point-to-point ops.

One contiguous buffer per (request, peer pair): [k|v, layers, blocks, block_size, heads, head_dim]
of the rectangle the pair shares (engine.reshard), gathered and scattered a whole block at a time. Sends and receives are asynchronous (isend/irecv on
the world group: gloo on CPU, NCCL on GPU) and tagged with the request id. The decode side keeps
stepping while receives are in flight and copies the buffers into its blocks when all arrived.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from engine.comm import RankContext
from engine.kv_cache import KVCache, blocks_for
from engine.reshard import Transfer, transfer_plan
from launcher.model_files import ModelShape


class KVTransfer:
    def __init__(self, ctx: RankContext, cache: KVCache, shape: ModelShape, layer_offset: int, head_offset: int):
        self.ctx, self.cache, self.shape = ctx, cache, shape
        self.layer_offset, self.head_offset = layer_offset, head_offset
        self.sending: dict[int, list] = {}     # req_id -> [(work, buffer)]
        self.receiving: dict[int, list] = {}   # req_id -> [(transfer, work, buffer)]
        self.waiters: dict[int, threading.Event] = {}
        self.reported: set[int] = set()

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
        return torch.empty((2, l1 - l0, num_blocks, self.cache.block_size, h1 - h0, self.shape.head_dim),
                           dtype=self.cache.k.dtype, device=self.cache.k.device)

    def _block_ids(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Whole blocks move (the tail past num_tokens is rewritten by decode before it is read)."""
        return torch.tensor(block_table[:blocks_for(num_tokens, self.cache.block_size)], dtype=torch.long)

    def post_sends(self, req_id: int, block_table: list[int], num_tokens: int, dst_instance: int) -> None:
        ids = self._block_ids(block_table, num_tokens)
        works = []
        for t in self._plan(self.ctx.instance.id, dst_instance):
            if t.src_rank != self.ctx.rank:
                continue
            layers, heads = self._local(t)
            buf = self._buffer(t, ids.numel())
            for i, cache in enumerate((self.cache.k, self.cache.v)):
                src = self._blocks(cache, layers)
                if buf.shape[4] == src.shape[3]:  # all of this rank's heads: gather straight into the buffer
                    torch.index_select(src, 1, ids, out=buf[i])
                else:
                    buf[i].copy_(src.index_select(1, ids)[:, :, :, heads])
            works.append((dist.isend(buf, t.dst_rank, tag=req_id), buf))
        self.sending[req_id] = works

    def post_recvs(self, req_id: int, num_tokens: int, src_instance: int) -> None:
        posted = []
        for t in self._plan(src_instance, self.ctx.instance.id):
            if t.dst_rank != self.ctx.rank:
                continue
            buf = self._buffer(t, blocks_for(num_tokens, self.cache.block_size))
            posted.append((t, dist.irecv(buf, t.src_rank, tag=req_id), buf))
        self.receiving[req_id] = posted
        self.waiters[req_id] = self._watch([w for _, w, _ in posted])

    @staticmethod
    def _watch(works: list) -> threading.Event:
        """gloo's recv works report completion only through wait(): wait on a helper thread
        (which releases the GIL) so the rank keeps stepping meanwhile."""
        done = threading.Event()

        def wait_all():
            for w in works:
                w.wait()
            done.set()

        threading.Thread(target=wait_all, daemon=True).start()
        return done

    def newly_arrived(self) -> list[int]:
        """Requests whose receives on this rank all completed since the last call."""
        done = [r for r, event in self.waiters.items() if r not in self.reported and event.is_set()]
        self.reported.update(done)
        return done

    def join(self, req_id: int, block_table: list[int]) -> None:
        """Copies the arrived buffers into the request's blocks of this rank's cache."""
        self.waiters.pop(req_id).wait()
        for t, work, buf in self.receiving.pop(req_id):
            layers, heads = self._local(t)
            ids = torch.tensor(block_table[:buf.shape[2]], dtype=torch.long)
            for i, cache in enumerate((self.cache.k, self.cache.v)):
                dst = self._blocks(cache, layers)
                if buf.shape[4] == dst.shape[3]:
                    dst.index_copy_(1, ids, buf[i])
                else:
                    dst[:, ids, :, heads] = buf[i]
        self.reported.discard(req_id)

    def release(self, req_id: int) -> None:
        for work, _ in self.sending.pop(req_id, []):
            work.wait()
