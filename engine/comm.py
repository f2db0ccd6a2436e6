"""Rank start-up: MPI control plane, torch.distributed data plane, per-instance TP/PP groups.

Control messages (launcher/protocol.py's dataclasses, pickled) travel over MPI; tensors over torch.distributed
(gloo on CPU, NCCL on GPU). Every rank creates every instance's groups in the same order,
because torch's new_group is collective over the whole world.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from launcher.network import free_port, rendezvous_address
from launcher.plan import InstancePlan, Plan
from launcher.dtypes import choose_dtype, cpu_flags, cpu_has_native_bf16
from launcher.protocol import Signal, Tag

STARTUP_S = 600.0    # how long instances may take to load their weights
HEARTBEAT_S = 1.0    # leaders and the controller tell each other they are alive this often


@dataclass
class RankContext:
    rank: int
    world_size: int
    plan: Plan
    world: Any                      # mpi4py COMM_WORLD
    instance: Optional[InstancePlan]
    instance_comm: Any              # MPI sub-communicator of this instance (None on the controller)
    tp_rank: int
    pp_stage: int
    tp_group: Any
    device: torch.device
    nodes: list                     # node name of every global rank, as the ranks see it
    kv_group: Any = None            # every rank: KV transfers' own communicator (NCCL: no blocking of TP/PP)
    dtype: str = "float32"          # the job's model dtype, agreed by every rank (launcher/dtypes.py)

    @property
    def is_controller(self) -> bool:
        return self.instance is None

    @property
    def is_leader(self) -> bool:
        return self.instance is not None and self.rank == self.instance.leader

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.instance is not None and self.pp_stage == self.instance.pp - 1

    def stage_rank(self, pp_stage: int) -> int:
        """Global rank of the same TP rank at another PP stage of this instance."""
        return self.instance.rank_of(self.tp_rank, pp_stage)


def node_name() -> str:
    """The node this rank runs on: Slurm's name for it inside an allocation (several Slurm nodes
    may share one machine), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def node_local_index(world, takes_device: bool) -> int | None:
    """This rank's index among the ranks of its machine that take a device (instance ranks: the
    controller takes none), or None for a rank that takes none. MPI says which ranks share the
    machine (COMM_TYPE_SHARED), whatever started them: srun sets SLURM_LOCALID, mpirun
    OMPI_COMM_WORLD_LOCAL_RANK, deepspeed LOCAL_RANK (or nothing, through Open MPI), and all of
    them count the controller. Collective over `world`."""
    from mpi4py import MPI

    machine = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    takers = machine.allgather(bool(takes_device))
    index = sum(takers[:machine.Get_rank()])
    machine.Free()
    return index if takes_device else None


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


def _rendezvous(world, cluster, plan: Plan) -> str:
    """Rank 0 chooses address and port; every rank learns them over MPI (never from DeepSpeed's
    interface discovery, which may pick an external address)."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT") and world.Get_size() == 1:
        return f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    endpoint = None
    if world.Get_rank() == 0:
        addr = rendezvous_address(cluster.master_addr, cluster.interface, plan.rank_hosts())
        endpoint = f"tcp://{addr}:{cluster.master_port or free_port(addr)}"
    return world.bcast(endpoint, root=0)


def start(plan: Plan, cluster, dtype: str = "float32") -> RankContext:
    """Initialises MPI + torch.distributed and builds this rank's groups; settles the model dtype
    (`dtype` as configured, `auto` resolved with every rank's hardware)."""
    from mpi4py import MPI

    from engine.megatron_import import import_megatron

    import_megatron()
    from megatron.core.hyper_comm_grid import HyperCommGrid

    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("this process was spawned without an MPI world (WORLD_SIZE="
                           f"{os.environ['WORLD_SIZE']}, e.g. by torchrun or deepspeed's own spawner); pdlaunch's "
                           "control plane needs MPI: use `pdlaunch generate --launcher deepspeed` (Open MPI) or mpirun")
    if size != plan.world_size:
        raise RuntimeError(f"the job has {size} ranks but the plan needs {plan.world_size} "
                           f"(1 controller + instance ranks); launch with -n {plan.world_size}")
    cuda = cluster.device == "cuda"
    mine = plan.instance_of(rank)
    local = node_local_index(world, takes_device=mine is not None)  # collective: every rank calls it
    if cuda and mine is not None:
        torch.cuda.set_device(cuda_device_index(local, torch.cuda.device_count(), node_name()))
        device = torch.device("cuda", torch.cuda.current_device())
        torch.set_float32_matmul_precision("high")  # fp32 matmuls in TF32 (README: GPU path; NVIDIA_TF32_OVERRIDE=0 undoes it)
    else:  # the CPU, and the controller of a CUDA job: it holds no model and never opens a CUDA context
        device = torch.device("cpu")
        # megatron allocates layer buffers on torch.cuda.current_device(); point it at the CPU.
        torch.cuda.current_device = lambda: "cpu"
    backend = "nccl" if cuda else "gloo"
    if cluster.interface:  # gloo and NCCL bind their data sockets here, not on what the host name resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", cluster.interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", cluster.interface)
    dist.init_process_group(backend, init_method=_rendezvous(world, cluster, plan), rank=rank,
                            world_size=size, timeout=timedelta(seconds=600))
    tp_group = None
    for inst in plan.instances:  # same order on every rank: new_group is collective
        grid = HyperCommGrid([inst.tp, 1, inst.pp, 1], ["tp", "cp", "pp", "dp"],
                             rank_offset=inst.first_rank, backend=backend)
        tp = grid.create_pg(["tp"])  # PP stages hand activations over point-to-point: no PP group
        if inst is mine:
            tp_group = tp
    kv_group = dist.new_group(list(range(size)), backend=backend)  # collective: after the instance groups
    instance_comm = world.Split(mine.id if mine else MPI.UNDEFINED, rank)
    tp_rank, pp_stage = mine.coords(rank) if mine else (0, 0)
    # the controller holds no model: it does not vote on bf16
    native_bf16 = rank == 0 or (torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16(cpu_flags()))
    return RankContext(rank, size, plan, world, mine, instance_comm if mine else None, tp_rank, pp_stage,
                       tp_group, device, world.allgather(node_name()), kv_group,
                       choose_dtype(dtype, world.allreduce(bool(native_bf16), op=MPI.LAND)))


class Outbox:
    """Non-blocking control-plane sends. Two ranks that both block in a large MPI send to each
    other deadlock (rendezvous protocol); isend + periodic progress never does."""

    def __init__(self, comm):
        self.comm, self.pending = comm, []

    def send(self, obj: Any, dest: int, tag: int) -> None:
        self.pending.append(self.comm.isend(obj, dest=dest, tag=tag))
        self.progress()

    def progress(self) -> None:
        self.pending = [r for r in self.pending if not r.Test()]

    def flush(self) -> None:
        for r in self.pending:
            r.wait()
        self.pending = []


class StepSender:
    """A leader's step plans to the other ranks of its instance, non-blocking: a blocking send of a
    plan above MPI's eager limit (~4 KB) waits until a busy later stage posts its receive, so stage
    0 could not start the next step while the last stage finished this one (no overlap)."""

    def __init__(self, ctx: "RankContext"):
        self.outbox, self.size = Outbox(ctx.instance_comm), ctx.instance.size

    def send(self, step) -> None:
        for local in range(1, self.size):
            self.outbox.send(step, local, Tag.STEP)

    def progress(self) -> None:
        self.outbox.progress()

    def flush(self) -> None:
        self.outbox.flush()


POLL_S = 0.0005     # sleep between polls while work came recently
IDLE_GRACE_S = 0.2  # no work for this long: the rank is idle


class IdleWait:
    """Sleeps between polls that found no work: POLL_S while work came within IDLE_GRACE_S (under
    load a loop reacts in well under a millisecond), then `idle_s` (an idle rank wakes ~100 times
    a second instead of ~2,000, which cost ~29 % of a core that NCCL proxies or data loading want).
    `expect(t)` announces work at wall time t: the rank wakes then and polls fast for IDLE_GRACE_S,
    so a request arriving at a sleeping instance does not wait out its sleep."""

    def __init__(self, idle_s: float):
        self.idle_s = max(idle_s, POLL_S)
        self.last_work = time.monotonic()
        self.wake_at: float | None = None

    def worked(self) -> None:
        self.last_work = time.monotonic()

    def expect(self, wall_time: float) -> None:
        self.wake_at = time.monotonic() + (wall_time - time.time())

    def sleep(self, at_most: float = float("inf"), wake: threading.Event | None = None) -> None:
        """`wake`, when given, ends the sleep as soon as it is set (new work from another thread)."""
        now = time.monotonic()
        if self.wake_at is not None:
            if now >= self.wake_at:
                self.wake_at, self.last_work = None, now
            else:
                at_most = min(at_most, self.wake_at - now)
        idle = now - self.last_work >= IDLE_GRACE_S
        seconds = max(0.0, min(self.idle_s if idle else POLL_S, at_most))
        if wake is None:
            time.sleep(seconds)
        elif wake.wait(seconds):
            wake.clear()
            self.worked()


def poll(comm, source: int, tag: int, idle_s: float = POLL_S, timeout_s: float | None = None,
         waiting_for: str = "a message") -> Any:
    """Blocking receive that sleeps between probes: MPI's own blocking calls spin a core, and
    here several ranks share two cores. Raises TimeoutError after timeout_s."""
    from mpi4py import MPI

    status = MPI.Status()
    deadline = None if timeout_s is None else time.time() + timeout_s
    while not comm.Iprobe(source=source, tag=tag, status=status):
        if deadline is not None and time.time() > deadline:
            raise TimeoutError(f"no answer from rank {source} for {timeout_s:.0f} s while waiting for {waiting_for}")
        time.sleep(idle_s)
    return comm.recv(source=status.Get_source(), tag=status.Get_tag())


def drain(comm, tag: int, source: int | None = None) -> list[tuple[int, Any]]:
    """Every message already waiting with `tag`, as (source, message) pairs."""
    from mpi4py import MPI

    out = []
    status = MPI.Status()
    src = MPI.ANY_SOURCE if source is None else source
    while comm.Iprobe(source=src, tag=tag, status=status):
        s = status.Get_source()
        out.append((s, comm.recv(source=s, tag=tag)))
    return out


class Beacon:
    """A thread that tells the controller once a second that this process runs, even while its
    main thread waits in a collective or a transfer: a rank whose beacon stops is stopped or dead,
    and the controller names it. (MPI runs with MPI_THREAD_MULTIPLE; the messages are a few bytes,
    sent eagerly.)"""

    def __init__(self, comm):
        self.comm, self.stop_event = comm, threading.Event()
        self.thread = threading.Thread(target=self._run, name="pdlaunch-beacon", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(HEARTBEAT_S):
            self.comm.send(Signal(), dest=0, tag=Tag.RANK_ALIVE)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()
