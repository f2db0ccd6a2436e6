"""Moves a request's KV cache between a prefill and a decode instance with point-to-point ops.

One contiguous buffer per (request, peer pair): [k|v, layers, tokens, heads, head_dim] of the
rectangle the pair shares (engine.reshard). Sends and receives are asynchronous (isend/irecv on
the world group: gloo on CPU, NCCL on GPU) and tagged with the request id. The decode side keeps
stepping while receives are in flight and copies the buffers into its blocks when all arrived.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from engine.batch import context_slots
from engine.comm import RankContext
from engine.kv_cache import KVCache
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

    def post_sends(self, req_id: int, block_table: list[int], num_tokens: int, dst_instance: int) -> None:
        slots = context_slots(block_table, num_tokens, self.cache.block_size)
        works = []
        for t in self._plan(self.ctx.instance.id, dst_instance):
            if t.src_rank != self.ctx.rank:
                continue
            layers, heads = self._local(t)
            k = self.cache.k[layers].index_select(1, slots)[:, :, heads]
            v = self.cache.v[layers].index_select(1, slots)[:, :, heads]
            buf = torch.stack((k, v)).contiguous()
            works.append((dist.isend(buf, t.dst_rank, tag=req_id), buf))
        self.sending[req_id] = works

    def post_recvs(self, req_id: int, num_tokens: int, src_instance: int) -> None:
        posted = []
        for t in self._plan(src_instance, self.ctx.instance.id):
            if t.dst_rank != self.ctx.rank:
                continue
            (l0, l1), (h0, h1) = t.rect.layers, t.rect.heads
            buf = torch.empty((2, l1 - l0, num_tokens, h1 - h0, self.shape.head_dim),
                              dtype=self.cache.k.dtype, device=self.cache.k.device)
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
            slots = context_slots(block_table, buf.shape[2], self.cache.block_size)
            for cache, part in ((self.cache.k, buf[0]), (self.cache.v, buf[1])):
                view = cache[layers]
                view[:, slots, heads] = part
        self.reported.discard(req_id)

    def release(self, req_id: int) -> None:
        for work, _ in self.sending.pop(req_id, []):
            work.wait()
