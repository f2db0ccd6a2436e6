"""Idle cost of the job's ranks and its effect on latency: the embedded default (SmolLM2-135M,
1 prefill + 1 decode instance) serves 6 prompts, idles 20 s, serves 6 more; CPU time of every rank
during the idle window, and TTFT/TPOT of the 12 requests, with idle ranks sleeping 10 ms between
polls (`scheduler.idle_sleep_ms`, the default) and with 0.5 ms polls (the old behaviour), the two
alternating, `--repeats` times each, side by side in one run.

    python benchmarks/idle_cpu.py [--repeats 2] [--out benchmarks/results/idle_cpu.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IDLE_GAP_S = 20.0
WINDOW_S = (10.0, 19.0)  # seconds after the first arrival: the first batch has drained, the second not started
SETTINGS = {"sleep 10 ms when idle": 10.0, "poll every 0.5 ms": 0.5}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rank_pids(run_dir: str) -> list[int]:
    """PIDs of the job's rank processes (python -m engine.main --job RUN_DIR/job.yaml)."""
    out = subprocess.run(["pgrep", "-f", f"engine.main --job {run_dir}/job.yaml"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def run_once(workdir: str, idle_ms: float, index: int) -> dict:
    with open(os.path.join(ROOT, "configs", "cpu-default.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["path"] = "embedded"
    cfg["cluster"]["hostfile"] = os.path.join(ROOT, "hostfiles", "localhost")
    cfg["planner"]["profile"] = os.path.join(ROOT, "configs", "profiles", "cpu-smollm2-{dtype}.json")
    cfg["scheduler"]["idle_sleep_ms"] = idle_ms
    name = f"{idle_ms:g}-{index}"
    run_dir = os.path.join(workdir, f"run-{name}")
    cfg.update(run_dir=run_dir)
    cfg["workload"] = {"input": os.path.join(workdir, "in.jsonl"), "output": os.path.join(workdir, f"out-{name}.jsonl")}
    config = os.path.join(workdir, f"cfg-{name}.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "generate", config, "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out_path = cfg["workload"]["output"]
    while not (os.path.exists(out_path) and sum(1 for _ in open(out_path)) >= 6):  # the first batch is done
        if proc.poll() is not None:
            raise SystemExit(f"the job ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    first_done = time.time()
    with open(out_path) as f:
        arrival0 = min(json.loads(line)["metrics"]["arrival"] for line in f)
    time.sleep(max(0.0, arrival0 + WINDOW_S[0] - time.time()))
    pids = rank_pids(run_dir)
    before = {p: cpu_seconds(p) for p in pids}
    t0 = time.time()
    if arrival0 + WINDOW_S[1] - t0 < 3:
        raise SystemExit("the first batch took too long: no idle window left before the second")
    time.sleep(arrival0 + WINDOW_S[1] - t0)
    used = {p: (cpu_seconds(p) - before[p]) / (time.time() - t0) for p in pids}
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"the job failed: {err[-2000:]}")
    with open(out_path) as f:
        metrics = [json.loads(line)["metrics"] for line in f]
    return {"idle_cpu_per_rank": sorted(used.values()), "ranks": len(pids), "window_after_first_batch_s":
            round(t0 - first_done, 1), "ttft_ms": [m["ttft_ms"] for m in metrics],
            "tpot_ms": [m["tpot_ms"] for m in metrics]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/idle_cpu.json")
    args = parser.parse_args()
    import tempfile

    runs = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as workdir:
        with open(os.path.join(ROOT, "examples", "prompts.jsonl")) as f:
            prompts = [json.loads(line) for line in f if line.strip()][:6]
        with open(os.path.join(workdir, "in.jsonl"), "w") as f:
            for batch, arrival in ((0, 0.0), (1, IDLE_GAP_S)):
                for i, p in enumerate(prompts):
                    f.write(json.dumps({**p, "custom_id": f"b{batch}-{i}", "arrival_s": arrival, "max_tokens": 24}) + "\n")
        for r in range(args.repeats):
            for name, idle_ms in SETTINGS.items():
                print(f"[idle] {name}, run {r + 1}/{args.repeats} ...", flush=True)
                runs[name].append(run_once(workdir, idle_ms, r))
    rows = {}
    for name, results in runs.items():
        cpu = [x for res in results for x in res["idle_cpu_per_rank"]]
        rows[name] = {"idle_cpu_per_rank_median": statistics.median(cpu), "idle_cpu_per_rank_max": max(cpu),
                      "ttft_ms_p50": statistics.median(x for res in results for x in res["ttft_ms"]),
                      "tpot_ms_p50": statistics.median(x for res in results for x in res["tpot_ms"]),
                      "runs": results}
        print(f"{name}: idle CPU per rank median {rows[name]['idle_cpu_per_rank_median']:.1%} (max "
              f"{rows[name]['idle_cpu_per_rank_max']:.1%}); TTFT p50 {rows[name]['ttft_ms_p50']:.0f} ms, "
              f"TPOT p50 {rows[name]['tpot_ms_p50']:.0f} ms")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "idle_gap_s": IDLE_GAP_S, "window_s": WINDOW_S,
                   "settings": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
