"""Every KV rank pair meets once at start, in one global order, before the first step
(engine.kv_transfer.KVTransfer.warm_up): NCCL creates a pair's communicator at its first send or
receive and blocks until the peer's first call, so first contacts in pull order could wait in a
cycle across 2 prefill and 2 decode instances. The order is checked on the shipped 2 x 8 GPU plan,
and a 2P2D job on gloo traces that every rank met its pairs in that order before its first step; its
answers are transformers' greedy tokens (the requests start together, so both prefill and both
decode instances take some)."""
from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import ROOT, ragged_prompts, read_results, run_pdlaunch, write_job

from contracts.plan import InstancePlan, Plan, read_plan
from engine.reshard import kv_rank_pairs


def test_pairs_of_the_shipped_two_node_plan_in_one_order_without_a_cycle():
    plan = read_plan(os.path.join(ROOT, "slurm", "gpu-2x8.plan.yaml"))
    pairs = kv_rank_pairs(plan.instances, 32, 8)  # Llama-3.1-8B: 32 layers, 8 KV heads
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs) and all(a < b for a, b in pairs)
    prefill = {r for i in plan.instances if i.role == "prefill" for r in i.ranks}
    decode = {r for i in plan.instances if i.role == "decode" for r in i.ranks}
    assert all((a in prefill) != (b in prefill) and {a, b} <= prefill | decode for a, b in pairs)
    # each rank meets its pairs in this order; replaying it one meeting at a time always finishes
    queues = {r: [p for p in pairs if r in p] for r in prefill | decode}
    met = 0
    while any(queues.values()):
        ready = [p for p in pairs if all(queues[r] and queues[r][0] == p for r in p)]
        assert ready, f"ranks wait in a cycle after {met} pairs"
        for a, b in ready:
            queues[a].pop(0)
            queues[b].pop(0)
        met += len(ready)
    assert met == len(pairs)


def test_colocated_instances_have_no_kv_pairs():
    plan = Plan([InstancePlan(0, "colocated", 2, 1, first_rank=1), InstancePlan(1, "colocated", 2, 1, first_rank=3)])
    assert kv_rank_pairs(plan.instances, 4, 4) == []


def greedy(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy continuations in fp32."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    return [model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.mark.mpi
def test_two_prefill_two_decode_job_warms_every_pair_in_order_before_its_first_step(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv("PDLAUNCH_STEP_TRACE", str(trace))
    layout = {"mode": "disaggregated", "prefill": {"instances": 2, "tp": 1, "pp": 1},
              "decode": {"instances": 2, "tp": 1, "pp": 1}}
    prompts = ragged_prompts(4, seed=3)
    config = write_job(tmp_path, tiny_model_dir, layout, prompts, 4)
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path / "out.jsonl")
    assert [results[f"r{i}"]["token_ids"] for i in range(4)] == greedy(tiny_model_dir, prompts, 4)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert all(i["peak_batch"] >= 1 for i in report["instances"]), report["instances"]  # every instance took some
    plan = yaml.safe_load(open(tmp_path / "run" / "plan.yaml"))
    assert [i["role"] for i in plan["instances"]] == ["prefill", "prefill", "decode", "decode"]
    expected = [[1, 3], [1, 4], [2, 3], [2, 4]]  # ranks 1, 2 prefill; 3, 4 decode; sorted pairs
    for rank in (1, 2, 3, 4):
        lines = [json.loads(line) for line in open(trace / f"rank{rank}.jsonl")]
        assert lines[0]["kv_warm_up"] == [p for p in expected if rank in p], rank
        steps = lines[1:]
        assert steps and all("step" in s and s["start"] >= lines[0]["end"] for s in steps), rank
