"""A real Slurm on this machine (slurm/local-slurm.sh) with three fake nodes n1..n3: `pdlaunch
sbatch` renders a script and its plan, sbatch runs it, and the job's outputs equal a direct mpirun
run of the same job — on one node, and spread over three nodes as the plan places it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import yaml

from conftest import ROOT, ragged_prompts, read_results, run_pdlaunch, write_job

pytestmark = pytest.mark.mpi  # every test here starts real jobs

NODES = 3


@pytest.fixture(scope="module")
def slurm_conf():
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): `make slurm` installs it (root, Debian packages)")
    script = os.path.join(ROOT, "slurm", "local-slurm.sh")
    env = dict(os.environ, PDLAUNCH_SLURM_NODES=str(NODES))
    proc = subprocess.run(["bash", script, "start"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    yield proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    subprocess.run(["bash", script, "stop"], timeout=60, env=env)


def submit_and_wait(script, slurm_conf: str) -> str:
    env = dict(os.environ, SLURM_CONF=slurm_conf, PYTHONPATH=ROOT)
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, timeout=60,
                         cwd=ROOT)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, env=env).stdout.strip():
        if time.time() > deadline:
            subprocess.run(["scancel", job_id], env=env)
            raise AssertionError("the Slurm job did not finish in 300 s")
        time.sleep(1)
    return job_id


def run_both_ways(tmp_path, config: str, slurm_conf: str, direct_config: str | None = None) -> tuple[dict, dict]:
    """The job directly with mpirun (on `direct_config` if given) and through sbatch; returns both
    outputs as custom_id -> token ids."""
    direct = run_pdlaunch("generate", direct_config or config, "--quiet", "--output", str(tmp_path / "direct.jsonl"))
    assert direct.returncode == 0, direct.stderr[-2000:]
    script = tmp_path / "job.sbatch"
    proc = run_pdlaunch("sbatch", config, "-o", str(script), "--time", "00:10:00", "--quiet")
    assert proc.returncode == 0, proc.stderr
    submit_and_wait(script, slurm_conf)
    out = tmp_path / "out.jsonl"
    assert out.exists(), "".join(p.read_text()[-3000:] for p in (tmp_path / "run").glob("slurm-*.out")) or "no log"
    via_slurm = {k: r["token_ids"] for k, r in read_results(out).items()}
    return via_slurm, {k: r["token_ids"] for k, r in read_results(tmp_path / "direct.jsonl").items()}


def port_outside_ephemeral_range() -> int:
    """A free port the system never hands out for port 0 (below ip_local_port_range), so the job's
    own rendezvous cannot take it between here and the server's bind."""
    import random

    from launcher.network import listening_socket

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        first_ephemeral = int(f.read().split()[0])
    for port in random.sample(range(10000, first_ephemeral), 200):
        try:
            listening_socket("127.0.0.1", port).close()
            return port
        except OSError:
            continue
    raise AssertionError(f"no free port below {first_ephemeral}")


@pytest.mark.slow
def test_sbatch_runs_the_job(slurm_conf, tmp_path, tiny_model_dir):
    layout = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
              "decode": {"instances": 1, "tp": 1, "pp": 1}}
    config = write_job(tmp_path, tiny_model_dir, layout, ragged_prompts(6, seed=8), 6)
    via_slurm, direct = run_both_ways(tmp_path, config, slurm_conf)
    assert len(via_slurm) == 6 and via_slurm == direct


@pytest.mark.slow
def test_sbatch_across_three_nodes(slurm_conf, tmp_path, tiny_model_dir):
    """Prefill TP2 on the first node, two decode instances PP2 on the second and third: KV crosses
    nodes and layouts (TP2 -> PP2). The ranks report the Slurm node they ran on."""
    layout = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 2, "pp": 1},
              "decode": {"instances": 2, "tp": 1, "pp": 2}}
    config = write_job(tmp_path, tiny_model_dir, layout, ragged_prompts(8, seed=9), 6)
    cfg = yaml.safe_load(open(config))
    cfg["cluster"]["hostfile"] = "local-hosts"
    (tmp_path / "local-hosts").write_text("localhost slots=8\n")
    (tmp_path / "direct.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "hosts").write_text("".join(f"node-{c} slots=2\n" for c in "abc"))  # placeholders for the plan
    via_slurm, direct = run_both_ways(tmp_path, config, slurm_conf, str(tmp_path / "direct.yaml"))
    assert "#SBATCH --nodes=3" in (tmp_path / "job.sbatch").read_text()
    assert len(via_slurm) == 8 and via_slurm == direct
    report = json.load(open(tmp_path / "run" / "report.json"))
    assert [i["nodes"] for i in report["instances"]] == [["n1", "n1"], ["n2", "n2"], ["n3", "n3"]]


@pytest.mark.slow
def test_example_script_of_the_embedded_default(slurm_conf):
    """slurm/embedded-default.sbatch as a user submits it from the repository root."""
    results = os.path.join(ROOT, "runs", "results.jsonl")
    if os.path.exists(results):
        os.remove(results)
    job_id = submit_and_wait(os.path.join(ROOT, "slurm", "embedded-default.sbatch"), slurm_conf)
    log = os.path.join(ROOT, f"slurm-{job_id}.out")
    assert os.path.exists(results), open(log).read()[-3000:] if os.path.exists(log) else "no Slurm log"
    with open(os.path.join(ROOT, "examples", "prompts.jsonl")) as f:
        assert len(read_results(results)) == sum(1 for line in f if line.strip())


@pytest.mark.slow
def test_the_job_log_shows_progress_lines_while_the_job_runs(slurm_conf, tmp_path, tiny_model_dir):
    """A batch user tails the job log: progress lines come while the job runs (its 16 requests arrive
    over about 8 s at 2 per second, however fast the machine), and the log ends with where the
    results and the report are."""
    layout = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
              "decode": {"instances": 1, "tp": 1, "pp": 1}}
    config = write_job(tmp_path, tiny_model_dir, layout, ragged_prompts(16, seed=3), 8,
                       workload={"arrival": "poisson", "rate": 2.0})
    script = tmp_path / "job.sbatch"
    proc = run_pdlaunch("sbatch", config, "-o", str(script), "--time", "00:10:00", "--log-interval", "0.5", "--quiet")
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, SLURM_CONF=slurm_conf, PYTHONPATH=ROOT)
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    log = tmp_path / "run" / f"slurm-{job_id}.out"
    seen_while_running, deadline = [], time.time() + 300
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, env=env).stdout.strip():
        assert time.time() < deadline, "the Slurm job did not finish in 300 s"
        text = log.read_text() if log.exists() else ""
        seen_while_running = [line for line in text.splitlines() if line.startswith("pdlaunch: progress ")]
        time.sleep(0.5)
    text = log.read_text()
    assert seen_while_running, text[-3000:]
    assert all(" requests, " in line and " tok/s, TTFT p50 " in line and "ETA" in line for line in seen_while_running)
    assert f"pdlaunch: results: {tmp_path / 'out.jsonl'}" in text and f"{tmp_path / 'run' / 'report.json'}" in text
    assert len(read_results(tmp_path / "out.jsonl")) == 16


@pytest.mark.slow
def test_sbatch_serve_prints_its_url_serves_and_drains_on_scancel(slurm_conf, tmp_path, tiny_model_dir):
    """`pdlaunch sbatch --serve`: the job log names the URL (rank 0's node), the endpoint answers,
    and `scancel --batch --signal=TERM` drains it: the job ends cleanly, no rank left."""
    import re
    import urllib.request

    from conftest import rank_processes

    layout = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
              "decode": {"instances": 1, "tp": 1, "pp": 1}}
    config = write_job(tmp_path, tiny_model_dir, layout, [[5, 6]], 6)
    port = port_outside_ephemeral_range()
    script = tmp_path / "serve.sbatch"
    proc = run_pdlaunch("sbatch", config, "-o", str(script), "--serve", "--port", str(port), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "exec " in script.read_text() and f"--port {port}" in script.read_text()
    key_file = f"{script}.api_key"
    assert os.stat(key_file).st_mode & 0o077 == 0
    key = open(key_file).read().strip()
    env = dict(os.environ, SLURM_CONF=slurm_conf, PYTHONPATH=ROOT)
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    log = tmp_path / "run" / f"slurm-{job_id}.out"
    url, deadline = None, time.time() + 180
    while url is None and time.time() < deadline and \
            subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, env=env).stdout.strip():
        found = re.search(r"serving '[^']+' at (http://\S+/v1)", log.read_text() if log.exists() else "")
        url = found.group(1) if found else None
        time.sleep(1)
    try:
        assert url and url.endswith(f":{port}/v1"), log.read_text() if log.exists() else "no log"
        assert f"clients need the API key in {key_file}" in log.read_text()
        body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 5, "ignore_eos": True}).encode()
        req = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["usage"]["completion_tokens"] == 5
    finally:
        subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], env=env)
    deadline = time.time() + 120
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, env=env).stdout.strip():
        assert time.time() < deadline, "the served job did not drain"
        time.sleep(1)
    text = log.read_text()
    assert "drained in" in text and "failed" not in text, text[-3000:]
    assert not rank_processes(str(tmp_path / "run"))
