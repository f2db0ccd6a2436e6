"""Moves a request's KV cache between a prefill and a decode instance with point-to-point ops.

Per (request, peer pair) the data is the rectangle the pair shares (engine.reshard) of the
request's whole blocks, [blocks, K|V, layers, block_size, heads, head_dim], sent as messages of
about CHUNK_BYTES of consecutive blocks, in order.

Messages match by order alone, as NCCL matches point-to-point ops (it ignores tags): every message
uses tag 0, and for each (sender rank, receiver rank) pair both sides post a request's messages in
the decode side's pull order (the prefill side posts its sends only once it has the pull, in the
order pulls came: engine.scheduler). Each request's messages on a pair start with a small header
(request id, message count) that the receiver checks, so a broken order fails loudly instead of
landing one request's KV in another's blocks. They travel on their own process group (a side
communicator on NCCL), so a posted receive never blocks the TP/PP collectives of the main group.

Both sides cut a pair's messages alike: at every break in the block table of a side whose rank the
pair's rectangle covers whole (all its layers and heads), since each side knows the other's table
(KVPost.peer_blocks), then into about CHUNK_BYTES. On such a side a message is a piece of the
block-major cache itself (no copy, however scattered the blocks); on a rank holding more than the
rectangle (a TP or PP reshard) it is a slice of a pooled staging buffer that the sender gathers
chunk by chunk while earlier chunks are on the wire, and that the receiver's helper thread scatters
as they land. (Sending a layer range's K and V block by block instead, without staging, measured no
faster here: 2 x blocks small messages cost what the copies do.) Sends and receives are asynchronous (isend/irecv
on the world group: gloo on CPU, NCCL on GPU, where the helper thread's copies are untested); the
decode side keeps stepping while they are in flight.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.distributed as dist

from engine.comm import RankContext
from engine.blocks import blocks_for
from engine.kv_cache import KVCache
from engine.reshard import Transfer, owned_rect, transfer_plan
from launcher.model_files import ModelShape

CHUNK_BYTES = 8 << 20
POOL_BYTES = 256 << 20
KV_TAG = 0  # order is the contract (NCCL ignores tags); the header checks it


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
    def __init__(self, ctx: RankContext, cache: KVCache, shape: ModelShape, layer_offset: int, head_offset: int,
                 group=None):
        self.ctx, self.cache, self.shape, self.group = ctx, cache, shape, group
        self.layer_offset, self.head_offset = layer_offset, head_offset
        self.sending: dict[int, tuple] = {}    # req_id -> ([work], [staging buffer], [header])
        self.receiving: dict[int, list] = {}   # req_id -> its staging buffers
        self.waiters: dict[int, threading.Event] = {}
        self.reported: set[int] = set()
        self.pool = StagingPool()
        self.broken: list[str] = []  # order violations seen by the helper threads

    def _header(self, req_id: int, count: int) -> torch.Tensor:
        return torch.tensor([req_id, count], dtype=torch.int64, device=self.cache.kv.device)

    def _plan(self, src_id: int, dst_id: int) -> list[Transfer]:
        insts = self.ctx.plan.instances
        return transfer_plan(insts[src_id], insts[dst_id], self.shape.num_layers, self.shape.num_kv_heads)

    def _local(self, t: Transfer) -> tuple[slice, slice]:
        (l0, l1), (h0, h1) = t.rect.layers, t.rect.heads
        return (slice(l0 - self.layer_offset, l1 - self.layer_offset),
                slice(h0 - self.head_offset, h1 - self.head_offset))

    def _buffer(self, t: Transfer, num_blocks: int) -> torch.Tensor:
        (l0, l1), (h0, h1) = t.rect.layers, t.rect.heads
        return self.pool.take((num_blocks, 2, l1 - l0, self.cache.block_size, h1 - h0, self.shape.head_dim),
                              self.cache.kv.dtype, self.cache.kv.device)

    def _block_ids(self, block_table: list[int], num_tokens: int) -> list[int]:
        """Whole blocks move (the tail past num_tokens is rewritten by decode before it is read)."""
        return block_table[:blocks_for(num_tokens, self.cache.block_size)]

    def _holds_just(self, t: Transfer, instance_id: int, rank: int) -> bool:
        """The pair's rectangle is all that `rank` holds (every layer and KV head of its cache), so
        a run of its consecutive blocks is one piece of its cache's memory."""
        owned = owned_rect(self.ctx.plan.instances[instance_id], rank, self.shape.num_layers, self.shape.num_kv_heads)
        return t.rect == owned

    def _ranges(self, t: Transfer, n: int, tables: list[list[int]]) -> list[tuple[int, int]]:
        """Block ranges of the pair's messages: cut at every break in the given block tables, then
        into about CHUNK_BYTES each; both sides compute the same list."""
        (l0, l1), (h0, h1) = t.rect.layers, t.rect.heads
        per_block = 2 * (l1 - l0) * self.cache.block_size * (h1 - h0) * self.shape.head_dim * self.cache.kv.element_size()
        step = max(1, CHUNK_BYTES // per_block)
        cuts = {0, n} | {i for table in tables for i in range(1, n) if table[i] != table[i - 1] + 1}
        edges = sorted(cuts)
        return [(a, min(a + step, end)) for start, end in zip(edges, edges[1:]) for a in range(start, end, step)]

    def _messages(self, t: Transfer, ids: list[int], peer_ids: list[int], src_id: int, dst_id: int,
                  sending: bool) -> tuple[list[tuple], torch.Tensor | None]:
        """The pair's messages in order, as (tensor, staged block range or None), and the staging
        buffer (None when every message is a piece of this rank's cache). Both sides cut at the
        table breaks of each side that holds just the pair's rectangle (both tables are known:
        KVPost.peer_blocks; without the peer's, an older caller's, only a rank's own consecutive
        blocks go unstaged). A staged message's blocks are gathered before it is sent, or
        scattered once it lands."""
        src, dst = self._holds_just(t, src_id, t.src_rank), self._holds_just(t, dst_id, t.dst_rank)
        mine, peer = (src, dst) if sending else (dst, src)
        n = len(ids)
        if not peer_ids:  # no cuts at the peer's breaks; unstaged only if this rank's blocks are consecutive
            peer = False
            mine = mine and ids == list(range(ids[0], ids[0] + n))
        ranges = self._ranges(t, n, [table for whole, table in ((mine, ids), (peer, peer_ids)) if whole])
        if mine:
            return [(self.cache.kv[ids[a]:ids[a] + b - a], None) for a, b in ranges], None
        buf = self._buffer(t, n)
        return [(buf[a:b], (a, b)) for a, b in ranges], buf

    def _copy(self, t: Transfer, message: torch.Tensor, blocks: torch.Tensor, to_cache: bool) -> None:
        """Copies a staged message from (sender) or into (receiver) this rank's `blocks`."""
        layers, heads = self._local(t)
        view = self.cache.kv[:, :, layers, :, heads]
        if to_cache:
            view.index_copy_(0, blocks, message)
        else:
            torch.index_select(view, 0, blocks, out=message)

    def post_sends(self, req_id: int, block_table: list[int], num_tokens: int, dst_instance: int,
                   peer_table: tuple[int, ...] = ()) -> None:
        ids = self._block_ids(block_table, num_tokens)
        peer_ids = self._block_ids(list(peer_table), num_tokens) if peer_table else []
        index = torch.tensor(ids, dtype=torch.long, device=self.cache.kv.device)
        works, buffers, headers = [], [], []
        for t in self._plan(self.ctx.instance.id, dst_instance):
            if t.src_rank != self.ctx.rank:
                continue
            messages, buf = self._messages(t, ids, peer_ids, self.ctx.instance.id, dst_instance, sending=True)
            header = self._header(req_id, len(messages))
            works.append(dist.isend(header, t.dst_rank, group=self.group, tag=KV_TAG))
            headers.append(header)  # alive until the send completes
            for message, staged in messages:
                if staged is not None:  # gather this chunk while the earlier ones are on the wire
                    self._copy(t, message, index[slice(*staged)], to_cache=False)
                works.append(dist.isend(message, t.dst_rank, group=self.group, tag=KV_TAG))
            if buf is not None:
                buffers.append(buf)
        self.sending[req_id] = (works, buffers, headers)

    def post_recvs(self, req_id: int, block_table: list[int], num_tokens: int, src_instance: int,
                   peer_table: tuple[int, ...] = ()) -> None:
        """Posts every message's receive; a helper thread scatters staged chunks as they land."""
        ids = self._block_ids(block_table, num_tokens)
        peer_ids = self._block_ids(list(peer_table), num_tokens) if peer_table else []
        index = torch.tensor(ids, dtype=torch.long, device=self.cache.kv.device)
        # (transfer, expected header or None, cache blocks to scatter into or None, message, work)
        posted, buffers = [], []
        for t in self._plan(src_instance, self.ctx.instance.id):
            if t.dst_rank != self.ctx.rank:
                continue
            messages, buf = self._messages(t, ids, peer_ids, src_instance, self.ctx.instance.id, sending=False)
            header = torch.zeros(2, dtype=torch.int64, device=self.cache.kv.device)
            posted.append((t, (req_id, len(messages)), None, header,
                           dist.irecv(header, t.src_rank, group=self.group, tag=KV_TAG)))
            posted += [(t, None, index[slice(*staged)] if staged else None, m,
                        dist.irecv(m, t.src_rank, group=self.group, tag=KV_TAG)) for m, staged in messages]
            if buf is not None:
                buffers.append(buf)
        self.receiving[req_id] = buffers
        self.waiters[req_id] = self._land(posted)

    def _land(self, posted: list) -> threading.Event:
        """gloo's recv works report completion only through wait(): wait on a helper thread (which
        releases the GIL) and scatter each staged chunk as it lands, so the rank keeps stepping.
        A header that names another request means the two sides posted in different orders."""
        done = threading.Event()

        def land_all():
            for t, expected, blocks, message, work in posted:
                work.wait()
                if expected is not None and tuple(message.tolist()) != expected:
                    self.broken.append(f"KV transfer order broken: rank {self.ctx.rank} expected request "
                                       f"{expected[0]} ({expected[1]} messages) from rank {t.src_rank} but got "
                                       f"{tuple(message.tolist())}")
                elif blocks is not None:  # a staged chunk: scatter it into the cache
                    self._copy(t, message, blocks, to_cache=True)
            done.set()

        threading.Thread(target=land_all, daemon=True).start()
        return done

    def _check_order(self) -> None:
        if self.broken:
            raise RuntimeError(self.broken[0])

    def newly_arrived(self) -> list[int]:
        """Requests whose KV landed in this rank's blocks since the last call."""
        self._check_order()
        done = [r for r, event in self.waiters.items() if r not in self.reported and event.is_set()]
        self.reported.update(done)
        return done

    def join(self, req_id: int) -> None:
        """The request's KV is in this rank's blocks once its helper thread is done."""
        self.waiters.pop(req_id).wait()
        self._check_order()
        for buf in self.receiving.pop(req_id):
            self.pool.give(buf)
        self.reported.discard(req_id)

    def release(self, req_id: int) -> None:
        works, buffers, _ = self.sending.pop(req_id, ([], [], []))
        for work in works:
            work.wait()
        for buf in buffers:
            self.pool.give(buf)
