"""Run by test_reshard under `mpirun -n 4`: moves one request's KV between two instance layouts
through engine.kv_transfer (real gloo isend/irecv) with consecutive, partly consecutive and
scattered block tables on either side, as the engine posts them (each side knows the other's
block table), and checks every received value against
what the sender holds and which ranks staged a copy; then six requests at
once, all with one tag, pulled in an order that is not the prefill order (and, as a check of the
check, a sender that ignores the pull order, which the receiver must refuse). Prints one line per
case on rank 0; exits non-zero on a mismatch."""
from __future__ import annotations

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402

from contracts.model_shape import ModelShape  # noqa: E402
from contracts.plan import InstancePlan, Plan  # noqa: E402
from engine.blocks import blocks_for  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.kv_transfer import KVTransfer  # noqa: E402
from engine.reshard import owned_rect  # noqa: E402

SHAPE = ModelShape(num_layers=4, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8,
                   vocab_size=64, rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False,
                   max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,))
BLOCK, NUM_BLOCKS, TOKENS = 4, 16, 13
CONSECUTIVE, SCATTERED, PARTLY = [5, 6, 7, 8], [9, 2, 14, 0], [3, 4, 10, 11]
TABLES = {"consecutive": CONSECUTIVE, "scattered": SCATTERED, "partly consecutive": PARTLY}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


class Ctx:
    def __init__(self, rank: int, plan: Plan, instance: InstancePlan):
        self.rank, self.plan, self.instance = rank, plan, instance


def rank_side(rank: int, plan: Plan):
    """(this rank's instance, its layer range, its KV-head range, a cache for them, its KVTransfer),
    or None for a rank outside the plan."""
    mine = plan.instance_of(rank)
    if mine is None:
        return None
    rect = owned_rect(mine, rank, SHAPE.num_layers, SHAPE.num_kv_heads)
    (l0, l1), (h0, h1) = rect.layers, rect.heads
    cache = KVCache(l1 - l0, NUM_BLOCKS, BLOCK, h1 - h0, SHAPE.head_dim, torch.float64, torch.device("cpu"))
    return mine, (l0, l1), (h0, h1), cache, KVTransfer(Ctx(rank, plan, mine), cache, SHAPE, l0, h0)


def pair_side(rank: int, src_layout: tuple[int, int], dst_layout: tuple[int, int]):
    """A prefill instance of (tp, pp) src_layout from rank 0, a decode instance of dst_layout after it:
    (prefill, decode, this rank's rank_side or None)."""
    p = InstancePlan(0, "prefill", *src_layout, first_rank=0)
    d = InstancePlan(1, "decode", *dst_layout, first_rank=p.size)
    return p, d, rank_side(rank, Plan([p, d]))


def slots(table: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block, offset in it, token position) of every token slot of a block table."""
    blocks = torch.tensor([b for b in table for _ in range(BLOCK)])
    return blocks, torch.arange(BLOCK).repeat(len(table)), torch.arange(len(blocks))


def fill_expected(cache: KVCache, layers: tuple[int, int], heads: tuple[int, int], table: list[int]) -> None:
    """Writes every value a sender holds of its rectangle into the table's slots."""
    blocks, offsets, positions = slots(table)
    for layer in range(*layers):
        for kv_index, tensor in enumerate((cache.k, cache.v)):
            for head in range(*heads):
                tensor[blocks, layer - layers[0], offsets, head - heads[0]] = expected(layer, kv_index, positions, head)


def expected(layer: int, kv: int, pos: torch.Tensor, head: int) -> torch.Tensor:
    """The value of (global layer, K|V, token position, global KV head, dim)."""
    return (((layer * 2 + kv) * 1000 + pos[:, None]) * 100 + head * 10 + torch.arange(SHAPE.head_dim)).double()


def run_case(rank: int, src: str, dst: str, src_table: list[int], dst_table: list[int],
             req_id: int) -> tuple[bool, bool]:
    """(every value right, this rank staged a copy)."""
    p, d, side = pair_side(rank, LAYOUTS[src], LAYOUTS[dst])
    if side is None:
        return True, False
    mine, (l0, l1), (h0, h1), cache, kv = side
    table = src_table if mine is p else dst_table
    blocks, offsets, positions = slots(table)
    if mine is p:
        fill_expected(cache, (l0, l1), (h0, h1), table)
        kv.post_sends(req_id, table, TOKENS, d.id, tuple(dst_table))
        kv.release(req_id)  # its staging buffer returns to the pool once the sends complete
        return True, bool(kv.pool.free or kv.pool.lent)
    cache.k.fill_(-1)
    cache.v.fill_(-1)
    kv.post_recvs(req_id, table, TOKENS, p.id, tuple(src_table))
    kv.join(req_id)
    moved = blocks_for(TOKENS, BLOCK) * BLOCK
    ok = True
    for layer in range(l0, l1):
        for kv_index, tensor in enumerate((cache.k, cache.v)):
            for head in range(h0, h1):
                got = tensor[:, layer - l0, :, head - h0]  # [blocks, offsets, dim]
                ok &= torch.equal(got[blocks[:moved], offsets[:moved]],
                                  expected(layer, kv_index, positions[:moved], head))
                untouched = torch.ones(got.shape[:2], dtype=torch.bool)
                untouched[blocks[:moved], offsets[:moved]] = False
                ok &= bool((got[untouched] == -1).all())
    return ok, bool(kv.pool.free)


PULL_ORDER = [4, 1, 5, 0, 3, 2]  # the decode side's pulls; the sender prefilled 0..5 in order


def run_many(rank: int, broken: bool) -> bool:
    """Six requests in flight at once between a TP1 prefill and a TP2 decode instance, every
    message with the same tag (order alone pairs them, as on NCCL): the receiver posts in its pull
    order and the sender follows it, so each request's KV lands in its own blocks. With `broken`
    the sender posts in prefill order instead, and the receiver must refuse (the header check; every
    request's tables cut its messages alike, so the misorder never pairs messages of unequal size,
    which gloo would abort on)."""
    p, d, side = pair_side(rank, LAYOUTS["tp1"], LAYOUTS["tp2"])
    if side is None:
        return True
    mine, (l0, l1), (h0, h1), cache, kv = side
    tokens = 6  # 2 blocks per request
    src_tables = {r: [2 * r, 2 * r + 1] for r in range(6)}
    dst_tables = {r: [2 * i, 15 - 2 * i] for i, r in enumerate(PULL_ORDER)}  # none consecutive

    def cells(tables):
        """(this rank's cache row of one block, layer, K|V and head; the values request r puts there)."""
        for r, table in tables.items():
            for j, block in enumerate(table):
                for layer in range(l0, l1):
                    for kv_index, tensor in enumerate((cache.k, cache.v)):
                        for head in range(h0, h1):
                            values = expected(layer, kv_index, torch.arange(j * BLOCK, (j + 1) * BLOCK), head)
                            yield tensor[block, layer - l0, :, head - h0], values + r * 1e7

    if mine is p:
        for row, values in cells(src_tables):
            row.copy_(values)
        for r in (range(6) if broken else PULL_ORDER):
            kv.post_sends(r, src_tables[r], tokens, d.id, tuple(dst_tables[r]))
        for r in range(6):
            kv.release(r)
        return True
    cache.k.fill_(-1)
    cache.v.fill_(-1)
    for r in PULL_ORDER:
        kv.post_recvs(r, dst_tables[r], tokens, p.id, tuple(src_tables[r]))
    try:
        for r in PULL_ORDER:
            kv.join(r)
    except RuntimeError as e:
        return broken and "KV transfer order broken" in str(e)
    if broken:
        return False
    return all(torch.equal(row, values) for row, values in cells(dst_tables))


def run_late_sender(rank: int, world) -> bool:
    """Arrival is reported only after completion, with real gloo works: the receiver posts its
    receives and polls while the sender has not posted (it waits for the receiver's word over MPI):
    nothing arrives; then the sender posts and releases at once (no wait) and the receiver polls
    until the request arrives: every value is in its blocks at that moment, before join; the
    senders' staging buffers go back to their pools only once their sends complete. PP2 -> TP2:
    every rank stages (gathers or scatters)."""
    p, d, side = pair_side(rank, LAYOUTS["pp2"], LAYOUTS["tp2"])
    if side is None:
        return True
    mine, (l0, l1), (h0, h1), cache, kv = side
    table = SCATTERED
    blocks, offsets, positions = slots(table)
    moved = blocks_for(TOKENS, BLOCK) * BLOCK
    if mine is p:
        fill_expected(cache, (l0, l1), (h0, h1), table)
        for dst in d.ranks:  # the receivers have polled with nothing sent
            world.recv(source=dst, tag=7)
        kv.post_sends(7, table, TOKENS, d.id, tuple(table))
        kv.release(7)
        while kv.releasing:  # buffers come back as the sends complete, without a wait() here
            kv.newly_arrived()
            time.sleep(0.001)
        return bool(kv.pool.free) and not kv.pool.lent
    cache.k.fill_(-1)
    cache.v.fill_(-1)
    kv.post_recvs(7, table, TOKENS, p.id, tuple(table))
    early = [kv.newly_arrived() for _ in range(20)]
    for src in p.ranks:
        world.send(None, dest=src, tag=7)
    while not kv.newly_arrived():
        time.sleep(0.001)
    ok = all(e == [] for e in early)
    for layer in range(l0, l1):
        for kv_index, tensor in enumerate((cache.k, cache.v)):
            for head in range(h0, h1):
                got = tensor[blocks[:moved], layer - l0, offsets[:moved], head - h0]
                ok &= torch.equal(got, expected(layer, kv_index, positions[:moved], head))
    kv.join(7)
    return ok


def main() -> None:
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    port = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = world.bcast(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world.Get_size())
    cases = [("tp1", "tp1", "consecutive", "consecutive"), ("tp1", "tp1", "scattered", "consecutive"),
             ("tp1", "tp1", "consecutive", "scattered"), ("tp1", "tp1", "scattered", "scattered"),
             ("tp1", "tp1", "partly consecutive", "scattered"),
             ("tp1", "tp2", "consecutive", "consecutive"), ("tp1", "tp2", "consecutive", "scattered"),
             ("tp2", "tp1", "consecutive", "consecutive"), ("tp2", "tp1", "scattered", "consecutive"),
             ("tp1", "pp2", "consecutive", "consecutive"), ("tp1", "pp2", "scattered", "partly consecutive"),
             ("pp2", "tp1", "scattered", "scattered"), ("tp2", "pp2", "scattered", "scattered"),
             ("pp2", "tp2", "partly consecutive", "scattered")]
    failed = 0
    for i, (src, dst, src_table, dst_table) in enumerate(cases):
        results = world.allgather(run_case(rank, src, dst, TABLES[src_table], TABLES[dst_table], 100 + i))
        ok = all(right for right, _ in results)
        failed += not ok
        staged = [r for r, (_, copied) in enumerate(results) if copied]
        if rank == 0:
            print(f"P {src} {src_table} -> D {dst} {dst_table}: {'ok' if ok else 'WRONG'}; staged on ranks {staged}",
                  flush=True)
    for broken in (False, True):
        ok = all(world.allgather(run_many(rank, broken)))
        failed += not ok
        if rank == 0:
            print(f"6 requests, one tag, pulled out of prefill order{', sender out of order' if broken else ''}: "
                  f"{('refused' if broken else 'ok') if ok else 'WRONG'}", flush=True)
    ok = all(world.allgather(run_late_sender(rank, world)))
    failed += not ok
    if rank == 0:
        print(f"arrival only after completion, late sender: {'ok' if ok else 'WRONG'}", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
