"""Dry-run command lines of every launcher for a 2-node x 8-GPU plan, rank placement included."""
from __future__ import annotations

import os
import sys

import pytest
import yaml

from launcher.cli import main
from launcher.rank_launch import NOT_LOOPBACK

BIN = os.path.dirname(sys.executable)
HOSTS = "node-a slots=8\nnode-b slots=8\n"


@pytest.fixture(autouse=True)
def no_forwarded_env(monkeypatch):
    """The command lines below as on a machine without NCCL_* / CUDA_* settings (forwarded: -x)."""
    for name in list(os.environ):
        if name.startswith(("NCCL_", "CUDA_")):
            monkeypatch.delenv(name)


def setup_job(tmp_path, model_dir, placement: dict) -> str:
    (tmp_path / "hosts").write_text(HOSTS)
    (tmp_path / "in.jsonl").write_text('{"prompt": [5, 6]}\n')
    cfg = {"model": {"path": model_dir, "max_model_len": 128}, "cluster": {"hostfile": "hosts", "device": "cuda"},
           "placement": placement, "workload": {"input": "in.jsonl", "output": "out.jsonl"}, "run_dir": "run"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def dry_run(capsys, config: str, launcher: str) -> str:
    """The command line a dry run prints; the files it names are printed after it, not written."""
    assert main(["generate", config, "--dry-run", "--launcher", launcher]) == 0
    return capsys.readouterr().out.strip().splitlines()[0]


def dry_run_files(capsys, argv: list[str]) -> dict[str, list[str]]:
    """The files a dry run's command names, as it prints them (nothing is written)."""
    assert main(argv) == 0
    files: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        if line.endswith(" (written at launch):"):
            path = line[2:].removesuffix(" (written at launch):")
            files[path] = []
        else:
            files[path].append(line.removeprefix("#   "))
    assert not any(os.path.exists(p) for p in files)
    return files


HIGH = {"mode": "disaggregated", "prefill": {"instances": 2, "tp": 4, "pp": 1},
        "decode": {"instances": 1, "tp": 4, "pp": 2}}


def test_mpirun_high_affinity_rankfile(tmp_path, tiny_model_dir, capsys):
    config = setup_job(tmp_path, tiny_model_dir, HIGH)
    run = tmp_path / "run"
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    expected = [f"{BIN}/mpirun", "-n", "17", "--bind-to", "none", *root, "--host", "node-a:9,node-b:8",
                "--map-by", f"rankfile:file={run}/rankfile:oversubscribe", "-x", "OMP_NUM_THREADS=1", "-x",
                "PYTHONPATH", "-x", "PYTHONSAFEPATH=1", sys.executable, "-m", "engine.main", "--job", f"{run}/job.json"]
    assert dry_run(capsys, config, "mpirun") == " ".join(expected)
    ranks = dry_run_files(capsys, ["generate", config, "--dry-run"])[f"{run}/rankfile"]
    # controller + prefill 0 + prefill 1 fill node-a; the decode instance (8 ranks) is node-b
    assert ranks[0] == "rank 0=node-a slot=0"
    assert ranks[1:9] == [f"rank {r}=node-a slot={r}" for r in range(1, 9)]
    assert ranks[9:] == [f"rank {r}=node-b slot={r - 9}" for r in range(9, 17)]


def test_mpirun_low_affinity_stages_share_nodes(tmp_path, tiny_model_dir, capsys):
    """Algorithm 2's placement: stage i of the prefill and of the decode instance on node i."""
    plan = {"instances": [
        {"role": "prefill", "tp": 4, "pp": 2, "hosts": ["node-a"] * 4 + ["node-b"] * 4},
        {"role": "decode", "tp": 2, "pp": 2, "hosts": ["node-a"] * 2 + ["node-b"] * 2}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    config = setup_job(tmp_path, tiny_model_dir, {"plan": "plan.yaml"})
    ranks = dry_run_files(capsys, ["generate", config, "--dry-run"])[f"{tmp_path}/run/rankfile"]
    assert ranks == ["rank 0=node-a slot=0",
                     "rank 1=node-a slot=1", "rank 2=node-a slot=2", "rank 3=node-a slot=3", "rank 4=node-a slot=4",
                     "rank 5=node-b slot=0", "rank 6=node-b slot=1", "rank 7=node-b slot=2", "rank 8=node-b slot=3",
                     "rank 9=node-a slot=5", "rank 10=node-a slot=6",
                     "rank 11=node-b slot=4", "rank 12=node-b slot=5"]


def test_deepspeed_command(tmp_path, tiny_model_dir, capsys):
    config = setup_job(tmp_path, tiny_model_dir, HIGH)
    run = tmp_path / "run"
    root = "--allow-run-as-root " if os.geteuid() == 0 else ""
    out = dry_run(capsys, config, "deepspeed")
    assert out == (f"{BIN}/deepspeed --hostfile {run}/ds_hostfile --no_ssh_check --master_addr node-a "
                   f"--master_port 29500 --launcher openmpi --force_multi --launcher_args "
                   f"'{root}--bind-to none -x OMP_NUM_THREADS=1 -x PYTHONPATH -x PYTHONSAFEPATH=1 "
                   f"--mca btl_tcp_if_include {NOT_LOOPBACK} --map-by rankfile:file={run}/rankfile:oversubscribe' "
                   f"--module engine.main --job {run}/job.json")
    files = dry_run_files(capsys, ["generate", config, "--dry-run", "--launcher", "deepspeed"])
    assert files[f"{run}/ds_hostfile"] == ["node-a slots=9", "node-b slots=8"]
    # the plan's rank-to-host map, as mpirun gets it: not DeepSpeed's fill-node-a-first order
    ranks = files[f"{run}/rankfile"]
    assert ranks[:9] == [f"rank {r}=node-a slot={r}" for r in range(9)]
    assert ranks[9:] == [f"rank {r}=node-b slot={r - 9}" for r in range(9, 17)]


def test_deepspeed_keeps_a_stage_per_node_plan_and_forwards_nccl_and_cuda_settings(tmp_path, tiny_model_dir, capsys,
                                                                                   monkeypatch):
    """Algorithm 2's plan (stage i of both instances on node i) through deepspeed: the rankfile
    keeps KV inside a node; NCCL_* / CUDA_* reach the remote ranks (-x); DeepSpeed's CPU
    accelerator is not forced on a GPU job (it would stop DeepSpeed forwarding NCCL_*); the
    configured interface replaces DeepSpeed's default eth0."""
    plan = {"instances": [
        {"role": "prefill", "tp": 4, "pp": 2, "hosts": ["node-a"] * 4 + ["node-b"] * 4},
        {"role": "decode", "tp": 2, "pp": 2, "hosts": ["node-a"] * 2 + ["node-b"] * 2}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    config = setup_job(tmp_path, tiny_model_dir, {"plan": "plan.yaml"})
    cfg = yaml.safe_load(open(config))
    cfg["cluster"]["interface"] = "lo"  # any interface this machine has (a cluster: ib0)
    open(config, "w").write(yaml.safe_dump(cfg))
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5_0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    out = dry_run(capsys, config, "deepspeed")
    assert not out.startswith("DS_ACCELERATOR")
    args = out.split("--launcher_args ")[1].split("'")[1].split()
    assert "-x CUDA_DEVICE_MAX_CONNECTIONS -x NCCL_IB_HCA" in " ".join(args)
    assert "--mca btl_tcp_if_include lo --mca oob_tcp_if_include lo" in " ".join(args)
    assert f"rankfile:file={tmp_path}/run/rankfile:oversubscribe" in args
    ranks = dry_run_files(capsys, ["generate", config, "--dry-run", "--launcher", "deepspeed"])[
        f"{tmp_path}/run/rankfile"]
    assert [r.split("=")[1].split()[0] for r in ranks] == ["node-a"] * 5 + ["node-b"] * 4 + ["node-a"] * 2 + ["node-b"] * 2
    mpirun = dry_run(capsys, config, "mpirun").split()
    assert mpirun[mpirun.index("PYTHONSAFEPATH=1") + 1:][:4] == ["-x", "CUDA_DEVICE_MAX_CONNECTIONS", "-x", "NCCL_IB_HCA"]


def test_multi_host_rendezvous_on_loopback_is_refused(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """This host's name resolves to 127.0.1.1 (a Debian/Ubuntu hosts file) and no interface is
    configured: remote ranks could not reach rank 0's rendezvous, so the launch is refused."""
    import socket

    from contracts.errors import UserError
    from launcher.network import rendezvous_address

    here = socket.gethostname()
    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.0.0.8" if name == "node-b" else "127.0.1.1")
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [] if host == "node-b" else real_getaddrinfo(host, *a, **k))
    with pytest.raises(UserError, match=f"{here} resolves to 127.0.1.1 .*set 'cluster.interface'"):
        rendezvous_address("auto", "", [here, "node-b"])
    assert rendezvous_address("10.0.0.7", "", [here, "node-b"]) == "10.0.0.7"
    assert rendezvous_address("auto", "", [here, here]) == "127.0.0.1"
    assert rendezvous_address("auto", "", ["127.0.0.1", "127.0.0.2"]) == "127.0.1.1"  # every host is this machine
    config = setup_job(tmp_path, tiny_model_dir, HIGH)
    (tmp_path / "hosts").write_text(f"{here} slots=8\nnode-b slots=8\n")
    assert main(["generate", config, "--launcher", "mpirun"]) == 2
    assert f"{here} resolves to 127.0.1.1" in capsys.readouterr().err


def test_srun_command_and_sbatch_script(tmp_path, tiny_model_dir, capsys):
    config = setup_job(tmp_path, tiny_model_dir, HIGH)
    run = tmp_path / "run"
    out = dry_run(capsys, config, "srun")
    assert out == (f"SLURM_HOSTFILE={run}/slurm_hostfile PMIX_MCA_psec=native OMP_NUM_THREADS=1 PYTHONSAFEPATH=1 srun --mpi=pmix "
                   f"-n 17 --distribution=arbitrary --overcommit --cpu-bind=none {sys.executable} -m engine.main "
                   f"--job {run}/job.json")
    files = dry_run_files(capsys, ["generate", config, "--dry-run", "--launcher", "srun"])
    assert files[f"{run}/slurm_hostfile"] == ["node-a"] * 9 + ["node-b"] * 8
    script = tmp_path / "job.sbatch"
    assert main(["sbatch", config, "-o", str(script), "--partition", "gpu", "--time", "02:00:00", "--quiet"]) == 0
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu", f"#SBATCH --output={run}/slurm-%j.out",
                 f"{BIN}/pdlaunch generate {config} --plan {script}.plan.yaml --launcher mpirun"):
        assert line in text.splitlines(), text
    planned = yaml.safe_load(open(f"{script}.plan.yaml"))
    assert [i["hosts"] for i in planned["instances"]] == [["node-a"] * 4, ["node-a"] * 4, ["node-b"] * 8]


def test_plan_maps_onto_slurm_allocation(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Inside an allocation a plan written against placeholder hosts lands on the allocation's
    nodes in order, keeping the low-affinity pattern (stage i of both instances on node i)."""
    plan = {"instances": [
        {"role": "prefill", "tp": 4, "pp": 2, "hosts": ["node-a"] * 4 + ["node-b"] * 4},
        {"role": "decode", "tp": 2, "pp": 2, "hosts": ["node-a"] * 2 + ["node-b"] * 2}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    config = setup_job(tmp_path, tiny_model_dir, {"mode": "disaggregated"})
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07,12]")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "6(x2)")
    ranks = dry_run_files(capsys, ["generate", config, "--plan", str(tmp_path / "plan.yaml"),
                                   "--dry-run"])[f"{tmp_path}/run/rankfile"]
    assert [r.split("=")[1].split()[0] for r in ranks] == ["gpu07"] * 5 + ["gpu12"] * 4 + ["gpu07"] * 2 + ["gpu12"] * 2
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu07")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "12")
    assert main(["generate", config, "--plan", str(tmp_path / "plan.yaml"), "--dry-run"]) == 2
    assert "plan uses 2 hosts but the Slurm allocation has 1 nodes (gpu07); allocate --nodes=2" in capsys.readouterr().err


@pytest.mark.mpi
@pytest.mark.slow
def test_mpirun_and_deepspeed_launchers_give_identical_outputs(tmp_path, tiny_model_dir):
    """The same tiny disaggregated job through `mpirun` and through the real `deepspeed` command.
    In make test-slow: two whole jobs (~35 s idle); make test keeps the real deepspeed command in
    test_device_binding (its ranks bind and number as under mpirun)."""
    import json

    from conftest import ragged_prompts, run_pdlaunch, write_job

    layout = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
              "decode": {"instances": 1, "tp": 1, "pp": 1}}
    config = write_job(tmp_path, tiny_model_dir, layout, ragged_prompts(6, seed=4), 6)
    outputs = {}
    for launcher in ("mpirun", "deepspeed"):
        proc = run_pdlaunch("generate", config, "--quiet", "--launcher", launcher,
                            "--output", str(tmp_path / f"{launcher}.jsonl"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[launcher] = {r["custom_id"]: r["token_ids"] for r in map(json.loads, open(tmp_path / f"{launcher}.jsonl"))}
    assert len(outputs["mpirun"]) == 6 and outputs["mpirun"] == outputs["deepspeed"]


def test_multi_node_gpu_example_files_agree():
    """slurm/gpu-2x8.sbatch, its plan, hostfile and config fit together and fit Llama-3.1-8B
    (the GPU run itself is untested: no GPU here)."""
    from contracts.config import config_from_dict
    from contracts.hostfile import read_hostfile
    from contracts.model_shape import ModelShape
    from contracts.plan import check_layouts, read_plan

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = yaml.safe_load(open(os.path.join(root, "configs", "gpu-2x8-llama8b.yaml")))
    cfg = config_from_dict(data)  # every key known (the interface exists only on the cluster)
    assert cfg.cluster.device == "cuda" and cfg.placement.plan == "../slurm/gpu-2x8.plan.yaml"
    plan = read_plan(os.path.join(root, "slurm", "gpu-2x8.plan.yaml"))
    llama_8b = ModelShape(32, 4096, 14336, 32, 8, 128, 128256, 5e5, 1e-5, False, 131072, 128000, (128009,))
    check_layouts(plan, llama_8b, read_hostfile(os.path.join(root, "hostfiles", "gpu-2x8")), key="plan")
    script = open(os.path.join(root, "slurm", "gpu-2x8.sbatch")).read().splitlines()
    for line in (f"#SBATCH --nodes={len(set(plan.rank_hosts()))}", f"#SBATCH --ntasks-per-node={plan.ranks_per_host()}",
                 f"#SBATCH --gpus-per-node={plan.ranks_per_host()}"):
        assert line in script
    assert any("configs/gpu-2x8-llama8b.yaml --plan slurm/gpu-2x8.plan.yaml" in line for line in script)


RSH_STANDIN = """#!/bin/sh
# stands in for ssh: drops ssh's options, takes the host name and runs the command on this machine
# in its own UTS namespace named after that host, so Open MPI sees two nodes
while [ "${1#-}" != "$1" ]; do shift; done
host=$1; shift
exec unshare --uts /bin/sh -c "hostname $host && $*"
"""


@pytest.mark.mpi
def test_two_hosts_outside_slurm_start_their_remote_daemons(tmp_path, tiny_model_dir):
    """A hostfile of two hosts, no Slurm: the generated mpirun line allocates both (--host) and
    pins ranks by rankfile, and Open MPI starts a daemon on the second host through its remote
    shell — here a stand-in for ssh that runs the daemon on this machine under the address and
    host name 127.0.0.2, so the ranks of the two 'hosts' talk over TCP as on two nodes."""
    import json
    import shutil

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the ssh stand-in needs root and unshare(1) to give the second 'host' its own name")

    from conftest import ragged_prompts, run_pdlaunch, write_job

    layout = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 2, "pp": 1},
              "decode": {"instances": 1, "tp": 2, "pp": 1}}
    config = write_job(tmp_path, tiny_model_dir, layout, ragged_prompts(4, seed=8), 5)
    (tmp_path / "hosts").write_text("127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    rsh = tmp_path / "rsh"
    rsh.write_text(RSH_STANDIN)
    rsh.chmod(0o755)
    os.environ["PRTE_MCA_plm_ssh_agent"] = str(rsh)  # Open MPI 5's runtime (PRRTE) reads this one
    try:
        proc = run_pdlaunch("generate", config, "--quiet")
    finally:
        del os.environ["PRTE_MCA_plm_ssh_agent"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["requests"] == 4 and report["errors"] == 0
    assert [i["nodes"] for i in report["instances"]][1] == ["127.0.0.2", "127.0.0.2"]  # ran under the second daemon
    assert (tmp_path / "run" / "rankfile").read_text().splitlines()[-1] == "rank 4=127.0.0.2 slot=1"


@pytest.mark.parametrize("banner_first", [True, False])
def test_a_deliberate_abort_is_said_once_whichever_line_comes_first(tmp_path, capsys, banner_first):
    """prterun's MPI_ABORT banner and the aborting rank's own diagnosis reach the launcher by
    different paths, in either order: the banner is dropped either way (the run's rank log keeps
    it); a banner no rank explained is relayed when the stream ends."""
    from contracts.plan import InstancePlan, Plan
    from launcher.supervise import RankLog

    banner = ["-" * 74 + "\n", "MPI_ABORT was invoked on rank 3 in communicator MPI_COMM_WORLD\n",
              "  Errorcode: 3\n", "-" * 74 + "\n"]
    diagnosis = ["pdlaunch: rank 3 on vm (decode instance 1 (tp 0, pp 1)) failed: RuntimeError: boom\n"]
    log = RankLog(Plan([InstancePlan(0, "colocated", 1, 1, 1, ["vm"])]), str(tmp_path / "ranks.log"))
    for line in banner + diagnosis if banner_first else diagnosis + banner:
        log.feed(line)
    log.close()
    err = capsys.readouterr().err
    assert "MPI_ABORT" not in err and err.count("pdlaunch: rank 3") == 1
    assert "MPI_ABORT" in (tmp_path / "ranks.log").read_text()
    unexplained = RankLog(Plan([InstancePlan(0, "colocated", 1, 1, 1, ["vm"])]), None)
    for line in banner:
        unexplained.feed(line)
    unexplained.close()
    assert "MPI_ABORT was invoked" in capsys.readouterr().err


def test_every_flag_of_every_command_has_help_text():
    import argparse

    from launcher.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.dest}" for name, sub in commands.choices.items() for action in sub._actions
               if not action.help]
    assert not missing
    assert len(commands.choices) >= 8 and "init" in commands.choices


def test_sbatch_serve_writes_a_private_api_key_the_job_exports_and_refuses_a_shared_one(tmp_path, tiny_model_dir):
    config = setup_job(tmp_path, tiny_model_dir, HIGH)
    script = tmp_path / "serve.sbatch"
    assert main(["sbatch", config, "-o", str(script), "--serve", "--quiet"]) == 0
    key_file = tmp_path / "serve.sbatch.api_key"
    key = key_file.read_text().strip()
    assert len(key) >= 32 and key_file.stat().st_mode & 0o777 == 0o600
    text = script.read_text()
    assert f"PDLAUNCH_API_KEY=$(cat {key_file})" in text.splitlines() and "export PDLAUNCH_API_KEY" in text
    assert f"clients need the API key in {key_file}" in text and "--host 0.0.0.0" in text and key not in text
    assert main(["sbatch", config, "-o", str(script), "--serve", "--quiet"]) == 0
    assert key_file.read_text().strip() == key  # rendered again: the same key, clients keep working
    key_file.chmod(0o644)
    assert main(["sbatch", config, "-o", str(script), "--serve", "--quiet"]) == 2
