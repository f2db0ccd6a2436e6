"""Offline batch generation as users run it: OpenAI batch files, bad lines, overload, a planned job."""
from __future__ import annotations

import json

import pytest
from conftest import ragged_prompts, run_pdlaunch, write_job

from launcher.planner.latency import load_profile

pytestmark = pytest.mark.mpi  # every test here starts real jobs

DISAGG = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
          "decode": {"instances": 1, "tp": 1, "pp": 1}}
BAD = {7: "{not json", 13: json.dumps({"custom_id": "no-prompt", "url": "/v1/completions", "body": {"max_tokens": 3}}),
       21: json.dumps({"custom_id": "too-long", "url": "/v1/completions", "body": {"prompt": [7] * 300}}),
       30: json.dumps({"custom_id": "bad-field", "url": "/v1/completions", "body": {"prompt": [7, 8], "beams": 2}}),
       44: json.dumps({"custom_id": "n2", "url": "/v1/completions", "body": {"prompt": [7, 8], "n": 2}})}


def test_openai_batch_with_bad_lines(tmp_path, tiny_model_dir):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [])
    prompts = ragged_prompts(50, seed=9)
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write((BAD.get(i) or json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                                "body": {"prompt": p, "max_tokens": 6}})) + "\n")
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert len(lines) == 50
    by_id = {r["custom_id"]: r for r in lines}
    assert len(by_id) == 50
    errors = {r["custom_id"] for r in lines if r["error"]}
    assert errors == {next(i for i in by_id if i.startswith("request-")), "no-prompt", "too-long", "bad-field", "n2"}
    assert "300 tokens" in by_id["too-long"]["error"]["message"]
    for i in set(range(50)) - set(BAD):
        r = by_id[f"c{i}"]
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "text_completion" and body["usage"]["prompt_tokens"] == len(prompts[i])
        assert body["choices"][0]["finish_reason"] in ("length", "stop") and isinstance(body["choices"][0]["text"], str)
        assert r["metrics"]["ttft_ms"] > 0


def test_overload_with_capped_kv_completes_with_bounded_memory(tmp_path, tiny_model_dir):
    """40 long requests at once need 20x the decode cache and the prefill hold area: back-pressure
    and pull-on-room carry them through, within the configured blocks, with flat memory."""
    prompts = [p * 4 for p in ragged_prompts(40, seed=11, low=25, high=26)]  # 100 tokens each
    capacity = 60  # blocks of 4 tokens: two requests of 100 + 20
    config = write_job(tmp_path, tiny_model_dir, DISAGG, prompts, 20,
                       scheduler={"decode_kv_blocks": capacity, "prefill_kv_blocks": capacity,
                                  "prefill_token_budget": 256})
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert len(lines) == 40 and all(len(r["token_ids"]) == 20 for r in lines)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for inst in report["instances"]:
        assert inst["kv_blocks"] == capacity and inst["peak_kv_blocks"] <= capacity
        # Python + torch + megatron imports take ~500 MB; the rest is the cache and the weights.
        assert inst["peak_rss_mb"] < 900 + inst["kv_cache_mb"] + inst["weights_mb"], inst


def test_profile_measures_what_pp_adds_and_whether_its_stages_overlap(tmp_path, tiny_model_dir):
    """`pdlaunch profile --pp 1,2` times a real TP1 x PP2 instance: each shape alone through both
    stages (latency) and with two steps in flight (interval); the planner reads the figures."""
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5, 6]], 4)
    out = tmp_path / "profile.json"
    proc = run_pdlaunch("profile", config, "-o", str(out), "--quiet", "--tp", "1", "--pp", "1,2", "--alone")
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = json.loads(out.read_text())
    entry = next(v for k, v in profile.items() if k != "_meta")["1"]
    measured = entry["pipeline"]["2"]
    shapes = [x.get("lens") or (x["batch"], x["context_sum"] // x["batch"] - 1) for x in measured["samples"]]
    # the 256-token prompt does not fit max_model_len 256, nor 32 sequences of 65 tokens 256 blocks
    # of 4; a lone decode trip's 256-token context is cut to 254
    assert shapes == [[64], [128], (1, 64), (1, 254), (2, 64), (8, 64), (15, 64)]
    assert all(x["latency_ms"] > 0 and x["interval_ms"] > 0 for x in measured["samples"])
    assert measured["handoff_ms"] >= 0 and 1.0 <= measured["overlap"] <= 2.0
    assert all(1.0 <= o <= 2.0 for o in measured["overlap_by_phase"].values())
    assert entry["pp_stage_ms"] == measured["handoff_ms"]
    # chunked prefill's mixed steps that fit (one here), priced by the fit of the pure ones
    assert [(x["batch"], x["lens"], x["starts"]) for x in entry["samples"]["mixed"]] == [(4, [64], [0])]
    assert entry["fit_max_rel_error"]["mixed"] >= 0
    # extend steps (tails behind one cached prefix) that fit: their terms beyond the prefill fit
    assert [(x["lens"], x["starts"]) for x in entry["samples"]["extend"]] == [([32] * 8, [128] * 8)]
    assert len(entry["extend"]) == 2 and min(entry["extend"]) >= 0
    assert load_profile(str(out)).by_tp[1].extend == tuple(entry["extend"])
    meta = profile["_meta"]
    assert meta["pipelined_pp_source"] == "measured" and meta["pipelined_pp"] == (measured["overlap"] >= 1.5)
    latency = load_profile(str(out))
    assert latency.overlap(1, 2, "decode") == measured["overlap_by_phase"]["decode"]
    assert latency.pipelined_pp == meta["pipelined_pp"]
    print(f"TP1 x PP2: hand-off {measured['handoff_ms']:.2f} ms, overlap {measured['overlap']:.2f}")


@pytest.mark.slow
def test_profile_plan_generate_bench(tmp_path, tiny_model_dir):
    """`pdlaunch profile` on this machine, then `pdlaunch plan` with that profile, then the engine
    runs the plan file as it is, then `pdlaunch bench` measures that plan's goodput by bisection."""
    config = write_job(tmp_path, tiny_model_dir, DISAGG, ragged_prompts(6, seed=2), 4,
                       extra={"planner": {"profile": "profile.json", "lengths": "uniform", "input_len": 20,
                                          "output_len": 4, "num_requests": 50, "memory_gb": 1},
                              "slo": {"ttft_ms": 25, "tpot_ms": 100, "attainment": 0.8}})
    proc = run_pdlaunch("profile", config, "-o", str(tmp_path / "profile.json"), "--quiet", "--tp", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = json.loads((tmp_path / "profile.json").read_text())
    entry = next(v for k, v in profile.items() if k != "_meta")["1"]
    assert entry["prefill"][1] > 0 and entry["token_budget"] > 0
    assert entry["concurrent_instances"] > 1 and set(entry["shared_slowdown"]) == {"prefill", "decode"}
    beside = entry["samples"]["beside_other_phase"]  # instance 0 timed beside idle, same- and other-phase neighbours
    assert beside["prefill"] and beside["decode"]
    assert all(x[k] > 0 for phase in beside.values() for x in phase for k in ("alone_ms", "same_ms", "ms"))
    from launcher.planner.profile_fit import other_phase_slowdown, shared_slowdown
    assert entry["shared_slowdown"] == pytest.approx(shared_slowdown(beside))
    other = other_phase_slowdown(beside, entry["decoding_large_small_bs_threshold"])
    assert entry["other_phase_slowdown"] == pytest.approx(other)
    assert load_profile(str(tmp_path / "profile.json")).by_tp[1].other_phase_slowdown == pytest.approx(
        (other["prefill"], other["decode_smallbs"], other["decode_largebs"]))
    assert len(entry["samples_alone"]["decode"]) == len(entry["samples"]["decode"]) // entry["concurrent_instances"]
    overhead = entry["samples"]["overhead"]  # the step loop beyond the forward, with the engine's scheduler
    assert overhead["prefill"] and overhead["decode"] and all(x["ms"] > 0 for x in overhead["decode"])
    from launcher.planner.profile_fit import fit_overhead
    for phase in ("prefill", "decode"):  # the written coefficients are the fit of the written samples
        assert entry["step_overhead"][phase] == pytest.approx(fit_overhead(overhead[phase]))
    proc = run_pdlaunch("plan", config, "-o", str(tmp_path / "plan.yaml"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml

    cfg = yaml.safe_load(open(config))
    cfg["placement"] = {"plan": "plan.yaml"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(1 for _ in open(tmp_path / "out.jsonl")) == 6

    # `pdlaunch bench` with the measured profile on 1 prefill + 1 decode rank (the plan above has 8
    # instances, too many ranks for a quick run on 2 cores): 2 rates in one job, then bisection jobs.
    cfg["placement"] = DISAGG
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    rates, probes, n = [2.0, 10000.0], 2, 16  # 16 prompts at once queue for ~6 prefills: TTFT > 25 ms
    proc = run_pdlaunch("bench", config, "--rates", ",".join(map(str, rates)), "--requests", str(n),
                        "--bisect", str(probes), "-o", str(tmp_path / "bench"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "bench" / "attainment.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    (system, goodput), = result["goodput_per_device"].items()
    rows = [r for r in result["rows"] if r["system"] == system]
    assert goodput["engine_runs"] == len(rows) and len(rates) <= len(rows) <= len(rates) + probes
    assert [j["rates"] for j in result["jobs"]][0] == rates  # the tested rates ran in one job
    assert len(result["jobs"]) == 1 + len(rows) - len(rates)  # each bisection probe is one more job
    devices = rows[0]["devices"]
    passing = [r["rate"] for r in rows if r["measured"]["attainment"] >= cfg["slo"]["attainment"]]
    lo, hi = goodput["bracket"]
    assert goodput["measured"] == lo == max(passing, default=0.0) / devices
    above = [r["rate"] / devices for r in rows if r["rate"] / devices > lo]
    assert hi == min(above, default=None), "the bracket's top is the lowest failing rate"
    assert goodput["simulated_profile"] > 0 and goodput["simulated_calibrated"] > 0
    for r in rows:  # every row predicted from the profile and from the profile scaled by the burst
        assert r["requests"] == n and r["calibration"]["prefill"] > 0 and r["calibration"]["decode"] > 0
        for kind in ("measured", "predicted", "calibrated"):  # a share of this segment's n requests
            assert r[kind]["attainment"] * n == pytest.approx(round(r[kind]["attainment"] * n)), kind
            assert r[kind]["ttft_ms_p50"] > 0, kind
        assert r["error_points"] == pytest.approx(abs(r["measured"]["attainment"] - r["calibrated"]["attainment"]) * 100)
    assert result["fidelity"][system]["calibrated"]["rows"] == len(rows)
    report = json.loads((tmp_path / "bench" / "run-disaggregated" / "report.json").read_text())
    steps = {i["role"]: i["step_samples"] for i in report["instances"]}
    assert steps["prefill"]["prefill"] and not steps["prefill"]["decode"] and steps["decode"]["decode"]
    assert all(x["ms"] > 0 and x["batch"] >= 1 for x in steps["decode"]["decode"])
