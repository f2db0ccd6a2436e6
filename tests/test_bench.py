"""`pdlaunch bench`'s goodput bracket and time budget, on synthetic engine runs (no processes)."""
from __future__ import annotations

import pytest

from launcher.bench import OutOfTime, measured_goodput


def row(rate: float, attainment: float) -> dict:
    return {"system": "s", "rate": rate, "devices": 2, "measured": {"attainment": attainment}}


def engine(threshold: float, rows: list, budget_runs: int = 99):
    """probe(rate): an engine run that meets the SLOs up to `threshold`, until the budget is spent."""
    tested = len(rows)

    def probe(rate: float) -> dict:
        if len(rows) - tested >= budget_runs:
            raise OutOfTime
        rows.append(row(rate, 1.0 if rate <= threshold else 0.5))
        return rows[-1]
    return probe


@pytest.mark.parametrize("threshold", [0.1, 0.45, 0.61, 1.7])
def test_bisection_brackets_the_engines_threshold(threshold):
    rows = [row(0.3, float(threshold >= 0.3)), row(0.6, float(threshold >= 0.6)), row(0.9, float(threshold >= 0.9))]
    g = measured_goodput(rows, "s", 0.9, 0.01, 20, engine(threshold, rows))
    lo, hi = g["bracket"]
    assert lo * 2 <= threshold < hi * 2 and hi - lo <= 0.01 + 1e-9
    assert g["measured"] == lo and g["engine_runs"] == len(rows) and not g["stopped_by_time_budget"]


def test_time_budget_stops_bisection_with_the_bracket_of_the_runs_made():
    rows = [row(0.3, 1.0), row(0.6, 0.0)]
    g = measured_goodput(rows, "s", 0.9, 0.001, 20, engine(0.5, rows, budget_runs=1))
    assert g["stopped_by_time_budget"] and g["engine_runs"] == 3
    assert g["bracket"] == pytest.approx([0.45 / 2, 0.6 / 2])  # one probe at 0.45 passed, then no time


def test_without_probes_an_unbroken_run_of_passes_has_no_upper_end():
    rows = [row(0.3, 1.0), row(0.6, 0.95)]
    g = measured_goodput(rows, "s", 0.9, 0.01, 0, None)
    assert g["bracket"] == [0.3, None] and g["measured"] == 0.3


def paper_setup():
    """A config, its 1 prefill + 1 decode plan and model spec that need no model files (OPT-13B)."""
    from launcher.config import load_config
    from launcher.hostfile import read_hostfile
    from launcher.plan import plan_from_config
    from launcher.planner.planning import model_spec

    cfg = load_config("configs/paper-opt13b-high.yaml")
    return cfg, plan_from_config(cfg, read_hostfile(cfg.resolve(cfg.cluster.hostfile))), model_spec(cfg)


def test_one_trace_holds_the_probe_then_each_rate_in_order():
    from launcher.bench import PROBE, build_trace, segment_requests

    cfg, plan, spec = paper_setup()
    rates, n = [2.0, 4.0, 8.0], 50
    trace, segment = build_trace(cfg, plan, spec, rates, n)
    assert segment == [0] * len(PROBE) + [k for k in (1, 2, 3) for _ in range(n)]
    assert all(a.arrival <= b.arrival for a, b in zip(trace, trace[1:]))
    for k, rate in enumerate(rates, 1):
        mine = [r for r, s in zip(trace, segment) if s == k]
        alone = segment_requests(cfg, rate, n)
        shift = mine[0].arrival - alone[0].arrival
        assert [(r.arrival - shift, r.input_len, r.output_len) for r in mine] == \
            [(pytest.approx(a.arrival), a.input_len, a.output_len) for a in alone]
        earlier = [r.arrival for r, s in zip(trace, segment) if s == k - 1]
        assert shift > max(earlier) - mine[0].arrival + alone[0].arrival  # starts after the previous one ended arriving


@pytest.mark.parametrize("prefill,decode", [(1.0, 1.0), (1.3, 0.8), (0.7, 1.25)])
def test_calibration_recovers_the_speed_the_probe_ran_at(prefill, decode):
    """The engine stands in as the simulator at a known speed: the probe's timings give it back."""
    from launcher.bench import build_trace, calibration, profile_latency, scaled
    from launcher.planner.replay import simulate_plan

    cfg, plan, spec = paper_setup()
    trace, segment = build_trace(cfg, plan, spec, [2.0], 20)
    machine = scaled(profile_latency(cfg, plan), prefill, decode)
    got = simulate_plan(cfg, plan, spec, machine, trace)
    factors = calibration(cfg, plan, spec, got, segment)
    assert factors["prefill"] == pytest.approx(prefill, rel=0.02)
    assert factors["decode"] == pytest.approx(decode, rel=0.02)


def test_scaled_multiplies_each_phase_and_its_step_cost():
    from launcher.bench import scaled
    from launcher.planner.latency import load_profile

    base = load_profile("configs/profiles/distserve-profile-a100-80g.json", "facebook/opt-13b")
    fast = scaled(base, 0.5, 2.0)
    assert fast.prefill_ms([300, 200], 2) == pytest.approx(0.5 * base.prefill_ms([300, 200], 2))
    assert fast.decode_ms(40, 20000, 1) == pytest.approx(2.0 * base.decode_ms(40, 20000, 1))
