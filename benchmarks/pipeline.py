"""Pipeline parallelism on this machine: decode and prefill throughput of one SmolLM2-135M instance
on TP1xPP1, TP1xPP2 filling and draining each step, and TP1xPP2 with batches in flight, same run.

Each case is a `pdlaunch generate` job (one colocated instance, every request at t=0, ignore_eos):
- decode: `batch` requests of 16-token prompts and 48 new tokens; throughput = tokens after each
  request's first / (last token - first first token), i.e. the decode phase alone;
- prefill: 24 prompts of 128 tokens, one new token each; throughput = prompt tokens / (last first
  token - arrival).
The layouts alternate within each repeat, so the machine's drift hits them alike; medians reported.

    python benchmarks/pipeline.py [--repeats 2] [--out benchmarks/results/pipeline.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plots import grouped_bars  # noqa: E402  (benchmarks/ is on sys.path as a script)

LAYOUTS = {"TP1xPP1": (1, True), "TP1xPP2 fill-and-drain": (2, False), "TP1xPP2 batches in flight": (2, True)}
CASES = [("decode", 8), ("decode", 32), ("prefill", 24)]


def requests(phase: str, n: int) -> list[dict]:
    length, new = (16, 48) if phase == "decode" else (128, 1)
    return [{"custom_id": f"r{i}", "prompt": [100 + (i * 37 + j) % 40000 for j in range(length)], "max_tokens": new,
             "ignore_eos": True} for i in range(n)]


def throughput(results: list[dict], phase: str) -> float:
    if phase == "prefill":
        start = min(r["metrics"]["arrival"] for r in results)
        end = max(r["metrics"]["arrival"] + r["metrics"]["token_times"][0] / 1e3 for r in results)
        return sum(r["usage"]["prompt_tokens"] for r in results) / (end - start)
    first = min(r["metrics"]["arrival"] + r["metrics"]["token_times"][0] / 1e3 for r in results)
    last = max(r["metrics"]["arrival"] + r["metrics"]["token_times"][-1] / 1e3 for r in results)
    return sum(len(r["token_ids"]) - 1 for r in results) / (last - first)


def run_case(work: str, pp: int, in_flight: bool, phase: str, n: int) -> float:
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "in.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in requests(phase, n))
    cfg = {"model": {"path": "embedded", "max_model_len": 512},
           "cluster": {"hostfile": os.path.join(ROOT, "hostfiles", "localhost")},
           "placement": {"mode": "colocated", "colocated": {"instances": 1, "tp": 1, "pp": pp}},
           "scheduler": {"prefill_token_budget": 512, "max_decode_batch": max(n, 8), "decode_kv_blocks": 2048,
                         "batches_in_flight": in_flight},
           "workload": {"input": "in.jsonl", "output": "out.jsonl"}, "run_dir": "run"}
    with open(os.path.join(work, "job.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "generate", os.path.join(work, "job.yaml"), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"pipeline bench: the {phase} job failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(work, "out.jsonl")) as f:
        return throughput([json.loads(line) for line in f], phase)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/pipeline.json")
    args = parser.parse_args()
    measured = {(layout, case): [] for layout in LAYOUTS for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for phase, n in CASES:
                for layout, (pp, in_flight) in LAYOUTS.items():
                    tps = run_case(os.path.join(tmp, f"{repeat}-{phase}-{n}-{pp}-{in_flight}"), pp, in_flight, phase, n)
                    measured[(layout, (phase, n))].append(tps)
                    print(f"repeat {repeat + 1}: {phase} {n:3d}  {layout:26s} {tps:8.1f} tok/s", flush=True)
    rows = []
    for phase, n in CASES:
        base = statistics.median(measured[("TP1xPP1", (phase, n))])
        for layout in LAYOUTS:
            tps = statistics.median(measured[(layout, (phase, n))])
            rows.append({"phase": phase, "requests": n, "layout": layout, "tokens_per_s": tps, "vs_pp1": tps / base,
                         "runs": measured[(layout, (phase, n))]})
    result = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores", "repeats": args.repeats,
              "model": "SmolLM2-135M-Instruct", "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("\n| phase | requests | layout | tok/s | vs TP1xPP1 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['requests']} | {r['layout']} | {r['tokens_per_s']:.1f} | {r['vs_pp1']:.2f}x |")
    png = os.path.splitext(args.out)[0] + ".png"
    grouped_bars([f"{p} {n}" for p, n in CASES],
                 {layout: [r["vs_pp1"] for r in rows if r["layout"] == layout] for layout in LAYOUTS},
                 "throughput vs TP1xPP1", f"SmolLM2-135M, 2 cores ({result['date']})", png, hline=1.0)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
