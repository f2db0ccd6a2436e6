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

from contracts.protocol import (CONTROLLER, Abort, Alive, DecodeSample, FirstToken, Heartbeat, InstanceStats,
                                KVIncoming, KVPull, MixedSample, NextArrival, PrefillSample, Pulled, RecvDone, Request,
                                Shutdown, StepPlan, StepSamples)
from engine import control_plane as c
from engine.control_plane import RankContext
from engine.runner import ModelRunner
from engine.scheduler import Outgoing, Scheduler
from engine.watchdog import ControllerWatch

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
        self.samples = {kind: deque(maxlen=STEP_SAMPLES) for kind in (PrefillSample, DecodeSample, MixedSample)}
        self.handlers = self._handlers()

    def _record(self, step: StepPlan, ms: float) -> None:
        """What a prefill, decode or mixed (chunked prefill: prompt chunks beside decodes) step
        cost this instance under the run's own load (its loop iteration: messages, scheduling, the
        step, posting results)."""
        now = round(time.time(), 3)
        decodes = [c for c in step.seqs if len(c.token_ids) == 1 and c.start_pos > 0]
        chunks = [c for c in step.seqs if not (len(c.token_ids) == 1 and c.start_pos > 0)]
        batch, context = len(decodes), sum(c.start_pos + 1 for c in decodes)
        lens = tuple(len(c.token_ids) for c in chunks)
        if not chunks:
            sample = DecodeSample(batch, context, ms, now)
        elif not decodes and all(c.start_pos == 0 for c in chunks):
            sample = PrefillSample(lens, ms, now)
        else:
            sample = MixedSample(lens, tuple(c.start_pos for c in chunks), batch, context, ms, now)
        self.samples[type(sample)].append(sample)

    def _heartbeat(self) -> None:
        """Tells the controller's watchdog this instance is alive and how far it got."""
        now = time.time()
        if now - self.last_beat >= c.HEARTBEAT_S:
            self.last_beat = now
            self.outbox.send(Heartbeat(self.inst.id, self.steps, self.sched.state()), CONTROLLER)

    def _next_arrival(self, nxt: NextArrival) -> None:
        self.idle.expect(nxt.wall_time)
        for local in range(1, self.inst.size):  # the followers wake for the step that follows
            c.send(self.ctx.instance_comm, nxt, local)

    def _handlers(self) -> dict:
        """What each message from the controller or a peer leader does here (a KVPull comes in
        its decode leader's order: MPI keeps a sender's order per class)."""
        sched = self.sched
        return {Request: sched.add_request, NextArrival: self._next_arrival,
                KVIncoming: lambda m: self._send_all(sched.add_incoming(m)), FirstToken: sched.add_first_token,
                KVPull: sched.add_pull, Pulled: lambda m: sched.pulled(m.req_id),
                Abort: lambda m: self._send_all(sched.abort(m.req_id)), Alive: lambda m: self.watch.alive(),
                Shutdown: self._stop}

    def _stop(self, _: Shutdown) -> None:
        self.stopping = True

    def _handle_messages(self) -> None:
        self._heartbeat()
        self.outbox.progress()
        self.steps_out.progress()
        for _, msg in c.drain(self.ctx.world, self.handlers):
            self.handlers[type(msg)](msg)
        self.watch.check()
        for _, done in c.drain(self.ctx.instance_comm, (RecvDone,)):
            for req_id in done.req_ids:
                self.sched.rank_arrived(req_id)
        for req_id in self.runner.kv.newly_arrived():
            self.sched.rank_arrived(req_id)

    def _send_all(self, messages: list[Outgoing]) -> None:
        for out in messages:
            self.outbox.send(out.msg, out.dest)

    def _stats(self) -> InstanceStats:
        return InstanceStats(self.inst.id, self.inst.role, tuple(self.ctx.nodes[r] for r in self.inst.ranks),
                             self.sched.stats(), kv_cache_mb=self.runner.cache.bytes() / 2 ** 20,
                             weights_mb=self.runner.stage.weight_bytes() / 2 ** 20, token_budget=self.sched.token_budget,
                             step_samples=StepSamples(*(tuple(self.samples[kind]) for kind in
                                                        (PrefillSample, DecodeSample, MixedSample))))

    def run(self) -> None:
        in_flight: deque[tuple] = deque()  # (Launched, when its loop iteration started), oldest first
        while True:
            started = time.perf_counter()
            self._handle_messages()
            if self.stopping and not self.sched.busy():
                self.steps_out.send(StepPlan(shutdown=True))
                self.outbox.send(self._stats(), CONTROLLER)
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
        while (got := c.take(comm, (StepPlan,), source=0)) is None:
            for _, nxt in c.drain(comm, (NextArrival,), source=0):
                idle.expect(nxt.wall_time)
            arrived = runner.kv.newly_arrived()
            if arrived:
                c.send(comm, RecvDone(tuple(arrived)), 0)
                idle.worked()
            idle.sleep()
        idle.worked()
        step: StepPlan = got[1]
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
