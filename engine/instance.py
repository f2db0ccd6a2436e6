"""The loops of an instance's ranks.

The leader (TP 0, PP stage 0) takes control messages, schedules, sends every rank of its
instance the step plan, executes its own share, and reports to the controller. The other ranks
wait for step plans and, while waiting, report KV receives that completed (the decode side's
join needs every rank's data).
"""
from __future__ import annotations

import os
import time
from collections import deque

from engine import comm as c
from engine.comm import RankContext
from engine.runner import ModelRunner
from engine.scheduler import KVIncoming, KVPull, ReadyNotice, Request, Scheduler, Sequence
from engine.step import StepPlan

STEP_SAMPLES = 4000  # most recent pure prefill / pure decode step timings kept for the final stats


def _event(seq: Sequence, instance_id: int, with_logits: bool) -> dict:
    event = {"req_id": seq.req_id, "output": list(seq.output), "times": dict(seq.times),
             "token_times": list(seq.token_times), "finish_reason": seq.finish_reason,
             "instance": instance_id}
    if with_logits:
        event["logits"] = [row if isinstance(row, list) else row.tolist() for row in seq.logits]
    return event


class ControllerWatch:
    """A leader's watch on the controller: the controller's watchdog covers every instance, this
    covers the controller (stopped or dead, nothing else would end the job while instances idle).
    The first beat comes once every instance has loaded, so until then the start-up limit holds."""

    def __init__(self, ctx: RankContext, limit_s: float):
        self.ctx, self.limit_s = ctx, limit_s
        self.deadline = time.time() + max(limit_s, c.STARTUP_S)

    def check(self) -> None:
        now = time.time()
        if c.drain(self.ctx.world, c.TAG_ALIVE, source=0):
            self.deadline = now + self.limit_s
        elif now > self.deadline:
            raise TimeoutError(f"the controller (rank 0 on {self.ctx.nodes[0]}) sent nothing for "
                               f"{self.limit_s:.0f} s: it is stuck or dead")


class Leader:
    def __init__(self, ctx: RankContext, runner: ModelRunner, scheduler: Scheduler, want_logits: bool,
                 idle_s: float, watch: ControllerWatch):
        self.ctx, self.runner, self.sched, self.watch = ctx, runner, scheduler, watch
        self.idle = c.IdleWait(idle_s)
        self.want_logits = want_logits
        self.inst = ctx.instance
        self.stopping = False
        self.outbox = c.Outbox(ctx.world)
        self.last_beat = 0.0
        self.steps = 0
        self.step_samples = {"prefill": deque(maxlen=STEP_SAMPLES), "decode": deque(maxlen=STEP_SAMPLES)}

    def _record(self, step: StepPlan, ms: float) -> None:
        """What a pure prefill or pure decode step cost this instance under the run's own load (its
        loop iteration: messages, scheduling, the step, posting results), in `pdlaunch profile`'s
        sample format, for `pdlaunch bench` to fit a latency model to."""
        now = round(time.time(), 3)  # when the step ended: lets a bench pick a window's steps
        if all(c.start_pos == 0 for c in step.seqs):
            self.step_samples["prefill"].append({"lens": [len(c.token_ids) for c in step.seqs], "ms": ms, "t": now})
        elif all(len(c.token_ids) == 1 and c.start_pos > 0 for c in step.seqs):
            self.step_samples["decode"].append({"batch": len(step.seqs), "context_sum": sum(c.start_pos + 1 for c in step.seqs),
                                                "ms": ms, "t": now})

    def _heartbeat(self) -> None:
        """Tells the controller's watchdog this instance is alive and how far it got."""
        now = time.time()
        if now - self.last_beat >= c.HEARTBEAT_S:
            self.last_beat = now
            self.outbox.send((self.inst.id, self.steps), 0, c.TAG_HEARTBEAT)

    def _handle_messages(self) -> None:
        world = self.ctx.world
        self._heartbeat()
        self.watch.check()
        self.outbox.progress()
        for _, req in c.drain(world, c.TAG_REQUEST):
            self.sched.add_request(req if isinstance(req, Request) else Request(**req))
        for _, wall_time in c.drain(world, c.TAG_NEXT_ARRIVAL, source=0):
            self.idle.expect(wall_time)
            for local in range(1, self.inst.size):  # the followers wake for the step that follows
                self.ctx.instance_comm.send(wall_time, dest=local, tag=c.TAG_NEXT_ARRIVAL)
        for _, incoming in c.drain(world, c.TAG_KV_INCOMING):
            self.sched.add_incoming(incoming)
        for _, notice in c.drain(world, c.TAG_KV_READY):
            self.sched.add_ready(notice)
        for _, pull in c.drain(world, c.TAG_KV_PULL):  # in each decode leader's order (MPI keeps it)
            self.sched.add_pull(pull)
        for _, req_id in c.drain(world, c.TAG_PULLED):
            self.sched.pulled(req_id)
        for _, arrived in c.drain(self.ctx.instance_comm, c.TAG_RECV_DONE):
            for req_id in arrived:
                self.sched.rank_arrived(req_id)
        for req_id in self.runner.kv.newly_arrived():
            self.sched.rank_arrived(req_id)
        if c.drain(world, c.TAG_SHUTDOWN, source=0):
            self.stopping = True

    def _leader_of(self, instance_id: int) -> int:
        return self.ctx.plan.instances[instance_id].leader

    def _broadcast(self, step: StepPlan) -> None:
        for local in range(1, self.inst.size):
            self.ctx.instance_comm.send(step, dest=local, tag=c.TAG_STEP)

    def run(self) -> None:
        send = self.outbox.send
        while True:
            started = time.perf_counter()
            self._handle_messages()
            if self.stopping and not self.sched.busy():
                self._broadcast(StepPlan(shutdown=True))
                send(self.sched.stats() | {"instance": self.inst.id, "role": self.inst.role,
                                           "nodes": [self.ctx.nodes[r] for r in self.inst.ranks],
                                           "kv_cache_mb": self.runner.cache.bytes() / 2 ** 20,
                                           "weights_mb": self.runner.weight_bytes() / 2 ** 20,
                                           "step_samples": {k: list(v) for k, v in self.step_samples.items()}},
                     0, c.TAG_STATS)
                self.outbox.flush()
                return
            step, joined = self.sched.schedule()
            for seq in self.sched.take_announcements():
                send(KVIncoming(seq.request, self.inst.id), self._leader_of(seq.request.decode_instance),
                     c.TAG_KV_INCOMING)
            if not (step.has_forward or step.kv_sends or step.kv_recvs or step.kv_joins or step.kv_releases):
                if self.sched.busy():  # waiting on a transfer or a first token: work is coming
                    self.idle.worked()
                self.idle.sleep()
                continue
            self.idle.worked()
            step.want_logits = self.want_logits
            self._broadcast(step)
            for recv in step.kv_recvs:  # the prefill side posts its sends in this order
                send(KVPull(recv.req_id, self.inst.id), self._leader_of(recv.peer_instance), c.TAG_KV_PULL)
            self.steps += 1
            fault_point(self.ctx, self.steps, keep_alive=self._heartbeat)
            tokens, logits = self.runner.execute(step)
            for seq in joined:
                send(seq.req_id, self._leader_of(seq.source_instance), c.TAG_PULLED)
                if seq.finish_reason:  # its first token ended it
                    send(_event(seq, self.inst.id, self.want_logits), 0, c.TAG_RESULT)
            if not step.has_forward:
                continue
            ready, finished = self.sched.on_step(tokens, logits)
            for seq in ready:
                notice = ReadyNotice(seq.request, self.inst.id, seq.output[0], dict(seq.times),
                                     [row.tolist() for row in seq.logits])
                send(notice, self._leader_of(seq.request.decode_instance), c.TAG_KV_READY)
                send(notice, 0, c.TAG_KV_READY)
            for seq in finished:
                send(_event(seq, self.inst.id, self.want_logits), 0, c.TAG_RESULT)
            self._record(step, (time.perf_counter() - started) * 1e3)


def follow(ctx: RankContext, runner: ModelRunner, idle_s: float) -> None:
    """Non-leader ranks: execute step plans until told to stop."""
    comm = ctx.instance_comm
    steps = 0
    idle = c.IdleWait(idle_s)
    while True:
        while not comm.Iprobe(source=0, tag=c.TAG_STEP):
            for _, wall_time in c.drain(comm, c.TAG_NEXT_ARRIVAL, source=0):
                idle.expect(wall_time)
            arrived = runner.kv.newly_arrived()
            if arrived:
                comm.send(arrived, dest=0, tag=c.TAG_RECV_DONE)
                idle.worked()
            idle.sleep()
        idle.worked()
        step = comm.recv(source=0, tag=c.TAG_STEP)
        if step.shutdown:
            return
        steps += 1
        fault_point(ctx, steps)
        runner.execute(step)


def fault_point(ctx: RankContext, step: int, keep_alive=None) -> None:
    """Failure injection for the reliability tests: PDLAUNCH_FAULT=RANK:STEP:raise|hang|stall makes
    that rank raise, stop answering, or (a leader) keep sending heartbeats but never step again,
    when it starts that step."""
    spec = os.environ.get("PDLAUNCH_FAULT")
    if not spec:
        return
    rank, at, kind = spec.split(":")
    if int(rank) == ctx.rank and int(at) == step:
        while kind in ("hang", "stall"):
            if kind == "stall" and keep_alive:
                keep_alive()
            time.sleep(0.1)
        raise RuntimeError(f"injected fault at step {step}")
