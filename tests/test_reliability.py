"""A dead, raising or stuck rank ends the whole job quickly with a diagnosis; --resume finishes the rest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, ragged_prompts, rank_pid, read_results, write_job

pytestmark = pytest.mark.mpi  # every test here starts real jobs

LAYOUT = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
          "decode": {"instances": 1, "tp": 1, "pp": 2}}
PROMPTS = ragged_prompts(24, seed=5)
MAX_TOKENS = 24


def start(config: str, *extra: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", "generate", config, "--quiet", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_lines(path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {n} lines")


def finish(proc: subprocess.Popen, since: float, limit: float = 30) -> tuple[int, str, float]:
    try:
        _, err = proc.communicate(timeout=limit + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the job did not end after a rank failed") from None
    return proc.returncode, err, time.time() - since


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    return [model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                           do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


@pytest.mark.parametrize("rank,role", [(1, "prefill instance 0"), (3, "decode instance 1 (TP rank 0, PP stage 1)")])
def test_kill_9_ends_job_and_resume_completes(rank, role, tmp_path, tiny_model_dir, expected):
    config = write_job(tmp_path, tiny_model_dir, LAYOUT, PROMPTS, MAX_TOKENS,
                       workload={"arrival": "poisson", "rate": 6.0}, scheduler={"watchdog_s": 10})
    proc = start(config)
    wait_lines(tmp_path / "out.jsonl", 3)
    killed = time.time()
    os.kill(rank_pid(str(tmp_path), rank), signal.SIGKILL)
    rc, err, took = finish(proc, killed)
    assert rc != 0 and took < 30, (rc, took)
    assert f"rank {rank} on" in err and role in err, err[-2000:]
    partial = read_results(tmp_path / "out.jsonl")
    assert 3 <= len(partial) < len(PROMPTS)
    resumed = start(config, "--resume")
    rc, err, _ = finish(resumed, time.time(), limit=120)
    assert rc == 0, err[-2000:]
    lines = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    ids = [r["custom_id"] for r in lines]
    assert sorted(ids) == sorted(f"r{i}" for i in range(len(PROMPTS))), "every request exactly once"
    for i, tokens in enumerate(expected):
        assert next(r for r in lines if r["custom_id"] == f"r{i}")["token_ids"] == tokens


def launch_process(launcher_pid: int) -> int:
    """PID of the launch command (mpirun, which becomes prterun) that pdlaunch started."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return int(f.read().split()[0])


def test_kill_9_of_mpirun_waits_for_every_rank_and_resume_is_exact(tmp_path, tiny_model_dir, expected):
    """SIGKILL of mpirun/prterun: pdlaunch reports only once no rank process is left (none writes
    after it lets go of the output), names what died, exits 128 + 9 and prints the exact --resume."""
    config = write_job(tmp_path, tiny_model_dir, LAYOUT, PROMPTS, MAX_TOKENS,
                       workload={"arrival": "poisson", "rate": 6.0}, scheduler={"watchdog_s": 10})
    proc = start(config)
    wait_lines(tmp_path / "out.jsonl", 3)
    os.kill(launch_process(proc.pid), signal.SIGKILL)
    rc, err, _ = finish(proc, time.time(), limit=60)
    assert not job_processes(str(tmp_path / "run")), "a rank outlived the launcher's report"
    assert rc == 128 + signal.SIGKILL, (rc, err[-2000:])
    assert "died of SIGKILL" in err and f"pdlaunch generate {config} --quiet --resume" in err, err[-2000:]
    written = (tmp_path / "out.jsonl").read_bytes()
    time.sleep(1)
    assert (tmp_path / "out.jsonl").read_bytes() == written  # nothing wrote after the report
    resumed = start(config, "--resume")
    rc, err, _ = finish(resumed, time.time(), limit=120)
    assert rc == 0, err[-2000:]
    lines = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert sorted(r["custom_id"] for r in lines) == sorted(f"r{i}" for i in range(len(PROMPTS)))
    for i, tokens in enumerate(expected):
        assert next(r for r in lines if r["custom_id"] == f"r{i}")["token_ids"] == tokens


@pytest.mark.parametrize("kind,rank", [("raise", 3), ("hang", 3), ("stall", 2)])
def test_failing_or_stuck_rank_ends_job_with_diagnosis(kind, rank, tmp_path, tiny_model_dir):
    """A rank that raises, one that stops answering (its leader stops heartbeating) and a leader
    that keeps heartbeating but never steps again (the controller sees no request move)."""
    config = write_job(tmp_path, tiny_model_dir, LAYOUT, PROMPTS, MAX_TOKENS,
                       workload={"arrival": "poisson", "rate": 6.0}, scheduler={"watchdog_s": 8})
    proc = start(config, env_extra={"PDLAUNCH_FAULT": f"{rank}:6:{kind}"})
    since = time.time()
    rc, err, took = finish(proc, since, limit=60)
    assert rc != 0, err[-2000:]
    if kind == "hang":
        assert "decode instance 1 (ranks 2-3" in err and "sent no heartbeat" in err, err[-2000:]
    elif kind == "stall":
        assert "decode instance 1 (ranks 2-3" in err and "took no step" in err and "stalled" in err, err[-2000:]
    else:
        assert "rank 3 on" in err and "decode instance 1 (tp 0, pp 1)" in err and "injected fault" in err, err[-2000:]
        assert "died" not in err and "MPI_ABORT" not in err, err[-2000:]  # a deliberate abort, said once
        assert "MPI_ABORT" in (tmp_path / "run" / "ranks.log").read_text()


def job_processes(job_dir: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if job_dir in open(f"/proc/{pid}/cmdline").read():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_the_job_dies_with_the_launcher(sig, tmp_path, tiny_model_dir):
    """Closing the terminal (SIGHUP) or SIGKILL of pdlaunch ends every rank; SIGHUP also leaves a
    report saying the run was interrupted and how many results it wrote."""
    config = write_job(tmp_path, tiny_model_dir, LAYOUT, PROMPTS, MAX_TOKENS,
                       workload={"arrival": "poisson", "rate": 3.0})
    proc = start(config)
    wait_lines(tmp_path / "out.jsonl", 2)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while job_processes(str(tmp_path / "run")) and time.time() < deadline:
        time.sleep(0.5)
    assert not job_processes(str(tmp_path / "run")), "ranks outlived the launcher"
    if sig == signal.SIGHUP:
        assert proc.returncode == 129
        report = json.loads((tmp_path / "run" / "report.json").read_text())
        assert report["status"] == "interrupted" and report["results_written"] >= 2


def test_a_failed_run_replaces_the_previous_report_and_a_foreign_engine_package_is_not_imported(tmp_path,
                                                                                                 tiny_model_dir):
    """Ranks import pdlaunch's own engine even when started from a directory with an `engine/`
    package; a failed run's report.json says it failed instead of showing the last good run."""
    config = write_job(tmp_path, tiny_model_dir, LAYOUT, PROMPTS[:4], 4)
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("raise SystemExit('imported the wrong engine')\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "launcher.cli", "generate", config, "--quiet"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["requests"] == 4
    failed = start(config, "--overwrite", env_extra={"PDLAUNCH_FAULT": "1:1:raise"})
    rc, err, _ = finish(failed, time.time(), limit=60)
    assert rc == 3
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and report["exit_code"] == 3


def test_a_stopped_controller_ends_the_job(tmp_path, tiny_model_dir):
    """SIGSTOP of the controller: the instance leaders stop hearing from it and end the job."""
    config = write_job(tmp_path, tiny_model_dir, LAYOUT, PROMPTS, MAX_TOKENS,
                       workload={"arrival": "poisson", "rate": 3.0}, scheduler={"watchdog_s": 8})
    proc = start(config)
    wait_lines(tmp_path / "out.jsonl", 2)
    stopped = time.time()
    os.kill(rank_pid(str(tmp_path), 0), signal.SIGSTOP)
    rc, err, took = finish(proc, stopped, limit=30)
    assert rc != 0 and took < 8 + 10, (rc, took, err[-2000:])
    assert "the controller (rank 0 on" in err and "sent nothing for 8 s" in err, err[-2000:]
    assert not job_processes(str(tmp_path / "run"))


@pytest.mark.slow
def test_fault_campaign(tmp_path):
    """benchmarks/fault_campaign.py, five trials: every target (controller, prefill leader and
    follower, decode leader and follower) once, kill -9 and SIGSTOP alternating; each must end
    within watchdog_s + 10 s naming rank, role and host, leave no process, and resume exactly."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fault_campaign.py"), "--trials", "5",
                           "--requests", "40", "--watchdog", "8", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    summary = json.loads((tmp_path / "results.json").read_text())
    failed = [r for r in summary["rows"] if not r["ok"]]
    assert proc.returncode == 0 and not failed, json.dumps(failed, indent=1)[-3000:]
    assert {r["signal"] for r in summary["rows"]} == {"kill -9", "SIGSTOP"}


@pytest.mark.slow
def test_concurrency_campaign(tmp_path):
    """benchmarks/concurrency_campaign.py, short: one trial of seven runs started together on one
    config (shared run directory, shared output, dry runs) and one SIGKILL of pdlaunch followed at
    once by --resume; every output exact line by line against an undisturbed run."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "concurrency_campaign.py"), "--trials",
                           "2", "--requests", "8", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1500, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    summary = json.loads((tmp_path / "results.json").read_text())
    failed = [r for r in summary["rows"] if not r["ok"]]
    assert proc.returncode == 0 and not failed, json.dumps(failed, indent=1)[-3000:]
    assert [r["kind"] for r in summary["rows"]] == ["together", "kill"]
    assert (summary["torn"], summary["duplicated"], summary["lost"], summary["wrong"]) == (0, 0, 0, 0)
