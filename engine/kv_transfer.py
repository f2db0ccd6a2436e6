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
on the KV group: gloo on CPU, NCCL on GPU); the decode side keeps stepping while they are in flight.

Completion is what a work's is_completed() says, never its wait(): on NCCL wait() only makes the
calling stream wait for the transfer (the data has not landed when it returns, and a stream made
to wait on a peer's transfer can close a cycle across instances). A request counts as arrived once
every receive of it reports completion, and a staging buffer or header goes back to the pool once
its send does (`Completions`). gloo's works complete only inside wait(), so on gloo a helper
thread waits on them; the main thread still decides by is_completed(). Staged chunks are scattered,
and headers checked, by the main thread once their receive completed, on its own stream (on CUDA
every later kernel is ordered after the scatter).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from contracts.model_shape import ModelShape
from engine.blocks import blocks_for
from engine.control_plane import POLL_S, RankContext
from engine.data_plane import dist_rank
from engine.kv_cache import KVCache
from engine.p2p_ops import Completions, PostedOp, StagingPool, drive_to_completion
from engine.reshard import Transfer, kv_rank_pairs, owned_rect, transfer_plan

CHUNK_BYTES = 8 << 20
KV_TAG = 0  # order is the contract (NCCL ignores tags); the header checks it


@dataclass(frozen=True)
class KVMessage:
    """One message of a rank pair's share of a request: a piece of the cache itself, or of a
    staging buffer holding the blocks [start, end) of the request's table (`staged`)."""

    tensor: torch.Tensor
    staged: Optional[tuple[int, int]] = None


class KVTransfer:
    def __init__(self, ctx: RankContext, cache: KVCache, shape: ModelShape, layer_offset: int, head_offset: int,
                 group=None):
        self.ctx, self.cache, self.shape, self.group = ctx, cache, shape, group
        self.layer_offset, self.head_offset = layer_offset, head_offset
        self.sending: dict[int, Completions] = {}    # req_id -> its sends (buffers back to the pool when done)
        self.releasing: list[Completions] = []       # sends of released requests not known complete yet
        self.receiving: dict[int, list] = {}         # req_id -> its staging buffers
        self.landing: dict[int, Completions] = {}    # req_id -> its receives (checks and scatters when done)
        self.reported: set[int] = set()
        self.pool = StagingPool()
        self.broken: list[str] = []  # order violations seen in headers
        self.driven = dist.get_backend(group) == "gloo"  # works that complete only inside wait()

    def warm_up(self) -> list[tuple[int, int]]:
        """Meets every KV peer of this rank once, before the first step, in the global pair order
        (engine.reshard.kv_rank_pairs). NCCL creates a pair's communicator at its first send or
        receive and blocks the host until the peer's first call; left to the step loop, first
        contacts follow pull and send order, which can wait in a cycle across instances (2
        prefill + 2 decode instances can hang until the timeout). Returns the pairs met, in order."""
        mine = [pair for pair in kv_rank_pairs(self.ctx.plan.instances, self.shape.num_layers,
                                               self.shape.num_kv_heads) if self.ctx.rank in pair]
        token = torch.zeros(1, dtype=self.cache.kv.dtype, device=self.cache.kv.device)
        for low, high in mine:
            if self.ctx.rank == low:
                work = dist.isend(token, self._peer(high), group=self.group, tag=KV_TAG)
            else:
                work = dist.irecv(token, self._peer(low), group=self.group, tag=KV_TAG)
            if self.driven:
                work.wait()  # gloo: completion
            while not work.is_completed():
                time.sleep(POLL_S)
        return mine

    def _peer(self, rank: int) -> int:
        return dist_rank(self.ctx.plan, rank)

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
                  sending: bool) -> tuple[list[KVMessage], torch.Tensor | None]:
        """The pair's messages in order, and the staging
        buffer (None when every message is a piece of this rank's cache). Both sides cut at the
        table breaks of each side that holds just the pair's rectangle (both tables are known:
        KVPost.peer_blocks). A staged message's blocks are gathered before it is sent, or scattered
        once it lands."""
        src, dst = self._holds_just(t, src_id, t.src_rank), self._holds_just(t, dst_id, t.dst_rank)
        mine, peer = (src, dst) if sending else (dst, src)
        n = len(ids)
        ranges = self._ranges(t, n, [table for whole, table in ((mine, ids), (peer, peer_ids)) if whole])
        if mine:
            return [KVMessage(self.cache.kv[ids[a]:ids[a] + b - a]) for a, b in ranges], None
        buf = self._buffer(t, n)
        return [KVMessage(buf[a:b], (a, b)) for a, b in ranges], buf

    def _copy(self, t: Transfer, message: torch.Tensor, blocks: torch.Tensor, to_cache: bool) -> None:
        """Copies a staged message from (sender) or into (receiver) this rank's `blocks`."""
        layers, heads = self._local(t)
        view = self.cache.kv[:, :, layers, :, heads]
        if to_cache:
            view.index_copy_(0, blocks, message)
        else:
            torch.index_select(view, 0, blocks, out=message)

    def post_sends(self, req_id: int, block_table: list[int], num_tokens: int, dst_instance: int,
                   peer_table: tuple[int, ...]) -> None:
        ids = self._block_ids(block_table, num_tokens)
        peer_ids = self._block_ids(list(peer_table), num_tokens)
        index = torch.tensor(ids, dtype=torch.long, device=self.cache.kv.device)
        works = []
        for t in self._plan(self.ctx.instance.id, dst_instance):
            if t.src_rank != self.ctx.rank:
                continue
            messages, buf = self._messages(t, ids, peer_ids, self.ctx.instance.id, dst_instance, sending=True)
            header = self._header(req_id, len(messages))  # alive until its send completes (the closure holds it)
            works.append(PostedOp(dist.isend(header, self._peer(t.dst_rank), group=self.group, tag=KV_TAG),
                                  lambda h=header: None))
            for m in messages:
                if m.staged is not None:  # gather this chunk while the earlier ones are on the wire
                    self._copy(t, m.tensor, index[slice(*m.staged)], to_cache=False)
                works.append(PostedOp(dist.isend(m.tensor, self._peer(t.dst_rank), group=self.group, tag=KV_TAG)))
            if buf is not None:  # back to the pool once the pair's last send completed
                works[-1] = PostedOp(works[-1].work, lambda b=buf: self.pool.give(b))
        self._drive([op.work for op in works])
        self.sending[req_id] = Completions(works)

    def post_recvs(self, req_id: int, block_table: list[int], num_tokens: int, src_instance: int,
                   peer_table: tuple[int, ...]) -> None:
        """Posts every message's receive; each staged chunk is scattered once it completed."""
        ids = self._block_ids(block_table, num_tokens)
        peer_ids = self._block_ids(list(peer_table), num_tokens)
        index = torch.tensor(ids, dtype=torch.long, device=self.cache.kv.device)
        entries, buffers = [], []
        for t in self._plan(src_instance, self.ctx.instance.id):
            if t.dst_rank != self.ctx.rank:
                continue
            messages, buf = self._messages(t, ids, peer_ids, src_instance, self.ctx.instance.id, sending=False)
            header = torch.zeros(2, dtype=torch.int64, device=self.cache.kv.device)
            entries.append(PostedOp(dist.irecv(header, self._peer(t.src_rank), group=self.group, tag=KV_TAG),
                                    lambda t=t, h=header, n=len(messages): self._check_header(t, h, (req_id, n))))
            for m in messages:
                scatter = (lambda t=t, m=m.tensor, b=index[slice(*m.staged)]: self._copy(t, m, b, to_cache=True)) \
                    if m.staged else None
                entries.append(PostedOp(dist.irecv(m.tensor, self._peer(t.src_rank), group=self.group, tag=KV_TAG), scatter))
            if buf is not None:
                buffers.append(buf)
        self._drive([op.work for op in entries])
        self.receiving[req_id] = buffers
        self.landing[req_id] = Completions(entries)

    def _drive(self, works: list) -> None:
        if self.driven:
            drive_to_completion(works)

    def _check_header(self, t: Transfer, header: torch.Tensor, expected: tuple[int, int]) -> None:
        """A header that names another request means the two sides posted in different orders."""
        got = tuple(header.tolist())
        if got != expected:
            self.broken.append(f"KV transfer order broken: rank {self.ctx.rank} expected request {expected[0]} "
                               f"({expected[1]} messages) from rank {t.src_rank} but got {got}")

    def _check(self) -> None:
        if self.broken:
            raise RuntimeError(self.broken[0])

    def _reclaim(self) -> None:
        """Staging buffers of released requests whose sends completed go back to the pool."""
        self.releasing = [sends for sends in self.releasing if not sends.advance()]

    def newly_arrived(self) -> list[int]:
        """Requests whose every receive on this rank completed (and whose staged chunks are
        scattered) since the last call. Never blocks."""
        self._reclaim()
        done = [r for r, landing in self.landing.items() if r not in self.reported and landing.advance()]
        self._check()
        self.reported.update(done)
        return done

    def join(self, req_id: int) -> None:
        """The request's KV is in this rank's blocks (its arrival was reported by every rank before
        the leader scheduled the join; on this rank it completes before this returns)."""
        landing = self.landing.pop(req_id)
        while not landing.advance():
            self._check()
            time.sleep(POLL_S)
        self._check()
        for buf in self.receiving.pop(req_id):
            self.pool.give(buf)
        self.reported.discard(req_id)

    def release(self, req_id: int) -> None:
        """The decode side has the request's KV (its receives completed, so every send has read its
        data); staging buffers return to the pool as the sends report completion. No wait(): on
        NCCL it would tie this rank's stream to the transfer."""
        if req_id in self.sending:
            self.releasing.append(self.sending.pop(req_id))
        self._reclaim()
