"""A real Slurm on this machine (slurm/local-slurm.sh): `pdlaunch sbatch` renders a script, sbatch
runs it, and the job's outputs equal a direct mpirun run of the same job."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import ROOT, ragged_prompts, run_pdlaunch, write_job

LAYOUT = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
          "decode": {"instances": 1, "tp": 1, "pp": 1}}


@pytest.fixture(scope="module")
def slurm_conf():
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("the local Slurm needs root and apt-get (Debian packages slurmctld, slurmd, munge)")
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "local-slurm.sh"), "start"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    yield conf
    subprocess.run(["bash", os.path.join(ROOT, "slurm", "local-slurm.sh"), "stop"], timeout=60)


@pytest.mark.slow
def test_sbatch_runs_the_job(slurm_conf, tmp_path, tiny_model_dir):
    prompts = ragged_prompts(6, seed=8)
    config = write_job(tmp_path, tiny_model_dir, LAYOUT, prompts, 6)
    direct = run_pdlaunch("generate", config, "--quiet", "--output", str(tmp_path / "direct.jsonl"))
    assert direct.returncode == 0, direct.stderr[-2000:]
    script = tmp_path / "job.sbatch"
    proc = run_pdlaunch("sbatch", config, "-o", str(script), "--time", "00:10:00", "--quiet")
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, SLURM_CONF=slurm_conf, PYTHONPATH=ROOT)
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, env=env).stdout
        if not queued.strip():
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id], env=env)
        raise AssertionError("the Slurm job did not finish in 300 s")
    log = next((tmp_path / "run").glob(f"slurm-{job_id}.out"), None)
    out = tmp_path / "out.jsonl"
    assert out.exists(), log.read_text()[-3000:] if log else "no Slurm log"
    via_slurm = {r["custom_id"]: r["token_ids"] for r in map(json.loads, open(out))}
    expected = {r["custom_id"]: r["token_ids"] for r in map(json.loads, open(tmp_path / "direct.jsonl"))}
    assert len(via_slurm) == len(prompts) and via_slurm == expected
