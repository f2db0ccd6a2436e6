"""`pdlaunch bench`'s machinery (the command: launcher/commands/bench.py): how well the simulator predicts the real engine, and each system's goodput.

One engine job per system runs every rate: its input is one trace made of a calibration probe
followed by one segment per rate (n requests at that rate, Poisson or gamma as configured), each
segment starting once the previous one should have drained. The job starts once (start-up is ~15 s
on this machine), and the probe measures how fast the machine runs *now* (a shared machine drifts by
20-35 % within the hour): single requests, one at a time, whose prefill and batch-1 decode steps
have exactly the shapes `pdlaunch profile` timed alone, so the ratio of the engine's step times to
the profile's own samples is the drift and nothing else (not the fit's shape error, not contention).
The simulator then replays the exact same trace (arrival times, lengths) on the same placement,
once with the profile as it is and once with its costs scaled by the drift, and each segment's SLO
attainment is compared with the engine's. Goodput per device comes from the segments' bracket
(highest rate that met the SLOs, lowest above it that did not), optionally narrowed by bisection
(one more job per probe). The trace: launcher/bench_trace.py; the probe's factors:
bench_calibration.py; goodput and fidelity: bench_goodput.py; the table and plot: bench_report.py.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time

from contracts.config import JobConfig
from contracts.plan import Plan
from launcher.bench_calibration import PROBE_PROMPTS, scaled
from launcher.bench_goodput import OutOfTime, fidelity, goodput_ratio, measured_goodput, simulated_goodput
from launcher.bench_report import FIDELITY_FIELDS, plot
from launcher.bench_trace import (build_trace, engine_lines, measured_and_simulated, profile_latency, rate_indices,
                                  slo_scale_curve, summary, system_config)
from launcher.job_setup import checked_requests, new_job, run_job
from launcher.step_pricing import pricing_line


def run_bench(cfg: JobConfig, systems: dict[str, Plan], rates: dict[str, list[float]], n: int, vocab: int, spec,
              run_one, out_dir: str, quiet: bool = False, probes: int = 0, budget_s: float = math.inf,
              relative: float = 0.0) -> dict:
    """run_one(system, plan, input_path, output_path) -> the job's report; runs one engine job.
    Each system runs all its rates in one job (after the calibration probe); with probes, its
    goodput is bisected further with one more job per probe (until its bracket is narrower than
    `relative` of its rate, else planner.precision), as long as the next one is expected to end
    within budget_s of the start. The systems are bisected in turns, one probe each, so a budget
    that runs out leaves every one of them narrowed alike."""
    os.makedirs(out_dir, exist_ok=True)
    rows, jobs = [], []
    started, overheads_s = time.monotonic(), [0.0]  # a job's time beyond its trace's span

    def say(text: str) -> None:
        if not quiet:
            print(f"[bench] {text}", file=sys.stderr, flush=True)

    def job(system: str, job_rates: list[float]) -> list[dict]:
        plan, cfg_s = systems[system], system_config(cfg, system)
        trace, segment = build_trace(cfg_s, plan, spec, job_rates, n)
        name = f"{system}-{len(jobs)}"
        inp, out = os.path.join(out_dir, f"workload-{name}.jsonl"), os.path.join(out_dir, f"results-{name}.jsonl")
        lines = engine_lines(trace, segment, vocab, cfg.workload.seed, cfg.planner.shared_prefix)
        with open(inp, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        span_s = trace[-1].arrival / 1e3
        say(f"{system}: rates {', '.join(f'{r:g}' for r in job_rates)} req/s, {n} requests each, in one job "
            f"({span_s:.0f} s of arrivals after a {len(PROBE_PROMPTS)}-request calibration probe) ...")
        job_started = time.monotonic()
        report = run_one(system, plan, inp, out)
        with open(os.path.join(out_dir, f"report-{name}.json"), "w") as f:  # its step samples, for later replays
            json.dump(report, f)
        overheads_s.append(time.monotonic() - job_started - span_s)
        runs, factors, pricing = measured_and_simulated(cfg_s, plan, spec, trace, segment, report, out)
        jobs.append({"system": system, "rates": job_rates, "calibration": factors, "wall_s": report.get("wall_s"),
                     "span_s": span_s, "step_pricing": pricing})
        say(f"  calibration: prefill steps run at {factors['prefill']:.2f}x and batch-1 decode steps at "
            f"{factors['decode']:.2f}x the profile's alone timings of the same shapes "
            f"({factors['steps']['prefill']} and {factors['steps']['decode']} probe steps)")
        run = factors["run"]
        say(f"  the job's own steps ran at {run['prefill']:.2f}x (prefill and mixed) and {run['decode']:.2f}x (decode) "
            "the profile's prices")
        say(f"  the job's steps against the calibrated model's price (median by kind and tokens per step; steps): "
            f"{pricing_line(pricing)}")
        new = []
        for k, rate in enumerate(job_rates, 1):
            pick = rate_indices(segment, k)
            m, p, c, r = ([runs[name][i] for i in pick] for name in ("measured", "predicted", "calibrated", "replayed"))
            row = {"system": system, "rate": rate, "devices": sum(i.size for i in plan.instances),
                   "requests": len(pick), "measured": summary(m, cfg_s), "predicted": summary(p, cfg_s),
                   "calibrated": summary(c, cfg_s), "replayed": summary(r, cfg_s),
                   "slo_scale": slo_scale_curve(m, cfg_s), "calibration": factors}
            for field, name, *_ in FIDELITY_FIELDS:
                row[field] = abs(row["measured"]["attainment"] - row[name]["attainment"]) * 100
            say(f"  {rate:g} req/s: attainment measured {row['measured']['attainment']:.1%}, simulated "
                f"{row['calibrated']['attainment']:.1%} (calibrated), {row['predicted']['attainment']:.1%} (profile), "
                f"{row['replayed']['attainment']:.1%} (at the job's own step speed)")
            new.append(row)
        rows.extend(new)
        return new

    def probe(system: str, rate: float) -> dict:
        trace, _ = build_trace(system_config(cfg, system), systems[system], spec, [rate], n)
        if time.monotonic() - started + trace[-1].arrival / 1e3 + max(overheads_s) > budget_s:
            say(f"{system} at {rate:g} req/s would end past the time budget: bisection stops")
            raise OutOfTime
        return job(system, [rate])[0]

    for system in systems:
        job(system, rates[system])
    goodput = {system: measured_goodput(rows, system, cfg.slo.attainment, cfg.planner.precision, 0, None)
               for system in systems}
    for _ in range(probes):
        for system in systems:
            if goodput[system]["stopped_by_time_budget"]:
                continue
            before = goodput[system]["engine_runs"]
            goodput[system] = measured_goodput(rows, system, cfg.slo.attainment, cfg.planner.precision, 1,
                                               lambda rate: probe(system, rate), relative)
            goodput[system]["done"] = goodput[system]["engine_runs"] == before and \
                not goodput[system]["stopped_by_time_budget"]
        if all(g.get("done") or g["stopped_by_time_budget"] for g in goodput.values()):
            break
    for system, plan in systems.items():
        goodput[system].pop("done", None)
        factors = next(j["calibration"] for j in jobs if j["system"] == system)
        profile = profile_latency(cfg, plan)
        cfg_s = system_config(cfg, system)
        goodput[system]["simulated_profile"] = simulated_goodput(cfg_s, plan, spec, n, profile)
        goodput[system]["simulated_calibrated"] = simulated_goodput(
            cfg_s, plan, spec, n, scaled(profile, factors["prefill"], factors["decode"]))
    rows.sort(key=lambda r: (r["system"], r["rate"]))
    errors = {system: fidelity([r for r in rows if r["system"] == system]) for system in systems}
    errors["all"] = fidelity(rows)
    result = {"date": time.strftime("%Y-%m-%d"),
              "slo": {"ttft_ms": cfg.slo.ttft_ms, "tpot_ms": cfg.slo.tpot_ms, "attainment": cfg.slo.attainment},
              "requests_per_rate": n, "jobs": jobs, "rows": rows, "fidelity": errors,
              "goodput_per_device": goodput, "duration_s": time.monotonic() - started}
    names = list(systems)
    if len(names) == 2:
        result["goodput_ratio"] = {f"{names[0]}/{names[1]}": goodput_ratio(goodput[names[0]], goodput[names[1]])}
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, result["slo"], os.path.join(out_dir, "attainment.png"),
         f"SLO attainment vs rate (TTFT <= {cfg.slo.ttft_ms:.0f} ms, TPOT <= {cfg.slo.tpot_ms:.0f} ms)")
    return result


def engine_runner(cfg: JobConfig, model_dir: str, out_dir: str):
    """run_bench's run_one: one engine job of `plan` on an input file, in out_dir/run-<system>."""
    def run_one(system: str, plan: Plan, inp: str, out: str) -> dict:
        run_cfg = copy.deepcopy(system_config(cfg, system))
        run_cfg.workload.input, run_cfg.workload.output = inp, out
        if os.path.exists(out):
            os.remove(out)
        run_dir = os.path.join(out_dir, f"run-{system}")
        os.makedirs(run_dir, exist_ok=True)
        report = os.path.join(run_dir, "report.json")
        run_job(new_job(run_cfg, plan, model_dir, requests=checked_requests(inp, run_dir), output=out, quiet=True,
                        report=report), run_dir, f"bench: the {system} job")
        with open(report) as f:
            return json.load(f)
    return run_one

