"""An instance rank's data plane: its device and torch.distributed (gloo on CPU, NCCL on GPU).

Only the instance ranks join it: the controller (rank 0) holds no model and never imports torch, so
the data plane numbers the instance ranks from 0 (`dist_rank`). Every instance rank creates every
instance's groups in the same order, because torch's new_group is collective over the data plane.
Tensors travel only here: TP all-reduces, PP activations (engine/runner.py), KV (engine/kv_transfer.py).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from contracts.plan import Plan
from engine.control_plane import RankContext, node_name
from launcher.dtypes import cpu_flags, cpu_has_native_bf16


def dist_rank(plan: Plan, rank: int) -> int:
    """The torch.distributed rank of global rank `rank`: the plan's instance ranks in order, from 0."""
    return rank - plan.instances[0].first_rank


def cuda_device_index(local_index: int, device_count: int, node: str) -> int:
    """The GPU of the local_index-th instance rank of a machine. One visible GPU is the rank's own
    (Slurm's --gpus-per-task or a CUDA_VISIBLE_DEVICES per rank); otherwise each instance rank
    needs its own (NCCL refuses two ranks of one communicator on a GPU)."""
    if device_count == 0:
        raise RuntimeError(f"cluster.device is cuda but {node} has no visible CUDA GPU")
    if device_count == 1:
        return 0
    if local_index >= device_count:
        raise RuntimeError(f"{node} runs more instance ranks than its {device_count} visible GPUs (rank "
                           f"{local_index + 1} of the machine has none); give the host fewer slots in the hostfile or plan")
    return local_index


def start(ctx: RankContext, cluster, dtype: str = "float32") -> None:
    """An instance rank, after control_plane.join: takes its device, votes on the model dtype
    (`dtype` as configured, `auto` resolved with every rank's hardware; collective with the
    controller) and joins torch.distributed with its TP and KV groups (set on ctx)."""
    from engine.megatron_import import import_megatron

    import_megatron()
    from megatron.core.hyper_comm_grid import HyperCommGrid

    torch.set_num_threads(1)
    cuda = cluster.device == "cuda"
    if cuda:
        torch.cuda.set_device(cuda_device_index(ctx.local_index, torch.cuda.device_count(), node_name()))
        ctx.device = torch.device("cuda", torch.cuda.current_device())
        torch.set_float32_matmul_precision("high")  # fp32 matmuls in TF32 (README: GPU path; NVIDIA_TF32_OVERRIDE=0 undoes it)
    else:
        ctx.device = torch.device("cpu")
        # megatron allocates layer buffers on torch.cuda.current_device(); point it at the CPU.
        torch.cuda.current_device = lambda: "cpu"
    ctx.agree_dtype(dtype, torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16(cpu_flags()))
    backend = "nccl" if cuda else "gloo"
    if cluster.interface:  # gloo and NCCL bind their data sockets here, not on what the host name resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", cluster.interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", cluster.interface)
    plan = ctx.plan
    size = sum(inst.size for inst in plan.instances)
    dist.init_process_group(backend, init_method=ctx.rendezvous, rank=dist_rank(plan, ctx.rank),
                            world_size=size, timeout=timedelta(seconds=600))
    for inst in plan.instances:  # same order on every rank: new_group is collective
        grid = HyperCommGrid([inst.tp, 1, inst.pp, 1], ["tp", "cp", "pp", "dp"],
                             rank_offset=dist_rank(plan, inst.first_rank), backend=backend)
        tp = grid.create_pg(["tp"])  # PP stages hand activations over point-to-point: no PP group
        if inst is ctx.instance:
            ctx.tp_group = tp
    ctx.kv_group = dist.new_group(list(range(size)), backend=backend)  # collective: after the instance groups
