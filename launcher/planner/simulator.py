"""Discrete-event simulator of the engine's policies (times in ms). Own event loop: a heap of
(time, seq, callback) is several times faster than simpy for the thousands of runs a search makes.

Policies mirror engine/scheduler.py and engine/controller.py:
- controller: requests go to the prefill (or colocated) instance with the fewest outstanding
  requests, and are assigned the decode instance with the fewest;
- prefill: FCFS batches under the token budget L_m (the first request always fits); its KV stays
  held until pulled; a full hold area stops new batches (backpressure);
- decode: named per request at dispatch and told when its prefill starts; at a step boundary (at
  once when idle) it pulls (posts the receives) when it has room for prompt + output tokens and
  batch room; the transfer runs from the later of the first token and the pull; a pulled request
  joins the batch at the first step boundary after its transfer; continuous batching;
- colocated: prefill-prioritised; a step is a prefill batch whenever one is admissible.
Where the profile says instances sharing a node slow each other (CPUs: cores and memory), a step
that starts while no other instance on its nodes is stepping costs the profile's alone share.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

from launcher.planner.latency import LatencyModel, prefill_token_budget, transfer_ms
from launcher.planner.workload import SimRequest


@dataclass
class InstanceSpec:
    tp: int
    pp: int
    kv_tokens: int          # KV capacity (hold area for prefill)
    node: int = 0           # first node of the instance
    span: int = 1           # nodes its PP stages spread over, in equal runs


@dataclass
class Policy:
    token_budget: int | None = None  # L_m; None: each instance's from the profile (prefill_token_budget)
    max_decode_batch: int = 256
    kv_bytes_per_token: int = 0
    bandwidth_gbps: Callable[[InstanceSpec, InstanceSpec], float] = lambda p, d: float("inf")


class _Loop:
    def __init__(self):
        self.heap, self.seq, self.now = [], 0, 0.0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn))

    def run(self) -> None:
        while self.heap:
            self.now, _, fn = heapq.heappop(self.heap)
            fn()


class _Running:
    """A continuous decode batch: each request leaves after output_len - 1 steps. Steps and context
    are counted, not walked, so a step costs O(requests finishing) however large the batch."""

    def __init__(self):
        self.steps = 0
        self.ends: list[tuple[int, int, SimRequest]] = []  # (step it finishes at, seq, request)
        self.context = 0    # tokens of every running request: prompt + generated so far
        self.seq = 0

    def __len__(self) -> int:
        return len(self.ends)

    def join(self, r: SimRequest) -> None:
        """r has its first token; it runs from the next step on."""
        self.seq += 1
        heapq.heappush(self.ends, (self.steps + r.output_len - 1, self.seq, r))
        self.context += r.input_len + 1

    def step_done(self) -> list[SimRequest]:
        """Every request gained a token; returns those that are now complete."""
        self.steps += 1
        self.context += len(self.ends)
        done = []
        while self.ends and self.ends[0][0] <= self.steps:
            r = heapq.heappop(self.ends)[2]
            self.context -= r.input_len + r.output_len
            done.append(r)
        return done


class _Prefill:
    def __init__(self, sim: "Simulation", spec: InstanceSpec, index: int):
        self.sim, self.spec, self.index = sim, spec, index
        self.queue: deque[SimRequest] = deque()
        self.free_at, self.held, self.outstanding, self.waking = 0.0, 0, 0, False
        self.busy_until = 0.0

    @property
    def busy(self) -> bool:
        return self.sim.loop.now < self.busy_until

    def try_start(self) -> None:
        loop, lat = self.sim.loop, self.sim.latency
        if not self.queue or self.waking:
            return
        if loop.now < self.free_at:
            self.waking = True
            loop.at(self.free_at, self._wake)
            return
        batch, tokens = [], 0
        while self.queue:
            r = self.queue[0]
            if batch and tokens + r.input_len > self.sim.token_budget(self.spec):
                break
            if self.held + tokens + r.input_len > self.spec.kv_tokens and (batch or self.held):
                break
            batch.append(self.queue.popleft())
            tokens += r.input_len
        if not batch:
            return  # backpressure: wakes again when a pull frees the hold area
        lens = [r.input_len for r in batch]
        for r in batch:
            r.prefill_start, r.prefill_instance = loop.now, self.index
            if r.output_len > 1:
                self.sim.announce(r, self)
        self.held += tokens
        scale = self.sim.contention(self, "prefill")
        self.free_at = loop.now + lat.prefill_interval_ms(lens, self.spec.tp, self.spec.pp) * scale
        self.busy_until = loop.now + lat.prefill_ms(lens, self.spec.tp, self.spec.pp) * scale
        loop.at(self.busy_until, lambda: self._done(batch))
        self.try_start()

    def enqueue(self, r: SimRequest) -> None:
        """Batches start after every request of this instant has arrived, as the engine's leader
        drains all its messages before it schedules."""
        self.queue.append(r)
        if not self.waking:
            self.waking = True
            self.sim.loop.at(max(self.sim.loop.now, self.free_at), self._wake)

    def _wake(self) -> None:
        self.waking = False
        self.try_start()

    def _done(self, batch: list[SimRequest]) -> None:
        for r in batch:
            r.first_token = self.sim.loop.now
            self.outstanding -= 1
            if r.output_len <= 1:
                r.finish = r.first_token
                self.sim.judge(r)
                self.sim.decode_of.pop(id(r)).assigned -= 1
                self.release(r)
            else:
                self.sim.decode_of.pop(id(r)).first_token(r)
        self.try_start()

    def release(self, r: SimRequest) -> None:
        self.held -= r.input_len
        self.try_start()


class _Decode:
    def __init__(self, sim: "Simulation", spec: InstanceSpec, index: int):
        self.sim, self.spec, self.index = sim, spec, index
        self.ready: deque[tuple[SimRequest, _Prefill]] = deque()  # announced, not pulled
        self.posted: dict[int, _Prefill] = {}  # pulled before their first token: id -> source
        self.running = _Running()
        self.joinable: list[SimRequest] = []
        self.pulling = self.used = self.assigned = 0
        self.stepping = False

    @property
    def busy(self) -> bool:
        return self.stepping

    def try_pull(self) -> None:
        p = self.sim.policy
        while self.ready and len(self.running) + self.pulling + len(self.joinable) < p.max_decode_batch:
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
        if not self.stepping:
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
        self.joinable.append(r)
        self.start_step()

    def start_step(self) -> None:
        if self.stepping:
            return
        now = self.sim.loop.now
        for r in self.joinable:
            r.joined = now
            self.running.join(r)
        self.joinable = []
        if not self.running:
            return
        ms = self.sim.latency.decode_ms(len(self.running), self.running.context, self.spec.tp, self.spec.pp)
        ms *= self.sim.contention(self, "decode")
        self.stepping = True
        self.sim.loop.at(now + ms, self._step_done)

    def _step_done(self) -> None:
        now = self.sim.loop.now
        for r in self.running.step_done():
            r.finish = now
            self.sim.judge(r)
            self.used -= r.input_len + r.output_len
            self.assigned -= 1
        self.stepping = False
        self.try_pull()
        self.start_step()


class _Colocated:
    def __init__(self, sim: "Simulation", spec: InstanceSpec, index: int):
        self.sim, self.spec, self.index = sim, spec, index
        self.queue: deque[SimRequest] = deque()
        self.running = _Running()
        self.used = self.outstanding = 0
        self.stepping = self.waking = False

    @property
    def busy(self) -> bool:
        return self.stepping

    def enqueue(self, r: SimRequest) -> None:
        """As _Prefill.enqueue: the step starts once this instant's arrivals are all queued."""
        self.queue.append(r)
        if not self.stepping and not self.waking:
            self.waking = True
            self.sim.loop.at(self.sim.loop.now, self._wake)

    def _wake(self) -> None:
        self.waking = False
        self.try_start()

    def try_start(self) -> None:
        if self.stepping:
            return
        lat, p, loop = self.sim.latency, self.sim.policy, self.sim.loop
        batch, tokens = [], 0
        while self.queue and len(self.running) + len(batch) < p.max_decode_batch:
            r = self.queue[0]
            need = r.input_len + r.output_len
            if batch and tokens + r.input_len > self.sim.token_budget(self.spec):
                break
            if self.used + need > self.spec.kv_tokens and (batch or self.used):
                break
            batch.append(self.queue.popleft())
            tokens += r.input_len
            self.used += need
        if batch:
            for r in batch:
                r.prefill_start = r.joined = loop.now
                r.prefill_instance = r.decode_instance = self.index
            ms = lat.prefill_ms([r.input_len for r in batch], self.spec.tp, self.spec.pp)
            loop.at(loop.now + ms * self.sim.contention(self, "prefill"), lambda: self._prefilled(batch))
            self.stepping = True
        elif self.running:
            ms = lat.decode_ms(len(self.running), self.running.context, self.spec.tp, self.spec.pp)
            loop.at(loop.now + ms * self.sim.contention(self, "decode"), self._decoded)
            self.stepping = True

    def _prefilled(self, batch: list[SimRequest]) -> None:
        for r in batch:
            r.first_token = r.joined = self.sim.loop.now
            if r.output_len <= 1:
                self._finish(r)
            else:
                self.running.join(r)
        self.stepping = False
        self.try_start()

    def _finish(self, r: SimRequest) -> None:
        r.finish = self.sim.loop.now
        self.sim.judge(r)
        self.used -= r.input_len + r.output_len
        self.outstanding -= 1

    def _decoded(self) -> None:
        for r in self.running.step_done():
            self._finish(r)
        self.stepping = False
        self.try_start()


class Simulation:
    """One run of a placement over a request list; returns the requests with their timings."""

    def __init__(self, latency: LatencyModel, policy: Policy, prefill: list[InstanceSpec] = (),
                 decode: list[InstanceSpec] = (), colocated: list[InstanceSpec] = ()):
        self.latency, self.policy, self.loop = latency, policy, _Loop()
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

    def contention(self, inst, phase: str) -> float:
        """The share of its profiled cost a step of `inst` starting now takes: all of it while
        another instance on its nodes is stepping (profiles time every slot busy), else the
        profile's alone share."""
        if not self.shared:
            return 1.0
        a = inst.spec
        for other in self.instances:
            b = other.spec
            if other is not inst and other.busy and a.node < b.node + b.span and b.node < a.node + a.span:
                return 1.0
        return self.latency.alone_factor(a.tp, phase)

    def announce(self, r: SimRequest, source: _Prefill) -> None:
        self.decode_of[id(r)].announce(r, source)

    def _arrive(self, r: SimRequest) -> None:
        entry = self.colocated or self.prefills
        target = min(entry, key=lambda i: i.outstanding)
        target.outstanding += 1
        if self.decodes:
            decode = min(self.decodes, key=lambda d: d.assigned)
            decode.assigned += 1
            self.decode_of[id(r)] = decode
        target.enqueue(r)

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
