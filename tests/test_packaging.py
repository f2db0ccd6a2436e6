"""pdlaunch as users install it: a non-editable install ships the engine, the CLI works from any
directory without the checkout, and the scheduler stays free of torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def _imports_no_torch(modules: list[str]) -> None:
    """Imports `modules` in a fresh interpreter and checks that torch never came with them."""
    code = (f"import sys, {', '.join(modules)}; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_scheduler_and_the_launcher_import_no_torch():
    commands = [f"launcher.commands.{c}" for c in ("generate", "serve", "bench", "plan", "profile", "sbatch", "init")]
    _imports_no_torch(["engine.scheduler", "engine.stops", "engine.blocks", "contracts.protocol", "launcher.cli",
                       "launcher.job_setup", "launcher.rank_launch", *commands])


def test_rank_0_imports_no_torch():
    """The controller and the serve path's HTTP thread (rank 0) hold no model: everything engine/main.py
    runs there, batch and serve, comes without torch (only instance ranks join the data plane)."""
    _imports_no_torch(["engine.main", "engine.control_plane", "engine.controller", "engine.frontend",
                       "engine.http_api", "engine.serve_metrics", "engine.progress", "engine.results",
                       "engine.tokenizer", "engine.watchdog", "contracts.answer_key", "contracts.batch_io"])


def test_the_contracts_import_neither_side():
    """contracts/ is what the launcher and the ranks agree on: it imports no torch and nothing from
    launcher/ or engine/, so neither side's internals leak into the other through it."""
    import pkgutil

    import contracts

    modules = [f"contracts.{m.name}" for m in pkgutil.iter_modules(contracts.__path__)]
    code = (f"import sys, {', '.join(modules)}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'launcher', 'engine')); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert len(modules) >= 10 and proc.returncode == 0, proc.stderr[-2000:]


def test_init_writes_a_starter_kit_whose_config_finds_its_files(tmp_path):
    from contracts.config import load_config
    from launcher.cli import main

    assert main(["init", str(tmp_path / "kit")]) == 0
    cfg = load_config(str(tmp_path / "kit" / "pdlaunch.yaml"))
    for path in (cfg.cluster.hostfile, cfg.workload.input, cfg.planner.profile.format(dtype="float32"),
                 cfg.planner.profile.format(dtype="bfloat16")):
        assert os.path.isfile(cfg.resolve(path)), path
    assert cfg.resolve(cfg.workload.output) == str(tmp_path / "kit" / "results.jsonl")
    assert cfg.resolve(cfg.run_dir) == str(tmp_path / "kit" / "runs" / "latest")
    assert main(["init", str(tmp_path / "kit")]) == 2  # never overwrites


@pytest.mark.slow
@pytest.mark.mpi
def test_a_non_editable_install_runs_from_another_directory(tmp_path):
    """`pip install` of a copy of the checkout (no editable link) into a fresh venv; its console
    script, run in an empty directory, writes the starter kit (`pdlaunch init`, package data) and
    generates on it (`pdlaunch generate pdlaunch.yaml`) with ranks that import the installed engine,
    and its summary names where the results went. The venv borrows the test venv's
    installed dependencies through a plain path entry (so the checkout's editable link, a .pth file
    there, is not loaded)."""
    source, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "work"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    with open(os.path.join(site, "test-deps.pth"), "w") as f:
        f.write(deps + "\n")
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(source)  # nothing may come from the copy it was built from
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    deps_bin = os.path.dirname(sys.executable)  # mpirun: a borrowed dependency, as a user's PATH would have it
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{deps_bin}:{env['PATH']}")
    packages = ("engine", "launcher", "contracts")
    show = f"import {', '.join(packages)}; print({', '.join(p + '.__file__' for p in packages)})"
    where = subprocess.run([str(python), "-c", show],
                           cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.split() == [os.path.join(site, p, "__init__.py") for p in packages]
    pdlaunch = str(venv / "bin" / "pdlaunch")
    init = subprocess.run([pdlaunch, "init"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr[-3000:]
    proc = subprocess.run([pdlaunch, "generate", "pdlaunch.yaml"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prompts = sum(1 for line in open(os.path.join(ROOT, "examples", "prompts.jsonl")) if line.strip())
    results = [json.loads(line) for line in open(work / "results.jsonl")]
    assert len(results) == prompts and all(r["token_ids"] for r in results)
    assert proc.stderr.rstrip().splitlines()[-2:] == [f"pdlaunch: results: {work / 'results.jsonl'}",
                                                      f"pdlaunch: report: {work / 'runs' / 'latest' / 'report.json'}"]
