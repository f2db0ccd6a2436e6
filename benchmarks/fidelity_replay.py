"""The simulator's error on one `pdlaunch bench` run's measured attainment, re-simulated with other
profiles: the same trace and the same engine results for each, so profiles (or simulator versions)
are compared without the engine's run-to-run noise (tens of points at the knee on this machine).
Takes every job whose report the bench kept (report-SYSTEM-N.json; before 2026-12-04 only each
system's last job, in run-SYSTEM/report.json); the bench directory needs its results-*.jsonl,
which `pdlaunch bench -o DIR` writes and git does not keep. Besides the profile as it is and the
job's probe, each job is replayed at the speed its own steps ran (launcher/step_pricing.py).

    python benchmarks/fidelity_replay.py CONFIG BENCH_DIR PROFILE [PROFILE ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from contracts.config import load_config  # noqa: E402
from contracts.plan import read_plan  # noqa: E402
from launcher.bench_trace import build_trace, measured_and_simulated, rate_indices, summary, system_config  # noqa: E402
from launcher.job_setup import model_dir_of  # noqa: E402
from launcher.model_files import read_shape  # noqa: E402
from launcher.planner.config_to_plan import model_spec  # noqa: E402


def replay(config: str, bench_dir: str, profile: str) -> list[dict]:
    """Per (system, rate): measured attainment and the simulator's, from `profile` as it is and
    calibrated by the run's own probe against it."""
    cfg = load_config(config)
    cfg.planner.profile = cfg.planner.colocated_profile = os.path.abspath(profile)
    spec = model_spec(cfg, read_shape(model_dir_of(cfg)))
    with open(os.path.join(bench_dir, "bench.json")) as f:
        bench = json.load(f)
    rows = []
    last = {job["system"]: index for index, job in enumerate(bench["jobs"])}
    for index, job in enumerate(bench["jobs"]):
        system = job["system"]
        report_path = os.path.join(bench_dir, f"report-{system}-{index}.json")  # kept per job since 2026-12-04
        if not os.path.exists(report_path):
            if index != last[system]:
                continue  # an older bench: run-<system>/report.json holds only the system's last job
            report_path = os.path.join(bench_dir, f"run-{system}", "report.json")
        cfg_s = system_config(cfg, system)  # its colocated policy
        plan = read_plan(os.path.join(bench_dir, f"run-{system}", "plan.yaml"))
        trace, segment = build_trace(cfg_s, plan, spec, job["rates"], bench["requests_per_rate"])
        with open(report_path) as f:
            report = json.load(f)
        runs, *_ = measured_and_simulated(cfg_s, plan, spec, trace, segment, report,
                                         os.path.join(bench_dir, f"results-{system}-{index}.jsonl"))
        for k, rate in enumerate(job["rates"], 1):
            pick = rate_indices(segment, k)
            rows.append({"system": system, "rate": rate} |
                        {name: summary([reqs[i] for i in pick], cfg_s)["attainment"] for name, reqs in runs.items()})
    return rows


def errors(rows: list[dict], kind: str) -> dict:
    points = [abs(r["measured"] - r[kind]) * 100 for r in rows]
    return {"mean_points": sum(points) / len(points), "worst_points": max(points)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("bench_dir")
    parser.add_argument("profiles", nargs="+")
    parser.add_argument("--out", help="JSON file for the rows and errors")
    args = parser.parse_args()
    out = {}
    for profile in args.profiles:
        rows = replay(args.config, args.bench_dir, profile)
        out[profile] = {"rows": rows, "profile": errors(rows, "predicted"), "calibrated": errors(rows, "calibrated"),
                        "replayed": errors(rows, "replayed")}
        print(f"{profile}:")
        for r in rows:
            print(f"  {r['system']:>13} {r['rate']:>5g} req/s: measured {r['measured']:.0%}, "
                  f"simulated {r['calibrated']:.0%} calibrated, {r['predicted']:.0%} from the profile, "
                  f"{r['replayed']:.0%} at the run's step speed")
        print("  error: calibrated mean {mean_points:.1f} / worst {worst_points:.1f} points; ".format(
            **out[profile]["calibrated"]) + "profile mean {mean_points:.1f} / worst {worst_points:.1f}; ".format(
            **out[profile]["profile"]) + "at the run's step speed mean {mean_points:.1f} / worst {worst_points:.1f}".format(
            **out[profile]["replayed"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bench_dir": args.bench_dir, "by_profile": out}, f, indent=1)


if __name__ == "__main__":
    main()
