"""Every rank's control plane: MPI (mpi4py) start-up, messages, idle waits and the beacon. No torch.

Control messages (contracts/protocol.py's dataclasses, pickled) travel over MPI: between rank 0 and
the leaders on the world communicator, inside an instance on its own. Every send and receive here
names a message's class, never a tag: the class decides the tag (protocol.TAGS). Rank 0 (the controller and the
serve path's HTTP thread) holds no model and imports this module, never torch; an instance rank's
devices and torch.distributed groups come on top of it (engine/data_plane.py).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from contracts.plan import InstancePlan, Plan
from contracts.protocol import CONTROLLER, RankAlive, StepPlan, tag_of
from launcher.dtypes import choose_dtype
from launcher.network import free_port, rendezvous_address

STARTUP_S = 600.0    # how long instances may take to load their weights
HEARTBEAT_S = 1.0    # leaders and the controller tell each other they are alive this often
POLL_S = 0.0005      # sleep between polls while work came recently
IDLE_GRACE_S = 0.2   # no work for this long: the rank is idle


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
    nodes: list                     # node name of every global rank, as the ranks see it
    local_index: Optional[int]      # among the instance ranks of this machine (None on the controller)
    rendezvous: str                 # the data plane's init_method, tcp://address:port
    dtype: str = "float32"          # the job's model dtype, agreed by every rank (agree_dtype)
    device: Any = None              # instance ranks (engine/data_plane.py): torch device,
    tp_group: Any = None            # TP process group,
    kv_group: Any = None            # and KV transfers' own group (NCCL: no blocking of TP/PP)

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

    def agree_dtype(self, dtype: str, native_bf16: bool) -> None:
        """Settles the model dtype (`auto` resolved with every rank's hardware); collective over the
        world, after join. The controller holds no model: it votes yes."""
        from mpi4py import MPI

        self.dtype = choose_dtype(dtype, self.world.allreduce(bool(native_bf16), op=MPI.LAND))


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


def join(plan: Plan, cluster) -> RankContext:
    """Every rank's MPI start-up, collective over the world: its place in the plan, its node-local
    device index, its instance's communicator, every rank's node, and the data plane's rendezvous.
    The first instance rank chooses the rendezvous (it hosts torch.distributed's store: the
    controller takes no part in the data plane) and every rank learns it over MPI, never from
    DeepSpeed's interface discovery, which may pick an external address."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("this process was spawned without an MPI world (WORLD_SIZE="
                           f"{os.environ['WORLD_SIZE']}, e.g. by torchrun or deepspeed's own spawner); pdlaunch's "
                           "control plane needs MPI: use `pdlaunch generate --launcher deepspeed` (Open MPI) or mpirun")
    if size != plan.world_size:
        raise RuntimeError(f"the job has {size} ranks but the plan needs {plan.world_size} "
                           f"(1 controller + instance ranks); launch with -n {plan.world_size}")
    mine = plan.instance_of(rank)
    local = node_local_index(world, takes_device=mine is not None)
    instance_comm = world.Split(mine.id if mine else MPI.UNDEFINED, rank)
    host = plan.instances[0].first_rank
    endpoint = None
    if rank == host:
        addr = rendezvous_address(cluster.master_addr, cluster.interface, plan.rank_hosts())
        endpoint = f"tcp://{addr}:{cluster.master_port or free_port(addr)}"
    endpoint = world.bcast(endpoint, root=host)
    tp_rank, pp_stage = mine.coords(rank) if mine else (0, 0)
    return RankContext(rank, size, plan, world, mine, instance_comm if mine else None, tp_rank, pp_stage,
                       world.allgather(node_name()), local, endpoint)


class Outbox:
    """Non-blocking control-plane sends. Two ranks that both block in a large MPI send to each
    other deadlock (rendezvous protocol); isend + periodic progress never does."""

    def __init__(self, comm):
        self.comm, self.pending = comm, []

    def send(self, msg: Any, dest: int) -> None:
        self.pending.append(isend(self.comm, msg, dest))
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

    def send(self, step: StepPlan) -> None:
        for local in range(1, self.size):
            self.outbox.send(step, local)

    def progress(self) -> None:
        self.outbox.progress()

    def flush(self) -> None:
        self.outbox.flush()


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


def send(comm, msg: Any, dest: int) -> None:
    """A blocking send of one message (small ones: MPI sends them eagerly)."""
    comm.send(msg, dest=dest, tag=tag_of(type(msg)))


def isend(comm, msg: Any, dest: int):
    """A non-blocking send of one message: the MPI request to test or wait on."""
    return comm.isend(msg, dest=dest, tag=tag_of(type(msg)))


def take(comm, kinds: Iterable[type], source: Optional[int] = None) -> Optional[tuple[int, Any]]:
    """The first waiting message of one of these classes (from `source`, default any), as
    (source, message), or None. Never blocks: the one receiver the waits below are built on."""
    from mpi4py import MPI

    status = MPI.Status()
    for kind in kinds:
        tag = tag_of(kind)
        if comm.Iprobe(source=MPI.ANY_SOURCE if source is None else source, tag=tag, status=status):
            src = status.Get_source()
            return src, comm.recv(source=src, tag=tag)
    return None


def drain(comm, kinds: Iterable[type], source: Optional[int] = None) -> list[tuple[int, Any]]:
    """Every message of these classes already waiting, as (source, message) pairs; never blocks."""
    kinds, out = tuple(kinds), []
    while (got := take(comm, kinds, source)) is not None:
        out.append(got)
    return out


def receive(comm, source: int, kinds: Iterable[type], idle_s: float = POLL_S, timeout_s: float | None = None,
            waiting_for: str = "a message") -> Any:
    """The next message of these classes from `source`, waiting for it: sleeps `idle_s` between
    probes (MPI's own blocking calls spin a core, and here several ranks share two cores).
    Raises TimeoutError after timeout_s."""
    kinds = tuple(kinds)
    deadline = None if timeout_s is None else time.time() + timeout_s
    while (got := take(comm, kinds, source)) is None:
        if deadline is not None and time.time() > deadline:
            raise TimeoutError(f"no answer from rank {source} for {timeout_s:.0f} s while waiting for {waiting_for}")
        time.sleep(idle_s)
    return got[1]


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
            send(self.comm, RankAlive(), CONTROLLER)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()
