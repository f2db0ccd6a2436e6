"""Planner speed: time to plan the paper's 4 x 8 A100 settings (OPT-13B and OPT-66B, high and low
node affinity) with DistServe's published profile, in one process on one core; medians of repeats.

    python benchmarks/planner_speed.py [--repeats 3] [--out benchmarks/results/planner_speed.json]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from plots import grouped_bars  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from contracts.config import load_config  # noqa: E402
from launcher.job_setup import cluster_hosts  # noqa: E402
from launcher.planner.config_to_plan import run_planner  # noqa: E402

CONFIGS = ["paper-opt13b-high", "paper-opt66b-high", "paper-opt13b-low", "paper-opt66b-low"]
TARGET_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/planner_speed.json")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target states
    rows = []
    for name in CONFIGS:
        cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        hosts = cluster_hosts(cfg)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            plan, result, predicted = run_planner(cfg, hosts)
            times.append(time.perf_counter() - started)
        rows.append({"config": name, "plan_s_median": statistics.median(times), "plan_s": times,
                     "layout": predicted["layout"], "per_device_goodput": predicted["per_device_goodput"],
                     "colocated": predicted["colocated"]})
        print(f"{name:20s} {statistics.median(times):6.2f} s  {predicted['layout']}  "
              f"{predicted['per_device_goodput']} req/s/GPU", flush=True)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, 1 core",
              "repeats": args.repeats, "target_s": TARGET_S, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    grouped_bars([r["config"].replace("paper-", "") for r in rows],
                 {"plan time (s)": [r["plan_s_median"] for r in rows]}, "seconds",
                 f"Planning 4 x 8 A100, one core, median of {args.repeats} ({result['date']}); target < {TARGET_S:g} s",
                 png, hline=TARGET_S)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
