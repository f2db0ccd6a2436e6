"""`pdlaunch bench`: how well the simulator predicts the real engine, and each system's goodput.

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
(one more job per probe).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import statistics
import sys
import time

from launcher.bench_calibration import (PROBE_GAP_S, PROBE_PROMPTS, calibration, calibration_requests, probe_window,
                                        scaled)
from launcher.bench_report import SCALES, plot, print_bench
from launcher.config import JobConfig, load_config
from launcher.errors import UserError
from launcher.job_setup import build_plan, check_hosts, cluster_hosts, model_dir_of, new_job, run_job
from launcher.model_files import read_shape
from launcher.plan import Plan, packed_plan
from launcher.planner.latency import LatencyModel
from launcher.planner.config_to_plan import latency_models, model_spec, settings_from
from launcher.planner.replay import simulate_plan
from launcher.stats import percentile
from launcher.planner.goodput import bisect_rate
from launcher.planner.workload import SimRequest, attainment, make_requests

DRAIN_MARGIN = 1.5      # a segment starts this many predicted drains after the previous one's last arrival
DRAIN_SLACK_S = 3.0
MAX_DRAIN_S = 60.0


# bench system -> its colocated policy; plain "colocated" names the runs stored before chunked prefill
COLOCATED_SYSTEMS = {"colocated-chunked": "chunked", "colocated-prefill_first": "prefill_first",
                     "colocated": "prefill_first"}


def system_config(cfg: JobConfig, system: str) -> JobConfig:
    """The config a bench system runs with: a colocated system's own scheduler.colocated_policy."""
    policy = COLOCATED_SYSTEMS.get(system)
    if policy is None or policy == cfg.scheduler.colocated_policy:
        return cfg
    out = copy.deepcopy(cfg)
    out.scheduler.colocated_policy = policy
    return out


def segment_requests(cfg: JobConfig, rate: float, n: int) -> list[SimRequest]:
    """n requests at `rate` req/s with the planner's length distribution, seeded by the rate: a
    rate given twice replays the identical trace, which measures the engine's own run-to-run noise."""
    settings = settings_from(cfg)
    return make_requests(n, rate, settings.lengths, settings.arrival, settings.cv,
                         cfg.workload.seed + round(rate * 1000))


def profile_latency(cfg: JobConfig, plan: Plan) -> LatencyModel:
    """The profile's latency model for the plan's kind of instances."""
    disagg, colo = latency_models(cfg)
    return colo if plan.by_role("colocated") else disagg


def measured_and_simulated(cfg: JobConfig, plan: Plan, spec, trace: list[SimRequest], segment: list[int],
                           report: dict, results_path: str) -> tuple[dict[str, list[SimRequest]], dict]:
    """One bench job's requests as the engine served them (its results file) and as the simulator
    runs the same trace, from the profile as it is and calibrated by the job's probe (report: the
    job's report.json); with the calibration factors."""
    profile = profile_latency(cfg, plan)
    factors = calibration(cfg, plan, report, probe_window(results_path, trace, segment), profile)
    return {"measured": measured(results_path, trace), "predicted": simulate_plan(cfg, plan, spec, profile, trace),
            "calibrated": simulate_plan(cfg, plan, spec, scaled(profile, factors["prefill"], factors["decode"]),
                                        trace)}, factors


def rate_indices(segment: list[int], k: int) -> list[int]:
    """The trace positions of the k-th rate's requests (segment 0 is the calibration probe)."""
    return [i for i, s in enumerate(segment) if s == k]


def build_trace(cfg: JobConfig, plan: Plan, spec, rates: list[float], n: int) -> tuple[list[SimRequest], list[int]]:
    """The job's whole trace and each request's segment (0 = calibration probe, k = rates[k-1]).
    Each segment starts when the profile says the previous one has drained (with margin), so
    segments barely interact, and where they do the simulator, replaying the same trace, sees it too."""
    latency = profile_latency(cfg, plan)
    trace, segment, t = [], [], PROBE_GAP_S * 1e3
    for r in calibration_requests(cfg):  # one at a time: each arrives once the previous should be done
        trace.append(SimRequest(t, r.input_len, r.output_len))
        segment.append(0)
        t += simulate_plan(cfg, plan, spec, latency, [r])[0].finish + PROBE_GAP_S * 1e3
    for k, rate in enumerate(rates, 1):
        reqs = segment_requests(cfg, rate, n)
        alone = simulate_plan(cfg, plan, spec, latency, reqs)
        last_arrival = max(r.arrival for r in reqs)
        drain_ms = max((r.finish for r in alone if not math.isnan(r.finish)), default=last_arrival) - last_arrival
        for r in reqs:
            trace.append(SimRequest(t + r.arrival, r.input_len, r.output_len))
            segment.append(k)
        t += last_arrival + min(MAX_DRAIN_S * 1e3, DRAIN_MARGIN * drain_ms + DRAIN_SLACK_S * 1e3)
    return trace, segment


def engine_lines(trace: list[SimRequest], segment: list[int], vocab: int, seed: int) -> list[dict]:
    """The trace as engine input: random token prompts, exact output lengths, replayed arrivals."""
    rng = random.Random(seed + 1)
    return [{"custom_id": f"s{k}-{i}", "prompt": [rng.randrange(10, vocab) for _ in range(r.input_len)],
             "max_tokens": r.output_len, "ignore_eos": True, "arrival_s": r.arrival / 1e3}
            for i, (r, k) in enumerate(zip(trace, segment))]


def measured(results_path: str, trace: list[SimRequest]) -> list[SimRequest]:
    """The engine's timings, in trace order (arrival, first token and last token relative to the
    request's own arrival; TPOT = (last - first) / (tokens - 1) as everywhere)."""
    by_index = {}
    with open(results_path) as f:
        for line in f:
            r = json.loads(line)
            m = r.get("metrics")
            if not m:
                continue
            index = int(r["custom_id"].split("-")[1])
            src = trace[index]
            req = SimRequest(src.arrival, r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"])
            req.first_token = src.arrival + m["ttft_ms"]
            req.finish = req.first_token + m["tpot_ms"] * (req.output_len - 1)
            by_index[index] = req
    if len(by_index) != len(trace):
        raise UserError(f"bench: the engine finished {len(by_index)} of {len(trace)} requests; see its messages above")
    return [by_index[i] for i in range(len(trace))]


def summary(reqs: list[SimRequest], cfg: JobConfig) -> dict:
    done = [r for r in reqs if not math.isnan(r.finish)]
    ttft = [r.ttft for r in done]
    tpot = [r.tpot for r in done if r.output_len > 1]
    span_s = (max(r.finish for r in done) - min(r.arrival for r in reqs)) / 1e3 if done else 0.0
    return {"attainment": attainment(reqs, cfg.slo.ttft_ms, cfg.slo.tpot_ms),
            "ttft_ms_p50": percentile(ttft, 0.5), "ttft_ms_p90": percentile(ttft, 0.9),
            "tpot_ms_p50": percentile(tpot, 0.5), "tpot_ms_p90": percentile(tpot, 0.9),
            "output_tokens_per_s": sum(r.output_len for r in done) / span_s if span_s else 0.0}


def slo_scale_curve(reqs: list[SimRequest], cfg: JobConfig) -> dict:
    """Attainment when both SLOs are multiplied by each scale (the paper's 'SLO scale' axis)."""
    return {str(k): attainment(reqs, cfg.slo.ttft_ms * k, cfg.slo.tpot_ms * k) for k in SCALES}


class OutOfTime(Exception):
    """The next engine job would not end within the bench's time budget."""


def _bracket(rows: list[dict], system: str, target: float) -> tuple[float, float | None]:
    """(highest rate that met the target, lowest rate above it that missed it or None), in totals."""
    mine = [r for r in rows if r["system"] == system]
    lo = max((r["rate"] for r in mine if r["measured"]["attainment"] >= target), default=0.0)
    return lo, min((r["rate"] for r in mine if r["rate"] > lo), default=None)


def measured_goodput(rows: list[dict], system: str, target: float, precision: float, probes: int, probe,
                     relative: float = 0.0) -> dict:
    """Goodput of one system on the engine: bracket from the tested rates (highest passing, lowest
    failing above it), narrowed by up to `probes` more engine runs at bracket midpoints (probe(rate)
    runs one and returns its row, or raises OutOfTime) until narrower than `relative` of the rate
    that passed (else than `precision`). Rates here are totals; precision is per device."""
    devices = next(r["devices"] for r in rows if r["system"] == system)
    lo, hi = _bracket(rows, system, target)
    out_of_time = False
    if probes:
        try:  # nothing failed yet: the first probe doubles the highest rate
            bisect_rate(lambda rate: probe(rate)["measured"]["attainment"] >= target, lo,
                        2 * lo if hi is None else hi, precision * devices, hi_fails=hi is not None, max_probes=probes,
                        relative=relative)
        except OutOfTime:
            out_of_time = True
        lo, hi = _bracket(rows, system, target)
    return {"measured": lo / devices, "bracket": [lo / devices, None if hi is None else hi / devices],
            "engine_runs": sum(r["system"] == system for r in rows), "stopped_by_time_budget": out_of_time}


def simulated_goodput(cfg: JobConfig, plan: Plan, spec, n: int, latency: LatencyModel) -> float:
    """The simulator's goodput per device for segments like the engine's (n requests at a rate,
    fresh system), by bisection up to the placement's analytic capacity."""
    from launcher.planner.replay import placement_instances
    from launcher.planner.search import colocated_capacity, placement_capacity

    settings = settings_from(cfg)
    devices = sum(i.size for i in plan.instances)
    inst = placement_instances(cfg, plan, spec)
    capacity = sum(colocated_capacity(latency, settings, i) for i in inst["colocated"]) if inst["colocated"] else \
        placement_capacity(latency, settings, inst["prefill"], inst["decode"])

    def ok(rate: float) -> bool:
        reqs = simulate_plan(cfg, plan, spec, latency, segment_requests(cfg, rate * devices, n))
        return attainment(reqs, cfg.slo.ttft_ms, cfg.slo.tpot_ms) >= cfg.slo.attainment

    return bisect_rate(ok, 0.0, capacity / devices, cfg.planner.precision, hi_fails=True)[0]


def _fidelity(rows: list[dict]) -> dict:
    """Mean and worst |simulated - measured| attainment, and where a rate ran twice (the same
    trace), how far the engine's two runs of it differ: the floor no simulator can beat."""
    out = {}
    for key, field in (("calibrated", "error_points"), ("profile", "error_points_profile")):
        errors = [r[field] for r in rows]
        out[key] = {"mean_points": statistics.fmean(errors), "worst_points": max(errors), "rows": len(errors)}
    repeats = {}
    for r in rows:
        repeats.setdefault((r["system"], r["rate"]), []).append(r["measured"]["attainment"] * 100)
    out["engine_repeat_points"] = [max(v) - min(v) for v in repeats.values() if len(v) > 1]
    return out


def goodput_ratio(a: dict, b: dict) -> dict | None:
    """a's measured goodput over b's, with the range their brackets allow (None where b has none;
    high None where a's bracket has no upper end)."""
    (a_lo, a_hi), (b_lo, b_hi) = a["bracket"], b["bracket"]
    if not b_lo:
        return None
    return {"ratio": a_lo / b_lo, "low": a_lo / b_hi if b_hi else 0.0, "high": a_hi / b_lo if a_hi else None}


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
        with open(inp, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in engine_lines(trace, segment, vocab, cfg.workload.seed))
        span_s = trace[-1].arrival / 1e3
        say(f"{system}: rates {', '.join(f'{r:g}' for r in job_rates)} req/s, {n} requests each, in one job "
            f"({span_s:.0f} s of arrivals after a {len(PROBE_PROMPTS)}-request calibration probe) ...")
        job_started = time.monotonic()
        report = run_one(system, plan, inp, out)
        overheads_s.append(time.monotonic() - job_started - span_s)
        runs, factors = measured_and_simulated(cfg_s, plan, spec, trace, segment, report, out)
        jobs.append({"system": system, "rates": job_rates, "calibration": factors, "wall_s": report.get("wall_s"),
                     "span_s": span_s})
        say(f"  calibration: prefill steps run at {factors['prefill']:.2f}x and batch-1 decode steps at "
            f"{factors['decode']:.2f}x the profile's alone timings of the same shapes "
            f"({factors['steps']['prefill']} and {factors['steps']['decode']} probe steps)")
        new = []
        for k, rate in enumerate(job_rates, 1):
            pick = rate_indices(segment, k)
            m, p, c = ([runs[name][i] for i in pick] for name in ("measured", "predicted", "calibrated"))
            row = {"system": system, "rate": rate, "devices": sum(i.size for i in plan.instances),
                   "requests": len(pick), "measured": summary(m, cfg_s), "predicted": summary(p, cfg_s),
                   "calibrated": summary(c, cfg_s), "slo_scale": slo_scale_curve(m, cfg_s), "calibration": factors}
            row["error_points"] = abs(row["measured"]["attainment"] - row["calibrated"]["attainment"]) * 100
            row["error_points_profile"] = abs(row["measured"]["attainment"] - row["predicted"]["attainment"]) * 100
            say(f"  {rate:g} req/s: attainment measured {row['measured']['attainment']:.1%}, simulated "
                f"{row['calibrated']['attainment']:.1%} (calibrated), {row['predicted']['attainment']:.1%} (profile)")
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
    fidelity = {system: _fidelity([r for r in rows if r["system"] == system]) for system in systems}
    fidelity["all"] = _fidelity(rows)
    result = {"date": time.strftime("%Y-%m-%d"),
              "slo": {"ttft_ms": cfg.slo.ttft_ms, "tpot_ms": cfg.slo.tpot_ms, "attainment": cfg.slo.attainment},
              "requests_per_rate": n, "jobs": jobs, "rows": rows, "fidelity": fidelity,
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
        run_job(new_job(run_cfg, plan, model_dir, input=inp, output=out, quiet=True, report=report), run_dir,
                f"bench: the {system} job")
        with open(report) as f:
            return json.load(f)
    return run_one


def _rates(text: str, option: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise UserError(f"bench: {option} must be numbers separated by commas, got {text!r}") from None
    if not all(math.isfinite(r) for r in rates):
        raise UserError(f"bench: {option} must be finite request rates, got {text!r}")
    if min(rates) <= 0:
        raise UserError(f"bench: {option} must be positive request rates, got {text!r}")
    return rates


def bench(args) -> int:
    """`pdlaunch bench`: validates the options, runs one engine job per system, prints and plots."""
    cfg = load_config(args.config)
    hosts = cluster_hosts(cfg)
    model_dir = model_dir_of(cfg)
    shape = read_shape(model_dir)
    rates = _rates(args.rates, "--rates")
    if args.requests < 1:
        raise UserError(f"bench: --requests must be >= 1, got {args.requests}")
    if not 0 < args.bisect_to < 1:
        raise UserError(f"bench: --bisect-to must be a share of the rate in (0, 1), e.g. 0.1; got {args.bisect_to:g}")
    if args.bisect < 0:
        raise UserError(f"bench: --bisect must be 0 or a positive number of engine runs, got {args.bisect}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UserError(f"bench: --time-budget must be a positive number of minutes, got {args.time_budget:g}")
    plan = build_plan(cfg, hosts, model_dir)
    main_system = f"colocated-{cfg.scheduler.colocated_policy}" if plan.by_role("colocated") else "disaggregated"
    systems = {main_system: plan}
    check_hosts(cfg, plan)
    per_system = {main_system: rates}
    if args.compare_colocated and plan.by_role("colocated"):
        raise UserError("bench: --compare-colocated compares a disaggregated placement with a colocated one, and "
                        "the config's placement is colocated; set placement.mode: disaggregated (or a plan file)")
    if args.compare_colocated:  # both colocated policies, on one TP1 instance per device
        devices = sum(i.size for i in next(iter(systems.values())).instances)
        colocated_rates = _rates(args.colocated_rates, "--colocated-rates") if args.colocated_rates else rates
        for system in ("colocated-chunked", "colocated-prefill_first"):
            systems.setdefault(system, packed_plan([("colocated", devices, 1, 1)], hosts))
            per_system.setdefault(system, colocated_rates)
    out_dir = os.path.abspath(args.output)
    result = run_bench(cfg, systems, per_system, args.requests, shape.vocab_size, model_spec(cfg, shape),
                       engine_runner(cfg, model_dir, out_dir),
                       out_dir, args.quiet, args.bisect, math.inf if args.time_budget is None else args.time_budget * 60,
                       args.bisect_to)
    if not args.quiet:
        print_bench(result)
        print(f"wrote {out_dir}/bench.json and attainment.png")
    return 0
