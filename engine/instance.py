"""The loops of an instance's ranks.

The leader (TP 0, PP stage 0) takes control messages, schedules, sends every rank of its
instance the step plan, sends the messages the scheduler produced, executes its own share, and
reports to the controller. With PP > 1 it keeps up to PP steps in flight (the scheduler's
pipeline depth): it launches the next step on stage 0 while the later stages finish earlier ones,
and takes their tokens back oldest first. The other ranks wait for step plans and, while waiting, report KV
receives that completed (the decode side's join needs every rank's data).
"""
from __future__ import annotations

import os
import time
from collections import deque

from engine import control_plane as c
from engine.control_plane import RankContext
from engine.runner import ModelRunner
from engine.scheduler import CONTROLLER, Scheduler
from engine.watchdog import ControllerWatch
from launcher.protocol import Heartbeat, InstanceStats, NextArrival, RecvDone, StepPlan, Tag

STEP_SAMPLES = 4000  # most recent step timings of each kind kept for the final stats


class Leader:
    def __init__(self, ctx: RankContext, runner: ModelRunner, scheduler: Scheduler, idle_s: float,
                 watch: ControllerWatch):
        self.ctx, self.runner, self.sched, self.watch = ctx, runner, scheduler, watch
        self.idle = c.IdleWait(idle_s)
        self.inst = ctx.instance
        self.stopping = False
        self.outbox = c.Outbox(ctx.world)
        # step plans go out without waiting: a follower busy with the previous step would otherwise
        # hold the leader in a blocking send of a plan too large for MPI's eager protocol
        self.steps_out = c.StepSender(ctx)
        self.last_beat = 0.0
        self.steps = 0
        self.step_samples = {kind: deque(maxlen=STEP_SAMPLES) for kind in ("prefill", "decode", "mixed")}

    def _record(self, step: StepPlan, ms: float) -> None:
        """What a prefill, decode or mixed (chunked prefill: prompt chunks beside decodes) step
        cost this instance under the run's own load (its loop iteration: messages, scheduling, the
        step, posting results), in `pdlaunch profile`'s sample format, for `pdlaunch bench` to fit a
        latency model to."""
        now = round(time.time(), 3)  # when the step ended: lets a bench pick a window's steps
        decodes = [c for c in step.seqs if len(c.token_ids) == 1 and c.start_pos > 0]
        chunks = [c for c in step.seqs if not (len(c.token_ids) == 1 and c.start_pos > 0)]
        decode = {"batch": len(decodes), "context_sum": sum(c.start_pos + 1 for c in decodes)}
        if not chunks:
            self.step_samples["decode"].append(decode | {"ms": ms, "t": now})
        elif not decodes and all(c.start_pos == 0 for c in chunks):
            self.step_samples["prefill"].append({"lens": [len(c.token_ids) for c in chunks], "ms": ms, "t": now})
        else:
            self.step_samples["mixed"].append({"lens": [len(c.token_ids) for c in chunks],
                                               "starts": [c.start_pos for c in chunks]} | decode | {"ms": ms, "t": now})

    def _heartbeat(self) -> None:
        """Tells the controller's watchdog this instance is alive and how far it got."""
        now = time.time()
        if now - self.last_beat >= c.HEARTBEAT_S:
            self.last_beat = now
            self.outbox.send(Heartbeat(self.inst.id, self.steps, **self.sched.state()), 0, Tag.HEARTBEAT)

    def _handle_messages(self) -> None:
        world, sched = self.ctx.world, self.sched
        self._heartbeat()
        self.watch.check()
        self.outbox.progress()
        self.steps_out.progress()
        for _, req in c.drain(world, Tag.REQUEST):
            sched.add_request(req)
        nxt: NextArrival
        for _, nxt in c.drain(world, Tag.NEXT_ARRIVAL, source=0):
            self.idle.expect(nxt.wall_time)
            for local in range(1, self.inst.size):  # the followers wake for the step that follows
                self.ctx.instance_comm.send(nxt, dest=local, tag=Tag.NEXT_ARRIVAL)
        for _, incoming in c.drain(world, Tag.KV_INCOMING):
            self._send_all(sched.add_incoming(incoming))
        for _, first in c.drain(world, Tag.FIRST_TOKEN):
            sched.add_first_token(first)
        for _, pull in c.drain(world, Tag.KV_PULL):  # in each decode leader's order (MPI keeps it)
            sched.add_pull(pull)
        for _, pulled in c.drain(world, Tag.PULLED):
            sched.pulled(pulled.req_id)
        for _, abort in c.drain(world, Tag.ABORT, source=0):
            self._send_all(sched.abort(abort.req_id))
        done: RecvDone
        for _, done in c.drain(self.ctx.instance_comm, Tag.RECV_DONE):
            for req_id in done.req_ids:
                sched.rank_arrived(req_id)
        for req_id in self.runner.kv.newly_arrived():
            sched.rank_arrived(req_id)
        if c.drain(world, Tag.SHUTDOWN, source=0):
            self.stopping = True

    def _send_all(self, messages) -> None:
        for instance, tag, message in messages:
            dest = 0 if instance == CONTROLLER else self.ctx.plan.instances[instance].leader
            self.outbox.send(message, dest, tag)

    def _stats(self) -> InstanceStats:
        return InstanceStats(instance=self.inst.id, role=self.inst.role,
                             nodes=tuple(self.ctx.nodes[r] for r in self.inst.ranks), **self.sched.stats(),
                             kv_cache_mb=self.runner.cache.bytes() / 2 ** 20,
                             weights_mb=self.runner.stage.weight_bytes() / 2 ** 20, token_budget=self.sched.token_budget,
                             step_samples={k: list(v) for k, v in self.step_samples.items()})

    def run(self) -> None:
        in_flight: deque[tuple] = deque()  # (Launched, when its loop iteration started), oldest first
        while True:
            started = time.perf_counter()
            self._handle_messages()
            if self.stopping and not self.sched.busy():
                self.steps_out.send(StepPlan(shutdown=True))
                self.outbox.send(self._stats(), 0, Tag.STATS)
                self.outbox.flush()
                self.steps_out.flush()
                return
            if len(in_flight) < self.sched.depth:
                out = self.sched.schedule()
                step = out.step
                if not step.is_empty:
                    self.idle.worked()
                    self.steps_out.send(step)
                    self._send_all(out.messages)
                    self.steps += 1
                    fault_point(self.ctx, self.steps, keep_alive=self._heartbeat)
                    launched = self.runner.launch(step)
                    if step.has_forward:
                        in_flight.append((launched, started))
                    if len(in_flight) < self.sched.depth:
                        continue  # room for another step on stage 0
                else:
                    self._send_all(out.messages)
                    if not in_flight:
                        if self.sched.busy():  # waiting on a transfer or a first token: work is coming
                            self.idle.worked()
                        self.idle.sleep()
                        continue
            launched, began = in_flight.popleft()
            tokens, logits = self.runner.collect(launched)
            self._send_all(self.sched.on_step(tokens, logits))
            self._record(launched.step, (time.perf_counter() - began) * 1e3)


def follow(ctx: RankContext, runner: ModelRunner, idle_s: float) -> None:
    """Non-leader ranks: execute step plans until told to stop."""
    comm = ctx.instance_comm
    steps = 0
    idle = c.IdleWait(idle_s)
    while True:
        while not comm.Iprobe(source=0, tag=Tag.STEP):
            nxt: NextArrival
            for _, nxt in c.drain(comm, Tag.NEXT_ARRIVAL, source=0):
                idle.expect(nxt.wall_time)
            arrived = runner.kv.newly_arrived()
            if arrived:
                comm.send(RecvDone(tuple(arrived)), dest=0, tag=Tag.RECV_DONE)
                idle.worked()
            idle.sleep()
        idle.worked()
        step = comm.recv(source=0, tag=Tag.STEP)
        if step.shutdown:
            runner.finish()
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
