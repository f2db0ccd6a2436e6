"""The GPU suite (`make test-gpu`): the engine on `cluster.device: cuda` against transformers (fp32
and bf16), a disaggregated job with different TP/PP layouts on each side moving KV over NCCL, and
the KV bandwidth benchmark on NCCL. Every test skips, saying why, where CUDA or enough GPUs are
missing (one rank per GPU: NCCL refuses two ranks of a communicator on one device)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, ragged_prompts, read_results, run_pdlaunch, write_job

pytestmark = pytest.mark.gpu
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
MAX_TOKENS = 8


def needs_gpus(n: int):
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA GPU(s), this machine has {GPUS}")


def one(tp, pp):
    return {"instances": 1, "tp": tp, "pp": pp}


CASES = {  # name: (placement, GPUs it needs, dtype)
    "colocated-tp1-fp32": ({"mode": "colocated", "colocated": one(1, 1)}, 1, "float32"),
    "colocated-tp1-bf16": ({"mode": "colocated", "colocated": one(1, 1)}, 1, "bfloat16"),
    "p-tp1-d-tp1-fp32": ({"mode": "disaggregated", "prefill": one(1, 1), "decode": one(1, 1)}, 2, "float32"),
    "p-tp2pp1-d-tp1pp2-fp32": ({"mode": "disaggregated", "prefill": one(2, 1), "decode": one(1, 2)}, 4, "float32"),
    "p-tp1pp2-d-tp2pp1-bf16": ({"mode": "disaggregated", "prefill": one(1, 2), "decode": one(2, 1)}, 4, "bfloat16"),
}


def reference(model_dir: str, prompts: list[list[int]], dtype: torch.dtype) -> list[tuple[list[int], torch.Tensor]]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).cuda().eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            gen = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=MAX_TOKENS,
                                 min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
            out.append((gen.sequences[0, len(p):].tolist(), torch.cat(gen.logits, dim=0).float().cpu()))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_engine_matches_transformers(name, tmp_path, tiny_model_dir):
    placement, gpus, dtype = CASES[name]
    if GPUS < gpus:
        pytest.skip(f"needs {gpus} CUDA GPU(s), this machine has {GPUS}")
    from safetensors.torch import load_file

    prompts = ragged_prompts(8, seed=2)
    config = write_job(tmp_path, tiny_model_dir, placement, prompts, MAX_TOKENS,
                       workload={"arrival": "poisson", "rate": 40.0},
                       extra={"model": {"path": tiny_model_dir, "max_model_len": 256, "dtype": dtype},
                              "cluster": {"hostfile": "hosts", "device": "cuda"}})
    proc = run_pdlaunch("generate", config, "--quiet", "--dump-logits", str(tmp_path / "logits"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path / "out.jsonl")
    expected = reference(tiny_model_dir, prompts, getattr(torch, dtype))
    tolerance = 1e-3 if dtype == "float32" else 0.1
    agree = 0
    for i, (tokens, ref_logits) in enumerate(expected):
        logits = load_file(str(tmp_path / "logits" / f"{i}.safetensors"))["logits"]
        agree += results[f"r{i}"]["token_ids"] == tokens
        if results[f"r{i}"]["token_ids"] == tokens:
            assert (logits - ref_logits).abs().max().item() < tolerance, f"request {i}"
    assert agree == len(prompts) if dtype == "float32" else agree >= len(prompts) - 1, agree


@needs_gpus(3)
def test_kv_transfer_benchmark_on_nccl(tmp_path):
    from launcher.commands import _mpirun

    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    out = tmp_path / "kv.json"
    proc = subprocess.run([_mpirun(), "-n", "3", "--oversubscribe", "--bind-to", "none", *root, sys.executable,
                           os.path.join(ROOT, "benchmarks", "kv_transfer.py"), "--device", "cuda", "--repeats", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["engine_gb_s"] > 0 for r in rows)
