"""A run owns its run directory and its output: a second run (or a dry run) on the same run_dir
touches nothing of the first; results are never overwritten silently; --resume keeps a result only
when the job would give the same answer now (request, sampling defaults, model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, read_results, write_job

from contracts.answer_key import answer_hash, model_hash
from contracts.batch_io import parse_line
from contracts.config import config_from_dict
from launcher.cli import main
from launcher.resume import reconcile

DISAGG = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
          "decode": {"instances": 1, "tp": 1, "pp": 1}}


def _set_sampling(config: str, **sampling) -> None:
    cfg = yaml.safe_load(open(config))
    cfg["sampling"] = {**cfg.get("sampling", {}), **sampling}
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)


def _input(path, ids: list[str], first: int) -> None:
    """Requests without max_tokens: the config's sampling defaults shape their answers."""
    path.write_text("".join(json.dumps({"custom_id": cid, "prompt": [first + i, 7, 9], "ignore_eos": True}) + "\n"
                            for i, cid in enumerate(ids)))


def _files(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def _assert_untouched_by_others(run, owned: dict[str, bytes], others: list[bytes]) -> None:
    """The first run goes on writing its run directory (its plan, its logs) while the others are
    refused, so its files may only have grown since `owned` was read: each file read then is still
    there and begins as it did, and no file names the others' input, output or requests."""
    now = _files(run)
    for name, content in owned.items():
        assert now.get(name, b"").startswith(content), f"{name} was changed"
    for name, content in now.items():
        assert not any(marker in content for marker in others), f"{name} holds another run's data"


def _pdlaunch(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.mpi
def test_runs_on_one_run_dir_never_touch_each_other_and_resume_reruns_answers_of_other_settings(
        tmp_path, tiny_model_dir, capsys):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [], workload={"arrival": "poisson", "rate": 2.0})
    _set_sampling(config, max_tokens=4)
    a_ids = [f"a{i}" for i in range(6)]
    _input(tmp_path / "in.jsonl", a_ids, 20)
    _input(tmp_path / "other.jsonl", ["b0", "b1"], 60)
    run = tmp_path / "run"
    old = '{"custom_id": "a0", "text": "an old answer"}\n'
    (tmp_path / "out.jsonl").write_text(old)
    first = _pdlaunch("generate", config, "--quiet", "--overwrite")
    deadline = time.time() + 120
    while not (run / "job.json").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    owned = _files(run)
    # a second run on the same run_dir (another output, another input): refused before it writes anything
    rc = main(["generate", config, "--input", str(tmp_path / "other.jsonl"), "--output", str(tmp_path / "b.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "another pdlaunch run is using" in err and len(err.strip().splitlines()) == 1, err
    # a dry run meanwhile prints and writes nothing
    assert main(["generate", config, "--input", str(tmp_path / "other.jsonl"), "--dry-run", "--overwrite"]) == 0
    capsys.readouterr()
    _assert_untouched_by_others(run, owned, [b"other.jsonl", b"b.jsonl", b'"b0"'])
    assert not (tmp_path / "b.jsonl").exists()
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    assert sorted(read_results(tmp_path / "out.jsonl")) == a_ids  # its own requests, each once
    assert (tmp_path / "out.jsonl.bak").read_text() == old  # --overwrite kept what it replaced

    # an output with results: neither --resume nor --overwrite is an error naming both
    before = (tmp_path / "out.jsonl").read_bytes()
    assert main(["generate", config]) == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "out.jsonl").read_bytes() == before

    # another sampling default: every kept answer is stale, moved aside and run again
    _set_sampling(config, max_tokens=6)
    resumed = _pdlaunch("generate", config, "--quiet", "--resume")
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    assert "6 made with other sampling defaults moved to" in err and "6 request(s) to run" in err, err
    results = read_results(tmp_path / "out.jsonl")
    assert sorted(results) == a_ids and all(len(r["token_ids"]) == 6 for r in results.values())
    assert len(read_results(tmp_path / "out.jsonl.stale.jsonl")) == 6



def _cfg(tmp_path, model_dir: str, **sampling):
    return config_from_dict({"model": {"path": model_dir, "max_model_len": 256, "dtype": "float32"},
                             "cluster": {"hostfile": "hosts"}, "sampling": sampling, "base_dir": str(tmp_path)})


def test_the_answer_hash_follows_sampling_defaults_and_the_model(tmp_path, tiny_model_dir):
    import shutil

    spec = parse_line(0, json.dumps({"custom_id": "x", "prompt": [5, 6]}))
    cfg = _cfg(tmp_path, tiny_model_dir, max_tokens=8)
    model = model_hash(cfg, tiny_model_dir)
    key = answer_hash(spec, cfg, model)
    assert answer_hash(spec, _cfg(tmp_path, tiny_model_dir, max_tokens=8), model) == key
    assert answer_hash(spec, _cfg(tmp_path, tiny_model_dir, max_tokens=48), model) != key
    explicit = parse_line(0, json.dumps({"custom_id": "x", "prompt": [5, 6], "max_tokens": 8}))
    assert answer_hash(explicit, cfg, model) == answer_hash(explicit, _cfg(tmp_path, tiny_model_dir, max_tokens=48),
                                                            model)  # the line's own value wins: same answer
    bf16 = _cfg(tmp_path, tiny_model_dir, max_tokens=8)
    bf16.model.dtype = "bfloat16"
    assert model_hash(bf16, tiny_model_dir) != model
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_model_dir, copy)
    before = model_hash(cfg, copy)
    with open(os.path.join(copy, "config.json"), "a") as f:
        f.write(" ")
    assert model_hash(cfg, copy) != before


def test_resume_moves_results_of_another_model_and_says_why(tmp_path, tiny_model_dir):
    specs = [parse_line(i, json.dumps({"custom_id": f"r{i}", "prompt": [5 + i]})) for i in range(3)]
    answers = {s.custom_id: f"answer-{s.custom_id}" for s in specs}
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in [
        {"custom_id": "r0", "request_hash": specs[0].digest, "answer_hash": "answer-r0", "model_hash": "m"},
        {"custom_id": "r1", "request_hash": specs[1].digest, "answer_hash": "old", "model_hash": "other"},
        {"custom_id": "r2", "request_hash": specs[2].digest}]))  # an older pdlaunch's: kept, said
    dry = reconcile(str(out), specs, apply=False, answers=answers, model="m")
    assert "dry run, nothing changed" in dry.message(str(out), 1, dry_run=True)
    assert "would be moved to" in dry.message(str(out), 1, dry_run=True)
    state = reconcile(str(out), specs, apply=True, answers=answers, model="m")
    assert state.reused == {"r0", "r2"} and state.model_changed == 1 and state.unverified == 1
    message = state.message(str(out), 1)
    assert "1 of another model" in message and "1 without request or answer hashes" in message
    assert set(read_results(out)) == {"r0", "r2"}
