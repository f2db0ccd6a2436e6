"""Which GPU each rank takes (engine.control_plane.node_local_index / engine.data_plane.cuda_device_index), with real
processes: the instance ranks of a machine number 0, 1, ... whatever launched them, and the
controller (rank 0) takes none. Launchers' own local ranks count the controller (mpirun,
srun's SLURM_LOCALID) or are absent (deepspeed through Open MPI), so under each the old
environment-variable binding put two ranks on one GPU or every rank on GPU 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "tests", "local_rank_ranks.py")
EXPECTED = [(0, None, None), (1, 0, 0), (2, 1, 1), (3, 2, 2), (4, 3, 3)]  # (rank, index, GPU of 4)


def bound(stdout: str, environment: str = "launcher") -> list[tuple]:
    """(rank, index, GPU) of every rank, in the launcher's environment or with srun's variables."""
    rows = json.loads(stdout.strip().splitlines()[-1])[environment]
    return [(r["rank"], r["index"], r["gpu"]) for r in rows]


def test_cuda_device_index():
    from engine.data_plane import cuda_device_index

    assert [cuda_device_index(i, 8, "n1") for i in range(8)] == list(range(8))
    assert cuda_device_index(3, 1, "n1") == 0  # one visible GPU: the rank's own (--gpus-per-task)
    with pytest.raises(RuntimeError, match="n1 runs more instance ranks than its 2 visible GPUs"):
        cuda_device_index(2, 2, "n1")
    with pytest.raises(RuntimeError, match="n1 has no visible CUDA GPU"):
        cuda_device_index(0, 0, "n1")


def _mpirun_args() -> list[str]:
    from launcher.rank_launch import _mpirun

    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [_mpirun(), "-n", "5", "--oversubscribe", "--bind-to", "none", "--mca", "btl_tcp_if_include", "lo", *root]


@pytest.mark.mpi
def test_instance_ranks_number_from_zero_under_mpirun_and_with_sruns_variables():
    """mpirun as is; then, in the same ranks, with the variables srun sets (SLURM_LOCALID, counting
    the controller; the real srun: test_slurm), which must not change the binding."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([*_mpirun_args(), sys.executable, SCRIPT], capture_output=True, text=True, env=env,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert bound(proc.stdout) == EXPECTED and bound(proc.stdout, "srun") == EXPECTED


@pytest.mark.mpi
def test_binding_under_the_real_deepspeed_launcher(tmp_path):
    """deepspeed --launcher openmpi (as `pdlaunch generate --launcher deepspeed` runs it): its ranks
    get no LOCAL_RANK at all."""
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(deepspeed):
        pytest.skip("deepspeed is not installed")
    (tmp_path / "hosts").write_text("localhost slots=5\n")
    root = "--allow-run-as-root " if os.geteuid() == 0 else ""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # ompi_info, mpirun
    proc = subprocess.run([deepspeed, "--hostfile", str(tmp_path / "hosts"), "--no_ssh_check", "--master_addr",
                           "127.0.0.1", "--launcher", "openmpi", "--force_multi", "--launcher_args",
                           f"{root}--oversubscribe --bind-to none --mca btl_tcp_if_include lo -x PYTHONPATH", SCRIPT],
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert bound(proc.stdout) == EXPECTED
