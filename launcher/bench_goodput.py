"""A bench's goodput per system: measured on the engine (the bracket of tested rates, narrowed by
bisection with more engine jobs), simulated for the same segments, their ratio between two systems,
and how closely the simulator followed the engine (fidelity). No torch."""
from __future__ import annotations

import statistics

from contracts.config import JobConfig
from contracts.plan import Plan
from launcher.bench_report import FIDELITY_FIELDS
from launcher.bench_trace import segment_requests
from launcher.planner.config_to_plan import settings_from
from launcher.planner.goodput import bisect_rate, highest_passing_rate
from launcher.planner.latency import LatencyModel
from launcher.planner.replay import simulate_plan
from launcher.planner.workload import attainment


class OutOfTime(Exception):
    """The next engine job would not end within the bench's time budget."""


def sustained(measured: dict, target: float) -> bool:
    """A segment passes as the planner's probes do: the SLOs met for `target` of its requests and
    its queues not growing (planner/goodput.py; checked from 100 requests on)."""
    return measured["attainment"] >= target and not measured.get("queues_grow", False)


def _bracket(rows: list[dict], system: str, target: float) -> tuple[float, float | None]:
    """(highest rate that passed, lowest rate above it that did not or None), in totals."""
    mine = [r for r in rows if r["system"] == system]
    lo = max((r["rate"] for r in mine if sustained(r["measured"], target)), default=0.0)
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
            bisect_rate(lambda rate: sustained(probe(rate)["measured"], target), lo,
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

    return highest_passing_rate(ok, capacity / devices, cfg.planner.precision)


def fidelity(rows: list[dict]) -> dict:
    """Mean and worst |simulated - measured| attainment, and where a rate ran twice (the same
    trace), how far the engine's two runs of it differ: the floor no simulator can beat."""
    out = {}
    for field, _, key, _ in FIDELITY_FIELDS:
        errors = [r[field] for r in rows if field in r]
        if not errors:
            continue
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
