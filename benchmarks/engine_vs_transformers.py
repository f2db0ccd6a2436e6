"""Engine vs transformers on one rank, one thread, same run: SmolLM2-135M prefill and decode tokens/s.

Both sides run the same model weights in fp32. Ours: the LlamaStage (megatron-core TP layers,
paged KV cache) that every rank runs, on a single-process gloo world. Theirs: transformers'
LlamaForCausalLM with its KV cache. Each measurement alternates the two systems and reports
medians, so machine noise hits both alike.

    python benchmarks/engine_vs_transformers.py [--repeats 5] [--out benchmarks/results/engine_vs_transformers.json]
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
import torch.distributed as dist  # noqa: E402
from plots import grouped_bars  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from contracts.protocol import SeqChunk  # noqa: E402
from contracts.sampling_params import SamplingParams  # noqa: E402
from engine.batch import build_batch  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.model import LlamaStage  # noqa: E402
from engine.rope import rope_tables  # noqa: E402
from engine.weights import load_stage  # noqa: E402
from launcher.model_files import read_shape, resolve_model_dir  # noqa: E402

BLOCK = 16


class Ours:
    def __init__(self, model_dir: str, max_tokens: int, dtype: torch.dtype = torch.float32):
        self.shape = read_shape(model_dir)
        self.stage = LlamaStage(self.shape, 0, self.shape.num_layers, True, True, 1, dist.new_group([0]), dtype)
        load_stage(self.stage, model_dir, self.shape, 0, 1)
        self.stage.to(dtype=dtype).eval()
        self.stage.prepare_weights()
        self.cos, self.sin = rope_tables(self.shape, 2048, dtype=dtype)
        self.cache = KVCache(self.shape.num_layers, -(-max_tokens // BLOCK), BLOCK, self.shape.num_kv_heads,
                             self.shape.head_dim, dtype, torch.device("cpu"))

    def _tables(self, batch: int, ctx: int) -> list[list[int]]:
        per = -(-ctx // BLOCK)
        return [list(range(i * per, (i + 1) * per)) for i in range(batch)]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> float:
        tables = self._tables(len(prompts), max(map(len, prompts)) + 64)
        chunks = [SeqChunk(i, p, 0, tables[i], SamplingParams(), 0) for i, p in enumerate(prompts)]
        t = time.perf_counter()
        b = build_batch(chunks, BLOCK, self.cos, self.sin)
        self.stage(b.token_ids, b, self.cache.k, self.cache.v).argmax(-1)
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode(self, prompts: list[list[int]], steps: int) -> float:
        """Seconds per decode step after prefilling `prompts`."""
        self.prefill(prompts)
        tables = self._tables(len(prompts), max(map(len, prompts)) + 64)
        last = [p[-1] for p in prompts]
        t = time.perf_counter()
        for s in range(steps):
            chunks = [SeqChunk(i, [last[i]], len(p) + s, tables[i], SamplingParams(), 0) for i, p in enumerate(prompts)]
            b = build_batch(chunks, BLOCK, self.cos, self.sin)
            last = self.stage(b.token_ids, b, self.cache.k, self.cache.v).argmax(-1).tolist()
        return (time.perf_counter() - t) / steps


class Theirs:
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32):
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> float:
        ids = torch.tensor(prompts)
        t = time.perf_counter()
        self.model(ids, use_cache=True).logits[:, -1].argmax(-1)
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode(self, prompts: list[list[int]], steps: int) -> float:
        out = self.model(torch.tensor(prompts), use_cache=True)
        past, last = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(steps):
            out = self.model(last, past_key_values=past, use_cache=True)
            past, last = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return (time.perf_counter() - t) / steps


def single_rank_world() -> None:
    """A one-rank gloo world (the stage's megatron layers need a TP group) on one thread."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.cuda.current_device = lambda: "cpu"


def side_by_side(ours: Ours, theirs: Theirs, cases: list[tuple[str, int, int]], repeats: int,
                 steps: int) -> dict[tuple, dict]:
    """Tokens/s of both systems per (phase, batch, context): medians of `repeats` runs alternating
    the two, so machine noise hits both alike, and each one's spread ((max - min) / median)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for phase, batch, ctx in cases:
        prompts = [torch.randint(10, 49000, (ctx,), generator=g).tolist() for _ in range(batch)]
        times = {"ours": [], "transformers": []}
        for _ in range(repeats):
            for name, system in (("ours", ours), ("transformers", theirs)):
                times[name].append(system.prefill(prompts) if phase == "prefill" else system.decode(prompts, steps))
        tokens = batch * ctx if phase == "prefill" else batch
        m = {name: tokens / statistics.median(t) for name, t in times.items()}
        out[(phase, batch, ctx)] = m | {"spread": {name: (max(t) - min(t)) / statistics.median(t)
                                                   for name, t in times.items()}}
        print(f"{phase:8s} batch {batch:3d} ctx {ctx:4d}: ours {m['ours']:8.1f} tok/s  transformers "
              f"{m['transformers']:8.1f} tok/s  ratio {m['ours'] / m['transformers']:.2f}x", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/engine_vs_transformers.json")
    args = parser.parse_args()
    single_rank_world()
    model_dir = resolve_model_dir("embedded")
    ours, theirs = Ours(model_dir, 64 * (args.context + 64 + BLOCK)), Theirs(model_dir)
    cases = [("prefill", 4, 128), ("decode", 1, args.context), ("decode", 8, args.context),
             ("decode", 32, args.context)]
    rows = [{"phase": phase, "batch": batch, "context": ctx, "ours_tokens_per_s": m["ours"],
             "transformers_tokens_per_s": m["transformers"], "ratio": m["ours"] / m["transformers"]}
            for (phase, batch, ctx), m in side_by_side(ours, theirs, cases, args.repeats, args.steps).items()]
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "threads": 1, "dtype": "float32", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)",
              "repeats": args.repeats, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    grouped_bars([f"{r['phase']} b{r['batch']}\n{r['ratio']:.2f}x" for r in rows],
                 {"pdlaunch engine": [r["ours_tokens_per_s"] for r in rows],
                  "transformers": [r["transformers_tokens_per_s"] for r in rows]},
                 "tokens/s", f"SmolLM2-135M fp32, 1 thread, context {args.context} ({result['date']})", png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
