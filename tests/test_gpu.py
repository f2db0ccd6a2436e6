"""The GPU suite (`make test-gpu`): the engine on `cluster.device: cuda` against transformers (fp32
and bf16), disaggregated jobs with different TP/PP layouts on each side moving KV over NCCL (two
prefill and two decode instances: pair warm-up; an instance with TP and PP > 1), temperature
sampling against the same job on the CPU, a launch by srun inside a Slurm allocation, and the KV
bandwidth benchmark on NCCL. Every test skips, saying why, where CUDA or enough GPUs are missing
(one rank per GPU: NCCL refuses two ranks of a communicator on one device). fp32 runs set
NVIDIA_TF32_OVERRIDE=0 (the engine allows TF32; the exactness checks want full fp32). None of
this has run on a GPU yet (README, "What has run where")."""
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
    "2p-tp1-2d-tp1-fp32": ({"mode": "disaggregated", "prefill": {"instances": 2, "tp": 1, "pp": 1},
                            "decode": {"instances": 2, "tp": 1, "pp": 1}}, 4, "float32"),
    "p-tp2pp2-d-tp1pp1-fp32": ({"mode": "disaggregated", "prefill": one(2, 2), "decode": one(1, 1)}, 5, "float32"),
    "colocated-tp2pp2-bf16": ({"mode": "colocated", "colocated": one(2, 2)}, 4, "bfloat16"),
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
def test_cuda_engine_matches_transformers(name, tmp_path, tiny_model_dir, monkeypatch):
    placement, gpus, dtype = CASES[name]
    if GPUS < gpus:
        pytest.skip(f"needs {gpus} CUDA GPU(s), this machine has {GPUS}")
    from safetensors.torch import load_file

    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # full fp32 in the ranks, as in the reference

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


DISAGGREGATED = {"mode": "disaggregated", "prefill": one(1, 1), "decode": one(1, 1)}


def generated(path, model_dir: str, device: str, launcher: str = "mpirun", sampling: dict | None = None) -> dict:
    """custom_id -> token ids of a 1P1D job on `device`, run in the new directory `path`."""
    prompts = ragged_prompts(8, seed=5)
    path.mkdir()
    config = write_job(path, model_dir, DISAGGREGATED, prompts, MAX_TOKENS,
                       extra={"cluster": {"hostfile": "hosts", "device": device}, **({"sampling": sampling} if sampling else {})})
    if sampling:  # per request, as the batch input carries it
        lines = [json.loads(line) for line in open(path / "in.jsonl")]
        with open(path / "in.jsonl", "w") as f:
            f.writelines(json.dumps({**line, **sampling}) + "\n" for line in lines)
    proc = run_pdlaunch("generate", config, "--quiet", "--launcher", launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: r["token_ids"] for k, r in read_results(path / "out.jsonl").items()}


@needs_gpus(2)
def test_temperature_sampling_on_cuda_draws_what_the_cpu_draws(tmp_path, tiny_model_dir, monkeypatch):
    """A request's draws come from a CPU generator seeded by (seed, token index): the same
    tokens on either device, unless a logit differs at a near-tie (one request allowed)."""
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    sampling = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 11}
    cuda = generated(tmp_path / "cuda", tiny_model_dir, "cuda", sampling=sampling)
    cpu = generated(tmp_path / "cpu", tiny_model_dir, "cpu", sampling=sampling)
    assert len(cuda) == 8 and sum(cuda[k] == cpu[k] for k in cpu) >= 7
    greedy = generated(tmp_path / "greedy", tiny_model_dir, "cuda")
    assert any(cuda[k] != greedy[k] for k in cuda), "temperature 0.8 drew the greedy tokens everywhere"


@needs_gpus(2)
def test_srun_launch_inside_a_gpu_allocation(tmp_path, tiny_model_dir):
    """`--launcher srun` inside a Slurm allocation with GPUs (run `make test-gpu` in `salloc -n 3
    --gpus=2`): every instance rank on its own GPU although srun's SLURM_LOCALID counts the
    controller."""
    import shutil

    if not os.environ.get("SLURM_JOB_ID") or not shutil.which("srun"):
        pytest.skip("not inside a Slurm allocation (salloc -n 3 --gpus=2, then make test-gpu)")
    assert generated(tmp_path / "srun", tiny_model_dir, "cuda", launcher="srun") == \
        generated(tmp_path / "mpirun", tiny_model_dir, "cuda")


@needs_gpus(3)
def test_kv_transfer_benchmark_on_nccl(tmp_path):
    from launcher.rank_launch import _mpirun

    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    out = tmp_path / "kv.json"
    proc = subprocess.run([_mpirun(), "-n", "3", "--oversubscribe", "--bind-to", "none", *root, sys.executable,
                           os.path.join(ROOT, "benchmarks", "kv_transfer.py"), "--device", "cuda", "--repeats", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["engine_gb_s"] > 0 for r in rows)
