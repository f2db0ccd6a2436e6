"""`pdlaunch bench`'s goodput bracket and time budget, on synthetic engine runs (no processes)."""
from __future__ import annotations

import pytest

from launcher.bench_goodput import OutOfTime, measured_goodput


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


def test_a_segment_whose_queues_grow_fails_whatever_its_attainment():
    """A burst the KV absorbs can meet loose SLOs at a rate far above what the placement sustains;
    the bench fails such a segment as the planner's probes do (queues growing: its last arrivals
    spend 1.5x longer per token than its middle ones)."""
    from contracts.config import JobConfig
    from launcher.bench_trace import summary
    from launcher.planner.workload import SimRequest

    def segment(backlog_growth: float) -> list:
        reqs = []
        for i in range(200):
            r = SimRequest(i * 10.0, 8, 11)
            r.prefill_start, r.first_token = r.arrival, r.arrival + 50.0
            r.finish = r.first_token + 10 * 40.0 + backlog_growth * i
            reqs.append(r)
        return reqs

    cfg = JobConfig()
    cfg.slo.ttft_ms, cfg.slo.tpot_ms = 1000.0, 1000.0
    steady, growing = summary(segment(0.0), cfg), summary(segment(20.0), cfg)
    assert steady["attainment"] == growing["attainment"] == 1.0
    assert not steady["queues_grow"] and growing["queues_grow"]
    rows = [dict(row(1.0, 1.0), measured=steady), dict(row(2.0, 1.0), measured=growing)]
    assert measured_goodput(rows, "s", 0.9, 0.01, 0, None)["bracket"] == [0.5, 1.0]


def paper_setup():
    """A config, its 1 prefill + 1 decode plan and model spec that need no model files (OPT-13B)."""
    from contracts.config import load_config
    from contracts.hostfile import read_hostfile
    from contracts.plan import plan_from_config
    from launcher.planner.config_to_plan import model_spec

    cfg = load_config("configs/paper-opt13b-high.yaml")
    return cfg, plan_from_config(cfg, read_hostfile(cfg.resolve(cfg.cluster.hostfile))), model_spec(cfg)


def test_one_trace_holds_the_probe_then_each_rate_in_order():
    from launcher.bench_calibration import PROBE_PROMPTS
    from launcher.bench_trace import build_trace, segment_requests

    cfg, plan, spec = paper_setup()
    rates, n = [2.0, 4.0, 8.0], 50
    trace, segment = build_trace(cfg, plan, spec, rates, n)
    assert segment == [0] * len(PROBE_PROMPTS) + [k for k in (1, 2, 3) for _ in range(n)]
    assert [r.input_len for r in trace[:len(PROBE_PROMPTS)]] == list(PROBE_PROMPTS)
    assert all(a.arrival <= b.arrival for a, b in zip(trace, trace[1:]))
    for k, rate in enumerate(rates, 1):
        mine = [r for r, s in zip(trace, segment) if s == k]
        alone = segment_requests(cfg, rate, n)
        shift = mine[0].arrival - alone[0].arrival
        assert [(r.arrival - shift, r.input_len, r.output_len) for r in mine] == \
            [(pytest.approx(a.arrival), a.input_len, a.output_len) for a in alone]
        earlier = [r.arrival for r, s in zip(trace, segment) if s == k - 1]
        assert shift > max(earlier) - mine[0].arrival + alone[0].arrival  # starts after the previous one ended arriving
    probe = trace[:len(PROBE_PROMPTS)]  # one at a time: each arrives after the previous has finished
    from launcher.bench_trace import profile_latency
    from launcher.planner.replay import simulate_plan
    finished = simulate_plan(cfg, plan, spec, profile_latency(cfg, plan), probe)
    assert all(b.arrival > a.finish for a, b in zip(finished, finished[1:]))


def test_a_shared_prefix_workload_sends_the_prompts_the_simulator_counts_as_cached():
    """planner.shared_prefix / shared_prefix_share reach the bench's trace and its engine input: the
    requests with cached tokens begin with one prefix (all prefix when shorter), the others share
    no block with it, and the engine's own prefix cache finds exactly each one's cached_len."""
    from engine.prefix_cache import PrefixCache, block_hashes
    from launcher.bench_trace import build_trace, engine_lines, profile_latency
    from launcher.planner.replay import simulate_plan

    cfg, plan, spec = paper_setup()
    cfg.planner.shared_prefix, cfg.planner.shared_prefix_share = 600, 0.5
    trace, segment = build_trace(cfg, plan, spec, [2.0, 4.0], 100)
    bs = cfg.scheduler.block_size
    sharers = [r for r, k in zip(trace, segment) if r.cached_len]
    assert all(r.cached_len == 0 for r, k in zip(trace, segment) if k == 0)  # the probe: plain prompts
    assert 70 < len(sharers) < 130 and any(r.input_len <= 600 for r in sharers)
    assert all(r.cached_len == min(600, r.input_len - 1) // bs * bs for r in sharers)
    lines = engine_lines(trace, segment, 50000, cfg.workload.seed, cfg.planner.shared_prefix)
    assert [len(line["prompt"]) for line in lines] == [r.input_len for r in trace]
    prefix = next(line["prompt"] for line, r in zip(lines, trace) if r.cached_len and r.input_len > 600)[:600]
    cache = PrefixCache(10000, bs)  # as an instance's cache is once one sharer has run: the prefix's blocks named
    names = block_hashes(prefix, bs)
    cache.register(cache.allocate(len(names)), names)
    for line, r in zip(lines, trace):
        prompt = line["prompt"]
        assert (prompt[:min(600, r.input_len)] == prefix[:r.input_len]) == bool(r.cached_len)
        assert len(cache.cached_prefix(block_hashes(prompt, bs), len(prompt))) * bs == r.cached_len
    # the simulator charges the sharers' tails only where the engine caches
    on = simulate_plan(cfg, plan, spec, profile_latency(cfg, plan), trace)
    cfg.scheduler.prefix_caching = False
    off = simulate_plan(cfg, plan, spec, profile_latency(cfg, plan), trace)
    assert sum(r.ttft for r in on) < sum(r.ttft for r in off)


def test_calibration_is_the_drift_against_the_profiles_own_samples(tmp_path):
    """Probe steps 1.2x slower (prefill) and 0.9x (decode) than the profile's alone timings of the
    same shapes give those factors; steps outside the probe window and other shapes do not count.
    On a PP instance a probe step is one trip through its stages: the reference adds the
    profile's hand-offs (pp_stage_ms per boundary), so the hand-off is not counted as drift."""
    import json

    from contracts.config import load_config
    from contracts.plan import InstancePlan, Plan
    from launcher.bench_calibration import calibration
    from launcher.planner.latency import load_profile

    alone = {"prefill": [{"lens": [64], "ms": 200.0}, {"lens": [128], "ms": 400.0}],
             "decode": [{"batch": 1, "context_sum": 33, "ms": 50.0}, {"batch": 1, "context_sum": 129, "ms": 60.0},
                        {"batch": 4, "context_sum": 516, "ms": 90.0}]}
    coef = {"prefill": [1, 1, 0], "decoding_smallbs": [1, 0, 1], "decoding_largebs": [1, 0, 1], "pp_stage_ms": 10.0}
    (tmp_path / "p.json").write_text(json.dumps({"m": {"1": coef | {"samples": alone, "samples_alone": alone}}}))
    (tmp_path / "c.yaml").write_text("planner: {profile: p.json}\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    plan = Plan([InstancePlan(0, "prefill", 1, 1, 1, ["h"]), InstancePlan(1, "decode", 1, 2, 2, ["h", "h"])])
    steps = {"prefill": [{"lens": [64], "ms": 240.0, "t": 10.0}, {"lens": [128], "ms": 480.0, "t": 11.0},
                         {"lens": [64, 64], "ms": 999.0, "t": 11.5}, {"lens": [64], "ms": 999.0, "t": 99.0}],
             "decode": [{"batch": 1, "context_sum": 81, "ms": 58.5, "t": 12.0},   # profile: 55 + 10 ms at 81 on PP2
                        {"batch": 2, "context_sum": 160, "ms": 999.0, "t": 12.5}]}
    report = {"instances": [{"instance": 0, "step_samples": {"prefill": steps["prefill"], "decode": []}},
                            {"instance": 1, "step_samples": {"prefill": [], "decode": steps["decode"]}}]}
    factors = calibration(cfg, plan, report, (5.0, 20.0), load_profile(str(tmp_path / "p.json")))
    assert factors["prefill"] == pytest.approx(1.2) and factors["decode"] == pytest.approx(0.9)
    assert factors["steps"] == {"prefill": 2, "decode": 1}
    # a profile that timed PP2 trips itself (pdlaunch profile --pp) is the PP2 instance's reference
    trips = [{"phase": "decode", "batch": 1, "context_sum": 65, "latency_ms": 70.0, "interval_ms": 40.0},
             {"phase": "decode", "batch": 1, "context_sum": 257, "latency_ms": 90.0, "interval_ms": 50.0}]
    coef["pipeline"] = {"2": {"overlap": 1.5, "samples": trips}}
    (tmp_path / "p.json").write_text(json.dumps({"m": {"1": coef | {"samples": alone, "samples_alone": alone}}}))
    factors = calibration(cfg, plan, report, (5.0, 20.0), load_profile(str(tmp_path / "p.json")))
    assert factors["decode"] == pytest.approx(58.5 / (70.0 + 20.0 * 16 / 192))  # 70 ms at context 65, 90 at 257


def test_scaled_multiplies_each_phase_and_its_step_cost():
    from launcher.bench_calibration import scaled
    from launcher.planner.latency import load_profile

    base = load_profile("configs/profiles/distserve-profile-a100-80g.json", "facebook/opt-13b")
    fast = scaled(base, 0.5, 2.0)
    assert fast.prefill_ms([300, 200], 2) == pytest.approx(0.5 * base.prefill_ms([300, 200], 2))
    assert fast.decode_ms(40, 20000, 1) == pytest.approx(2.0 * base.decode_ms(40, 20000, 1))


def test_bisection_to_a_share_of_the_rate_states_the_ratio_with_its_range():
    """--bisect-to 0.1: each bracket ends narrower than a tenth of the rate that passed, however
    coarse planner.precision is, and the ratio of two systems comes with the range their brackets allow."""
    from launcher.bench_goodput import goodput_ratio

    rows = [row(0.4, 1.0), row(1.2, 0.0)]
    g = measured_goodput(rows, "s", 0.9, 1.0, 20, engine(0.83, rows), relative=0.1)
    lo, hi = g["bracket"]
    assert lo * 2 <= 0.83 < hi * 2 and hi - lo <= 0.1 * lo
    other = {"bracket": [0.2, 0.21]}
    r = goodput_ratio(g, other)
    assert r["low"] == pytest.approx(lo / 0.21) and r["high"] == pytest.approx(hi / 0.2)
    assert r["low"] <= r["ratio"] <= r["high"]
    assert goodput_ratio(g, {"bracket": [0.0, 0.1]}) is None
    assert goodput_ratio(g, {"bracket": [0.2, None]})["low"] == 0.0
    assert goodput_ratio({"bracket": [0.4, None]}, other)["high"] is None
def test_each_colocated_system_runs_its_own_policy():
    from contracts.config import JobConfig
    from launcher.bench_trace import system_config

    cfg = JobConfig()
    assert system_config(cfg, "disaggregated") is cfg and system_config(cfg, "colocated-chunked") is cfg
    other = system_config(cfg, "colocated-prefill_first")
    assert other.scheduler.colocated_policy == "prefill_first" and cfg.scheduler.colocated_policy == "chunked"
    # the bench runs stored before chunked prefill named their prefill-first system "colocated"
    assert system_config(cfg, "colocated").scheduler.colocated_policy == "prefill_first"


def test_step_pricing_names_the_step_classes_the_model_misprices():
    """Engine steps at 1.3x the model's price for batch-16 decodes and at its price elsewhere: the
    table shows 1.3 for that class alone, each class with its count, and a PP instance's steps are
    priced through its stages."""
    from contracts.plan import InstancePlan, Plan
    from launcher.planner.latency import load_profile
    from launcher.step_pricing import pricing_line, size_class, step_price, step_pricing

    latency = load_profile("configs/profiles/distserve-profile-a100-80g.json", "facebook/opt-13b")
    plan = Plan([InstancePlan(0, "colocated", 1, 1, 1, ["h"]), InstancePlan(1, "colocated", 1, 2, 2, ["h", "h"])])
    shapes = {"prefill": [{"lens": [300, 200]}, {"lens": [16]}],
              "decode": [{"batch": 16, "context_sum": 4000}, {"batch": 1, "context_sum": 300}],
              "mixed": [{"lens": [100], "starts": [256], "batch": 8, "context_sum": 900}]}
    report = {"instances": []}
    for index, inst in enumerate(plan.instances):
        samples = {kind: [dict(s, ms=step_price(latency, s, inst.tp, inst.pp) * (1.3 if s.get("batch") == 16 else 1.0))
                          for s in steps] for kind, steps in shapes.items()}
        report["instances"].append({"instance": index, "step_samples": samples})
    rows = step_pricing(report, plan, latency)
    assert [(r["kind"], r["tokens"], r["steps"], r["ratio"]) for r in rows] == [
        ("decode", "1", 2, 1.0), ("decode", "16-31", 2, 1.3), ("mixed", "64-127", 2, 1.0),
        ("prefill", "16-31", 2, 1.0), ("prefill", "256-511", 2, 1.0)]
    assert pricing_line(rows).startswith("decode 1: 1.00x (2), decode 16-31: 1.30x (2)")
    assert [size_class(n) for n in (0, 1, 2, 3, 7, 8, 511, 512, 4000)] == \
        ["1", "1", "2-3", "2-3", "4-7", "8-15", "256-511", "512+", "512+"]
    assert step_price(latency, shapes["decode"][0], 1, 2) > step_price(latency, shapes["decode"][0], 1, 1)


def test_run_factors_are_the_jobs_own_speed_against_the_profile_per_phase():
    """Prompt-carrying steps (prefill, mixed) at 1.5x the profile's price and decodes at 0.8x give
    those factors, whatever the shapes; a job without steps leaves the profile as it is."""
    from contracts.plan import InstancePlan, Plan
    from launcher.planner.latency import load_profile
    from launcher.step_pricing import run_factors, step_price

    latency = load_profile("configs/profiles/distserve-profile-a100-80g.json", "facebook/opt-13b")
    plan = Plan([InstancePlan(0, "colocated", 1, 1, 1, ["h"])])
    steps = {"prefill": [{"lens": [n]} for n in (40, 300, 900)],
             "mixed": [{"lens": [64], "starts": [128], "batch": 5, "context_sum": 700}],
             "decode": [{"batch": b, "context_sum": 100 * b} for b in (1, 7, 30)]}
    samples = {kind: [dict(s, ms=step_price(latency, s, 1, 1) * (0.8 if kind == "decode" else 1.5)) for s in shapes]
               for kind, shapes in steps.items()}
    factors = run_factors({"instances": [{"instance": 0, "step_samples": samples}]}, plan, latency)
    assert factors["prefill"] == pytest.approx(1.5) and factors["decode"] == pytest.approx(0.8)
    assert factors["steps"] == {"prefill": 4, "decode": 3}
    assert run_factors({"instances": []}, plan, latency) == {"prefill": 1.0, "decode": 1.0,
                                                             "steps": {"prefill": 0, "decode": 0}}


def test_fidelity_summarises_each_simulation_a_row_has():
    from launcher.bench_goodput import fidelity

    rows = [{"system": "s", "rate": r, "measured": {"attainment": 0.9}, "error_points": e, "error_points_profile": 2 * e,
             "error_points_replayed": e / 2} for r, e in ((1.0, 4.0), (2.0, 8.0))]
    out = fidelity(rows)
    assert out["calibrated"] == {"mean_points": 6.0, "worst_points": 8.0, "rows": 2}
    assert out["profile"]["worst_points"] == 16.0 and out["replayed"]["mean_points"] == 3.0
    assert "replayed" not in fidelity([{k: v for k, v in r.items() if k != "error_points_replayed"} for r in rows])
