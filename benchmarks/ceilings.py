"""The engine's prefill and decode against this machine's own ceilings, per dtype, in one run.

Measures, one thread, side by side:
- memory read bandwidth: a sum over as many weights as the model has (what a batch-1 decode step
  must read at least once), GB/s, in each dtype; the faster is the machine's rate, whatever kernel
  reads the bytes;
- what matrix-vector kernels reach over those weights (GB/s, for the record, not the ceiling):
  torch's plain one and oneDNN's on a packed weight (what the engine runs, engine/matmul.py);
- matmul throughput: the best of a few prefill-sized matmuls, GFLOP/s, over torch's plain kernel
  and oneDNN's on a packed weight (the faster is the machine's rate);
then SmolLM2-135M's prefill (4 x 128 tokens) and decode (batch 1, 8, 32 at context 128) on the
engine's stage and on transformers, each as a fraction of the ceiling the two figures imply:
- decode batch B: B tokens per max(weights + KV bytes / bandwidth, FLOPs / matmul rate);
- prefill: tokens per FLOPs / matmul rate (2 x non-embedding weights per token, attention, and the
  LM head for each sequence's last token: what the engine computes).
bf16 runs only where the CPU computes it natively (avx512_bf16 or AMX, launcher/dtypes.py); without
it torch emulates bf16 and the ceilings say so. Medians of --repeats alternating runs.

    python benchmarks/ceilings.py [--repeats 5] [--out benchmarks/results/ceilings.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine_vs_transformers import BLOCK, Ours, Theirs, side_by_side, single_rank_world  # noqa: E402  (benchmarks/ is on sys.path as a script)
from engine.matmul import linear, pack  # noqa: E402
from launcher.dtypes import cpu_flags, cpu_has_native_bf16  # noqa: E402
from launcher.model_files import read_shape, resolve_model_dir  # noqa: E402
from plots import grouped_bars  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CASES = [("prefill", 4, 128), ("decode", 1, 128), ("decode", 8, 128), ("decode", 32, 128)]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def streaming_gbps(elements: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """GB/s reading `elements` weights (cold in cache: larger than any LLC): a plain sum (the memory
    read rate), a matrix-vector product, and oneDNN's linear on the same weights packed."""
    cols = 4096
    w = torch.randn(elements // cols, cols).to(dtype)
    x = torch.randn(cols).to(dtype)
    packed = pack(w)
    runs = {"read": lambda: w.sum(), "matvec": lambda: w @ x, "packed_matvec": lambda: linear(x[None], packed)}
    return {name: w.numel() * w.element_size() / median_time(fn, repeats) / 1e9 for name, fn in runs.items()}


def matmul_gflops(dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """The best of a few prefill-sized matmuls, GFLOP/s, per kernel: torch's plain one (MKL) and
    oneDNN's on a packed weight (what the engine runs). The faster is the machine's rate: a ceiling
    taken from one kernel alone measures the kernel (the packed one beats the plain by 5-40 %)."""
    best = {"plain": 0.0, "packed": 0.0}
    for m, k, n in ((512, 576, 1536), (512, 1536, 576), (1024, 1024, 1024)):
        a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        b, packed = w.t().contiguous(), pack(w)
        flops = 2 * m * k * n
        best["plain"] = max(best["plain"], flops / median_time(lambda: a @ b, repeats) / 1e9)
        best["packed"] = max(best["packed"], flops / median_time(lambda: linear(a, packed), repeats) / 1e9)
    return best


def ceilings(shape, dtype: torch.dtype, bandwidth: float, gflops: float) -> dict[tuple, float]:
    """Tokens/s ceiling per case from the measured bandwidth (GB/s) and matmul rate (GFLOP/s)."""
    size = torch.tensor([], dtype=dtype).element_size()
    embed = shape.vocab_size * shape.hidden_size
    body = shape.param_count() - embed * (1 if shape.tie_word_embeddings else 2)  # the layers' weights
    streamed = (body + embed) * size  # a decode step reads every layer and the LM head, not the embedding table
    kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * size
    attn_flops = lambda ctx: 4 * shape.num_layers * shape.num_heads * shape.head_dim * ctx  # noqa: E731 (QK^T + AV)
    out = {}
    for phase, batch, ctx in CASES:
        if phase == "prefill":
            flops = batch * (ctx * 2 * body + sum(attn_flops(i + 1) for i in range(ctx)) + 2 * embed)
            out[(phase, batch, ctx)] = batch * ctx / (flops / (gflops * 1e9))
        else:
            flops = batch * (2 * (body + embed) + attn_flops(ctx))
            seconds = max((streamed + batch * ctx * kv_per_token) / (bandwidth * 1e9), flops / (gflops * 1e9))
            out[(phase, batch, ctx)] = batch / seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/ceilings.json")
    args = parser.parse_args()
    single_rank_world()
    model_dir = resolve_model_dir("embedded")
    shape = read_shape(model_dir)
    native_bf16 = cpu_has_native_bf16(cpu_flags())
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "cpu_native_bf16": native_bf16, "threads": 1, "model": "SmolLM2-135M-Instruct", "dtypes": {}}
    for name, dtype in DTYPES.items():
        streams, mm = streaming_gbps(shape.param_count(), dtype, args.repeats), matmul_gflops(dtype, args.repeats)
        print(f"{name}: memory read {streams['read']:.1f} GB/s (matvec kernels: plain {streams['matvec']:.1f}, "
              f"packed {streams['packed_matvec']:.1f}), matmul {max(mm.values()):.1f} GFLOP/s (plain "
              f"{mm['plain']:.1f}, packed {mm['packed']:.1f})", flush=True)
        result["dtypes"][name] = {"read_gbps": streams["read"], "matvec_gbps": streams["matvec"],
                                  "packed_matvec_gbps": streams["packed_matvec"], "matmul_gflops": max(mm.values()),
                                  "matmul_plain_gflops": mm["plain"], "matmul_packed_gflops": mm["packed"], "rows": []}
    # the memory is the same whichever dtype reads it: the faster read is the machine's bandwidth
    bw = result["bandwidth_gbps"] = max(entry["read_gbps"] for entry in result["dtypes"].values())
    for name, dtype in DTYPES.items():
        entry = result["dtypes"][name]
        gf = entry["matmul_gflops"]
        if dtype == torch.bfloat16 and not native_bf16:
            entry["skipped"] = ("this CPU has no native bf16 (avx512_bf16/AMX): torch emulates it at "
                                f"{gf:.1f} GFLOP/s, so model.dtype: auto runs float32 here")
            print(f"  engine runs skipped: {entry['skipped']}")
            continue
        ceiling = ceilings(shape, dtype, bw, gf)
        ours, theirs = Ours(model_dir, 64 * (128 + 64 + BLOCK), dtype), Theirs(model_dir, dtype)
        for case, m in side_by_side(ours, theirs, CASES, args.repeats, args.steps).items():
            entry["rows"].append({"phase": case[0], "batch": case[1], "context": case[2], "ceiling_tokens_per_s": ceiling[case],
                                  "ours_tokens_per_s": m["ours"], "transformers_tokens_per_s": m["transformers"],
                                  "ours_of_ceiling": m["ours"] / ceiling[case],
                                  "transformers_of_ceiling": m["transformers"] / ceiling[case],
                                  "ours_vs_transformers": m["ours"] / m["transformers"], "spread": m["spread"]})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("\n| dtype | phase | batch | ceiling tok/s | ours tok/s | of ceiling | transformers tok/s | of ceiling | ours / transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    labels, ours_share, theirs_share = [], [], []
    for name, entry in result["dtypes"].items():
        for r in entry["rows"]:
            print(f"| {name} | {r['phase']} | {r['batch']} | {r['ceiling_tokens_per_s']:.1f} | {r['ours_tokens_per_s']:.1f} | "
                  f"{r['ours_of_ceiling']:.2f} | {r['transformers_tokens_per_s']:.1f} | {r['transformers_of_ceiling']:.2f} | "
                  f"{r['ours_vs_transformers']:.2f}x |")
            labels.append(f"{name}\n{r['phase']} b{r['batch']}")
            ours_share.append(r["ours_of_ceiling"])
            theirs_share.append(r["transformers_of_ceiling"])
    png = os.path.splitext(args.out)[0] + ".png"
    grouped_bars(labels, {"pdlaunch engine": ours_share, "transformers": theirs_share}, "share of the machine's ceiling",
                 f"SmolLM2-135M, 1 thread, context 128 ({result['date']})", png, hline=1.0)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
