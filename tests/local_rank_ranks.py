"""Run by test_device_binding under a launcher (mpirun, deepspeed's Open MPI runner): every rank
computes its node-local device index as engine.control_plane.join does (rank 0, the controller,
takes no device), first in the launcher's own environment, then again with the variables srun
sets (SLURM_LOCALID counting the controller, alike on every rank here; SLURMD_NODENAME), and rank 0
prints every rank's (node, index, GPU of 4) for both as one JSON line: {"launcher": rows, "srun": rows}."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpi4py import MPI  # noqa: E402

from engine.control_plane import node_local_index, node_name  # noqa: E402
from engine.data_plane import cuda_device_index  # noqa: E402

world = MPI.COMM_WORLD
rank = world.Get_rank()


def binding() -> list[dict] | None:
    index = node_local_index(world, takes_device=rank != 0)
    gpu = None if index is None else cuda_device_index(index, 4, node_name())
    return world.gather({"rank": rank, "node": node_name(), "index": index, "gpu": gpu,
                         "launcher_local_rank": os.environ.get("SLURM_LOCALID", os.environ.get("LOCAL_RANK"))},
                        root=0)


rows = {"launcher": binding()}
os.environ.update(SLURM_LOCALID="0", SLURM_PROCID="0", SLURMD_NODENAME="n1")  # the real srun: test_slurm
rows["srun"] = binding()
if rank == 0:
    print(json.dumps(rows), flush=True)
