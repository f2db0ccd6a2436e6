"""pdlaunch as users install it: a non-editable install ships the engine, the CLI works from any
directory without the checkout, and the scheduler stays free of torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, ragged_prompts, write_job


def test_the_scheduler_and_the_launcher_import_no_torch():
    code = ("import sys, engine.scheduler, engine.stops, engine.blocks, launcher.protocol, launcher.cli, launcher.jobs, launcher.bench, launcher.placement, launcher.profiling; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.mpi
def test_a_non_editable_install_runs_from_another_directory(tmp_path, tiny_model_dir):
    """`pip install` of a copy of the checkout (no editable link) into its own directory; its
    console script, run from an unrelated directory with nothing of the checkout on the path,
    generates with ranks that import the installed engine."""
    source, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(source)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (site / "engine" / "__init__.py").exists() and (site / "engine" / "main.py").exists()
    shutil.rmtree(source)  # nothing may come from the copy it was built from
    work.mkdir()
    config = write_job(work, tiny_model_dir, {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
                                              "decode": {"instances": 1, "tp": 1, "pp": 1}},
                       ragged_prompts(3, seed=6), 4)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "import engine, launcher; print(engine.__file__, launcher.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.split() == [str(site / "engine" / "__init__.py"), str(site / "launcher" / "__init__.py")]
    proc = subprocess.run([str(site / "bin" / "pdlaunch"), "generate", config, "--quiet"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in open(work / "out.jsonl")]
    assert len(results) == 3 and all(len(r["token_ids"]) == 4 for r in results)
