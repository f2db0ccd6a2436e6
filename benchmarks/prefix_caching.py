"""Prefix caching on vs off on the embedded model (SmolLM2-135M, fp32, 1 prefill + 1 decode rank),
each workload run both ways back to side by side:
- shared: a batch of N requests (all at t=0) that share a 512-token system prompt, each with a short
  unique tail (8-24 tokens), 16 output tokens: prefill-bound without caching;
- distinct: a batch of requests with nothing shared (128-token random prompts, 16 output tokens):
  what caching costs where it cannot help (hashing, bookkeeping);
- fidelity: the shared workload at Poisson arrivals, caching on, then `pdlaunch simulate` on its
  results file (the measured hits per request) against the measured SLO attainment at five scales
  of the SLOs, the bench's fidelity measure (attainment points).
Throughput and TTFT p50/p90 per run, the on/off ratios, and the fidelity rows go to
benchmarks/results/prefix-caching/results.json.

    python benchmarks/prefix_caching.py [--requests 200] [--distinct 60] [--fidelity-requests 80] [--rate 3]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "benchmarks", "results", "prefix-caching")
WORK = os.path.join(ROOT, "runs", "prefix-caching")
VOCAB = 49152
SYSTEM_LEN, OUTPUT = 512, 16
SCALES = (0.4, 0.6, 0.8, 1.0, 1.2)


def config(name: str, caching: bool, workload: dict) -> str:
    """A job config: the embedded default pinned to fp32 and 1P1D (1 rank each)."""
    run = os.path.join(WORK, name)
    os.makedirs(run, exist_ok=True)
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "cpu-default.yaml")))
    cfg["model"]["dtype"] = "float32"
    cfg["cluster"]["hostfile"] = os.path.join(ROOT, "hostfiles", "localhost")
    cfg["placement"] = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
                        "decode": {"instances": 1, "tp": 1, "pp": 1}}
    cfg["scheduler"]["prefix_caching"] = caching
    cfg["planner"]["profile"] = os.path.join(ROOT, "configs", "profiles", "cpu-smollm2-{dtype}.json")
    cfg["workload"] = {"input": os.path.join(run, "input.jsonl"), "output": os.path.join(run, "results.jsonl"),
                       **workload}
    cfg["run_dir"] = run
    path = os.path.join(run, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def shared_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(10, VOCAB) for _ in range(SYSTEM_LEN)]
    return [system + [rng.randrange(10, VOCAB) for _ in range(rng.randint(8, 24))] for _ in range(n)]


def distinct_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, VOCAB) for _ in range(128)] for _ in range(n)]


def run_job(name: str, caching: bool, prompts: list[list[int]], workload: dict) -> dict:
    """Runs one job; returns its report.json."""
    path = config(name, caching, workload)
    run = os.path.dirname(path)
    with open(os.path.join(run, "input.jsonl"), "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"custom_id": f"q{i}", "prompt": p, "max_tokens": OUTPUT, "ignore_eos": True}) + "\n")
    out = os.path.join(run, "results.jsonl")
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "launcher.cli", "generate", path, "--quiet"], cwd=ROOT, env=env, check=True)
    with open(os.path.join(run, "report.json")) as f:
        return json.load(f)


def figures(report: dict) -> dict:
    return {"output_tokens_per_s": report["output_tokens_per_s"], "requests_per_s": report["requests_per_s"],
            "wall_s": report["wall_s"], "ttft_p50_ms": report["ttft_ms"]["p50"], "ttft_p90_ms": report["ttft_ms"]["p90"],
            "tpot_p50_ms": report["tpot_ms"]["p50"], "prefix_hit_rate": report["prefix_hit_rate"],
            "requests": report["requests"], "errors": report["errors"]}


def side_by_side(name: str, prompts: list[list[int]]) -> dict:
    on = figures(run_job(f"{name}-on", True, prompts, {"arrival": "all"}))
    off = figures(run_job(f"{name}-off", False, prompts, {"arrival": "all"}))
    return {"on": on, "off": off, "throughput_on_over_off": on["output_tokens_per_s"] / off["output_tokens_per_s"],
            "ttft_p50_off_over_on": off["ttft_p50_ms"] / on["ttft_p50_ms"],
            "ttft_p90_off_over_on": off["ttft_p90_ms"] / on["ttft_p90_ms"]}


def measured_attainment(results: str, slo: dict) -> dict:
    rows = [json.loads(line) for line in open(results)]
    ok = [r["metrics"] for r in rows if r.get("metrics")]
    return {f"{k:g}": sum(m["ttft_ms"] <= slo["ttft_ms"] * k and m["tpot_ms"] <= slo["tpot_ms"] * k for m in ok)
            / len(rows) for k in SCALES}


def fidelity(n: int, rate: float) -> dict:
    """The shared workload at `rate` req/s, caching on, measured and replayed by `pdlaunch simulate`."""
    report = run_job("fidelity", True, shared_prompts(n, seed=2), {"arrival": "poisson", "rate": rate, "seed": 2})
    run = os.path.join(WORK, "fidelity")
    sim_out = os.path.join(run, "simulated.json")
    subprocess.run([sys.executable, "-m", "launcher.cli", "simulate", os.path.join(run, "job.yaml"), "--trace",
                    os.path.join(run, "results.jsonl"), "--slo-scales", ",".join(map(str, SCALES)), "-o", sim_out,
                    "--quiet"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
    simulated = json.load(open(sim_out))
    measured = measured_attainment(os.path.join(run, "results.jsonl"), simulated["slo"])
    points = {k: abs(measured[k] - simulated["attainment"][k]["both"]) * 100 for k in measured}
    sim_ttft = sorted(r["ttft_ms"] for r in simulated["requests"] if r["ttft_ms"] is not None)
    return {"rate": rate, "requests": n, "prefix_hit_rate": report["prefix_hit_rate"],
            "measured_attainment": measured,
            "simulated_attainment": {k: simulated["attainment"][k]["both"] for k in measured},
            "error_points": points, "mean_points": sum(points.values()) / len(points),
            "worst_points": max(points.values()),
            "ttft_p50_ms": {"measured": report["ttft_ms"]["p50"], "simulated": sim_ttft[len(sim_ttft) // 2]},
            "ttft_mean_ms": {"measured": report["ttft_ms_mean"], "simulated": simulated["ttft_ms"]["mean"]},
            "tpot_mean_ms": {"measured": report["tpot_ms_mean"], "simulated": simulated["tpot_ms"]["mean"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="shared-prefix batch size")
    parser.add_argument("--distinct", type=int, default=60, help="requests of the workload without shared prefixes")
    parser.add_argument("--fidelity-requests", type=int, default=80)
    parser.add_argument("--rate", type=float, default=3.0, help="req/s of the fidelity run")
    args = parser.parse_args()
    os.makedirs(OUT_DIR, exist_ok=True)
    out = {"machine": f"{os.uname().machine}, {os.cpu_count()} cores", "model": "SmolLM2-135M fp32, 1P1D (TP1 each)",
           "shared": side_by_side("shared", shared_prompts(args.requests, seed=1)),
           "distinct": side_by_side("distinct", distinct_prompts(args.distinct, seed=3)),
           "fidelity": fidelity(args.fidelity_requests, args.rate)}
    with open(os.path.join(OUT_DIR, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    for name in ("shared", "distinct"):
        r = out[name]
        print(f"{name}: on {r['on']['output_tokens_per_s']:.1f} tok/s, TTFT p50/p90 {r['on']['ttft_p50_ms']:.0f}/"
              f"{r['on']['ttft_p90_ms']:.0f} ms (hits {r['on']['prefix_hit_rate']:.0%}); off "
              f"{r['off']['output_tokens_per_s']:.1f} tok/s, {r['off']['ttft_p50_ms']:.0f}/{r['off']['ttft_p90_ms']:.0f} ms"
              f"; throughput {r['throughput_on_over_off']:.2f}x, TTFT p50 {r['ttft_p50_off_over_on']:.2f}x lower")
    fid = out["fidelity"]
    print(f"fidelity at {fid['rate']:g} req/s: attainment error mean {fid['mean_points']:.1f} / worst "
          f"{fid['worst_points']:.1f} points (measured {fid['measured_attainment']}, simulated "
          f"{fid['simulated_attainment']})")


if __name__ == "__main__":
    main()
