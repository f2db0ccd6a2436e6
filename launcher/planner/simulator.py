"""Discrete-event simulator of the engine's policies (times in ms). Own event loop: a heap of
(time, seq, callback) is several times faster than simpy for the thousands of runs a search makes.

Policies mirror engine/scheduler.py and engine/controller.py:
- controller: requests go to the prefill (or colocated) instance with the fewest outstanding
  requests (with prefix caching, Policy.cache_aware: the fewest queued uncached prompt tokens plus
  the request's own, as engine/dispatch.py), and are assigned the decode instance with the fewest;
- prefill: FCFS batches under the token budget L_m of whole prompts; a prompt longer than L_m
  runs in chunks that fill the budget; its KV stays held until pulled; a full hold area stops new
  batches (backpressure); a request's cached prefix (SimRequest.cached_len, prefix caching) runs
  no step and takes no room beside its tail (its blocks are shared), so only the tail is charged;
- decode: named per request at dispatch and told when its prefill starts; at a step boundary (at
  once when idle) it pulls (posts the receives) when it has room for prompt + output tokens and
  batch room; the transfer runs from the later of the first token and the pull; a pulled request
  joins the batch at the first step boundary after its transfer; continuous batching;
- colocated, chunked (Policy.colocated_policy, the default): every step carries the next decode
  group plus prompt chunks (started prompts first, then FCFS) up to the step token budget, decode
  tokens included; a prompt's first token comes with its last chunk; such a mixed step costs
  LatencyModel.mixed_ms;
- colocated, prefill_first: a step is a prefill batch whenever one is admissible.
Where the profile says instances sharing a node slow each other (CPUs: cores and memory), a step
that starts while no other instance on its nodes is stepping costs the profile's alone share, and
one that starts while another runs the other phase costs the profile's beside-the-other-phase share.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

from launcher.planner.latency import LatencyModel, prefill_token_budget, transfer_ms
from launcher.planner.sim_steps import (DecodeGroups, EventLoop, RunningBatch, StepPipeline, launch_decode,
                                        prompt_queue, step_cost, wake_at, wake_when_first_stage_frees)
from launcher.planner.workload import SimRequest


@dataclass
class InstanceSpec:
    tp: int
    pp: int
    kv_tokens: int          # KV capacity (hold area for prefill)
    node: int = 0           # first node of the instance
    span: int = 1           # nodes its PP stages spread over, in equal runs
    step_token_budget: int | None = None  # chunked colocated: its tokens per step (the planner's pick)


@dataclass
class Policy:
    token_budget: int | None = None  # L_m; None: each instance's from the profile (prefill_token_budget)
    max_decode_batch: int = 256
    kv_bytes_per_token: int = 0
    bandwidth_gbps: Callable[[InstanceSpec, InstanceSpec], float] = lambda p, d: float("inf")
    colocated_policy: str = "chunked"  # chunked | prefill_first, as scheduler.colocated_policy
    step_token_budget: int | None = None  # chunked colocated: tokens per step; None: the instance's L_m
    cache_aware: bool = False  # dispatch by queued uncached prompt tokens (scheduler.prefix_caching)


def _depth(sim: "Simulation", spec: InstanceSpec, phase: str) -> int:
    """Steps an instance keeps in flight: its PP degree where its stages overlap, else 1."""
    return spec.pp if sim.latency.overlap(spec.tp, spec.pp, phase) is not None else 1


class _Prefill:
    def __init__(self, sim: "Simulation", spec: InstanceSpec, index: int):
        self.sim, self.spec, self.index = sim, spec, index
        self.prompts = prompt_queue()
        self.held, self.outstanding, self.waking = 0, 0, False
        self.queued_tokens = 0  # uncached prompt tokens sent here without their first token yet
        self.pipe = StepPipeline(_depth(sim, spec, "prefill"))

    @property
    def busy(self) -> bool:
        return self.pipe.flying > 0

    def _admit(self, r: SimRequest, chunks: int) -> bool:
        """Room in the hold area (the first prompt always fits an empty one)."""
        if self.held + r.uncached_len > self.spec.kv_tokens and (chunks or self.held):
            return False
        self.held += r.uncached_len
        r.prefill_start, r.prefill_instance = self.sim.loop.now, self.index
        if r.output_len > 1:
            self.sim.announce(r, self)
        return True

    def try_start(self) -> None:
        loop = self.sim.loop
        if not self.prompts or self.waking or wake_when_first_stage_frees(self, self.try_start):
            return
        if not self.pipe.has_room(loop.now):
            return  # every step slot in flight: the next one to land wakes it
        budget = self.sim.token_budget(self.spec)
        chunks = self.prompts.take(budget, lambda n: n > budget, self._admit)
        if not chunks:
            return  # backpressure: wakes again when a pull frees the hold area
        latency, interval, phase = step_cost(self, chunks, None)
        done = self.pipe.launch(loop.now, latency, interval, phase)
        loop.at(done, lambda: self._done([r for r, start, n in chunks if start + n == r.input_len]))
        self.try_start()

    def enqueue(self, r: SimRequest) -> None:
        """Batches start after every request of this instant has arrived, as the engine's leader
        drains all its messages before it schedules."""
        self.prompts.add(r)
        wake_at(self, max(self.sim.loop.now, self.pipe.first_free), self.try_start)

    def _done(self, batch: list[SimRequest]) -> None:
        """A step landed; `batch`: the requests whose last chunk it ran."""
        self.pipe.landed()
        for r in batch:
            r.first_token = self.sim.loop.now
            self.outstanding -= 1
            self.queued_tokens -= r.uncached_len
            if r.output_len <= 1:
                r.finish = r.first_token
                self.sim.judge(r)
                self.sim.decode_of.pop(id(r)).assigned -= 1
                self.release(r)
            else:
                self.sim.decode_of.pop(id(r)).first_token(r)
        self.try_start()

    def release(self, r: SimRequest) -> None:
        self.held -= r.uncached_len
        self.try_start()


class _Decode:
    def __init__(self, sim: "Simulation", spec: InstanceSpec, index: int):
        self.sim, self.spec, self.index = sim, spec, index
        self.ready: deque[tuple[SimRequest, _Prefill]] = deque()  # announced, not pulled
        self.posted: dict[int, _Prefill] = {}  # pulled before their first token: id -> source
        depth = _depth(sim, spec, "decode")
        self.running, self.pipe = DecodeGroups(depth), StepPipeline(depth)
        self.pulling = self.used = self.assigned = 0
        self.waking = False

    @property
    def busy(self) -> bool:
        return self.pipe.flying > 0

    def try_pull(self) -> None:
        p = self.sim.policy
        while self.ready and len(self.running) + self.pulling < p.max_decode_batch:
            r, source = self.ready[0]
            need = r.input_len + r.output_len
            if self.used + need > self.spec.kv_tokens and (self.used or self.pulling):
                break
            self.ready.popleft()
            self.used += need
            self.pulling += 1
            if math.isnan(r.first_token):
                self.posted[id(r)] = source
            else:
                self._transfer(r, source)

    def announce(self, r: SimRequest, source: _Prefill) -> None:
        r.decode_instance = self.index
        self.ready.append((r, source))
        if not self.busy:
            self.try_pull()

    def first_token(self, r: SimRequest) -> None:
        """The prefill side posts its sends; the transfer starts if the receives are posted."""
        source = self.posted.pop(id(r), None)
        if source is not None:
            self._transfer(r, source)

    def _transfer(self, r: SimRequest, source: _Prefill) -> None:
        p, ms = self.sim.policy, 0.0
        if p.kv_bytes_per_token:
            ms = transfer_ms(r.input_len * p.kv_bytes_per_token, p.bandwidth_gbps(source.spec, self.spec))
        self.sim.loop.at(self.sim.loop.now + ms, lambda: self._arrived(r, source))

    def _arrived(self, r: SimRequest, source: _Prefill) -> None:
        self.pulling -= 1
        source.release(r)
        self.running.joining.append(r)
        self.start_step()

    def start_step(self) -> None:
        loop = self.sim.loop
        while self.pipe.has_room(loop.now):
            group = self.running.next_group(loop.now)
            if group is None:
                return
            launch_decode(self, group, self._step_done)
        wake_when_first_stage_frees(self, self.start_step)

    def _step_done(self, group: RunningBatch) -> None:
        now = self.sim.loop.now
        self.pipe.landed()
        for r in self.running.landed(group):
            r.finish = now
            self.sim.judge(r)
            self.used -= r.input_len + r.output_len
            self.assigned -= 1
        self.try_pull()
        self.start_step()


class _Colocated:
    """Both phases on one instance. Chunked (vLLM >= 0.6, Sarathi-Serve): whenever the pipeline has
    room, a step carries the next decode group and prompt chunks up to the step token budget.
    Prefill first (vLLM before 0.6): a step is a prefill batch of whole prompts if one is
    admissible, else the next decode group; with PP, a prefill on the first stage overlaps a decode
    group on a later one, as in the engine."""

    def __init__(self, sim: "Simulation", spec: InstanceSpec, index: int):
        self.sim, self.spec, self.index = sim, spec, index
        self.prompts = prompt_queue()
        depth = _depth(sim, spec, "decode")
        self.running, self.pipe = DecodeGroups(depth), StepPipeline(depth)
        self.used = self.outstanding = self.starting = self.queued_tokens = 0
        self.chunked = sim.policy.colocated_policy == "chunked"
        self.waking = False

    @property
    def busy(self) -> bool:
        return self.pipe.flying > 0

    def enqueue(self, r: SimRequest) -> None:
        """As _Prefill.enqueue: the step starts once this instant's arrivals are all queued."""
        self.prompts.add(r)
        wake_at(self, max(self.sim.loop.now, self.pipe.first_free), self.try_start)

    def _admit(self, r: SimRequest, chunks: int) -> bool:
        """Batch room (running + started) and KV room for prompt + output (the first always fits
        an empty cache)."""
        need = r.uncached_len + r.output_len
        if len(self.running) + self.starting >= self.sim.policy.max_decode_batch:
            return False
        if self.used + need > self.spec.kv_tokens and (chunks or self.used):
            return False
        self.used += need
        self.starting += 1
        r.prefill_start = self.sim.loop.now
        r.prefill_instance = r.decode_instance = self.index
        return True

    def try_start(self) -> None:
        loop = self.sim.loop
        while self.pipe.has_room(loop.now):
            if self.chunked:
                group = self.running.next_group(loop.now)
                budget = self.sim.step_budget(self.spec) - (len(group) if group else 0)
                chunks = self.prompts.take(budget, lambda n: True, self._admit)
            else:
                chunks = self.prompts.take(self.sim.token_budget(self.spec), lambda n: False, self._admit)
                group = None if chunks else self.running.next_group(loop.now)
            if not chunks and group is None:
                break
            latency, interval, phase = step_cost(self, chunks, group)
            done = self.pipe.launch(loop.now, latency, interval, phase)
            firsts = [r for r, start, n in chunks if start + n == r.input_len]
            loop.at(done, lambda group=group, firsts=firsts: self._landed(group, firsts))
        wake_when_first_stage_frees(self, self.try_start)

    def _landed(self, group: "RunningBatch | None", firsts: list[SimRequest]) -> None:
        """A step's tokens are back: its decode group's and the first tokens of the prompts whose
        last chunk it ran."""
        self.pipe.landed()
        if group is not None:
            for r in self.running.landed(group):
                self._finish(r)
        for r in firsts:
            self.starting -= 1
            self.queued_tokens -= r.uncached_len
            r.first_token = r.joined = self.sim.loop.now
            if r.output_len <= 1:
                self._finish(r)
            else:
                self.running.joining.append(r)
        self.try_start()

    def _finish(self, r: SimRequest) -> None:
        r.finish = self.sim.loop.now
        self.sim.judge(r)
        self.used -= r.uncached_len + r.output_len
        self.outstanding -= 1


class Simulation:
    """One run of a placement over a request list; returns the requests with their timings."""

    def __init__(self, latency: LatencyModel, policy: Policy, prefill: list[InstanceSpec] = (),
                 decode: list[InstanceSpec] = (), colocated: list[InstanceSpec] = (), cold_cache: bool = False):
        """cold_cache: the entry instances start with empty prefix caches, as a job does: the
        first request that shares the workload's prefix on an instance computes it (a drawn
        workload marks every sharer cached; a measured one already holds its misses)."""
        self.latency, self.policy, self.loop = latency, policy, EventLoop()
        self.cold_cache, self.holds_prefix = cold_cache, set()
        self.prefills = [_Prefill(self, s, i) for i, s in enumerate(prefill)]
        self.decodes = [_Decode(self, s, len(prefill) + i) for i, s in enumerate(decode)]
        self.colocated = [_Colocated(self, s, i) for i, s in enumerate(colocated)]
        self.decode_of: dict[int, _Decode] = {}
        if not self.colocated and not (self.prefills and self.decodes):
            raise ValueError("simulate prefill + decode instances, or colocated instances")
        self.instances = [*self.prefills, *self.decodes, *self.colocated]
        self.shared = latency.shares_nodes() and len(self.instances) > 1
        self.slo, self.misses_allowed = None, None

    def token_budget(self, spec: InstanceSpec) -> int:
        return prefill_token_budget(self.policy.token_budget, self.latency, spec.tp)

    def step_budget(self, spec: InstanceSpec) -> int:
        """A chunked colocated instance's tokens per step, decodes included: the policy's (the
        config's number), else the instance's own (the planner's pick), else its L_m."""
        return self.policy.step_token_budget or spec.step_token_budget or self.token_budget(spec)

    def contention(self, inst, phase: str, batch: int = 0) -> float:
        """The share of its profiled cost a step of `inst` (`batch` sequences) starting now takes.
        Profiles time every slot busy with the same phase, so: all of it while other instances on
        its nodes step in that phase alone; the profile's beside-the-other-phase share while one
        of them runs the other phase; the alone share while none steps."""
        if not self.shared:
            return 1.0
        a, beside = inst.spec, set()
        for other in self.instances:
            b = other.spec
            if other is not inst and a.node < b.node + b.span and b.node < a.node + a.span:
                beside.update(other.pipe.phases)
        if not beside:
            return self.latency.alone_factor(a.tp, phase)
        return 1.0 if beside == {phase} else self.latency.other_phase_factor(a.tp, phase, batch)

    def announce(self, r: SimRequest, source: _Prefill) -> None:
        self.decode_of[id(r)].announce(r, source)

    def _arrive(self, r: SimRequest) -> None:
        entry = self.colocated or self.prefills
        if self.policy.cache_aware:
            target = min(entry, key=lambda i: (i.queued_tokens + self._uncached_on(i, r), i.outstanding))
        else:
            target = min(entry, key=lambda i: i.outstanding)
        if self.cold_cache and r.cached_len:
            if id(target) not in self.holds_prefix:
                r.cached_len = 0  # it computes the prefix; the sharers after it find it cached
            self.holds_prefix.add(id(target))
        target.outstanding += 1
        target.queued_tokens += r.uncached_len
        if self.decodes:
            decode = min(self.decodes, key=lambda d: d.assigned)
            decode.assigned += 1
            self.decode_of[id(r)] = decode
        target.enqueue(r)

    def _uncached_on(self, inst, r: SimRequest) -> int:
        """The prompt tokens r would prefill on `inst`: all of them on a cold instance."""
        if self.cold_cache and r.cached_len and id(inst) not in self.holds_prefix:
            return r.input_len
        return r.uncached_len

    def judge(self, r: SimRequest) -> None:
        """Counts a finished request against the SLOs given to run(); once more have missed them
        than the target allows, the verdict is known and the run stops (the rest stay unfinished)."""
        if self.misses_allowed is None:
            return
        ttft_ms, tpot_ms = self.slo
        if (ttft_ms is not None and r.ttft > ttft_ms) or (tpot_ms is not None and r.tpot > tpot_ms):
            self.misses_allowed -= 1
            if self.misses_allowed < 0:
                self.loop.heap.clear()

    def run(self, requests: list[SimRequest], slo: tuple[float | None, float | None] | None = None,
            target: float = 1.0) -> list[SimRequest]:
        """Simulates every request; with `slo` (ttft_ms, tpot_ms), stops as soon as more than
        (1 - target) of them have missed it (a search only needs pass or fail)."""
        self.slo = slo
        self.misses_allowed = None if slo is None else math.floor((1 - target) * len(requests) + 1e-9)
        for r in requests:
            self.loop.at(r.arrival, lambda r=r: self._arrive(r))
        self.loop.run()
        return requests
