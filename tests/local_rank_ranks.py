"""Run by test_device_binding under a launcher (mpirun, deepspeed's Open MPI runner, srun): every
rank computes its node-local device index as engine.control_plane.join does (rank 0, the controller,
takes no device) and rank 0 prints every rank's (node, index, GPU of 4) as one JSON line."""
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
index = node_local_index(world, takes_device=rank != 0)
gpu = None if index is None else cuda_device_index(index, 4, node_name())
rows = world.gather({"rank": rank, "node": node_name(), "index": index, "gpu": gpu,
                     "launcher_local_rank": os.environ.get("SLURM_LOCALID", os.environ.get("LOCAL_RANK"))}, root=0)
if rank == 0:
    print(json.dumps(rows), flush=True)
