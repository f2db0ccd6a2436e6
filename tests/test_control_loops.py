"""The controller's loop and an instance leader's message handling, in one process: real
Controller, Leader and Scheduler objects talk over an in-memory MPI (Wire: per receiver, messages in
the order sent, matched by source and tag, pickled as mpi4py pickles them), and the test plays the
ranks on the other side with typed messages only."""
from __future__ import annotations

import pickle
import threading
import time
from types import SimpleNamespace

from mpi4py import MPI

from contracts.batch_io import RequestSpec
from contracts.config import JobConfig
from contracts.plan import InstancePlan, Plan
from contracts.protocol import (CONTROLLER, Abort, Alive, FirstToken, Heartbeat, InstanceStats, KVIncoming, PrefillDone,
                                Pulled, RankAlive, Request, Result, SchedulerStats, Shutdown, Timings, TokensOut,
                                tag_of)
from contracts.sampling_params import SamplingParams
from engine.arrivals import Replay
from engine.controller import Controller
from engine.instance import Leader
from engine.results import Sink
from engine.scheduler import Scheduler
from engine.sequence import InstanceLimits
from engine.watchdog import ControllerWatch

PREFILL_LEADER, DECODE_LEADER = 1, 2
PLAN = Plan([InstancePlan(0, "prefill", 1, 1, PREFILL_LEADER, ["localhost"]),
             InstancePlan(1, "decode", 1, 1, DECODE_LEADER, ["localhost"])])


class Wire:
    """Point-to-point messages between in-process ranks."""

    def __init__(self):
        self.inboxes: dict[int, list] = {}
        self.lock = threading.Lock()

    def comm(self, rank: int) -> "Comm":
        return Comm(self, rank)


class Comm:
    """The part of an mpi4py communicator the control plane uses, on a Wire."""

    def __init__(self, wire: Wire, rank: int):
        self.wire, self.rank = wire, rank

    def send(self, obj, dest: int, tag: int) -> None:
        with self.wire.lock:
            self.wire.inboxes.setdefault(dest, []).append((self.rank, tag, pickle.dumps(obj)))

    def isend(self, obj, dest: int, tag: int):
        self.send(obj, dest, tag)
        return SimpleNamespace(Test=lambda: True, wait=lambda: None)

    def _first(self, source: int, tag: int):
        for i, (src, t, _) in enumerate(self.wire.inboxes.get(self.rank, [])):
            if t == tag and source in (MPI.ANY_SOURCE, src):
                return i
        return None

    def Iprobe(self, source: int, tag: int, status: MPI.Status) -> bool:  # noqa: N802 - mpi4py's name
        with self.wire.lock:
            i = self._first(source, tag)
            if i is not None:
                status.Set_source(self.wire.inboxes[self.rank][i][0])
            return i is not None

    def recv(self, source: int, tag: int):
        with self.wire.lock:
            return pickle.loads(self.wire.inboxes[self.rank].pop(self._first(source, tag))[2])


def expect(comm: Comm, kind: type, source: int = MPI.ANY_SOURCE, timeout_s: float = 30.0):
    """The next message of `kind` at this rank (the test's side of the wire), waiting for it."""
    status, deadline = MPI.Status(), time.time() + timeout_s
    while not comm.Iprobe(source, tag_of(kind), status):
        assert time.time() < deadline, f"rank {comm.rank} never got a {kind.__name__}"
        time.sleep(0.002)
    return comm.recv(status.Get_source(), tag_of(kind))


def waiting(comm: Comm, kind: type) -> list:
    """Every message of `kind` already at this rank."""
    status, out = MPI.Status(), []
    while comm.Iprobe(MPI.ANY_SOURCE, tag_of(kind), status):
        out.append(comm.recv(status.Get_source(), tag_of(kind)))
    return out


class Collected(Sink):
    def __init__(self):
        self.results, self.streamed, self.beats = [], [], []

    def write(self, req, result) -> None:
        self.results.append((req.spec.custom_id, result))

    def tokens(self, req, new: list[int]) -> None:
        self.streamed.append((req.spec.custom_id, new))

    def instance_state(self, beat: Heartbeat) -> None:
        self.beats.append(beat)


def stats(instance: int, role: str) -> InstanceStats:
    return InstanceStats(instance, role, ("localhost",), SchedulerStats(8, 3, 2, 5, 100.0), 1.0, 2.0, 32)


def test_the_controller_dispatches_follows_and_ends_a_disaggregated_request():
    """Both leaders report in; the request goes to the prefill leader naming the decode instance;
    its first token, streamed tokens (out of order) and result come back; then every leader is
    told to stop and its final stats end the run as report.json's flat records."""
    wire = Wire()
    prefill, decode = wire.comm(PREFILL_LEADER), wire.comm(DECODE_LEADER)
    cfg = JobConfig()
    controller = Controller(SimpleNamespace(plan=PLAN, world=wire.comm(CONTROLLER), nodes=["localhost"] * 3), cfg,
                            codec=None, vocab_size=100)
    sink = Collected()
    state = controller.prepare(RequestSpec(0, "a", prompt=[5, 6, 7], sampling={"max_tokens": 3}))
    state.stream = True
    source = Replay([state])
    out = {}
    loop = threading.Thread(target=lambda: out.update(controller.run(source, sink)), daemon=True)
    loop.start()
    for comm, inst in ((prefill, 0), (decode, 1)):
        comm.send(Heartbeat(inst, 0), CONTROLLER, tag_of(Heartbeat))
    request: Request = expect(prefill, Request)
    assert (request.prompt_ids, request.decode_instance, request.stream) == ((5, 6, 7), 1, True)
    now = time.time()
    prefill.send(RankAlive(), CONTROLLER, tag_of(RankAlive))
    decode.send(TokensOut(1, ((request.req_id, 1, 9), (request.req_id, 2, 10))), CONTROLLER, tag_of(TokensOut))
    prefill.send(TokensOut(0, ((request.req_id, 0, 8),)), CONTROLLER, tag_of(TokensOut))
    prefill.send(PrefillDone(request.req_id, 0, now), CONTROLLER, tag_of(PrefillDone))
    decode.send(Result(request.req_id, 1, (8, 9, 10), "length", Timings(first_token=now), (now, now, now)),
                CONTROLLER, tag_of(Result))
    for comm, inst, role in ((prefill, 0, "prefill"), (decode, 1, "decode")):
        expect(comm, Shutdown)
        comm.send(stats(inst, role), CONTROLLER, tag_of(InstanceStats))
    loop.join(timeout=30)
    assert not loop.is_alive()
    assert sink.streamed == [("a", [8, 9, 10])]                     # in output order, whoever sent them first
    assert [(custom_id, r.output) for custom_id, r in sink.results] == [("a", (8, 9, 10))]
    assert [b.instance for b in sink.beats] == [0, 1]
    assert [(i["instance"], i["role"], i["forward_steps"], i["token_budget"]) for i in out["instances"]] == \
        [(0, "prefill", 5, 32), (1, "decode", 5, 32)]
    assert controller.load == {0: 0, 1: 0} and not controller.by_id


def decode_leader(wire: Wire) -> Leader:
    """A decode instance's leader (one rank), its scheduler real, its model absent: the messages
    it handles move no tensors."""
    ctx = SimpleNamespace(plan=PLAN, world=wire.comm(DECODE_LEADER), instance=PLAN.instances[1],
                          instance_comm=Wire().comm(0), nodes=["localhost"] * 3)
    sched = Scheduler("decode", 1, 1, InstanceLimits(16, 4, 32, 8, 128), leaders=(PREFILL_LEADER, DECODE_LEADER))
    runner = SimpleNamespace(kv=SimpleNamespace(newly_arrived=lambda: []))
    return Leader(ctx, runner, sched, 0.001, ControllerWatch(ctx, 60.0))


def test_a_leader_routes_each_message_by_its_class_and_answers_the_right_ranks():
    wire = Wire()
    controller, prefill = wire.comm(CONTROLLER), wire.comm(PREFILL_LEADER)
    leader = decode_leader(wire)
    request = Request(4, (5, 6, 7), SamplingParams(max_tokens=4), 0.0, decode_instance=1)
    prefill.send(KVIncoming(request, 0, (0,)), DECODE_LEADER, tag_of(KVIncoming))
    prefill.send(FirstToken(4, 0, 8, Timings(first_token=0.0)), DECODE_LEADER, tag_of(FirstToken))
    controller.send(Alive(), DECODE_LEADER, tag_of(Alive))
    controller.send(Abort(4), DECODE_LEADER, tag_of(Abort))  # announced, not pulled: dropped at once
    leader.watch.deadline = 0.0                                # only the Alive keeps the watch quiet
    leader._handle_messages()
    assert leader.watch.deadline > time.time()
    assert [p.req_id for p in waiting(prefill, Pulled)] == [4]  # the prefill leader frees its held copy
    (result,) = waiting(controller, Result)
    assert (result.req_id, result.finish_reason) == (4, "abort")
    (beat,) = waiting(controller, Heartbeat)
    assert (beat.instance, beat.state.kv_blocks) == (1, 16)
    assert not leader.stopping and not leader.sched.busy()
    controller.send(Shutdown(), DECODE_LEADER, tag_of(Shutdown))
    leader._handle_messages()
    assert leader.stopping
