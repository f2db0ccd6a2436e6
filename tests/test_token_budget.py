"""L_m (`scheduler.prefill_token_budget`): auto by default, from the profile for each instance's TP
degree; the same value bounds the engine's prefill batches and the simulator's."""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import read_results, run_pdlaunch, write_job

from contracts.config import load_config
from contracts.errors import UserError
from contracts.plan import InstancePlan, Plan, plan_from_dict
from launcher.job_setup import new_job
from launcher.planner.latency import DEFAULT_TOKEN_BUDGET, load_profile, prefill_token_budget
from launcher.planner.simulator import InstanceSpec, Policy, Simulation
from launcher.planner.workload import SimRequest

ENTRY = {"prefill": [1.0, 0.01, 0.0], "decoding_smallbs": [1.0, 0.0, 0.1], "decoding_largebs": [1.0, 0.0, 0.1]}


def write_profile(path, budgets: dict[int, int | None]) -> str:
    model = {str(tp): ENTRY | ({"token_budget": b} if b else {}) for tp, b in budgets.items()}
    path.write_text(json.dumps({"tiny": model, "_meta": {"dtype": "float32"}}))
    return str(path)


def config_with(tmp_path, scheduler: dict, profile: str = "") -> str:
    cfg = {"model": {"path": "embedded"}, "scheduler": scheduler, "planner": {"profile": profile}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_auto_is_the_default_and_numbers_still_override(tmp_path):
    assert load_config(config_with(tmp_path, {})).scheduler.token_budget is None
    assert load_config(config_with(tmp_path, {"prefill_token_budget": "auto"})).scheduler.token_budget is None
    assert load_config(config_with(tmp_path, {"prefill_token_budget": 96})).scheduler.token_budget == 96
    for bad, says in (("fast", "must be an integer or auto"), (0, "must be >= 1"), (True, "must be an integer or auto")):
        with pytest.raises(UserError, match=f"'scheduler.prefill_token_budget' {says}"):
            load_config(config_with(tmp_path, {"prefill_token_budget": bad}))


def test_each_instance_takes_the_profiles_budget_for_its_tp(tmp_path):
    profile = write_profile(tmp_path / "profile.json", {1: 48, 2: 160, 4: None})
    plan = Plan([InstancePlan(0, "prefill", 1, 1, 1, ["localhost"]),
                 InstancePlan(1, "prefill", 2, 1, 2, ["localhost"] * 2),
                 InstancePlan(2, "decode", 4, 1, 4, ["localhost"] * 4)])
    auto = load_config(config_with(tmp_path, {}, profile))
    assert new_job(auto, plan, "/m").token_budgets == (48, 160, DEFAULT_TOKEN_BUDGET)  # TP4: no L_m profiled
    fixed = load_config(config_with(tmp_path, {"prefill_token_budget": 64}, profile))
    assert new_job(fixed, plan, "/m").token_budgets == (64, 64, 64)
    no_profile = load_config(config_with(tmp_path, {}))
    assert new_job(no_profile, plan, "/m").token_budgets == (DEFAULT_TOKEN_BUDGET,) * 3
    latency = load_profile(profile)
    assert [prefill_token_budget(None, latency, tp) for tp in (1, 2, 4)] == [48, 160, DEFAULT_TOKEN_BUDGET]


def test_a_chunked_colocated_instance_takes_the_step_budget(tmp_path):
    profile = write_profile(tmp_path / "profile.json", {1: 48})
    plan = Plan([InstancePlan(0, "prefill", 1, 1, 1, ["localhost"]), InstancePlan(1, "colocated", 1, 1, 2, ["localhost"])])
    assert new_job(load_config(config_with(tmp_path, {}, profile)), plan, "/m").token_budgets == (48, 48)  # auto: L_m
    chunked = load_config(config_with(tmp_path, {"step_token_budget": 96}, profile))
    assert new_job(chunked, plan, "/m").token_budgets == (48, 96)
    first = load_config(config_with(tmp_path, {"step_token_budget": 96, "colocated_policy": "prefill_first"}, profile))
    assert new_job(first, plan, "/m").token_budgets == (48, 48)


def test_the_plans_step_budget_runs_unless_the_config_names_one(tmp_path):
    """The planner writes the step budget it found best into the plan; the engine runs it, a
    number in the config overrides it, and prefill-first instances ignore it."""
    profile = write_profile(tmp_path / "profile.json", {1: 48})
    planned = Plan([InstancePlan(0, "colocated", 1, 1, 1, ["localhost"], step_token_budget=32)])
    again = plan_from_dict(json.loads(json.dumps(planned.to_dict())))
    assert again.instances[0].step_token_budget == 32
    assert new_job(load_config(config_with(tmp_path, {}, profile)), again, "/m").token_budgets == (32,)
    named = load_config(config_with(tmp_path, {"step_token_budget": 96}, profile))
    assert new_job(named, again, "/m").token_budgets == (96,)
    first = load_config(config_with(tmp_path, {"colocated_policy": "prefill_first"}, profile))
    assert new_job(first, again, "/m").token_budgets == (48,)
    bad = planned.to_dict()
    bad["instances"][0]["role"] = "prefill"
    with pytest.raises(UserError, match="step_token_budget must be a positive integer on a colocated instance"):
        plan_from_dict(bad)


def test_the_simulator_batches_prefills_under_the_profiles_budget(tmp_path):
    latency = load_profile(write_profile(tmp_path / "profile.json", {1: 100}))
    reqs = [SimRequest(0.0, 40, 2) for _ in range(5)]  # 200 prompt tokens at once
    Simulation(latency, Policy(), [InstanceSpec(1, 1, 10 ** 6)], [InstanceSpec(1, 1, 10 ** 6)]).run(reqs)
    starts = sorted({r.prefill_start for r in reqs})
    assert len(starts) == 3, "40 + 40 fit L_m = 100, a third prompt does not: batches of 2, 2, 1"
    explicit = [SimRequest(0.0, 40, 2) for _ in range(5)]
    Simulation(latency, Policy(token_budget=200), [InstanceSpec(1, 1, 10 ** 6)], [InstanceSpec(1, 1, 10 ** 6)]).run(explicit)
    assert len({r.prefill_start for r in explicit}) == 1


@pytest.mark.mpi
def test_the_profiles_budget_reaches_the_engines_scheduler(tmp_path, tiny_model_dir):
    """A profile whose L_m for TP1 is 24: the prefill instance reports 24 and never batches more
    than 24 prompt tokens (unless one prompt alone is longer); the answers are unchanged."""
    prompts = [[5 + i] * 10 for i in range(6)]  # 6 prompts of 10 tokens, all at t=0
    profile = write_profile(tmp_path / "profile.json", {1: 24})
    placement = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
                 "decode": {"instances": 1, "tp": 1, "pp": 1}}
    config = write_job(tmp_path, tiny_model_dir, placement, prompts, 4, scheduler={"prefill_token_budget": "auto"},
                       extra={"planner": {"profile": profile}})
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    prefill = next(i for i in report["instances"] if i["role"] == "prefill")
    assert prefill["token_budget"] == 24
    batches = [sum(s["lens"]) for s in prefill["step_samples"]["prefill"]]
    assert batches and max(batches) <= 24 and sum(batches) == 60, batches
    assert len(read_results(tmp_path / "out.jsonl")) == len(prompts)
