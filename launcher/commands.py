"""The command lines that start a job's ranks, built from a plan. No torch."""
from __future__ import annotations

import os
import shlex
import socket
import sys

LOCAL_NAMES = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}


def _mpirun() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return beside if os.path.exists(beside) else "mpirun"


def write_rankfile(rank_hosts: list[str], path: str) -> None:
    """Open MPI rankfile: global rank i runs on rank_hosts[i]."""
    per_host: dict[str, int] = {}
    with open(path, "w") as f:
        for rank, host in enumerate(rank_hosts):
            slot = per_host.get(host, 0)
            per_host[host] = slot + 1
            f.write(f"rank {rank}={host} slot={slot}\n")


def mpirun_command(rank_hosts: list[str], job_path: str, run_dir: str) -> list[str]:
    """mpirun (pip's Open MPI) with one process per rank, each on the host the plan gives it."""
    cmd = [_mpirun(), "-n", str(len(rank_hosts)), "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if set(rank_hosts) <= LOCAL_NAMES:
        cmd += ["--oversubscribe", "--mca", "btl_tcp_if_include", "lo"]
    else:
        rankfile = os.path.join(run_dir, "rankfile")
        write_rankfile(rank_hosts, rankfile)
        cmd += ["--map-by", f"rankfile:file={rankfile}:oversubscribe"]
    cmd += ["-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH", sys.executable, "-m", "engine.main", "--job", job_path]
    return cmd


def render(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
