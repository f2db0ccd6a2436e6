"""KV transfer: the engine's path (messages that are pieces of the cache where a rank holds exactly the
pair's rectangle, cut at the breaks of either side's block table; else gathered into / scattered from
a staging buffer) against raw gloo isend/irecv of the same bytes between the same rank pairs (one
pre-allocated buffer per pair, all pairs at once), measured in the same run.

Run under MPI with 1 + ranks of the two layouts, e.g. (3 ranks: P TP1 -> D TP1, and P TP1 -> D TP2):
    mpirun -n 3 --oversubscribe python benchmarks/kv_transfer.py [--out benchmarks/results/kv_transfer.json]
Rank 0 is the prefill rank; ranks 1-2 form the decode instances. SmolLM2-135M's KV shape, fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402
from plots import grouped_bars  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from contracts.model_shape import ModelShape  # noqa: E402
from contracts.plan import InstancePlan, Plan  # noqa: E402
from engine.blocks import blocks_for  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.kv_transfer import KVTransfer  # noqa: E402
from engine.reshard import owned_rect, transfer_plan  # noqa: E402

SHAPE = ModelShape(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64,
                   vocab_size=49152, rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,))
BLOCK = 16


class Ctx:
    """The parts of a RankContext KVTransfer uses."""

    def __init__(self, rank: int, plan: Plan, instance: InstancePlan):
        self.rank, self.plan, self.instance = rank, plan, instance


def barrier(world) -> None:
    """A barrier that sleeps instead of spinning: an idle rank must not take one of the two cores
    from the pair being measured (MPI's Barrier busy-polls)."""
    req = world.Ibarrier()
    while not req.Test():
        time.sleep(0.0002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,512,2048")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/kv_transfer.json")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: caches on one GPU per rank, NCCL (needs 3 GPUs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    assert size == 3, "run with 3 ranks"
    device = torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    port = world.bcast(29700 + os.getpid() % 200 if rank == 0 else None)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=size)
    # Layout pairs: P TP1 (rank 0) -> D TP1 (rank 1); P TP1 (rank 0) -> D TP... heads split over ranks 1, 2
    # is not possible with 3 KV heads, so the second pair is D PP2 (layers split over ranks 1, 2).
    # Block tables: consecutive (what the allocator gives when a free run fits), or scattered (a
    # fragmented cache: each side's blocks in its own random order). Each side knows the other's
    # table, as in the engine, so only a rank holding more than the pair's rectangle (the TP1
    # sender of a PP2 pair) stages a copy.
    same = [InstancePlan(0, "prefill", 1, 1, 0), InstancePlan(1, "decode", 1, 1, 1)]
    split = [InstancePlan(0, "prefill", 1, 1, 0), InstancePlan(1, "decode", 1, 2, 1)]
    pairs = {"P tp1 -> D tp1": (same, False), "P tp1 -> D tp1 scattered": (same, True),
             "P tp1 -> D pp2": (split, False), "P tp1 -> D pp2 scattered": (split, True)}
    rows = []
    for name, (instances, scattered) in pairs.items():
        plan = Plan(instances)
        mine = instances[0] if rank == 0 else plan.instance_of(rank)
        for length in [int(x) for x in args.lengths.split(",")]:
            blocks = blocks_for(length, BLOCK)
            tables = [list(range(blocks)), list(range(blocks))]  # prefill side's, decode side's
            if scattered:
                for side, table in enumerate(tables):
                    random.Random(2 * length + side).shuffle(table)
            engine_s, raw_s = [], []
            if mine is not None:
                rect = owned_rect(mine, rank, SHAPE.num_layers, SHAPE.num_kv_heads)
                layers = rect.layers[1] - rect.layers[0]
                cache = KVCache(layers, blocks, BLOCK, SHAPE.num_kv_heads, SHAPE.head_dim, torch.float32, device)
                cache.k.normal_()
                cache.v.normal_()
                kv = KVTransfer(Ctx(rank, plan, mine), cache, SHAPE, rect.layers[0], rect.heads[0])
            total_bytes = 2 * SHAPE.num_layers * SHAPE.num_kv_heads * SHAPE.head_dim * 4 * length
            # raw: each rank pair of the layout pair moves its share as one pre-allocated buffer
            # (allocated and touched once: raw's best case), all pairs at once
            shares = [(t.src_rank, t.dst_rank, torch.zeros(2 * (t.rect.layers[1] - t.rect.layers[0]) * length *
                                                          (t.rect.heads[1] - t.rect.heads[0]) * SHAPE.head_dim,
                                                          device=device))
                      for t in transfer_plan(instances[0], instances[1], SHAPE.num_layers, SHAPE.num_kv_heads)]

            def engine(req: int) -> None:
                if rank == 0:
                    kv.post_sends(req, tables[0], length, 1, tuple(tables[1]))
                    kv.release(req)
                elif mine is not None:
                    kv.post_recvs(req, tables[1], length, 0, tuple(tables[0]))
                    kv.join(req)

            def raw(_req: int) -> None:
                works = [dist.isend(buf, dst) if rank == src else dist.irecv(buf, src)
                         for src, dst, buf in shares if rank in (src, dst)]
                for work in works:
                    work.wait()

            for rep in range(args.repeats + 1):  # rep 0 warms both up; then alternate which goes first
                for fn, times in ((engine, engine_s), (raw, raw_s))[::1 if rep % 2 == 0 else -1]:
                    barrier(world)
                    t = time.perf_counter()
                    fn(1000 * rep + length)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    barrier(world)
                    if rep:
                        times.append(time.perf_counter() - t)
            if rank == 0:
                e, r = statistics.median(engine_s), statistics.median(raw_s)
                rows.append({"pair": name, "tokens": length, "mbytes": total_bytes / 1e6,
                             "engine_gb_s": total_bytes / e / 1e9, "raw_gb_s": total_bytes / r / 1e9,
                             "ratio": r / e, "engine_ms": e * 1e3})
                print(f"{name:16s} {length:5d} tokens {total_bytes / 1e6:7.1f} MB: engine {total_bytes / e / 1e9:5.2f} "
                      f"GB/s, raw {total_bytes / r / 1e9:5.2f} GB/s, ratio {r / e:.2f}", flush=True)
    if rank == 0:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
                       "repeats": args.repeats, "rows": rows}, f, indent=2)
        png = os.path.splitext(args.out)[0] + ".png"
        grouped_bars([f"{r['pair']}\n{r['tokens']} tok, {r['ratio']:.2f}" for r in rows],
                     {"engine path": [r["engine_gb_s"] for r in rows], "raw send/recv": [r["raw_gb_s"] for r in rows]},
                     "GB/s", f"KV transfer, {'NCCL' if args.device == 'cuda' else 'gloo over loopback'}, medians of "
                     f"{args.repeats}", png)
        print(f"wrote {args.out} and {png}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
