"""The command lines that start a job's ranks, built from a plan. No torch."""
from __future__ import annotations

import os
import shlex
import sys

from launcher.network import LOCAL_NAMES, single_host


def _mpirun() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return beside if os.path.exists(beside) else "mpirun"


def host_counts(rank_hosts: list[str]) -> dict[str, int]:
    """Ranks per host, in the order hosts first appear."""
    counts: dict[str, int] = {}
    for host in rank_hosts:
        counts[host] = counts.get(host, 0) + 1
    return counts


def rankfile_text(rank_hosts: list[str]) -> str:
    """Open MPI rankfile: global rank i runs on rank_hosts[i]."""
    per_host: dict[str, int] = {}
    lines = []
    for rank, host in enumerate(rank_hosts):
        slot = per_host.get(host, 0)
        per_host[host] = slot + 1
        lines.append(f"rank {rank}={host} slot={slot}\n")
    return "".join(lines)


def _side_file(path: str, text: str, files: dict | None) -> str:
    """A file the command names: written, or (a dry run, which writes nothing) put in `files`."""
    if files is None:
        with open(path, "w") as f:
            f.write(text)
    else:
        files[path] = text
    return path


FORWARDED_PREFIXES = ("NCCL_", "CUDA_")
# Every IPv4 address but loopback (127.0.0.0/8): Open MPI's own default, written as an include
# list so that DeepSpeed's openmpi runner, which adds `btl_tcp_if_include eth0` unless one is given,
# keeps it.
NOT_LOOPBACK = "0.0.0.0/2,64.0.0.0/3,96.0.0.0/4,112.0.0.0/5,120.0.0.0/6,124.0.0.0/7,126.0.0.0/8,128.0.0.0/1"


def forwarded_env_args(environ=None) -> list[str]:
    """`-x NAME` for every NCCL_* / CUDA_* variable set here: outside Slurm, mpirun gives remote
    ranks only what -x names (the value is mpirun's own)."""
    environ = os.environ if environ is None else environ
    return [arg for name in sorted(environ) if name.startswith(FORWARDED_PREFIXES) for arg in ("-x", name)]


def _tcp_interface_args(rank_hosts: list[str], interface: str, name_the_default: bool = False) -> list[str]:
    """Open MPI's TCP transports on the configured interface, or loopback for a one-host job.
    (Across nodes Open MPI refuses loopback, even for several Slurm nodes on one machine.) Across
    nodes without an interface: Open MPI's default, spelled out when `name_the_default`."""
    if interface:
        return ["--mca", "btl_tcp_if_include", interface, "--mca", "oob_tcp_if_include", interface]
    if single_host(rank_hosts):
        return ["--mca", "btl_tcp_if_include", "lo"]
    return ["--mca", "btl_tcp_if_include", NOT_LOOPBACK] if name_the_default else []


def _rank_placement(rank_hosts: list[str], run_dir: str, files: dict | None) -> list[str]:
    """Each rank on its plan host (a rankfile) across hosts; one host: any slot, oversubscribed."""
    if single_host(rank_hosts):
        return ["--oversubscribe"]
    rankfile = _side_file(os.path.join(run_dir, "rankfile"), rankfile_text(rank_hosts), files)
    return ["--map-by", f"rankfile:file={rankfile}:oversubscribe"]


def mpirun_command(rank_hosts: list[str], job_path: str, run_dir: str, interface: str = "",
                   files: dict | None = None) -> list[str]:
    """mpirun (pip's Open MPI) with one process per rank, each on the host the plan gives it.
    The files the command names are written, or with `files` (a dry run) put there instead."""
    cmd = [_mpirun(), "-n", str(len(rank_hosts)), "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += _tcp_interface_args(rank_hosts, interface)
    if not single_host(rank_hosts):
        # --host allocates the hosts outside a resource manager (inside Slurm they must be, and
        # are, in the allocation); the rankfile then pins each rank to its host and slot
        cmd += ["--host", ",".join(f"{h}:{n}" for h, n in host_counts(rank_hosts).items())]
    cmd += _rank_placement(rank_hosts, run_dir, files)
    cmd += ["-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH", "-x", "PYTHONSAFEPATH=1", *forwarded_env_args(),
            sys.executable, "-m", "engine.main", "--job", job_path]
    return cmd


def _python_module() -> list[str]:
    return [sys.executable, "-m", "engine.main"]


def deepspeed_command(rank_hosts: list[str], job_path: str, run_dir: str, interface: str = "",
                      master_port: int = 29500, files: dict | None = None) -> list[str]:
    """The deepspeed launcher, told to start the ranks through Open MPI (`--launcher openmpi
    --force_multi`), because pdlaunch's control plane is MPI; its MPI discovery is bypassed (the
    engine agrees on the rendezvous over MPI), so it never picks an external interface. Its
    hostfile allocates the hosts; the same rankfile as mpirun's puts each rank on its plan host,
    and NCCL_* / CUDA_* reach remote ranks as with mpirun."""
    hostfile = _side_file(os.path.join(run_dir, "ds_hostfile"),
                          "".join(f"{h} slots={n}\n" for h, n in host_counts(rank_hosts).items()), files)
    mpi_args = ["--bind-to", "none", "-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH", "-x", "PYTHONSAFEPATH=1",
                *forwarded_env_args()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        mpi_args.insert(0, "--allow-run-as-root")
    mpi_args += _tcp_interface_args(rank_hosts, interface, name_the_default=True)
    mpi_args += _rank_placement(rank_hosts, run_dir, files)
    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [beside if os.path.exists(beside) else "deepspeed", "--hostfile", hostfile, "--no_ssh_check",
            "--master_addr", rank_hosts[0] if rank_hosts[0] not in LOCAL_NAMES else "127.0.0.1",
            "--master_port", str(master_port), "--launcher", "openmpi", "--force_multi",
            "--launcher_args", " ".join(mpi_args), "--module", "engine.main", "--job", job_path]


def srun_command(rank_hosts: list[str], job_path: str, run_dir: str, interface: str = "",
                 files: dict | None = None) -> tuple[list[str], dict]:
    """srun inside a Slurm allocation, each task on its plan host (SLURM_HOSTFILE + arbitrary
    distribution), MPI wired by PMIx. `--overcommit` lets the controller rank share its node's
    CPUs with that node's instance ranks. Returns the command and the environment it needs."""
    hostfile = _side_file(os.path.join(run_dir, "slurm_hostfile"), "".join(h + "\n" for h in rank_hosts), files)
    env = {"SLURM_HOSTFILE": hostfile, "PMIX_MCA_psec": "native", "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
    if interface:
        env["OMPI_MCA_btl_tcp_if_include"] = interface
    return ["srun", "--mpi=pmix", "-n", str(len(rank_hosts)), "--distribution=arbitrary", "--overcommit",
            "--cpu-bind=none", *_python_module(), "--job", job_path], env


def sbatch_script(config_path: str, plan_path: str, nodes: int, ranks_per_node: int, gpus: bool, time_limit: str,
                  partition: str | None, run_dir: str, workdir: str, launcher: str,
                  serve: tuple[int, float, str] | None = None, log_interval: float | None = None) -> str:
    """An sbatch script that runs `pdlaunch generate` on a fixed plan inside its allocation: the
    plan's hosts become the allocation's nodes there (contracts.plan.map_onto_allocation), so ranks
    share nodes exactly as planned. One task per device; the controller rank rides along.
    With `serve` = (port, drain_s, key_file) it runs `pdlaunch serve` on every interface of the first
    node instead, clients needing the key in key_file (the job log names the URL and the file); pdlaunch
    is the batch step's own process, so
    `scancel --batch --signal=TERM` and Slurm's warning before the time limit drain it."""
    lines = ["#!/bin/bash", "#SBATCH --job-name=pdlaunch" + ("-serve" if serve else ""), f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={ranks_per_node}", f"#SBATCH --time={time_limit}",
             f"#SBATCH --output={run_dir}/slurm-%j.out"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={ranks_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if serve:
        lines.append(f"#SBATCH --signal=B:TERM@{int(serve[1]) + 60}")  # Slurm warns pdlaunch in time to drain
    pdlaunch = shlex.quote(os.path.join(os.path.dirname(sys.executable), "pdlaunch"))
    lines += ["set -euo pipefail", f"cd {shlex.quote(workdir)}", "export OMP_NUM_THREADS=1"]
    if serve:
        key_file = shlex.quote(serve[2])
        lines += ["# clients send the key in the key file (readable by its owner only): Authorization: Bearer KEY",
                  f"PDLAUNCH_API_KEY=$(cat {key_file})",
                  "export PDLAUNCH_API_KEY",
                  f"echo \"pdlaunch: clients need the API key in {serve[2]} (readable by $(id -un) only)\"",
                  "# stop (drains running requests first): scancel --batch --signal=TERM $SLURM_JOB_ID",
                  f"exec {pdlaunch} serve {shlex.quote(config_path)} --plan {shlex.quote(plan_path)} "
                  f"--launcher {launcher} --host 0.0.0.0 --port {serve[0]}", ""]
    else:
        interval = f" --log-interval {log_interval:g}" if log_interval else ""
        lines += [f"{pdlaunch} generate {shlex.quote(config_path)} --plan {shlex.quote(plan_path)} "
                  f"--launcher {launcher}{interval}", ""]
    return "\n".join(lines)


def render(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def render_dry_run(cmd: list[str], env: dict, files: dict) -> str:
    """What a dry run prints: the command line, then each file it names (written at launch) as comments."""
    lines = [" ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + render(cmd)]
    for path, text in files.items():
        lines += [f"# {path} (written at launch):"] + [f"#   {line}" for line in text.splitlines()]
    return "\n".join(lines)
