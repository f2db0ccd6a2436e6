"""`pdlaunch bench`'s calibration probe: how fast the machine runs *now* against its profile.

The probe is single requests, one at a time, whose prefill and batch-1 decode steps have exactly the
shapes `pdlaunch profile` timed alone, so the ratio of the engine's step times to the profile's own
samples is the machine's drift since it was profiled, and nothing else (not the fit's shape error,
not contention).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import replace

from contracts.config import JobConfig
from contracts.plan import Plan
from launcher.planner.config_to_plan import profile_path
from launcher.planner.latency import LatencyModel, read_profile_entry
from launcher.planner.workload import SimRequest

PROBE_PROMPTS = (64, 128, 256) * 2  # prompt lengths `pdlaunch profile` times (PREFILL_LENS), each alone
PROBE_TOKENS = 6                    # answers: batch-1 decode steps near the profile's contexts
PROBE_GAP_S = 0.5                   # idle time before and between probe requests


def calibration_requests(cfg: JobConfig) -> list[SimRequest]:
    """The calibration probe's requests (arrival times set by build_trace), shortened to fit a
    small max_model_len."""
    limit = cfg.model.max_model_len
    return [SimRequest(0.0, min(n, limit // 2), min(PROBE_TOKENS, limit // 4)) for n in PROBE_PROMPTS]


def scaled(latency: LatencyModel, prefill: float, decode: float) -> LatencyModel:
    """`latency` with every prefill cost (compute, extend and per-step) times `prefill`, every decode cost
    times `decode`: the machine running uniformly faster or slower than when it was profiled."""
    def times(values, k):
        return tuple(v * k for v in values)

    by_tp = {tp: replace(c, prefill=times(c.prefill, prefill), extend=times(c.extend, prefill),
                         prefill_overhead=times(c.prefill_overhead, prefill),
                         decode_small=times(c.decode_small, decode), decode_large=times(c.decode_large, decode),
                         decode_overhead=times(c.decode_overhead, decode))
             for tp, c in latency.by_tp.items()}
    return LatencyModel(latency.model, by_tp, f"{latency.source} x ({prefill:.3f}, {decode:.3f})", latency.pipelined_pp,
                        latency.meta)


def profile_alone_samples(cfg: JobConfig, plan: Plan, tp: int, pp: int, latency: LatencyModel) -> dict | None:
    """The profile's own step timings of a TP `tp` x PP `pp` instance alone on the node (or, for a
    profile taken with one instance, its only timings); None when the profile has none. For PP > 1:
    the latencies `pdlaunch profile --pp` measured on such an instance (one trip through every
    stage), else the PP1 timings plus the hand-offs `latency` adds for the stages."""
    p = cfg.planner
    path = p.colocated_profile if plan.by_role("colocated") and p.colocated_profile else p.profile
    entry = read_profile_entry(profile_path(cfg, path), p.profile_model or p.model, tp)
    samples = entry.get("samples_alone") or entry.get("samples")
    measured = entry.get("pipeline", {}).get(str(pp), {}).get("samples")
    if pp > 1 and measured:
        return {phase: [{k: v for k, v in x.items() if k not in ("phase", "latency_ms", "interval_ms")}
                        | {"ms": x["latency_ms"]} for x in measured if x["phase"] == phase]
                for phase in ("prefill", "decode")}
    if pp > 1 and samples and tp in latency.by_tp:
        handoffs = latency.by_tp[tp].pp_stage_ms * (pp - 1)
        return {phase: [dict(x, ms=x["ms"] + handoffs) for x in samples[phase]] for phase in ("prefill", "decode")}
    return samples


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear y(x) through sorted points, held flat beyond the ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def calibration(cfg: JobConfig, plan: Plan, report: dict, window: tuple[float, float], latency: LatencyModel) -> dict:
    """Drift factors (prefill, decode): the median ratio of the engine's step times during the
    probe (wall-clock `window`) to the profile's alone timings of the same shapes on the same
    kind of instance (profile_alone_samples) — prefill of the same single prompt, batch-1 decode
    interpolated on context. 1.0 for a phase without both."""
    ratios = {"prefill": [], "decode": []}
    references = {(i.tp, i.pp): profile_alone_samples(cfg, plan, i.tp, i.pp, latency) for i in plan.instances}
    for stats in report["instances"]:
        inst = plan.instances[stats["instance"]]
        reference = references[inst.tp, inst.pp]
        if not reference:
            continue
        prefill = {tuple(x["lens"]): x["ms"] for x in reference["prefill"]}
        decode = sorted((x["context_sum"], x["ms"]) for x in reference["decode"] if x["batch"] == 1)
        for x in stats["step_samples"]["prefill"]:
            if window[0] <= x["t"] <= window[1] and tuple(x["lens"]) in prefill:
                ratios["prefill"].append(x["ms"] / prefill[tuple(x["lens"])])
        for x in stats["step_samples"]["decode"]:
            if window[0] <= x["t"] <= window[1] and x["batch"] == 1 and decode:
                ratios["decode"].append(x["ms"] / _interpolate(decode, x["context_sum"]))
    return {phase: statistics.median(r) if r else 1.0 for phase, r in ratios.items()} | \
        {"steps": {phase: len(r) for phase, r in ratios.items()}}


def probe_window(results_path: str, trace: list[SimRequest], segment: list[int]) -> tuple[float, float]:
    """Wall-clock span of the probe: from the job's clock start to the first rate's first arrival."""
    with open(results_path) as f:
        first = json.loads(f.readline())
    index = int(first["custom_id"].split("-")[1])
    start = first["metrics"]["arrival"] - trace[index].arrival / 1e3
    end = next((r.arrival for r, k in zip(trace, segment) if k > 0), trace[-1].arrival + 60e3)
    return start, start + end / 1e3
