"""Goodput as a sustained rate: capacity bounds, burst vs sustained, ties, per-step costs, and
`pdlaunch simulate`'s trace replay against hand-computed timings."""
from __future__ import annotations

import json
import math

import pytest

from launcher.cli import main
from launcher.planner.goodput import (NoPrefillLatency, Settings, decode_capacity, goodput, prefill_capacity,
                                      probe_requests, queues_grow)
from launcher.planner.latency import KNOWN_MODELS, Coefficients, LatencyModel, load_profile
from launcher.planner.replay import trace_requests
from launcher.planner.search import Candidate, _best
from launcher.planner.simulator import InstanceSpec, Policy, Simulation
from launcher.planner.workload import LengthDist, SimRequest, attainment, make_requests

OPT13B = KNOWN_MODELS["facebook/opt-13b"]
UNLIMITED = InstanceSpec(1, 1, 10 ** 12)


def toy(prefill=(10.0, 1.0, 0.0), decode=(10.0, 0.0, 1.0), overhead=((0.0, 0.0), (0.0, 0.0)), pipelined=True):
    coef = Coefficients(prefill, decode, decode, 10 ** 6, 0.0, prefill_overhead=overhead[0], decode_overhead=overhead[1])
    return LatencyModel("toy", {1: coef}, pipelined_pp=pipelined)


def paper_decode(settings: Settings, tp: int = 1, pp: int = 1):
    """OPT-13B decode alone on the published A100 profile (prefill free), KV of an 80 GB GPU."""
    from launcher.planner.latency import kv_capacity_tokens

    lat = load_profile("configs/profiles/distserve-profile-a100-80g.json", "facebook/opt-13b")
    inst = InstanceSpec(tp, pp, kv_capacity_tokens(OPT13B, 80, tp, pp))
    policy = Policy(settings.token_budget, settings.max_decode_batch)

    def run(reqs, *stop):
        return Simulation(NoPrefillLatency(lat), policy, [UNLIMITED], [inst]).run(reqs, *stop)
    return lat, inst, run


def chatbot(**kw) -> Settings:
    return Settings(250, 100, lengths=LengthDist("lognormal", 755, 200, 1.0, max_len=2048), token_budget=2048,
                    max_decode_batch=256, **kw)


def test_prefill_capacity_by_hand():
    """L_m 100, prompts of 50: two per batch, a batch costs 10 + 100 ms: 2 / 110 ms."""
    s = Settings(1e9, 1e9, lengths=LengthDist("fixed", 50, 1), token_budget=100)
    assert prefill_capacity(toy(), s, InstanceSpec(1, 1, 10 ** 9)) == pytest.approx(2 / 0.110)


def test_decode_capacity_by_hand():
    """Steps of 10 + 1 * batch ms, 5 steps per request (6 tokens), batch <= 4 by KV (100 / (20 + 6)):
    4 requests per 14 ms step, each needing 5 steps: 4 / (5 * 14 ms)."""
    s = Settings(1e9, 1e9, lengths=LengthDist("fixed", 20, 6), max_decode_batch=256)
    assert decode_capacity(toy(), s, InstanceSpec(1, 1, 105)) == pytest.approx(4 / (5 * 0.014))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 4)])
def test_decode_goodput_is_finite_and_below_its_analytic_bound(tp, pp):
    settings = chatbot()
    lat, inst, run = paper_decode(settings, tp, pp)
    cap = decode_capacity(lat, settings, inst)
    g = goodput(run, settings, tp * pp, None, settings.tpot_ms, cap)
    assert 0 < g.rate < cap / (tp * pp) < math.inf
    assert g.capacity == pytest.approx(cap / (tp * pp)) and 0 < g.mean_tpot_ms <= settings.tpot_ms
    # the bound is real: just above it, a sustained run falls behind its arrivals
    rate = 1.1 * cap
    reqs = run(make_requests(probe_requests(settings, rate), rate, settings.lengths, seed=1))
    assert queues_grow(reqs) or attainment(reqs, None, settings.tpot_ms) < settings.target


@pytest.mark.parametrize("tp,pp", [(1, 4), (2, 2)])
def test_a_burst_passes_where_the_same_rate_sustained_fails(tp, pp):
    """A decode layout whose KV holds a whole 300-request burst meets the TPOT SLO at twice, even
    five times, the rate it sustains; over ten request lifetimes the same rate fails, and the
    search (sustained, capacity-bounded) returns a rate below the bound."""
    settings = chatbot()
    lat, inst, run = paper_decode(settings, tp, pp)
    cap = decode_capacity(lat, settings, inst)
    sustained = goodput(run, settings, tp * pp, None, settings.tpot_ms, cap).rate * tp * pp
    assert 0 < sustained < cap
    for rate in (2 * sustained, 5 * sustained):
        burst = run(make_requests(300, rate, settings.lengths, seed=0))
        assert attainment(burst, None, settings.tpot_ms) >= settings.target
        long = run(make_requests(probe_requests(settings, rate), rate, settings.lengths, seed=0))
        assert len(long) > 300 and queues_grow(long)
        assert attainment(long, None, settings.tpot_ms) < settings.target


def test_a_run_given_slos_stops_once_the_target_is_out_of_reach():
    lat = toy(prefill=(50.0, 0.0, 0.0))
    reqs = make_requests(1000, 25.0, LengthDist("fixed", 10, 1), seed=3)  # overloaded: TTFT grows
    full = Simulation(lat, Policy(token_budget=10), [InstanceSpec(1, 1, 10 ** 9)], [UNLIMITED]).run(
        [SimRequest(r.arrival, r.input_len, r.output_len) for r in reqs])
    cut = Simulation(lat, Policy(token_budget=10), [InstanceSpec(1, 1, 10 ** 9)], [UNLIMITED]).run(reqs, (500.0, None), 0.9)
    missed = sum(r.ttft > 500 for r in full)
    assert missed > 100 and attainment(full, 500, None) < 0.9
    assert sum(r.ttft > 500 for r in cut if not math.isnan(r.finish)) == 101  # stopped at the 101st miss
    assert attainment(cut, 500, None) == attainment(full[:0] + cut, 500, None) < 0.9


def test_queues_grow_on_a_falling_behind_system_only():
    lat = toy(prefill=(50.0, 0.0, 0.0))
    s = Policy(token_budget=10)
    for rate, grows in ((10.0, False), (25.0, True)):  # one prefill every 50 ms: capacity 20 req/s
        reqs = Simulation(lat, s, [InstanceSpec(1, 1, 10 ** 9)], [UNLIMITED]).run(
            make_requests(2000, rate, LengthDist("fixed", 10, 1), seed=3))
        assert queues_grow(reqs) == grows


def test_ties_go_to_fewer_devices_then_lower_tpot():
    a = Candidate("decode", 1, 2, 4.0, 2, mean_tpot_ms=50)
    b = Candidate("decode", 1, 1, 2.0, 1, mean_tpot_ms=70)
    c = Candidate("decode", 2, 1, 4.0, 2, mean_tpot_ms=40)
    assert _best([a, b, c], "decode") is b
    assert _best([a, c], "decode") is c


def test_step_overhead_is_paid_once_per_step_on_the_first_stage():
    lat = toy(prefill=(40.0, 0.0, 0.0), overhead=((2.0, 0.01), (3.0, 0.001)))
    assert lat.prefill_ms([100], 1) == pytest.approx(40 + 2 + 1)
    assert lat.prefill_ms([100], 1, pp=2) == pytest.approx(40 + 2 + 1)      # no stage cost in this toy
    assert lat.prefill_interval_ms([100], 1, pp=2) == pytest.approx(20 + 3)  # compute split, overhead not
    assert lat.decode_ms(4, 1000, 1) == pytest.approx(10 + 4 + 3 + 1)
    anchor = load_profile("configs/profiles/distserve-profile-a100-80g.json", "facebook/opt-13b")
    assert anchor.step_overhead_ms("decode", 1000, 1) == pytest.approx(2.1)
    assert anchor.by_tp[1].pp_stage_ms == 1.0


def _two_request_trace(tmp_path, kind: str) -> str:
    """The two requests of test_planner's hand-computed trace (arrivals 0 and 5 ms)."""
    if kind == "distserve":
        path = tmp_path / "trace.json"
        path.write_text(json.dumps([{"start_time": 12.0, "prompt_len": 10, "output_len": 3},
                                    {"start_time": 12.005, "prompt_len": 20, "output_len": 2}]))
    else:  # a results file: arrival times in metrics, lengths in usage, an error record skipped
        path = tmp_path / "results.jsonl"
        lines = [{"custom_id": "a", "usage": {"prompt_tokens": 10, "completion_tokens": 3}, "metrics": {"arrival": 1000.0}},
                 {"custom_id": "x", "error": {"message": "bad line"}},
                 {"custom_id": "b", "usage": {"prompt_tokens": 20, "completion_tokens": 2}, "metrics": {"arrival": 1000.005}}]
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


@pytest.mark.parametrize("kind", ["distserve", "results"])
def test_trace_replay_honours_arrival_times_exactly(tmp_path, kind):
    reqs = trace_requests(_two_request_trace(tmp_path, kind))
    assert [(r.arrival, r.input_len, r.output_len) for r in reqs] == [(0.0, 10, 3), (pytest.approx(5.0), 20, 2)]
    lat = toy(prefill=(10.0, 1.0, 0.0), decode=(5.0, 0.0, 1.0))
    policy = Policy(token_budget=100, kv_bytes_per_token=10 ** 6, bandwidth_gbps=lambda p, d: 1.0)
    a, b = Simulation(lat, policy, [InstanceSpec(1, 1, 1000)], [InstanceSpec(1, 1, 1000)]).run(reqs)
    # prefill a 0 -> 20, b 20 -> 50; transfers 10 and 20 ms; decode steps of 5 + batch ms
    assert (a.first_token, a.finish, a.queue_ms, a.transfer_ms) == (20.0, 42.0, 0.0, 10.0)
    assert (b.first_token, b.finish, b.queue_ms, b.transfer_ms) == (50.0, 76.0, pytest.approx(15.0), 20.0)
    assert (a.prefill_instance, a.decode_instance) == (0, 1)


def test_simulate_command_on_a_paper_config(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    starts = [i * 0.5 for i in range(40)]
    trace.write_text(json.dumps([{"start_time": t, "prompt_len": 100 + 10 * i, "output_len": 20}
                                 for i, t in enumerate(starts)]))
    out = tmp_path / "sim.json"
    rc = main(["simulate", "configs/paper-opt13b-high.yaml", "--trace", str(trace), "--slo-scales", "0.5,1",
               "-o", str(out), "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["attainment"]) == {"0.5", "1"} and set(report["attainment"]["1"]) == {"ttft", "tpot", "both"}
    assert [r["prompt_len"] for r in report["requests"]] == [100 + 10 * i for i in range(40)]  # input order
    assert [r["arrival_ms"] for r in report["requests"]] == pytest.approx([t * 1e3 for t in starts])
    for r in report["requests"]:
        assert 0 <= r["queue_ms"] < r["ttft_ms"] and r["tpot_ms"] > 0
        assert r["output_len"] > 1 and 0 <= r["transfer_ms"] <= r["tpot_ms"] * (r["output_len"] - 1)  # joined before token 2
        assert r["prefill_instance"] == 0 and r["decode_instance"] == 1
    assert report["attainment"]["1"]["both"] == 1.0  # 2 req/s on P + D of OPT-13B: light load
    assert report["ttft_ms"]["p90"] >= report["ttft_ms"]["mean"] > 0


@pytest.mark.parametrize("content,message", [
    ("[{\"start_time\": 0, \"prompt_len\": 10}]", "missing or non-numeric"),
    ("{\"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 2}}\n", "lacks arrival times"),
    ("not json\n", "line 1 is not valid JSON"),
    ("[{\"start_time\": 0, \"prompt_len\": 0, \"output_len\": 4}]", "must be >= 1"),
])
def test_bad_traces_get_one_line_errors(tmp_path, capsys, content, message):
    trace = tmp_path / "t.json"
    trace.write_text(content)
    assert main(["simulate", "configs/paper-opt13b-high.yaml", "--trace", str(trace)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # full searches on the paper's 4 x 8 A100 settings (~55 s together)
@pytest.mark.parametrize("name", ["paper-opt13b-high", "paper-opt13b-low", "paper-opt66b-high", "paper-opt66b-low"])
def test_paper_plans_have_no_goodput_at_a_search_ceiling(tmp_path, name):
    from contracts.plan import read_plan

    out = tmp_path / "plan.yaml"
    assert main(["plan", f"configs/{name}.yaml", "-o", str(out), "--quiet"]) == 0
    predicted = read_plan(str(out)).predicted
    assert 0 < predicted["per_device_goodput"] < predicted["capacity_per_device"] < math.inf
    assert 0 < predicted["colocated"]["per_device_goodput"]


def test_fit_overhead_recovers_a_per_step_and_per_token_cost():
    from launcher.planner.profile_fit import fit_overhead

    samples = [{"context_tokens": n, "ms": 1.5 + 0.002 * n} for n in (16, 100, 400, 1200)]
    assert fit_overhead(samples) == pytest.approx([1.5, 0.002])
    flat = [{"context_tokens": n, "ms": 0.8 + 0.1 * (-1) ** n} for n in range(10, 20)]  # no per-token trend
    assert fit_overhead(flat) == pytest.approx([0.8, 0.0], abs=0.02)
    falling = [{"context_tokens": n, "ms": 2.0 - 0.001 * n} for n in (10, 100, 500)]  # a negative slope is clamped
    assert fit_overhead(falling) == pytest.approx([sum(x["ms"] for x in falling) / 3, 0.0])
    assert fit_overhead([]) == [0.0, 0.0]


def test_a_profiles_own_step_overhead_overrides_the_files_default(tmp_path):
    entry = {"prefill": [1, 0, 0], "decoding_smallbs": [1, 0, 0], "decoding_largebs": [1, 0, 0]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"_meta": {"step_overhead": {"prefill": [2, 0], "decode": [3, 0]}, "pp_stage_ms": 0.25},
                                "m": {"1": entry, "2": entry | {"step_overhead": {"prefill": [5, 0], "decode": [7, 0]}}}}))
    lat = load_profile(str(path))
    assert lat.step_overhead_ms("decode", 100, 1) == 3 and lat.step_overhead_ms("decode", 100, 2) == 7
    assert lat.by_tp[1].pp_stage_ms == 0.25
