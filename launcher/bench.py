"""`pdlaunch bench`: replay one workload against the real engine at several rates, next to the
simulator's prediction for the same requests (same lengths, same arrival times), and report SLO
attainment, TTFT/TPOT percentiles, throughput and goodput as JSON and a PNG. Goodput per device
comes from the tested rates' bracket, narrowed by bisection on the engine when probes are given,
next to the simulator's own goodput found by bisection.
"""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import replace

from launcher.config import JobConfig
from launcher.errors import UserError
from launcher.plan import Plan
from launcher.planner.latency import Coefficients, LatencyModel
from launcher.planner.planning import latency_models, settings_from
from launcher.planner.profile_fit import fit_decode_split, fit_prefill
from launcher.planner.search import bisect_rate
from launcher.planner.simulator import InstanceSpec, Policy, Simulation, SimRequest, attainment, make_requests

MIN_SHAPES = 4  # distinct step shapes a phase needs before its coefficients are refitted


def workload(cfg: JobConfig, rate: float, n: int, vocab: int) -> tuple[list[SimRequest], list[dict]]:
    """n requests at `rate` req/s with the planner's length distribution, as simulator requests and
    as engine input lines (random token prompts, exact output lengths, replayed arrival times)."""
    settings = settings_from(cfg)
    reqs = make_requests(n, rate, settings.lengths, settings.arrival, settings.cv, cfg.workload.seed)
    rng = random.Random(cfg.workload.seed + 1)
    lines = [{"custom_id": f"b{i}", "prompt": [rng.randrange(10, vocab) for _ in range(r.input_len)],
              "max_tokens": r.output_len, "ignore_eos": True, "arrival_s": r.arrival / 1e3}
             for i, r in enumerate(reqs)]
    return reqs, lines


def base_latency(cfg: JobConfig, plan: Plan) -> LatencyModel:
    """The profile's latency model for the plan's kind of instances."""
    disagg, colo = latency_models(cfg)
    return colo if plan.by_role("colocated") else disagg


def predict(cfg: JobConfig, plan: Plan, spec_kv_bytes: int, reqs: list[SimRequest],
            latency: LatencyModel | None = None) -> list[SimRequest]:
    """The simulator on `plan` (its instances, KV capacities and the engine's policies); latency is
    the profile's model unless given."""
    latency = latency or base_latency(cfg, plan)
    s = cfg.scheduler

    def inst(i, blocks):
        return InstanceSpec(i.tp, i.pp, blocks * s.block_size)

    policy = Policy(s.prefill_token_budget, s.max_decode_batch, spec_kv_bytes,
                    lambda p, d: cfg.cluster.intra_node_bandwidth_gbps)
    fresh = [SimRequest(r.arrival, r.input_len, r.output_len) for r in reqs]
    if plan.by_role("colocated"):
        sim = Simulation(latency, policy, colocated=[inst(i, s.decode_kv_blocks) for i in plan.by_role("colocated")])
    else:
        sim = Simulation(latency, policy, [inst(i, s.prefill_kv_blocks) for i in plan.by_role("prefill")],
                         [inst(i, s.decode_kv_blocks) for i in plan.by_role("decode")])
    return sim.run(fresh)


def calibrated(base: LatencyModel, plan: Plan, reports: list[dict]) -> LatencyModel:
    """`base` refitted to the pure prefill and decode step timings that the engine's instances
    recorded in `reports` (the runs' own contention included), per TP degree of PP-1 instances;
    a phase with fewer than MIN_SHAPES distinct shapes keeps base's coefficients."""
    by_tp: dict[int, dict[str, list]] = {}
    for report in reports:
        for stats in report["instances"]:
            inst = plan.instances[stats["instance"]]
            if inst.pp == 1:
                for kind, samples in stats["step_samples"].items():
                    by_tp.setdefault(inst.tp, {"prefill": [], "decode": []})[kind].extend(samples)
    coefficients = dict(base.by_tp)
    for tp, samples in by_tp.items():
        coef = coefficients.get(tp)
        shapes = {"prefill": {sum(x["lens"]) for x in samples["prefill"]},
                  "decode": {(x["batch"], x["context_sum"]) for x in samples["decode"]}}
        enough = {kind: len(v) >= MIN_SHAPES for kind, v in shapes.items()}
        if coef is None and not all(enough.values()):
            continue
        changes = {}
        if enough["prefill"]:
            changes["prefill"] = tuple(fit_prefill(samples["prefill"]))
        if enough["decode"]:
            small, large, threshold = fit_decode_split(samples["decode"])
            changes.update(decode_small=tuple(small), decode_large=tuple(large), threshold=threshold)
        coefficients[tp] = replace(coef, **changes) if coef else Coefficients(
            changes["prefill"], changes["decode_small"], changes["decode_large"], changes["threshold"], 0.5)
    return LatencyModel(base.model, coefficients, "engine step timings", base.pipelined_pp, base.meta)


def measured(results_path: str) -> list[SimRequest]:
    out = []
    with open(results_path) as f:
        for line in f:
            r = json.loads(line)
            m = r.get("metrics")
            if not m:
                continue
            req = SimRequest(0.0, r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"])
            req.first_token = m["ttft_ms"]
            req.finish = m["ttft_ms"] + m["tpot_ms"] * (req.output_len - 1)
            out.append(req)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summary(reqs: list[SimRequest], cfg: JobConfig, wall_s: float | None = None) -> dict:
    ttft = [r.ttft for r in reqs]
    tpot = [r.tpot for r in reqs if r.output_len > 1]
    out = {"attainment": attainment(reqs, cfg.slo.ttft_ms, cfg.slo.tpot_ms),
           "ttft_ms_p50": statistics.median(ttft), "ttft_ms_p90": pct(ttft, 0.9),
           "tpot_ms_p50": statistics.median(tpot) if tpot else 0.0, "tpot_ms_p90": pct(tpot, 0.9)}
    if wall_s:
        out["output_tokens_per_s"] = sum(r.output_len for r in reqs) / wall_s
    return out


SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def slo_scale_curve(reqs: list[SimRequest], cfg: JobConfig) -> dict:
    """Attainment when both SLOs are multiplied by each scale (the paper's 'SLO scale' axis)."""
    return {str(k): attainment(reqs, cfg.slo.ttft_ms * k, cfg.slo.tpot_ms * k) for k in SCALES}


def plot(rows: list[dict], slo: dict, scale_rate: float, path: str, title: str) -> None:
    """Left: attainment vs per-device rate, measured and simulated; right: attainment vs SLO scale
    at `scale_rate` (a rate every system ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for system in sorted({r["system"] for r in rows}):
        row = next(r for r in rows if r["system"] == system and r["rate"] == scale_rate)
        ax2.plot(SCALES, [row["slo_scale"][str(k)] * 100 for k in SCALES], "o-", label=f"{system} measured")
    ax2.axhline(slo["attainment"] * 100, color="grey", lw=0.8)
    ax2.set_xlabel(f"SLO scale (x TTFT {slo['ttft_ms']:.0f} ms, TPOT {slo['tpot_ms']:.0f} ms) at {scale_rate:g} req/s")
    ax2.set_ylabel("SLO attainment (%)")
    ax2.set_ylim(0, 105)
    ax2.legend(fontsize=8)
    for system in sorted({r["system"] for r in rows}):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
        rate = [r["rate"] / r["devices"] for r in mine]
        line, = ax.plot(rate, [r["measured"]["attainment"] * 100 for r in mine], "o-", label=f"{system} measured")
        ax.plot(rate, [r["predicted"]["attainment"] * 100 for r in mine], "x--", color=line.get_color(),
                label=f"{system} simulated (profile)")
        if all("calibrated" in r for r in mine):
            ax.plot(rate, [r["calibrated"]["attainment"] * 100 for r in mine], "+:", color=line.get_color(),
                    label=f"{system} simulated (refit)")
    ax.axhline(slo["attainment"] * 100, color="grey", lw=0.8)
    ax.set_xlabel("rate per device (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class OutOfTime(Exception):
    """The next engine run would not end within the bench's time budget."""


def _bracket(rows: list[dict], system: str, target: float) -> tuple[float, float | None]:
    """(highest rate that met the target, lowest rate above it that missed it or None), in totals."""
    mine = [r for r in rows if r["system"] == system]
    lo = max((r["rate"] for r in mine if r["measured"]["attainment"] >= target), default=0.0)
    return lo, min((r["rate"] for r in mine if r["rate"] > lo), default=None)


def measured_goodput(rows: list[dict], system: str, target: float, precision: float, probes: int, probe) -> dict:
    """Goodput of one system on the engine: bracket from the tested rates (highest passing, lowest
    failing above it), narrowed by up to `probes` more engine runs at bracket midpoints (probe(rate)
    runs one and returns its row, or raises OutOfTime). Rates here are totals; precision is per device."""
    devices = next(r["devices"] for r in rows if r["system"] == system)
    lo, hi = _bracket(rows, system, target)
    out_of_time = False
    if probes:
        try:  # nothing failed yet: the first probe doubles the highest rate
            bisect_rate(lambda rate: probe(rate)["measured"]["attainment"] >= target, lo,
                        2 * lo if hi is None else hi, precision * devices, hi_fails=hi is not None, max_probes=probes)
        except OutOfTime:
            out_of_time = True
        lo, hi = _bracket(rows, system, target)
    return {"measured": lo / devices, "bracket": [lo / devices, None if hi is None else hi / devices],
            "engine_runs": sum(r["system"] == system for r in rows), "stopped_by_time_budget": out_of_time}


def simulated_goodput(cfg: JobConfig, plan: Plan, n: int, vocab: int, kv_bytes: int,
                      latency: LatencyModel | None = None) -> float | None:
    """The simulator's goodput per device for the same workload generator, by bisection; None when
    no rate up to 1e6 req/s/device misses the SLOs."""
    devices = sum(i.size for i in plan.instances)

    def ok(rate: float) -> bool:
        reqs = predict(cfg, plan, kv_bytes, workload(cfg, rate * devices, n, vocab)[0], latency)
        return attainment(reqs, cfg.slo.ttft_ms, cfg.slo.tpot_ms) >= cfg.slo.attainment

    lo, hi = bisect_rate(ok, 0.0, cfg.planner.precision * 4, cfg.planner.precision, ceiling=1e6)
    return lo if hi < math.inf else None


def run_bench(cfg: JobConfig, systems: dict[str, Plan], rates: list[float], n: int, vocab: int, kv_bytes: int,
              run_one, out_dir: str, quiet: bool = False, probes: int = 0, budget_s: float = math.inf) -> dict:
    """run_one(system, plan, input_path, output_path) -> the run's report (wall_s, instances' stats);
    runs the engine. With probes, each system's goodput is bisected further with up to that many
    extra engine runs, as long as the next one is expected to end within budget_s of the start
    (its arrivals' span plus the slowest start-up and drain seen so far). Each row is predicted
    twice: from the profile, and from a latency model refitted to the step timings of the same
    system's runs at the other rates (leave-one-out)."""
    os.makedirs(out_dir, exist_ok=True)
    rows, reports = [], {}
    started, overheads_s = time.monotonic(), [0.0]  # a run's time beyond its arrivals' span

    def measure(system: str, rate: float) -> dict:
        plan = systems[system]
        reqs, lines = workload(cfg, rate, n, vocab)
        run_started = time.monotonic()
        inp = os.path.join(out_dir, f"workload-{rate:g}.jsonl")
        with open(inp, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        out = os.path.join(out_dir, f"results-{system}-{rate:g}.jsonl")
        if not quiet:
            print(f"[bench] {system} at {rate:g} req/s ({n} requests) ...", file=sys.stderr, flush=True)
        reports[system, rate] = run_one(system, plan, inp, out)
        overheads_s.append(time.monotonic() - run_started - reqs[-1].arrival / 1e3)
        got = measured(out)
        if len(got) != n:
            raise UserError(f"bench: {system} at {rate} req/s finished {len(got)} of {n} requests")
        row = {"system": system, "rate": rate, "devices": sum(i.size for i in plan.instances),
               "measured": summary(got, cfg, reports[system, rate]["wall_s"]),
               "predicted": summary(predict(cfg, plan, kv_bytes, reqs), cfg), "slo_scale": slo_scale_curve(got, cfg)}
        row["error_points"] = abs(row["measured"]["attainment"] - row["predicted"]["attainment"]) * 100
        rows.append(row)
        if not quiet:
            print(f"[bench]   attainment measured {row['measured']['attainment']:.1%}, simulated "
                  f"{row['predicted']['attainment']:.1%}", file=sys.stderr, flush=True)
        return row

    def probe(system: str, rate: float) -> dict:
        span_s = workload(cfg, rate, n, vocab)[0][-1].arrival / 1e3
        if time.monotonic() - started + span_s + max(overheads_s) > budget_s:
            if not quiet:
                print(f"[bench] {system} at {rate:g} req/s would end past the time budget: bisection stops",
                      file=sys.stderr, flush=True)
            raise OutOfTime
        return measure(system, rate)

    for rate in rates:
        for system in systems:
            measure(system, rate)
    goodput = {}
    for system, plan in systems.items():
        goodput[system] = measured_goodput(rows, system, cfg.slo.attainment, cfg.planner.precision, probes,
                                           lambda rate: probe(system, rate))
        base = base_latency(cfg, plan)
        mine = [key for key in reports if key[0] == system]
        for row in (r for r in rows if r["system"] == system and len(mine) > 1):
            refit = calibrated(base, plan, [reports[key] for key in mine if key[1] != row["rate"]])
            reqs = predict(cfg, plan, kv_bytes, workload(cfg, row["rate"], n, vocab)[0], refit)
            row["calibrated"] = summary(reqs, cfg)
            row["calibrated_error_points"] = abs(row["measured"]["attainment"] - row["calibrated"]["attainment"]) * 100
        goodput[system]["simulated"] = simulated_goodput(cfg, plan, n, vocab, kv_bytes)
        goodput[system]["simulated_calibrated"] = simulated_goodput(
            cfg, plan, n, vocab, kv_bytes, calibrated(base, plan, [reports[key] for key in mine]))
    rows.sort(key=lambda r: (r["rate"], r["system"]))
    result = {"date": time.strftime("%Y-%m-%d"), "slo": {"ttft_ms": cfg.slo.ttft_ms, "tpot_ms": cfg.slo.tpot_ms,
                                                           "attainment": cfg.slo.attainment},
              "requests_per_rate": n, "rows": rows, "goodput_per_device": goodput,
              "duration_s": time.monotonic() - started}
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, result["slo"], max(rates), os.path.join(out_dir, "attainment.png"),
         f"SLO attainment vs rate (TTFT <= {cfg.slo.ttft_ms:.0f} ms, TPOT <= {cfg.slo.tpot_ms:.0f} ms)")
    return result
