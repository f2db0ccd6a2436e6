"""Planner: the simulator against answers known in closed form or by hand, and the search end to end."""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import replace

import pytest

from contracts.hostfile import Host
from contracts.plan import read_plan
from launcher.cli import main
from launcher.planner.latency import KNOWN_MODELS, Coefficients, LatencyModel, load_profile
from launcher.planner.profile_fit import fit_pipeline, other_phase_slowdown, shared_slowdown
from launcher.planner.simulator import InstanceSpec, Policy, Simulation
from launcher.planner.workload import LengthDist, SimRequest, attainment, make_requests

BIG = InstanceSpec(1, 1, 10 ** 12)


def linear_model(prefill=(10.0, 0.0, 0.0), decode=(5.0, 0.0, 0.0), stage_ms=0.0, pipelined=True) -> LatencyModel:
    coef = Coefficients(prefill, decode, decode, 95, stage_ms)
    return LatencyModel("toy", {1: coef, 2: coef}, pipelined_pp=pipelined)


def test_prefill_queue_matches_md1_formula():
    """One prefill instance, one request per batch, Poisson arrivals: mean TTFT = D + rho*D/(2(1-rho))."""
    service_ms, rate = 40.0, 15.0  # rho = 0.6
    lat = linear_model(prefill=(service_ms, 0.0, 0.0))
    reqs = make_requests(40000, rate, LengthDist("fixed", 100, 1), seed=7)
    Simulation(lat, Policy(token_budget=100), [InstanceSpec(1, 1, 10 ** 9)], [BIG]).run(reqs)
    rho = rate * service_ms / 1e3
    expected = service_ms + rho * service_ms / (2 * (1 - rho))
    measured = statistics.fmean(r.ttft for r in reqs)
    assert abs(measured - expected) / expected < 0.03, (measured, expected)


def test_hand_computed_trace():
    """Two requests through prefill -> transfer -> decode, every time worked out by hand."""
    lat = linear_model(prefill=(10.0, 1.0, 0.0), decode=(5.0, 0.0, 1.0))
    # KV: 1e6 bytes/token over 1 GB/s = 1 ms per prompt token.
    policy = Policy(token_budget=100, kv_bytes_per_token=10 ** 6, bandwidth_gbps=lambda p, d: 1.0)
    a = SimRequest(arrival=0.0, input_len=10, output_len=3)
    b = SimRequest(arrival=5.0, input_len=20, output_len=2)
    Simulation(lat, policy, [InstanceSpec(1, 1, 1000)], [InstanceSpec(1, 1, 1000)]).run([a, b])
    # a: prefill 0 -> 20 (10 + 10 tokens); transfer 10 ms -> joins at 30; steps of 5 + 1*batch.
    assert a.first_token == 20.0
    # b waits for the instance (free at 20), prefill 20 -> 50; transfer 20 ms -> 70.
    assert b.first_token == 50.0
    # decode: step 30 -> 36 (a alone: token 2); step 36 -> 42 (a: token 3, done).
    assert a.finish == 42.0
    # b joins at 70 (decode idle since 42): step 70 -> 76, its second token.
    assert b.finish == 76.0
    assert a.tpot == 11.0 and b.tpot == 26.0
    assert attainment([a, b], ttft_ms=30, tpot_ms=20) == 0.5
    assert attainment([a, b], ttft_ms=30, tpot_ms=30, rule="separate") == 0.5


@pytest.mark.parametrize("same_node", [True, False])
def test_steps_run_at_their_alone_cost_while_the_nodes_other_instances_idle(same_node):
    """Profiled costs are with every slot busy; shared_slowdown 2 halves a step that starts while no
    other instance on its node steps. Same trace as above, worked out by hand."""
    coef = Coefficients((10.0, 1.0, 0.0), (5.0, 0.0, 1.0), (5.0, 0.0, 1.0), 95, 0.0, shared_slowdown=(2.0, 2.0))
    lat = LatencyModel("toy", {1: coef})
    policy = Policy(token_budget=100, kv_bytes_per_token=10 ** 6, bandwidth_gbps=lambda p, d: 1.0)
    a = SimRequest(arrival=0.0, input_len=10, output_len=3)
    b = SimRequest(arrival=5.0, input_len=20, output_len=3)
    Simulation(lat, policy, [InstanceSpec(1, 1, 1000, node=0)], [InstanceSpec(1, 1, 1000, node=0 if same_node else 1)]).run([a, b])
    # a: prefill 0 -> 10 (alone: 20 / 2); transfer 10 ms; b: prefill 10 -> 25 (alone: 30 / 2).
    assert (a.first_token, b.first_token) == (10.0, 25.0)
    # a joins at 20; its first step overlaps b's prefill on a shared node: 6 ms, else 3; then 3.
    assert a.finish == (29.0 if same_node else 26.0)
    # b joins at 45 (transfer 20 ms), alone: 3 ms steps.
    assert b.finish == 51.0


def test_a_step_beside_the_other_phase_costs_the_profiles_other_phase_share():
    """The trace above with other_phase_slowdown (prefill 1.5x, decode 2x its cost beside the same
    phase): a's first decode step starts during b's prefill on the same node and costs 2 x 6 ms;
    its second starts once b's prefill is done, alone. b's prefill started while the decode
    instance idled (a's KV in transfer): alone, as before."""
    coef = Coefficients((10.0, 1.0, 0.0), (5.0, 0.0, 1.0), (5.0, 0.0, 1.0), 95, 0.0, shared_slowdown=(2.0, 2.0),
                        other_phase_slowdown=(1.5, 2.0, 2.0))
    lat = LatencyModel("toy", {1: coef})
    policy = Policy(token_budget=100, kv_bytes_per_token=10 ** 6, bandwidth_gbps=lambda p, d: 1.0)
    a = SimRequest(arrival=0.0, input_len=10, output_len=3)
    b = SimRequest(arrival=5.0, input_len=20, output_len=3)
    Simulation(lat, policy, [InstanceSpec(1, 1, 1000)], [InstanceSpec(1, 1, 1000)]).run([a, b])
    assert (a.first_token, b.first_token) == (10.0, 25.0)
    assert a.finish == 20.0 + 12.0 + 3.0
    assert b.finish == 51.0


def test_other_phase_share_by_phase_and_batch_size():
    coef = Coefficients((10.0, 1.0, 0.0), (5.0, 0.0, 1.0), (5.0, 0.0, 1.0), 4, 0.0, shared_slowdown=(1.1, 1.2),
                        other_phase_slowdown=(1.5, 1.2, 2.0))
    lat = LatencyModel("toy", {1: coef})
    assert lat.other_phase_factor(1, "prefill", 0) == 1.5
    assert (lat.other_phase_factor(1, "decode", 3), lat.other_phase_factor(1, "decode", 4)) == (1.2, 2.0)
    unmeasured = LatencyModel("toy", {1: replace(coef, other_phase_slowdown=None)})
    assert unmeasured.other_phase_factor(1, "decode", 8) == 1.0


def test_slowdowns_come_from_the_side_by_side_timings():
    """shared: beside the same phase / beside idle neighbours; other phase: beside the other phase
    / beside the same; decode split at the small/large threshold (a half without samples takes
    the other's)."""
    beside = {"prefill": [{"lens": [64], "alone_ms": 100.0, "same_ms": 110.0, "ms": 121.0},
                          {"lens": [128], "alone_ms": 200.0, "same_ms": 220.0, "ms": 242.0}],
              "decode": [{"batch": 1, "context_sum": 33, "alone_ms": 50.0, "same_ms": 60.0, "ms": 60.0},
                         {"batch": 2, "context_sum": 66, "alone_ms": 50.0, "same_ms": 60.0, "ms": 63.0},
                         {"batch": 16, "context_sum": 528, "alone_ms": 80.0, "same_ms": 100.0, "ms": 130.0}]}
    assert shared_slowdown(beside) == pytest.approx({"prefill": 1.1, "decode": 1.2})
    assert other_phase_slowdown(beside, 8) == pytest.approx({"prefill": 1.1, "decode_smallbs": 1.025,
                                                             "decode_largebs": 1.3})
    assert other_phase_slowdown(beside, 64)["decode_largebs"] == pytest.approx(1.05)


def test_pipelined_pp_raises_prefill_throughput_not_latency():
    lat = linear_model(prefill=(40.0, 0.0, 0.0), stage_ms=1.0)
    reqs = [SimRequest(0.0, 100, 1) for _ in range(4)]
    Simulation(lat, Policy(token_budget=100), [InstanceSpec(1, 2, 10 ** 9)], [BIG]).run(reqs)
    # latency 41 ms each; a new batch every 20.5 ms
    assert [r.first_token for r in reqs] == [41.0, 61.5, 82.0, 102.5]


def test_measured_pp_overlap_sets_the_prefill_interval_and_the_decode_round():
    """A profile's measured overlap replaces the assumed one: for PP2, 1.6 prefill steps at once,
    1.25 decode steps."""
    coef = Coefficients((40.0, 0.0, 0.0), (5.0, 0.0, 1.0), (5.0, 0.0, 1.0), 95, 1.0, pp_overlap=((2, 1.6, 1.25),))
    lat = LatencyModel("toy", {1: coef}, pipelined_pp=True)
    assert lat.prefill_ms([100], 1, 2) == 41.0  # PP never shortens a batch's latency
    assert lat.prefill_interval_ms([100], 1, 2) == pytest.approx(41.0 / 1.6)
    # batch 8 on PP2: two groups of 4, each a 5 + 4 + 1 ms trip, a round 2 / 1.25 of it
    assert lat.decode_ms(8, 800, 1, 2) == pytest.approx(10.0 * 2 / 1.25)
    assert lat.decode_ms(1, 100, 1, 2) == pytest.approx(5.0 + 1.0 + 1.0)  # one group: its trip, nothing to wait for
    assert lat.overlap(1, 4, "decode") == 4.0  # not measured: assumed from pipelined_pp
    unpipelined = LatencyModel("toy", {1: replace(coef, pp_overlap=())}, pipelined_pp=False)
    assert unpipelined.overlap(1, 2, "prefill") is None and unpipelined.decode_ms(8, 800, 1, 2) == 5.0 + 8.0 + 1.0
    reqs = [SimRequest(0.0, 100, 1) for _ in range(3)]
    Simulation(lat, Policy(token_budget=100), [InstanceSpec(1, 2, 10 ** 9)], [BIG]).run(reqs)
    assert [r.first_token for r in reqs] == pytest.approx([41.0, 41.0 + 41.0 / 1.6, 41.0 + 2 * 41.0 / 1.6])


def test_pipeline_fit_recovers_hand_off_and_overlap():
    pp1 = {"prefill": [2.0, 0.1, 0.0], "decoding_smallbs": [1.0, 0.0, 0.5], "decoding_largebs": [3.0, 0.0, 0.25],
           "decoding_large_small_bs_threshold": 16}
    handoff, overlap = 1.5, 1.7
    samples = []
    for n in (64, 128, 256):
        latency = 2.0 + 0.1 * n + handoff
        samples.append({"phase": "prefill", "lens": [n], "latency_ms": latency, "interval_ms": latency / overlap})
    for batch in (8, 32):
        latency = (1.0 + 0.5 * batch if batch < 16 else 3.0 + 0.25 * batch) + handoff
        samples.append({"phase": "decode", "batch": batch, "context_sum": batch * 129, "latency_ms": latency,
                        "interval_ms": latency / overlap})
    fit = fit_pipeline(samples, pp1, 2)
    assert fit["handoff_ms"] == pytest.approx(handoff) and fit["overlap"] == pytest.approx(overlap)
    assert fit["overlap_by_phase"] == pytest.approx({"prefill": overlap, "decode": overlap})
    # noise beyond the physical range is clamped: no negative hand-off, no overlap beyond pp or below 1
    fast = [dict(x, latency_ms=x["latency_ms"] - 3 * handoff) for x in samples]
    fast = [dict(x, interval_ms=x["latency_ms"] / 3) for x in fast]
    fit = fit_pipeline(fast, pp1, 2)
    assert fit["handoff_ms"] == 0.0 and fit["overlap"] == 2.0


def test_backpressure_and_decode_capacity_in_simulation():
    lat = linear_model(prefill=(10.0, 0.0, 0.0), decode=(5.0, 0.0, 0.0))
    reqs = [SimRequest(0.0, 50, 10) for _ in range(6)]
    # decode holds 2 requests (60 tokens each), the prefill hold area 2 prompts.
    sim = Simulation(lat, Policy(token_budget=50), [InstanceSpec(1, 1, 100)], [InstanceSpec(1, 1, 120)])
    sim.run(reqs)
    assert all(r.finish == r.finish for r in reqs)  # every request finished (no NaN)
    firsts = sorted(r.first_token for r in reqs)
    assert firsts[2] > 20.0, "the third prefill must wait for a pull to free the hold area"


def test_colocated_prefill_stalls_decode():
    lat = linear_model(prefill=(30.0, 0.0, 0.0), decode=(5.0, 0.0, 0.0))
    a = SimRequest(0.0, 10, 4)
    b = SimRequest(31.0, 10, 2)
    Simulation(lat, Policy(token_budget=100, colocated_policy="prefill_first"),
               colocated=[InstanceSpec(1, 1, 1000)]).run([a, b])
    # a: prefill 0-30, decode 30-35; b arrives at 31 and is prefilled 35-65 (prefill first), a waits.
    assert a.first_token == 30.0 and b.first_token == 65.0
    assert a.finish == 75.0  # tokens at 35, (65-70), 70-75


def test_chunked_colocated_runs_prompt_chunks_beside_the_decodes():
    """Step budget 4, decodes included: b's 9-token prompt rides along a's decodes in chunks of 3,
    each mixed step costing the larger fixed cost (2 ms) plus 1 ms per prompt token; under
    prefill_first b's whole prefill (11 ms) stalls a."""
    lat = linear_model(prefill=(2.0, 1.0, 0.0), decode=(2.0, 0.0, 0.0))
    runs = {}
    for policy in ("chunked", "prefill_first"):
        a, b = SimRequest(0.0, 3, 4), SimRequest(1.0, 9, 2)
        Simulation(lat, Policy(token_budget=100, colocated_policy=policy, step_token_budget=4),
                   colocated=[InstanceSpec(1, 1, 1000)]).run([a, b])
        runs[policy] = (a.first_token, a.finish, b.first_token, b.finish)
    # a prefilled 0-5; then a's decode + 3 of b's tokens per step: 5-10, 10-15, 15-20 (b's first
    # token); a's fourth token at 20 ends it; b's decode 20-22
    assert runs["chunked"] == (5.0, 20.0, 20.0, 22.0)
    # a prefilled 0-5, b prefilled 5-16, a decodes 16-18-20-22 (b beside it 16-18)
    assert runs["prefill_first"] == (5.0, 22.0, 16.0, 18.0)


def test_prefill_instance_runs_a_prompt_longer_than_its_budget_in_chunks():
    """L_m 10: a 25-token prompt takes steps of 10, 10 and 5 tokens, each paying the fixed cost;
    the 5-token prompt behind it fills the last step."""
    lat = linear_model(prefill=(5.0, 1.0, 0.0))
    long, short = SimRequest(0.0, 25, 1), SimRequest(0.0, 5, 1)
    Simulation(lat, Policy(token_budget=10), [InstanceSpec(1, 1, 10 ** 9)], [BIG]).run([long, short])
    assert long.first_token == 15 + 15 + 15 and short.first_token == 45.0  # 5 + 5 fit the last step


def test_mixed_step_pricing_adds_each_parts_terms_beyond_the_larger_fixed_cost():
    coef = Coefficients((10.0, 0.5, 0.01), (4.0, 0.002, 0.3), (4.0, 0.002, 0.3), 95, 1.0,
                        prefill_overhead=(2.0, 0.01), decode_overhead=(3.0, 0.001))
    lat = LatencyModel("toy", {1: coef})
    # chunks of one prompt sum to the whole prompt's compute: the quadratic term telescopes
    whole = lat.prefill_ms([100], 1) - 10 - 2
    parts = lat.prefill_ms([40], 1, starts=[0]) + lat.prefill_ms([60], 1, starts=[40]) - 2 * (10 + 2)
    assert parts == pytest.approx(whole)
    assert lat.prefill_ms([60], 1, starts=[40]) == pytest.approx(10 + 0.5 * 60 + 0.01 * (100 ** 2 - 40 ** 2) + 2 + 0.6)
    # 60 prompt tokens after 40, beside 8 decodes over 800 context tokens, PP 2
    mixed = lat.mixed_ms([60], [40], 8, 800, 1, pp=2)
    expected = max(10, 4) + 0.5 * 60 + 0.01 * (100 ** 2 - 40 ** 2) + 0.002 * 800 + 0.3 * 8 + 1.0 + \
        max(2, 3) + 0.01 * 60 + 0.001 * 800
    assert mixed == pytest.approx(expected)
    assert mixed > max(lat.prefill_ms([60], 1, 2, [40]), lat.decode_trip_ms(8, 800, 1, 2))
    # an empty part leaves the other phase's own price
    assert lat.mixed_ms([], [], 8, 800, 1) == lat.decode_trip_ms(8, 800, 1)
    assert lat.mixed_ms([60], [40], 0, 0, 1) == lat.prefill_ms([60], 1, starts=[40])


def test_colocated_pp_overlaps_a_prefill_with_a_decode_group():
    """A colocated TP1 x PP2 instance with batches in flight (overlap 2 measured) runs as the
    engine's leader does: b's prefill starts as soon as the first stage is free, while a's decode
    group is still due; a's next token follows b's prefill on the last stage by one interval, not
    by b's whole prefill. Fill-and-drain (no overlap) serialises the two."""
    lat = linear_model(prefill=(40.0, 0.0, 0.0), decode=(10.0, 0.0, 0.0))
    pipelined = LatencyModel("toy", {1: replace(lat.by_tp[1], pp_overlap=((2, 2.0, 2.0),))})
    serial = LatencyModel("toy", {1: lat.by_tp[1]}, pipelined_pp=False)
    runs = {}
    for name, model in (("pipelined", pipelined), ("serial", serial)):
        a, b = SimRequest(0.0, 10, 3), SimRequest(50.0, 10, 2)
        Simulation(model, Policy(token_budget=100, colocated_policy="prefill_first"),
                   colocated=[InstanceSpec(1, 2, 1000)]).run([a, b])
        runs[name] = (a.first_token, a.finish, b.first_token, b.finish)
    # pipelined: a prefilled 0-40, a decodes 40-50; b's prefill 50-90 (first stage free at 70);
    # a's decode launched at 70 leaves the last stage one interval (5 ms) after b's prefill: 95
    assert runs["pipelined"] == (40.0, 95.0, 90.0, 100.0)
    # serial: a decodes 40-50, b prefills 50-90, then a and b decode together 90-100
    assert runs["serial"] == (40.0, 100.0, 90.0, 100.0)


@pytest.mark.slow  # a full search on the paper's 4 x 8 A100 setting (~20 s)
def test_anchor_profile_and_paper_plans(tmp_path):
    lat = load_profile("configs/profiles/distserve-profile-a100-80g.json", "facebook/opt-13b")
    assert lat.tp_degrees() == [1, 2, 4]
    # 18.10 + 0.1019 * 100 + 7.12e-6 * 100^2 ms, plus simdistserve's step cost 2 ms + 1e-4 ms * 100
    assert lat.prefill_ms([100], 1) == pytest.approx(18.10254647486372 + 10.19122572698738 + 0.0712226431 + 2.01,
                                                     rel=1e-9)
    assert KNOWN_MODELS["facebook/opt-66b"].kv_bytes_per_token() == 2 * 64 * 72 * 128 * 2
    for name in ("paper-opt66b-high", "paper-opt66b-low"):
        out = tmp_path / f"{name}.yaml"
        assert main(["plan", f"configs/{name}.yaml", "-o", str(out), "--quiet"]) == 0  # its speed: benchmarks/planner_speed.py
        plan = read_plan(str(out))
        assert plan.by_role("prefill") and plan.by_role("decode")
        assert sum(i.size for i in plan.instances) <= 32
        assert plan.predicted["per_device_goodput"] > 0 and plan.predicted["colocated"]["per_device_goodput"] > 0
        if name.endswith("low"):  # stage i of a unit's prefill and decode on the same node
            for p, d in zip(plan.by_role("prefill"), plan.by_role("decode")):
                for stage in range(min(p.pp, d.pp)):
                    pf = p.hosts[p.rank_of(0, stage * p.pp // min(p.pp, d.pp)) - p.first_rank]
                    dc = d.hosts[d.rank_of(0, stage * d.pp // min(p.pp, d.pp)) - d.first_rank]
                    assert pf == dc


@pytest.mark.parametrize("threshold", [0.07, 1.0, 3.3, 250.0])
def test_bisect_rate_brackets_the_threshold(threshold):
    """A monotone pass/fail: the bracket holds the threshold and is no wider than the precision,
    whether the search starts below it (doubling) or with a known failing rate above it."""
    from launcher.planner.goodput import bisect_rate

    probed = []

    def ok(rate):
        probed.append(rate)
        return rate <= threshold

    lo, hi = bisect_rate(ok, 0.0, 0.5, 0.01)
    assert lo <= threshold < hi and hi - lo <= 0.01 and all(r > 0 for r in probed)
    lo, hi = bisect_rate(ok, 0.0, threshold * 3, 0.01, hi_fails=True)
    assert lo <= threshold < hi and hi - lo <= 0.01 and threshold * 3 not in probed


def test_bisect_rate_stops_at_its_probe_budget_and_ceiling():
    from launcher.planner.goodput import bisect_rate

    calls = []
    lo, hi = bisect_rate(lambda r: calls.append(r) or r <= 3.3, 2.0, 4.0, 1e-9, hi_fails=True, max_probes=3)
    assert calls == [3.0, 3.5, 3.25] and (lo, hi) == (3.25, 3.5)
    lo, hi = bisect_rate(lambda r: True, 0.0, 1.0, 0.1, ceiling=100)
    assert lo == 64.0 and hi == math.inf  # 128 would exceed the ceiling: not probed


@pytest.mark.parametrize("threshold", [0.0, 0.004, 0.013, 0.049, 0.12])
def test_highest_passing_rate_looks_below_a_failing_grid(threshold):
    """On the grid (precision 0.05) the answer is a grid rate; where the grid's first step fails,
    a rate that still passes below it is found to within a tenth of itself, not priced at 0;
    where nothing passes down to a sixteenth of that step, the answer is 0."""
    from launcher.planner.goodput import highest_passing_rate

    rate = highest_passing_rate(lambda r: r <= threshold, 0.8, 0.05)
    if threshold >= 0.05:
        assert threshold - 0.05 < rate <= threshold
    elif threshold >= 0.05 / 16:
        assert 0.9 * threshold <= rate <= threshold
    else:
        assert rate == 0.0


def _placement(per_device: float, devices: int = 2, mean_tpot_ms: float = 100.0):
    from launcher.planner.search import PlacementResult

    return PlacementResult("high", [], [], per_device, devices, [], layout="x", mean_tpot_ms=mean_tpot_ms)


def test_choose_mode_picks_the_higher_goodput_per_device_and_says_why():
    from launcher.planner.modes import choose_mode

    choice = choose_mode(_placement(2.0), _placement(3.0))
    assert choice.mode == "colocated" and "higher than disaggregated's 2" in choice.reason and "1.50x" in choice.reason
    choice = choose_mode(_placement(3.0), _placement(2.0))
    assert choice.mode == "disaggregated" and "higher than colocated's 2" in choice.reason
    # a tie on the goodput grid: fewer devices, then the lower mean TPOT
    assert choose_mode(_placement(2.0, 4), _placement(2.0, 2)).mode == "colocated"
    choice = choose_mode(_placement(2.0, mean_tpot_ms=80), _placement(2.0, mean_tpot_ms=120))
    assert choice.mode == "disaggregated" and "lower mean TPOT (80 vs 120 ms)" in choice.reason
    choice = choose_mode(_placement(2.0, mean_tpot_ms=80), _placement(2.0, mean_tpot_ms=120), "colocated")
    assert choice.mode == "colocated" and "colocated at the higher mean TPOT (120 vs 80 ms)" in choice.reason
    # a forced mode is written, and the comparison is still stated
    choice = choose_mode(_placement(2.0), _placement(3.0), "disaggregated")
    assert choice.mode == "disaggregated" and "as requested" in choice.reason and "lower than colocated's 3" in choice.reason
    # a mode with no layout that meets the SLOs loses, with its reason
    choice = choose_mode(None, _placement(1.0), errors={"disaggregated": "no decode layout meets the SLOs"})
    assert choice.mode == "colocated" and "no decode layout meets the SLOs" in choice.reason
    with pytest.raises(ValueError, match="colocated: no layout meets the SLOs"):
        choose_mode(_placement(1.0), _placement(0.0), "colocated")


@pytest.mark.parametrize("regime,winner", [("long prefill, tight TPOT", "disaggregated"),
                                           ("short prefill, loose TPOT", "colocated")])
def test_the_search_picks_colocated_only_where_its_simulated_goodput_per_device_is_higher(regime, winner):
    """Both modes searched on 2 devices with toy profiles. A 200 ms prefill beside a running decode
    adds ~10 ms to each of its requests' 19 TPOT intervals: past a 16 ms TPOT SLO colocated can
    only serve the rare request that never meets another's prefill, while a prefill and a decode
    instance keep them apart. With 2 ms prefills and a loose TPOT, the two colocated instances
    both decode, where the disaggregated pair leaves its prefill device mostly idle."""
    from launcher.planner.config_to_plan import search_modes
    from launcher.planner.goodput import Settings
    from launcher.planner.latency import ModelSpec

    long = regime.startswith("long")
    lat = linear_model(prefill=(200.0 if long else 2.0, 0.0, 0.0), decode=(8.0, 0.0, 0.5))
    settings = Settings(ttft_ms=2000, tpot_ms=16 if long else 100, lengths=LengthDist("fixed", 64, 20), span_s=20,
                        num_requests=100, max_requests=1000, precision=0.25, max_decode_batch=16, memory_gb=1.0,
                        intra_node_gbps=1e6)
    spec = ModelSpec("toy", 2, 64, 2, 32, 1e6, 2)
    choice = search_modes(lat, lat, spec, settings, "high", 1, 2, 0.0)
    got = {m: r.per_device_goodput for m, r in choice.placements.items()}
    loser = next(m for m in got if m != winner)
    assert got[winner] > got[loser], got
    assert choice.mode == winner and choice.reason.startswith(f"{winner} sustains the SLOs at")
    assert (choice.chosen.colocated != []) == (winner == "colocated")


def test_chunked_colocated_candidates_carry_the_step_budget_that_sustains_the_most():
    """The best colocated layout at L_m is simulated again with every power-of-two step budget above
    the decode batch up to 2 L_m, and the placement runs the one that sustains the most (ties as rank_key).
    Under a mean-TPOT SLO a prompt stalls the running decodes by its tokens' cost however it is cut,
    so small chunks buy little TPOT and pay in TTFT: here the largest budget wins. The pick reaches
    the plan."""
    from contracts.hostfile import Host
    from launcher.planner.config_to_plan import to_plan
    from launcher.planner.goodput import Settings
    from launcher.planner.latency import ModelSpec
    from launcher.planner.search import colocated_placement, rank_key, step_budgets

    lat = linear_model(prefill=(20.0, 0.25, 0.0), decode=(8.0, 0.0, 0.1))
    settings = Settings(ttft_ms=4000, tpot_ms=20, lengths=LengthDist("fixed", 256, 16), span_s=20, num_requests=100,
                        max_requests=1000, precision=0.25, max_decode_batch=8, memory_gb=1.0, token_budget=128)
    assert step_budgets(lat, settings, 1) == [16, 32, 64, 128, 256]
    assert step_budgets(lat, replace(settings, step_token_budget=48), 1) == [48]
    assert step_budgets(lat, replace(settings, colocated_policy="prefill_first"), 1) == [None]
    result = colocated_placement(lat, ModelSpec("toy", 2, 64, 2, 32, 1e6, 2), settings, 1, 1)
    by_budget = {c.step_token_budget: c for c in result.candidates}
    assert set(by_budget) == {16, 32, 64, 128, 256}
    assert len({c.per_device for c in by_budget.values()}) > 1, "the budget changes what a layout sustains"
    chosen = result.colocated[0].step_token_budget
    assert chosen == max(by_budget, key=lambda b: rank_key(by_budget[b].per_device, 1, by_budget[b].mean_tpot_ms)) == 256
    assert f"{chosen} tokens per step" in result.layout
    plan = to_plan([("colocated", s) for s in result.colocated], [Host("localhost", 1)], 1)
    assert plan.instances[0].step_token_budget == chosen


HERE = [Host("localhost", 2)]  # a cluster this machine is one of: the probe measures it


@pytest.fixture
def profile_of(tmp_path):
    """A config planning on a copy of the shipped fp32 profile with the given fingerprint (None: none)."""
    import json

    import yaml

    from contracts.config import load_config

    def make(fingerprint, calibrate=True):
        with open("configs/profiles/cpu-smollm2-float32.json") as f:
            profile = json.load(f)
        if fingerprint is not None:
            profile["_meta"]["fingerprint"] = fingerprint
        (tmp_path / "profile.json").write_text(json.dumps(profile))
        with open("configs/cpu-default.yaml") as f:
            config = yaml.safe_load(f)
        config["model"]["dtype"] = "float32"
        config["cluster"]["hostfile"] = os.path.abspath("hostfiles/localhost")
        config["planner"].update(profile=str(tmp_path / "profile.json"), calibrate=calibrate)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
        return load_config(str(tmp_path / "job.yaml"))
    return make


def test_a_profile_of_another_machine_is_calibrated_here_or_the_plan_says_so(profile_of):
    from launcher.calibrate import planning_models
    from launcher.machine import fingerprint

    here = fingerprint("cpu", "float32")
    probes = []

    def probe(cfg, hosts, latency):
        probes.append(latency.source)
        return {"prefill": 0.5, "decode": 2.0}

    cfg = profile_of(here)
    base, _, check = planning_models(cfg, HERE, probe)
    assert check.status == "same" and not probes
    other = dict(here, cpu="Intel Xeon", cpu_flags=["amx_bf16", "avx512_bf16"])
    disagg, colo, check = planning_models(profile_of(other), HERE, probe)
    assert check.status == "calibrated" and len(probes) == 1 and "cpu_flags" in check.note and "0.50x" in check.note
    assert disagg.prefill_ms([100], 1) == pytest.approx(0.5 * base.prefill_ms([100], 1))
    assert colo.decode_ms(4, 400, 1) == pytest.approx(2.0 * base.decode_ms(4, 400, 1))
    _, _, check = planning_models(profile_of(other, calibrate=False), HERE, probe)
    assert check.status == "other" and len(probes) == 1
    assert "measured on another machine" in check.note and "rests on that machine's timings" in check.note
    _, _, check = planning_models(profile_of(None, calibrate=False), HERE, probe)
    assert check.status == "unknown" and "no machine fingerprint" in check.note and len(probes) == 1
    assert "unknown machine's timings" in check.note


def test_a_profile_without_fingerprint_is_calibrated_once_a_day_per_machine(profile_of, tmp_path, monkeypatch):
    """A profile that does not say where it was measured is calibrated like another machine's;
    the factors are kept in the cache, so the next plan on this machine reuses them, and a
    changed profile or an entry older than a day probes again."""
    import json

    from launcher import calibrate

    monkeypatch.setenv("PDLAUNCH_CACHE", str(tmp_path / "cache"))
    probes = []

    def probe(cfg, hosts, latency):
        probes.append(latency.source)
        return {"prefill": 0.8, "decode": 1.25, "steps": {"prefill": 3, "decode": 3}}

    cfg = profile_of(None)
    _, _, check = calibrate.planning_models(cfg, HERE, probe)
    assert check.status == "calibrated" and "no machine fingerprint" in check.note and "0.80x" in check.note
    _, _, again = calibrate.planning_models(cfg, HERE, probe)
    assert len(probes) == 1 and again.factors["decode"] == 1.25 and "reused from" in again.note
    [entry] = (tmp_path / "cache" / "calibration").iterdir()
    old = json.loads(entry.read_text())
    entry.write_text(json.dumps(dict(old, measured_at=old["measured_at"] - calibrate.CACHE_MAX_AGE_S - 1)))
    calibrate.planning_models(cfg, HERE, probe)
    assert len(probes) == 2, "a day-old calibration is measured again"
    profile = json.loads((tmp_path / "profile.json").read_text())
    profile["_meta"]["date"] = "another day"
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    calibrate.planning_models(cfg, HERE, probe)
    assert len(probes) == 3, "another profile is calibrated for itself"
    _, _, elsewhere = calibrate.planning_models(cfg, [Host("node1", 8), Host("node2", 8)], probe)
    assert len(probes) == 3 and elsewhere.status == "unknown", "a cluster this machine is not one of is not probed here"
    assert "not one of" in elsewhere.note


def test_placement_auto_plans_at_launch_and_says_which_and_why(tmp_path, capsys):
    """The embedded default plans its layout when it starts: one line names the mode, the layout
    and the reason, and the job's plan carries both modes' figures (the controller copies them
    into report.json)."""
    from contracts.config import load_config
    from launcher.cli import build_parser
    from launcher.commands.generate import prepare_generate

    assert load_config("configs/cpu-default.yaml").placement.mode == "auto"
    args = build_parser().parse_args(["generate", "configs/cpu-default.yaml", "--dry-run", "--run-dir", str(tmp_path),
                                      "--output", str(tmp_path / "out.jsonl")])
    job = prepare_generate(args)[0]  # a dry run: the job every rank would read, nothing written
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("planner: "))
    predicted = job.plan.predicted
    assert predicted["mode"] in line and predicted["layout"] in line and predicted["reason"] in line
    assert predicted["planned_at_launch"] and set(predicted["modes"]) == {"disaggregated", "colocated"}
    assert all(m["per_device_goodput"] > 0 for m in predicted["modes"].values())
    chosen = max(predicted["modes"], key=lambda m: predicted["modes"][m]["per_device_goodput"])
    if len({m["per_device_goodput"] for m in predicted["modes"].values()}) == 2:
        assert predicted["mode"] == chosen


@pytest.mark.parametrize("mode,roles", [("disaggregated", {"prefill", "decode"}), ("colocated", {"colocated"})])
def test_plan_mode_forces_the_architecture_and_still_reports_both(tmp_path, mode, roles):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "configs/cpu-default.yaml", "--mode", mode, "--no-calibrate", "-o", str(out), "--quiet"]) == 0
    plan = read_plan(str(out))
    assert {i.role for i in plan.instances} == roles
    assert plan.predicted["mode"] == mode and plan.predicted["reason"].startswith(f"as requested (--mode {mode})")
    assert all(m["per_device_goodput"] > 0 for m in plan.predicted["modes"].values())
    assert plan.predicted["machine"]["status"] in ("same", "unknown", "other")  # never a probe with --no-calibrate
    weak = plan.predicted["colocated_prefill_first"]  # for the record: the chosen colocated layout, prefill-first
    assert weak["layout"] == plan.predicted["modes"]["colocated"]["layout"].split(", ")[0] and weak["per_device_goodput"] >= 0
def test_profile_fit_reports_how_well_it_prices_the_mixed_steps_it_timed():
    from launcher.planner.profile_fit import fit_entry

    truth = LatencyModel("toy", {1: Coefficients((5.0, 0.1, 1e-4), (3.0, 0.001, 0.2), (3.0, 0.001, 0.2), 10 ** 6)})
    prefill = [{"lens": [n] * b, "ms": truth.prefill_ms([n] * b, 1)} for n in (16, 64, 256) for b in (1, 2, 4)]
    decode = [{"batch": b, "context_sum": b * c, "ms": truth.decode_trip_ms(b, b * c, 1)}
              for b in (1, 2, 4, 8, 16) for c in (32, 256)]
    shapes = [([64], [0], 4, 516), ([128], [256], 8, 2056), ([256], [128], 16, 2064)]
    mixed = [{"lens": lens, "starts": starts, "batch": b, "context_sum": ctx,
              "ms": truth.mixed_ms(lens, starts, b, ctx, 1)} for lens, starts, b, ctx in shapes]
    entry = fit_entry({"prefill": prefill, "decode": decode, "mixed": mixed})
    assert entry["fit_max_rel_error"]["mixed"] < 0.01
    slower = [dict(x, ms=x["ms"] * 1.25) for x in mixed]  # mixed steps a quarter slower than the model says
    assert fit_entry({"prefill": prefill, "decode": decode, "mixed": slower})["fit_max_rel_error"]["mixed"] == \
        pytest.approx(0.2, abs=0.01)
    assert "mixed" not in fit_entry({"prefill": prefill, "decode": decode})["fit_max_rel_error"]


def test_an_extend_chunk_pays_for_its_tail_and_for_attending_over_its_cached_context(tmp_path):
    """A chunk of n tokens after s cached ones: the prefill terms b*n + c*((s+n)^2 - s^2) and the
    extend terms e0 + e1*s; a fresh prompt pays no extend terms; a profile without them prices as before."""
    a, b, c, e0, e1 = 5.0, 0.1, 1e-4, 2.0, 0.03
    lat = LatencyModel("toy", {1: Coefficients((a, b, c), (3.0, 0.0, 0.0), (3.0, 0.0, 0.0), extend=(e0, e1))})
    tails = lat.prefill_ms([16] * 15, 1, starts=[512] * 15)
    assert tails == pytest.approx(a + b * 240 + c * 15 * (528 ** 2 - 512 ** 2) + 15 * (e0 + e1 * 512))
    assert lat.prefill_ms([256], 1) == pytest.approx(a + b * 256 + c * 256 ** 2)
    assert lat.mixed_ms([16], [512], 4, 400, 1) - lat.mixed_ms([16], [0], 4, 400, 1) == \
        pytest.approx(c * (528 ** 2 - 512 ** 2 - 16 ** 2) + e0 + e1 * 512)
    profile = tmp_path / "p.json"
    profile.write_text('{"toy": {"1": {"prefill": [5, 0.1, 1e-4], "decoding_smallbs": [3, 0, 0], '
                       '"decoding_largebs": [3, 0, 0]}}}')
    plain = load_profile(str(profile))
    assert plain.prefill_ms([16] * 15, 1, starts=[512] * 15) == pytest.approx(a + b * 240 + c * 15 * (528 ** 2 - 512 ** 2))
    profile.write_text(profile.read_text().replace('"decoding_largebs"', '"extend": [2.0, 0.03], "decoding_largebs"'))
    assert load_profile(str(profile)).prefill_ms([16] * 15, 1, starts=[512] * 15) == pytest.approx(tails)
    from launcher.bench_calibration import scaled
    assert scaled(lat, 2.0, 1.0).prefill_ms([16] * 15, 1, starts=[512] * 15) == pytest.approx(2 * tails)


def test_profile_fit_recovers_the_extend_terms_from_the_extend_steps_it_timed():
    from engine.step_timing import EXTEND_SHAPES
    from launcher.planner.profile_fit import fit_entry

    truth = LatencyModel("toy", {1: Coefficients((5.0, 0.1, 1e-4), (3.0, 0.001, 0.2), (3.0, 0.001, 0.2), 10 ** 6,
                                                 extend=(2.0, 0.03))})
    prefill = [{"lens": [n] * b, "ms": truth.prefill_ms([n] * b, 1)} for n in (16, 64, 256, 512) for b in (1, 2, 4)]
    decode = [{"batch": b, "context_sum": b * c, "ms": truth.decode_trip_ms(b, b * c, 1)}
              for b in (1, 2, 4, 8, 16) for c in (32, 256)]
    extend = [{"lens": [n] * b, "starts": [s] * b, "ms": truth.prefill_ms([n] * b, 1, starts=[s] * b)}
              for b, n, s in EXTEND_SHAPES]
    entry = fit_entry({"prefill": prefill, "decode": decode, "extend": extend})
    assert entry["extend"] == pytest.approx([2.0, 0.03], rel=1e-3) and entry["fit_max_rel_error"]["extend"] < 1e-3
    # without extend timings the profile has no extend terms, and its extend steps come out cheaper
    assert "extend" not in fit_entry({"prefill": prefill, "decode": decode})


@pytest.mark.parametrize("pp", [1, 2])
def test_chunked_colocated_finishes_every_request_within_its_budget_and_memory(pp):
    """Random lengths (prompts up to 6x the budget), Poisson arrivals, a small KV, PP with steps in
    flight: every request finishes, its prefill starting after its arrival, its first token after that."""
    lat = linear_model(prefill=(3.0, 0.05, 1e-4), decode=(4.0, 0.001, 0.2))
    reqs = make_requests(400, 20.0, LengthDist("uniform", low=(1, 1), high=(192, 24)), seed=5)
    Simulation(lat, Policy(token_budget=64, max_decode_batch=16, step_token_budget=32),
               colocated=[InstanceSpec(1, pp, 2000)]).run(reqs)
    assert all(not math.isnan(r.finish) and r.arrival <= r.prefill_start <= r.first_token <= r.finish for r in reqs)
