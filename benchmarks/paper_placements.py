"""The planner's placements against the ones DistServe deployed, on the paper's four 4 x 8 A100
settings (OPT-13B / OPT-66B chatbot, high and low node affinity), with the published A100 profile.

For each config: `pdlaunch plan` picks a placement; the paper's placement (OPT-13B: prefill TP2 +
decode TP1; OPT-66B: prefill TP4 + decode TP2xPP2) is replicated over the same 32 GPUs. Both are
replayed with `pdlaunch simulate` on long sustained traces (3,000+ Poisson arrivals, the config's
lengths) at per-GPU rates on the config's precision grid around the knee, and each one's goodput
is the highest rate whose trace and every lower one meet the SLOs for 90 % of requests.

    python benchmarks/paper_placements.py [--out benchmarks/results/paper_placements.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from contracts.config import load_config  # noqa: E402
from contracts.plan import Plan, packed_plan, read_plan, write_plan  # noqa: E402
from launcher.cli import main as pdlaunch  # noqa: E402
from launcher.job_setup import cluster_hosts  # noqa: E402
from launcher.planner.config_to_plan import settings_from  # noqa: E402
from launcher.planner.goodput import probe_span_s  # noqa: E402
from launcher.planner.workload import make_requests  # noqa: E402

CONFIGS = ["paper-opt13b-high", "paper-opt13b-low", "paper-opt66b-high", "paper-opt66b-low"]
PAPER = {"facebook/opt-13b": [("prefill", 2, 1), ("decode", 1, 1)],      # (role, tp, pp) of one unit
         "facebook/opt-66b": [("prefill", 4, 1), ("decode", 2, 2)]}
MIN_REQUESTS = 3000


def paper_plan(cfg, hosts) -> Plan:
    """The paper's unit replicated as often as the cluster's GPUs allow."""
    unit = PAPER[cfg.planner.model]
    units = sum(h.slots for h in hosts) // sum(tp * pp for _, tp, pp in unit)
    return packed_plan([(role, units, tp, pp) for role, tp, pp in unit], hosts)


def layout_of(plan: Plan) -> str:
    counts = Counter(f"{i.role[0].upper()}(tp{i.tp},pp{i.pp})" for i in plan.instances)
    return " + ".join(f"{n} x {kind}" for kind, n in counts.items())


def attainment_at(cfg_path: str, plan_path: str, cfg, devices: int, rate: float, workdir: str) -> float:
    """`pdlaunch simulate` on a sustained trace at `rate` req/s per GPU; the joint attainment at SLO scale 1."""
    settings = settings_from(cfg)
    total = rate * devices
    n = max(MIN_REQUESTS, math.ceil(total * probe_span_s(settings)))
    reqs = make_requests(n, total, settings.lengths, settings.arrival, settings.cv, settings.seed)
    trace = os.path.join(workdir, "trace.json")
    with open(trace, "w") as f:
        json.dump([{"start_time": r.arrival / 1e3, "prompt_len": r.input_len, "output_len": r.output_len}
                   for r in reqs], f)
    out = os.path.join(workdir, "sim.json")
    rc = pdlaunch(["simulate", cfg_path, "--trace", trace, "--plan", plan_path, "--slo-scales", "1", "-o", out,
                   "--quiet"])
    if rc != 0:
        raise SystemExit(f"pdlaunch simulate failed on {plan_path} at {rate} req/s/GPU")
    with open(out) as f:
        return json.load(f)["attainment"]["1"]["both"]


def sustained_goodput(cfg_path: str, plan_path: str, cfg, devices: int, workdir: str) -> tuple[float, list]:
    """Walks the precision grid up from its first step until a rate misses the target; returns the
    last passing rate and every (rate, attainment) tried."""
    step, curve = cfg.planner.precision, []
    rate = step
    while True:
        a = attainment_at(cfg_path, plan_path, cfg, devices, rate, workdir)
        curve.append((rate, a))
        if a < cfg.slo.attainment:
            return rate - step, curve
        rate += step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/paper_placements.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in CONFIGS:
            cfg_path = os.path.join(ROOT, "configs", f"{name}.yaml")
            cfg = load_config(cfg_path)
            hosts = cluster_hosts(cfg)
            chosen_path, paper_path = os.path.join(workdir, "chosen.yaml"), os.path.join(workdir, "paper.yaml")
            if pdlaunch(["plan", cfg_path, "-o", chosen_path, "--quiet"]) != 0:
                raise SystemExit(f"pdlaunch plan failed on {name}")
            write_plan(paper_plan(cfg, hosts), paper_path)
            row = {"config": name, "slo": {"ttft_ms": cfg.slo.ttft_ms, "tpot_ms": cfg.slo.tpot_ms}}
            for label, path in (("chosen", chosen_path), ("paper", paper_path)):
                plan = read_plan(path)
                devices = sum(i.size for i in plan.instances)
                goodput, curve = sustained_goodput(cfg_path, path, cfg, devices, workdir)
                row[label] = {"layout": layout_of(plan), "devices": devices, "goodput_per_gpu": goodput, "curve": curve,
                              "planner_predicted": plan.predicted.get("per_device_goodput")}
            print(f"{name}: chosen {row['chosen']['layout']} sustains {row['chosen']['goodput_per_gpu']:.3f} "
                  f"req/s/GPU; paper {row['paper']['layout']} {row['paper']['goodput_per_gpu']:.3f}", flush=True)
            rows.append(row)
    result = {"date": datetime.date.today().isoformat(), "min_requests_per_trace": MIN_REQUESTS, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, args.out.replace(".json", ".png"))
    print(f"wrote {args.out}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.6))
    for ax, row in zip(axes, rows):
        for label, style in (("chosen", "o-"), ("paper", "s--")):
            rates, att = zip(*row[label]["curve"])
            ax.plot(rates, [a * 100 for a in att], style, label=f"{label}: {row[label]['layout']}")
        ax.axhline(90, color="grey", lw=0.8)
        ax.set_title(row["config"], fontsize=9)
        ax.set_xlabel("rate per GPU (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
