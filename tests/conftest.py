"""Shared fixtures: a tiny random Llama (HF format, built here) and a runner for real mpirun jobs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pdlaunch's cache (converted models, the planner's calibration factors) is this run's, never the user's
os.environ["PDLAUNCH_CACHE"] = tempfile.mkdtemp(prefix="pdlaunch-test-cache-")
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
            initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def pytest_collection_modifyitems(items):
    """Every test that starts no job is a unit test: `make test-fast` runs exactly those."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("mpi", "slow", "gpu")):
            item.add_marker(pytest.mark.unit)


def write_word_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer whose token i is the word 't<i>': enough to decode tiny-model output."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(os.path.join(path, "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tiny-llama"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model.save_pretrained(path, safe_serialization=True)
    write_word_tokenizer(path, TINY["vocab_size"])
    return path


@pytest.fixture(scope="session")
def tp_group():
    """A one-rank gloo group in this process: a model stage with TP 1 runs here, without a job."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.new_group([0])


@pytest.fixture
def megatron_on_cpu(monkeypatch):
    """megatron allocates its buffers on torch.cuda.current_device(): in a process without CUDA that
    must name the CPU (engine.data_plane does the same in a rank). Restored after the test."""
    import torch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")


def ragged_prompts(n: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, TINY["vocab_size"]) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def write_job(tmp_path, model_dir: str, placement: dict, prompts: list[list[int]], max_tokens: int = 8,
              scheduler: dict | None = None, workload: dict | None = None, extra: dict | None = None) -> str:
    """A config + hostfile + input file under tmp_path; returns the config path."""
    (tmp_path / "hosts").write_text("localhost slots=8\n")
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"custom_id": f"r{i}", "prompt": p, "max_tokens": max_tokens,
                                "ignore_eos": True}) + "\n")
    cfg = {
        "model": {"path": model_dir, "max_model_len": 256, "dtype": "float32"},  # exactness: fp32
        "cluster": {"hostfile": "hosts"},
        "placement": placement,
        "scheduler": {"block_size": 4, "prefill_token_budget": 64, "max_decode_batch": 8,
                      "prefill_kv_blocks": 256, "decode_kv_blocks": 256, **(scheduler or {})},
        "workload": {"input": "in.jsonl", "output": "out.jsonl", **(workload or {})},
        "run_dir": "run",
        **(extra or {}),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_pdlaunch(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Runs the CLI; on timeout it is stopped the way a user would (SIGTERM -> mpirun is ended too)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "launcher.cli", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"pdlaunch {' '.join(args)} timed out after {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_results(path) -> dict[str, dict]:
    with open(path) as f:
        return {r["custom_id"]: r for r in map(json.loads, f)}


class ServerProcess:
    """`pdlaunch serve CONFIG --port 0` in the background: started, waited for until it prints its
    URL (the port the server bound: a port picked here and passed on could be taken meanwhile, e.g.
    by the job's own rendezvous), and stopped with SIGTERM (a drain); `stop()` returns the exit code
    and keeps stderr."""

    def __init__(self, config: str, run_dir: str, startup_s: float = 240, args: tuple = (), env: dict | None = None):
        import threading
        import time

        self.run_dir, self.url = run_dir, ""
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", config, "--port", "0",
                                      "--run-dir", run_dir, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + startup_s
        while not self.ready.wait(0.5):
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise AssertionError("the server did not start:\n" + "".join(self.lines)[-3000:])

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            serving = re.search(r"pdlaunch: serving '[^']+' at (http://\S+)/v1", line)
            if serving:
                self.url = serving.group(1)
                self.ready.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 90) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the server did not drain in time:\n" + self.stderr[-3000:]) from None


def rank_processes(run_dir: str) -> list[int]:
    """PIDs of rank processes still running for the job in run_dir."""
    out = subprocess.run(["pgrep", "-f", f"engine.main --job {run_dir}/job.json"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def rank_pid(job_dir: str, rank: int) -> int:
    """PID of MPI rank `rank` of the job whose files are in job_dir."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline").read()
            env = open(f"/proc/{pid}/environ").read().split("\0")
        except OSError:
            continue
        if "engine.main" in cmd and job_dir in cmd and f"OMPI_COMM_WORLD_RANK={rank}" in env:
            return int(pid)
    raise AssertionError(f"rank {rank} not found")
