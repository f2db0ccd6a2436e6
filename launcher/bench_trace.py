"""The trace one bench job runs, and what came of it: a calibration probe and one segment per rate,
as the engine's input lines; the engine's timings read back from its results, beside the
simulator's replay of the same trace (from the profile as it is and calibrated by the probe), and
each segment's summary. No torch."""
from __future__ import annotations

import copy
import json
import math
import random

from contracts.config import JobConfig
from contracts.errors import UserError
from contracts.plan import Plan
from launcher.bench_calibration import PROBE_GAP_S, calibration, calibration_requests, probe_window, scaled
from launcher.bench_report import SCALES
from launcher.planner.config_to_plan import latency_models, settings_from, workload_prefix
from launcher.planner.goodput import queues_grow
from launcher.planner.latency import LatencyModel
from launcher.planner.replay import simulate_plan
from launcher.planner.workload import SimRequest, attainment, make_requests
from launcher.step_pricing import run_factors, step_pricing
from launcher.stats import percentile

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
    """n requests at `rate` req/s with the planner's length distribution and shared prefix (a
    request that begins with it has the prefix's full blocks as its cached_len, which the
    simulator charges only with prefix caching on), seeded by the rate: a rate given twice replays
    the identical trace, which measures the engine's own run-to-run noise."""
    settings = settings_from(cfg)
    return make_requests(n, rate, settings.lengths, settings.arrival, settings.cv,
                         cfg.workload.seed + round(rate * 1000), workload_prefix(cfg))


def profile_latency(cfg: JobConfig, plan: Plan) -> LatencyModel:
    """The profile's latency model for the plan's kind of instances."""
    disagg, colo = latency_models(cfg)
    return colo if plan.by_role("colocated") else disagg


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
            trace.append(SimRequest(t + r.arrival, r.input_len, r.output_len, cached_len=r.cached_len))
            segment.append(k)
        t += last_arrival + min(MAX_DRAIN_S * 1e3, DRAIN_MARGIN * drain_ms + DRAIN_SLACK_S * 1e3)
    return trace, segment


def engine_lines(trace: list[SimRequest], segment: list[int], vocab: int, seed: int,
                 prefix_len: int = 0) -> list[dict]:
    """The trace as engine input: random token prompts, exact output lengths, replayed arrivals. A
    request with cached tokens begins with the workload's shared prefix (one random prefix of
    `prefix_len` tokens for the whole trace; all prefix where the prompt is no longer), so the
    engine's cache finds the full blocks the simulator counts as cached."""
    rng = random.Random(seed + 1)
    prefix = [rng.randrange(10, vocab) for _ in range(prefix_len)]

    def prompt(r: SimRequest) -> list[int]:
        head = prefix[:r.input_len] if r.cached_len else []
        return head + [rng.randrange(10, vocab) for _ in range(r.input_len - len(head))]

    return [{"custom_id": f"s{k}-{i}", "prompt": prompt(r), "max_tokens": r.output_len, "ignore_eos": True,
             "arrival_s": r.arrival / 1e3}
            for i, (r, k) in enumerate(zip(trace, segment))]


def rate_indices(segment: list[int], k: int) -> list[int]:
    """The trace positions of the k-th rate's requests (segment 0 is the calibration probe)."""
    return [i for i, s in enumerate(segment) if s == k]


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


def measured_and_simulated(cfg: JobConfig, plan: Plan, spec, trace: list[SimRequest], segment: list[int],
                           report: dict, results_path: str) -> tuple[dict[str, list[SimRequest]], dict, list[dict]]:
    """One bench job's requests as the engine served them (its results file) and as the simulator
    runs the same trace: from the profile as it is, calibrated by the job's probe (report: the
    job's report.json), and replayed at the speed the job's steps ran (step_pricing.run_factors,
    factors["run"]); with the calibration factors and the job's step pricing against the calibrated
    model (step_pricing.step_pricing). The job starts with empty prefix caches, and
    so does its simulation (the first sharer of the prefix on an instance computes it)."""
    profile = profile_latency(cfg, plan)
    factors = calibration(cfg, plan, report, probe_window(results_path, trace, segment), profile)
    factors["run"] = run_factors(report, plan, profile)
    calibrated = scaled(profile, factors["prefill"], factors["decode"])

    def simulated(latency: LatencyModel) -> list[SimRequest]:
        return simulate_plan(cfg, plan, spec, latency, trace, cold_cache=True)
    return {"measured": measured(results_path, trace), "predicted": simulated(profile),
            "calibrated": simulated(calibrated),
            "replayed": simulated(scaled(profile, factors["run"]["prefill"], factors["run"]["decode"]))}, factors, \
        step_pricing(report, plan, calibrated)


def summary(reqs: list[SimRequest], cfg: JobConfig) -> dict:
    done = [r for r in reqs if not math.isnan(r.finish)]
    ttft = [r.ttft for r in done]
    tpot = [r.tpot for r in done if r.output_len > 1]
    span_s = (max(r.finish for r in done) - min(r.arrival for r in reqs)) / 1e3 if done else 0.0
    return {"attainment": attainment(reqs, cfg.slo.ttft_ms, cfg.slo.tpot_ms), "queues_grow": queues_grow(reqs),
            "ttft_ms_p50": percentile(ttft, 0.5), "ttft_ms_p90": percentile(ttft, 0.9),
            "tpot_ms_p50": percentile(tpot, 0.5), "tpot_ms_p90": percentile(tpot, 0.9),
            "output_tokens_per_s": sum(r.output_len for r in done) / span_s if span_s else 0.0}


def slo_scale_curve(reqs: list[SimRequest], cfg: JobConfig) -> dict:
    """Attainment when both SLOs are multiplied by each scale (the paper's 'SLO scale' axis)."""
    return {str(k): attainment(reqs, cfg.slo.ttft_ms * k, cfg.slo.tpot_ms * k) for k in SCALES}
