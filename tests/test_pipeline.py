"""Batches in flight on a PP instance: stage 0 works on one step while stage 1 finishes another.

Every rank traces its forwards (PDLAUNCH_STEP_TRACE); the leader (stage 0) records with each step
how many earlier steps it had launched and not yet taken the tokens of. With batches in flight it
launches step k+1 while step k is still in the later stage whenever another decode group or prompt
chunk is ready (a fact of its loop, not of the machine's speed: whether the stages' forwards also
overlap in wall-clock time depends on the cores the ranks get); filling and draining each step
(scheduler.batches_in_flight: false) never does. The tokens are the same, whichever colocated
policy runs the steps: the in-flight job runs chunked prefill (mixed steps), the drained one
prefill-first.
"""
from __future__ import annotations

import json

import pytest

from conftest import ragged_prompts, read_results, run_pdlaunch, write_job

pytestmark = pytest.mark.mpi


def steps_launched_behind_another(trace_dir) -> int:
    """Steps the leader (rank 1, stage 0) launched while an earlier step's tokens were still out."""
    leader = [json.loads(line) for line in open(trace_dir / "rank1.jsonl")]
    return len({r["step"] for r in leader if r["in_flight"] > 0})


def run(tmp_path, tiny_model_dir, monkeypatch, in_flight: bool, policy: str) -> tuple[dict, int]:
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv("PDLAUNCH_STEP_TRACE", str(trace))
    config = write_job(tmp_path, tiny_model_dir, {"mode": "colocated", "colocated": {"instances": 1, "tp": 1, "pp": 2}},
                       ragged_prompts(8, seed=4), 24,
                       scheduler={"batches_in_flight": in_flight, "colocated_policy": policy})
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path / "out.jsonl")
    return {k: r["token_ids"] for k, r in results.items()}, steps_launched_behind_another(trace)


def test_two_steps_run_on_different_stages_at_once(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tokens_in_flight, behind_in_flight = run(tmp_path / "a", tiny_model_dir, monkeypatch, True, "chunked")
    tokens_drained, behind_drained = run(tmp_path / "b", tiny_model_dir, monkeypatch, False, "prefill_first")
    assert tokens_in_flight == tokens_drained and len(tokens_in_flight) == 8
    assert behind_drained == 0, "fill-and-drain: a step is launched only once the previous one's tokens are back"
    # 8 requests arrive together and decode 24 tokens in two groups that take turns: nearly every step
    assert behind_in_flight >= 10, f"only {behind_in_flight} steps launched while another was in flight"
