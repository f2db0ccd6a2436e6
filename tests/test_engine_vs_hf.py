"""Real mpirun jobs on a tiny random Llama: greedy tokens and logits must match transformers.

Each layout runs ragged prompts (lengths 3..40) arriving while earlier ones decode (Poisson
arrivals), so prefill batches are ragged and decode batches mix positions.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import ragged_prompts, read_results, run_pdlaunch, write_job

pytestmark = pytest.mark.mpi  # every test here starts real jobs

MAX_TOKENS = 8


def one(tp, pp, instances=1):
    return {"instances": instances, "tp": tp, "pp": pp}


LAYOUTS = {
    # single instances (the foundation issue): prefill and decode on the same ranks
    "colocated-tp1pp1": {"mode": "colocated", "colocated": one(1, 1)},
    "colocated-tp2pp1": {"mode": "colocated", "colocated": one(2, 1)},
    "colocated-tp1pp2": {"mode": "colocated", "colocated": one(1, 2)},
    "colocated-tp2pp2": {"mode": "colocated", "colocated": one(2, 2)},
    # disaggregated, KV moved between layouts (the runtime issue)
    "p-tp1pp1-d-tp1pp1": {"mode": "disaggregated", "prefill": one(1, 1), "decode": one(1, 1)},
    "p-tp2pp1-d-tp1pp2": {"mode": "disaggregated", "prefill": one(2, 1), "decode": one(1, 2)},
    "p-tp1pp2-d-tp2pp1": {"mode": "disaggregated", "prefill": one(1, 2), "decode": one(2, 1)},
    "2p-tp1-d-tp1": {"mode": "disaggregated", "prefill": one(1, 1, instances=2), "decode": one(1, 1)},
}


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers' greedy continuations and per-step logits for the test prompts."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    prompts = ragged_prompts(10, seed=1)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            tokens = gen.sequences[0, len(p):].tolist()
            out.append((tokens, torch.cat(gen.logits, dim=0)))
    return prompts, out


# `make test-slow` runs these three, among the longest jobs of `make test`: TP2 x PP2 colocated
# combines what colocated-tp2pp1 and -tp1pp2 check apart; a PP2 prefill -> TP2 decode job is
# p-tp2pp1-d-tp1pp2 the other way round (test_reshard moves KV PP2 -> TP2 value by value); two
# prefill instances give transformers' tokens in test_kv_warm_up's 2P2D job.
SLOW_LAYOUTS = ("colocated-tp2pp2", "p-tp1pp2-d-tp2pp1", "2p-tp1-d-tp1")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_LAYOUTS else n for n in LAYOUTS])
def test_layout_matches_transformers(name, tmp_path, tiny_model_dir, reference):
    prompts, expected = reference
    config = write_job(tmp_path, tiny_model_dir, LAYOUTS[name], prompts, MAX_TOKENS,
                       workload={"arrival": "poisson", "rate": 40.0})
    logits_dir = tmp_path / "logits"
    proc = run_pdlaunch("generate", config, "--quiet", "--dump-logits", str(logits_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path / "out.jsonl")
    assert len(results) == len(prompts)
    for i, (tokens, ref_logits) in enumerate(expected):
        got = results[f"r{i}"]
        assert got["token_ids"] == tokens, f"request {i}: {got['token_ids']} != {tokens}"
        logits = load_file(os.path.join(logits_dir, f"{i}.safetensors"))["logits"]
        assert logits.shape == ref_logits.shape
        diff = (logits - ref_logits).abs().max().item()
        assert diff < 1e-4, f"request {i}: max |logit diff| {diff}"
        assert got["metrics"]["ttft_ms"] > 0 and got["metrics"]["tpot_ms"] > 0
        if LAYOUTS[name]["mode"] == "disaggregated" and len(tokens) > 1:
            # the request joins the decode batch before its second token
            assert 0 <= got["metrics"]["transfer_ms"] <= got["metrics"]["tpot_ms"] * (len(tokens) - 1)


def test_decode_pulls_only_when_it_has_room(tmp_path, tiny_model_dir):
    """Decode KV for two requests at a time, ten requests: all complete, correctly, within capacity."""
    from transformers import LlamaForCausalLM

    prompts = [p[:36] + [5] * (36 - len(p[:36])) for p in ragged_prompts(10, seed=3, low=30, high=40)]
    capacity = 2 * 11  # 36 prompt + 8 new tokens = 11 blocks of 4 per request
    config = write_job(tmp_path, tiny_model_dir, LAYOUTS["p-tp1pp1-d-tp1pp1"], prompts, MAX_TOKENS,
                       scheduler={"decode_kv_blocks": capacity})
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path / "out.jsonl")
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    for i, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert results[f"r{i}"]["token_ids"] == ref
    import json

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    decode = next(s for s in report["instances"] if s["role"] == "decode")
    assert decode["kv_blocks"] == capacity
    assert 0 < decode["peak_kv_blocks"] <= capacity
    assert decode["peak_batch"] <= 2


@pytest.mark.slow
def test_smollm2_tp1pp2_matches_transformers(tmp_path):
    """The real embedded model (SmolLM2-135M, GGUF) on TP1 x PP2: same tokens as transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.tokenizer import TextCodec
    from launcher.model_files import embedded_gguf, resolve_model_dir

    gguf_path = embedded_gguf()
    model_dir = resolve_model_dir("embedded")
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    codec = TextCodec(model_dir)
    prompts = [codec.encode(t) for t in texts]
    assert prompts == [hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    config = write_job(tmp_path, model_dir, {"mode": "colocated", "colocated": one(1, 2)}, prompts, 16,
                       scheduler={"block_size": 16})
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path / "out.jsonl")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                 torch_dtype=torch.float32).eval()
    for i, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             pad_token_id=2)[0, len(p):].tolist()
        assert results[f"r{i}"]["token_ids"] == ref, (texts[i], results[f"r{i}"]["text"])
