"""Does the planner pick the architecture the engine measures as better? Two regimes in one command,
on the embedded SmolLM2 job (configs/cpu-default.yaml) and this machine's hostfile:

- prefill-stalls-decode: long prompts and a tight TPOT SLO; a prefill beside a running decode
  stalls it past the SLO, which disaggregation avoids;
- short-prompts: short prompts, long answers and a loose TPOT; a prefill barely stalls a decode,
  and a disaggregated prefill device idles while colocated instances both decode.

For each: the planner's predicted goodput per device for both modes (its own search, as `pdlaunch
plan` runs it: colocated instances chunk prompts under the step budget it found best) and its pick;
then both modes' placements on the engine (`pdlaunch bench`'s job: calibration probe, then each
rate), bisected in turns to --bisect-to of their rate within the time budget; the measured winner
(where the brackets do not overlap) and whether the pick is it. The colocated placement also runs
with the prefill-first policy, for the record: the weak baseline DistServe compared against.

    python benchmarks/mode_choice.py [--requests N] [--lifetimes L] [--bisect N] [--time-budget MIN]
        [--prefill-first-in REGIMES] [--dtype D] [--plan-only] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from contracts.config import load_config  # noqa: E402
from contracts.plan import packed_plan  # noqa: E402
from launcher.bench import engine_runner, run_bench  # noqa: E402
from launcher.bench_goodput import goodput_ratio, simulated_goodput, sustained  # noqa: E402
from launcher.bench_report import print_bench  # noqa: E402
from launcher.bench_trace import profile_latency, system_config  # noqa: E402
from launcher.calibrate import planning_models  # noqa: E402
from launcher.job_setup import cluster_hosts, model_dir_of  # noqa: E402
from launcher.model_files import read_shape  # noqa: E402
from launcher.planner.config_to_plan import model_spec, run_planner, to_plan  # noqa: E402

REGIMES = {
    "prefill-stalls-decode": {"input_len": 384, "output_len": 32, "ttft_ms": 8000, "tpot_ms": 130},
    "short-prompts": {"input_len": 16, "output_len": 64, "ttft_ms": 2000, "tpot_ms": 400},
}


def regime_config(name: str, dtype: str):
    """The embedded job in `dtype` with the regime's lengths (fixed) and SLOs, its hosts, and the
    latency models to plan it with. The SLOs are set for the fp32 profile's machine; where this one
    runs the profile's steps at other speeds (the calibration factors), TTFT scales with the prefill
    factor and TPOT with the decode one, so the regime means the same on any machine (e.g. a prefill beside a decode still
    breaks the TPOT SLO)."""
    cfg = load_config(os.path.join(ROOT, "configs", "cpu-default.yaml"))
    cfg.model.dtype = dtype
    r = REGIMES[name]
    cfg.planner.lengths, cfg.planner.input_len, cfg.planner.output_len = "fixed", r["input_len"], r["output_len"]
    cfg.model.max_model_len = max(cfg.model.max_model_len, 2 * (r["input_len"] + r["output_len"]))
    hosts = cluster_hosts(cfg)
    models = planning_models(cfg, hosts)
    factors = models[2].factors or {"prefill": 1.0, "decode": 1.0}
    cfg.slo.ttft_ms, cfg.slo.tpot_ms = r["ttft_ms"] * factors["prefill"], r["tpot_ms"] * factors["decode"]
    return cfg, hosts, models


FALLBACK_LAYOUTS = {"disaggregated": [("prefill", 1, 1, 1), ("decode", 1, 1, 1)], "colocated": [("colocated", 2, 1, 1)]}


def plan_both(cfg, hosts, shape, models) -> tuple[dict, dict]:
    """The planner's choice and each mode's plan: its best placement of that mode, or, where no
    layout of a mode meets the SLOs in simulation, its plainest one on the same two devices (so the
    engine shows whether it really sustains nothing)."""
    _, choice, predicted = run_planner(cfg, hosts, shape, "auto", models)
    gpus = cfg.planner.gpus_per_node or max(h.slots for h in hosts)
    plans = {}
    for mode, result in choice.placements.items():
        if result is not None and result.per_device_goodput > 0:
            specs = [("prefill", s) for s in result.prefill] + [("decode", s) for s in result.decode] + \
                [("colocated", s) for s in result.colocated]
            plans[mode] = to_plan(specs, hosts, gpus)
        else:
            plans[mode] = packed_plan(FALLBACK_LAYOUTS[mode], hosts)
    return predicted, plans


def tpot_p90_at_goodput(result: dict, system: str) -> float | None:
    """TPOT p90 (ms) the engine measured at the highest rate the system sustained."""
    passing = [r for r in result["rows"] if r["system"] == system and
               sustained(r["measured"], result["slo"]["attainment"])]
    return max(passing, key=lambda r: r["rate"])["measured"]["tpot_ms_p90"] if passing else None


def winner(goodput: dict) -> str:
    """The mode whose measured bracket lies wholly above the other's, else 'tie' (within the brackets)."""
    d, c = goodput["disaggregated"]["bracket"], goodput["colocated"]["bracket"]
    if d[1] is not None and c[0] >= d[1]:
        return "colocated"
    if c[1] is not None and d[0] >= c[1]:
        return "disaggregated"
    return "tie"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--requests", type=int, default=40, help="fewest requests per rate (default 40)")
    parser.add_argument("--lifetimes", type=float, default=3.0,
                        help="a rate's arrivals span at least this many request lifetimes at the SLOs (TTFT + output "
                             "x TPOT) at the highest rate first tested, so a burst the KV absorbs cannot pass for a "
                             "sustained rate (default 3)")
    parser.add_argument("--factors", default="0.5,1,1.5", help="tested rates as multiples of each mode's predicted goodput")
    parser.add_argument("--bisect", type=int, default=8, help="engine runs per mode to narrow its bracket (default 8)")
    parser.add_argument("--bisect-to", type=float, default=0.1)
    parser.add_argument("--time-budget", type=float, default=60, help="minutes per regime (default 60)")
    parser.add_argument("--prefill-first-in", default=",".join(REGIMES),
                        help="regimes where the colocated placement also runs prefill-first, for the record "
                             "(default: all; a time budget spent on it is not spent narrowing the two modes)")
    parser.add_argument("--dtype", default="float32",
                        help="model.dtype of the job (default float32, the dtype the regimes' SLOs were set for: in "
                             "bf16 on a CPU with avx512_bf16 a 384-token prefill no longer breaks their TPOT; auto: "
                             "what the embedded job runs here)")
    parser.add_argument("--plan-only", action="store_true", help="the planner's figures and pick only, no engine runs")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "mode-choice"))
    args = parser.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "dtype": args.dtype, "load_average_at_start": os.getloadavg(),
               "regimes": {}}
    for name in args.regimes.split(","):
        cfg, hosts, models = regime_config(name, args.dtype)
        model_dir = model_dir_of(cfg)
        shape = read_shape(model_dir)
        predicted, plans = plan_both(cfg, hosts, shape, models)
        entry = {"regime": REGIMES[name], "slo_here": {"ttft_ms": round(cfg.slo.ttft_ms), "tpot_ms": round(cfg.slo.tpot_ms)},
                 "calibration": models[2].to_dict(), "pick": predicted["mode"], "reason": predicted["reason"],
                 "predicted": {m: f.get("per_device_goodput", 0.0) for m, f in predicted["modes"].items()},
                 "layouts": {m: f.get("layout") for m, f in predicted["modes"].items()},
                 "machine": predicted.get("machine", {}).get("status")}
        print(f"[{name}] {models[2].note}; SLOs here: TTFT {cfg.slo.ttft_ms:.0f} ms, TPOT {cfg.slo.tpot_ms:.0f} ms",
              flush=True)
        print(f"[{name}] planner picks {predicted['mode']}: {predicted['reason']}", flush=True)
        if not args.plan_only:
            # bench names a colocated system by its policy (the one the planner priced: the config's)
            system = {"disaggregated": "disaggregated", "colocated": f"colocated-{cfg.scheduler.colocated_policy}"}
            devices = {m: sum(i.size for i in p.instances) for m, p in plans.items()}
            # a mode the planner gives no goodput is tried at the other's rates
            best = max(entry["predicted"].values())
            rates = {system[m]: sorted({round(f * (entry["predicted"][m] or best) * devices[m], 3) for f in factors})
                     for m in plans}
            systems = {system[m]: p for m, p in plans.items()}
            spec = model_spec(cfg, shape)
            if system["colocated"] != "colocated-prefill_first" and name in args.prefill_first_in.split(","):
                record = "colocated-prefill_first"
                systems[record] = plans["colocated"]
                weak = simulated_goodput(system_config(cfg, record), plans["colocated"], spec, args.requests,
                                         profile_latency(cfg, plans["colocated"]))
                entry["predicted_prefill_first"] = weak
                rates[record] = sorted({round(f * (weak or best) * devices["colocated"], 3) for f in factors})
            out_dir = os.path.join(os.path.abspath(args.out), name)
            lifetime_s = (cfg.slo.ttft_ms + REGIMES[name]["output_len"] * cfg.slo.tpot_ms) / 1e3
            n = max(args.requests, math.ceil(args.lifetimes * lifetime_s * max(max(r) for r in rates.values())))
            entry["requests_per_rate"] = n
            result = run_bench(cfg, systems, rates, n, shape.vocab_size, spec,
                               engine_runner(cfg, model_dir, out_dir), out_dir,
                               probes=args.bisect, budget_s=args.time_budget * 60, relative=args.bisect_to)
            print_bench(result)
            g = {m: result["goodput_per_device"][system[m]] for m in plans}
            entry["measured"] = {s: {"goodput": g_s["measured"], "bracket": g_s["bracket"],
                                     "engine_runs": g_s["engine_runs"], "stopped_by_time_budget":
                                     g_s["stopped_by_time_budget"], "calibrated_simulation": g_s["simulated_calibrated"],
                                     "tpot_p90_ms": tpot_p90_at_goodput(result, s)}
                                 for s, g_s in result["goodput_per_device"].items()}
            entry["fidelity"] = result["fidelity"]
            entry["ratio_disaggregated_over_colocated"] = goodput_ratio(g["disaggregated"], g["colocated"])
            entry["measured_winner"] = winner(g)
            entry["pick_is_measured_winner"] = entry["measured_winner"] == entry["pick"] if \
                entry["measured_winner"] != "tie" else None
            print(f"[{name}] measured winner: {entry['measured_winner']}; planner's pick {entry['pick']}: "
                  + {True: "right", False: "wrong", None: "undecided (brackets overlap)"}[entry["pick_is_measured_winner"]],
                  flush=True)
        summary["regimes"][name] = entry
        summary["load_average_at_end"] = os.getloadavg()
        write_summary(summary, args.out)  # after each regime: a run cut short keeps what it measured


def write_summary(summary: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "mode_choice.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
