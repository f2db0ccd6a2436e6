"""Prefix caching on vs off on the embedded model (SmolLM2-135M, fp32, 1 prefill + 1 decode rank),
each workload run both ways back to side by side:
- shared: a batch of N requests (all at t=0) that share a 512-token system prompt, each with a short
  unique tail (8-24 tokens), 16 output tokens: prefill-bound without caching;
- distinct: a batch of requests with nothing shared (128-token random prompts, 16 output tokens):
  what caching costs where it cannot help (hashing, bookkeeping);
- fidelity: `pdlaunch bench` on the shared workload (planner.shared_prefix 512, every prompt 512 +
  16 tokens, 16 out, caching on) at Poisson rates: the engine's SLO attainment per rate against the
  simulator replaying the same trace, calibrated by the bench's probe (the bench's fidelity measure,
  attainment points), under SLOs loosened by --slo-scale for a machine slower than its profile.
Throughput and TTFT p50/p90 per run, the on/off ratios, and the fidelity rows go to
benchmarks/results/prefix-caching/results.json.

    python benchmarks/prefix_caching.py [--requests 200] [--distinct 60] [--pairs 3] [--fidelity-requests 40]
        [--rates 0.5,1,1.5] [--slo-scale 1]
The parts run in that order (fidelity, distinct, shared), results.json written after each.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "benchmarks", "results", "prefix-caching")
WORK = os.path.join(ROOT, "runs", "prefix-caching")
VOCAB = 49152
SYSTEM_LEN, OUTPUT = 512, 16


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


def side_by_side(name: str, prompts: list[list[int]], pairs: int = 1) -> dict:
    """`pairs` on/off pairs in alternating order (on off, off on, ...), so neither setting always
    runs first on a machine whose speed drifts; each figure and ratio is the median over the pairs."""
    runs = {"on": [], "off": []}
    for i in range(pairs):
        for caching in ((True, False) if i % 2 == 0 else (False, True)):
            key = "on" if caching else "off"
            runs[key].append(figures(run_job(f"{name}-{key}", caching, prompts, {"arrival": "all"})))
    on, off = ({k: statistics.median(r[k] for r in runs[key]) for k in runs[key][0]} for key in ("on", "off"))
    pair_ratios = {"throughput_on_over_off": [a["output_tokens_per_s"] / b["output_tokens_per_s"]
                                              for a, b in zip(runs["on"], runs["off"])],
                   "ttft_p50_off_over_on": [b["ttft_p50_ms"] / a["ttft_p50_ms"] for a, b in zip(runs["on"], runs["off"])],
                   "ttft_p90_off_over_on": [b["ttft_p90_ms"] / a["ttft_p90_ms"] for a, b in zip(runs["on"], runs["off"])]}
    return {"on": on, "off": off, "pairs": pairs, "per_pair": pair_ratios,
            **{k: statistics.median(v) for k, v in pair_ratios.items()}}


def fidelity(n: int, rates: str, slo_scale: float) -> dict:
    """The shared workload through `pdlaunch bench` at `rates`, n requests each, caching on."""
    path = config("fidelity", True, {"arrival": "poisson", "seed": 2})
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["planner"].update(lengths="fixed", input_len=SYSTEM_LEN + 16, output_len=OUTPUT, shared_prefix=SYSTEM_LEN,
                          shared_prefix_share=1.0)
    cfg["slo"] = {k: v * slo_scale if k.endswith("_ms") else v for k, v in cfg["slo"].items()}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    out = os.path.join(WORK, "fidelity", "bench")
    subprocess.run([sys.executable, "-m", "launcher.cli", "bench", path, "--rates", rates, "--requests", str(n),
                    "-o", out, "--quiet"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
    with open(os.path.join(out, "bench.json")) as f:
        bench = json.load(f)
    rows = [{"rate": r["rate"], "measured": r["measured"]["attainment"], "calibrated": r["calibrated"]["attainment"],
             "profile": r["predicted"]["attainment"], "error_points": r["error_points"],
             "ttft_p50_ms": {k: r[k]["ttft_ms_p50"] for k in ("measured", "calibrated")},
             "tpot_p50_ms": {k: r[k]["tpot_ms_p50"] for k in ("measured", "calibrated")}} for r in bench["rows"]]
    return {"slo": bench["slo"], "requests_per_rate": n, "calibration": bench["jobs"][0]["calibration"],
            "rows": rows, "fidelity": bench["fidelity"]["all"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="shared-prefix batch size")
    parser.add_argument("--distinct", type=int, default=60, help="requests of the workload without shared prefixes")
    parser.add_argument("--fidelity-requests", type=int, default=40, help="requests per rate of the fidelity bench")
    parser.add_argument("--rates", default="0.5,1,1.5", help="req/s of the fidelity bench")
    parser.add_argument("--slo-scale", type=float, default=1.0,
                        help="the fidelity bench's SLOs: the config's times this (a loaded machine: > 1)")
    parser.add_argument("--pairs", type=int, default=3,
                        help="on/off pairs of the workload without shared prefixes, in alternating order (medians)")
    parser.add_argument("--parts", default="fidelity,distinct,shared",
                        help="which parts to run; the others' figures already in results.json are kept")
    args = parser.parse_args()
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "results.json")
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            out = json.load(f)
    out.update(machine=f"{os.uname().machine}, {os.cpu_count()} cores", model="SmolLM2-135M fp32, 1P1D (TP1 each)")
    parts = (("fidelity", lambda: fidelity(args.fidelity_requests, args.rates, args.slo_scale)),
             ("distinct", lambda: side_by_side("distinct", distinct_prompts(args.distinct, seed=3), args.pairs)),
             ("shared", lambda: side_by_side("shared", shared_prompts(args.requests, seed=1))))
    for name, run in parts:  # written after each part: a run cut short keeps what it measured
        if name not in args.parts.split(","):
            continue
        load = os.getloadavg()
        out[name] = run() | {"load_average": {"before": load, "after": os.getloadavg()}}
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        report(name, out[name])


def report(name: str, r: dict) -> None:
    load = f"load average {r['load_average']['before'][0]:.1f} before, {r['load_average']['after'][0]:.1f} after"
    if name == "fidelity":
        for row in r["rows"]:
            print(f"fidelity at {row['rate']:g} req/s: attainment measured {row['measured']:.0%}, simulated "
                  f"{row['calibrated']:.0%} calibrated ({row['profile']:.0%} from the profile as it is)")
        print(f"fidelity (calibrated): mean {r['fidelity']['calibrated']['mean_points']:.1f} / worst "
              f"{r['fidelity']['calibrated']['worst_points']:.1f} points; {load}")
        return
    medians = f" (medians of {r['pairs']} pairs)" if r.get("pairs", 1) > 1 else ""
    print(f"{name}: on {r['on']['output_tokens_per_s']:.1f} tok/s, TTFT p50/p90 {r['on']['ttft_p50_ms']:.0f}/"
          f"{r['on']['ttft_p90_ms']:.0f} ms (hits {r['on']['prefix_hit_rate']:.0%}); off "
          f"{r['off']['output_tokens_per_s']:.1f} tok/s, {r['off']['ttft_p50_ms']:.0f}/{r['off']['ttft_p90_ms']:.0f} ms"
          f"; throughput {r['throughput_on_over_off']:.2f}x, TTFT p50 {r['ttft_p50_off_over_on']:.2f}x lower{medians}"
          f"; {load}")


if __name__ == "__main__":
    main()
