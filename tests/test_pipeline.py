"""Batches in flight on a PP instance: stage 0 works on one step while stage 1 finishes another.

Every rank traces its forwards (PDLAUNCH_STEP_TRACE: step number, stage, start, end); with batches
in flight some forward of stage 0 overlaps in time a forward of stage 1 *of another step*; filling
and draining each step (scheduler.batches_in_flight: false) never does. The tokens are the same,
whichever colocated policy runs the steps: the in-flight job runs chunked prefill (mixed steps),
the drained one prefill-first.
"""
from __future__ import annotations

import json

import pytest

from conftest import ragged_prompts, read_results, run_pdlaunch, write_job

pytestmark = pytest.mark.mpi


def cross_step_overlaps(trace_dir) -> int:
    """Pairs of forwards (stage 0, stage 1) of different steps that ran at the same time."""
    stage0 = [json.loads(line) for line in open(trace_dir / "rank1.jsonl")]
    stage1 = [json.loads(line) for line in open(trace_dir / "rank2.jsonl")]
    return sum(1 for a in stage0 for b in stage1
               if a["step"] != b["step"] and a["start"] < b["end"] and b["start"] < a["end"])


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
    return {k: r["token_ids"] for k, r in results.items()}, cross_step_overlaps(trace)


def test_two_steps_run_on_different_stages_at_once(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tokens_in_flight, overlaps_in_flight = run(tmp_path / "a", tiny_model_dir, monkeypatch, True, "chunked")
    tokens_drained, overlaps_drained = run(tmp_path / "b", tiny_model_dir, monkeypatch, False, "prefill_first")
    assert tokens_in_flight == tokens_drained and len(tokens_in_flight) == 8
    assert overlaps_drained == 0, "fill-and-drain: a step's forwards never overlap another step's"
    assert overlaps_in_flight >= 10, f"only {overlaps_in_flight} cross-step overlaps with batches in flight"
