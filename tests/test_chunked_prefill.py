"""Chunked prefill, token-exact: colocated instances that mix prompt chunks into decode steps
(scheduler.colocated_policy: chunked) on TP1, TP2 and PP2, and a prefill instance that chunks
prompts longer than its L_m, give the tokens of whole-prompt prefill (prefill_first), in fp32.
The prompts are shorter than, equal to and several times the step budget."""
from __future__ import annotations

import json

import pytest

from conftest import ragged_prompts, read_results, run_pdlaunch, write_job

pytestmark = pytest.mark.mpi

BUDGET = 16  # > max_decode_batch (8), so every step has room for prompt tokens
PROMPTS = [p * 5 for p in ragged_prompts(3, seed=21, low=14, high=15)] + \
    [p[:BUDGET] for p in ragged_prompts(2, seed=22, low=20, high=21)] + ragged_prompts(5, seed=23, low=3, high=12)
MAX_TOKENS = 10


def colocated(tp: int, pp: int) -> dict:
    return {"mode": "colocated", "colocated": {"instances": 1, "tp": tp, "pp": pp}}


def tokens(tmp_path, model_dir, name: str, placement: dict, scheduler: dict) -> tuple[dict, dict]:
    """The generated tokens of one job by custom_id, and its report."""
    path = tmp_path / name
    path.mkdir()
    config = write_job(path, model_dir, placement, PROMPTS, MAX_TOKENS, scheduler=scheduler)
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((path / "run" / "report.json").read_text())
    return {k: r["token_ids"] for k, r in read_results(path / "out.jsonl").items()}, report


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """Whole-prompt prefill batches between decode steps (prefill_first)."""
    out, _ = tokens(tmp_path_factory.mktemp("ref"), tiny_model_dir, "prefill_first", colocated(1, 1),
                    {"colocated_policy": "prefill_first", "prefill_token_budget": 256})
    assert len(out) == len(PROMPTS) and all(len(t) == MAX_TOKENS for t in out.values())
    return out


def test_prompt_lengths_cover_the_budget():
    lens = sorted(len(p) for p in PROMPTS)
    assert lens[0] < BUDGET and BUDGET in lens and lens[-1] >= 4 * BUDGET


@pytest.mark.parametrize("tp,pp", [(1, 1), pytest.param(2, 1, marks=pytest.mark.slow), (1, 2)],
                         ids=["tp1", "tp2", "pp2"])
def test_chunked_colocated_matches_prefill_first(tmp_path, tiny_model_dir, reference, tp, pp):
    """TP2 runs in `make test-slow`: the chunking is the scheduler's, the same at any TP degree, and
    TP2's math is checked against transformers by test_engine_vs_hf's colocated-tp2pp1."""
    out, report = tokens(tmp_path, tiny_model_dir, f"chunked-tp{tp}pp{pp}", colocated(tp, pp),
                         {"colocated_policy": "chunked", "step_token_budget": BUDGET})
    assert out == reference
    (inst,) = report["instances"]
    assert inst["token_budget"] == BUDGET and inst["peak_batch"] > 1
    mixed = inst["step_samples"]["mixed"]  # prompt chunks beside decodes, within the budget
    assert any(x["batch"] for x in mixed) and all(sum(x["lens"]) + x["batch"] <= BUDGET for x in mixed)


def test_prefill_instance_chunks_prompts_longer_than_its_budget(tmp_path, tiny_model_dir, reference):
    """L_m = 16 on a PP2 prefill instance (chunks of one prompt in flight at once), a TP1 decode instance."""
    disagg = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 2},
              "decode": {"instances": 1, "tp": 1, "pp": 1}}
    out, report = tokens(tmp_path, tiny_model_dir, "disagg", disagg, {"prefill_token_budget": BUDGET})
    assert out == reference
    prefill = next(i for i in report["instances"] if i["role"] == "prefill")
    assert prefill["token_budget"] == BUDGET
    steps = prefill["step_samples"]["prefill"] + prefill["step_samples"]["mixed"]
    assert all(sum(s["lens"]) <= BUDGET for s in steps) and any(max(s.get("starts", [0])) > 0 for s in steps)
