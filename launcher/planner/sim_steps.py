"""The simulator's step machinery (launcher/planner/simulator.py runs the instances on it): the
event loop, a decode batch counted rather than walked, the steps in flight on a PP instance, the
decode groups that take turns through its stages, the prompt queue steps take chunks from (the
engine's rule: contracts.prompt_chunks), and the price of one step. Times in ms.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Callable

from contracts.prompt_chunks import PromptChunks
from launcher.planner.workload import SimRequest


def prompt_queue() -> PromptChunks[SimRequest]:
    """An instance's prompts waiting for, or part-way through, their prefill."""
    return PromptChunks(lambda r: r.input_len, lambda r: r.uncached_len, lambda r: r.cached_len)


def step_cost(inst, chunks: list[tuple[SimRequest, int, int]], group: "RunningBatch | None") -> tuple[float, float, str]:
    """(latency, first-stage interval, phase) of a step of prompt chunks beside a decode group."""
    sim, tp, pp = inst.sim, inst.spec.tp, inst.spec.pp
    lens, starts = [n for _, _, n in chunks], [s for _, s, _ in chunks]
    batch, context = (len(group), group.context) if group else (0, 0)
    phase = "prefill" if chunks else "decode"
    scale = sim.contention(inst, phase, batch)
    return (sim.latency.mixed_ms(lens, starts, batch, context, tp, pp) * scale,
            sim.latency.mixed_interval_ms(lens, starts, batch, context, tp, pp) * scale, phase)


class EventLoop:
    def __init__(self):
        self.heap, self.seq, self.now = [], 0, 0.0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn))

    def run(self) -> None:
        while self.heap:
            self.now, _, fn = heapq.heappop(self.heap)
            fn()


class RunningBatch:
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


class StepPipeline:
    """The steps in flight on one instance, as the engine's leader keeps them: at most `depth`
    (PP with batches in flight, else 1); a step holds the first stage for its interval and the
    last stage likewise, so its tokens come back after its latency, and never sooner than one
    interval after the previous step's. With depth 1 the interval is the latency."""

    def __init__(self, depth: int):
        self.depth, self.flying = depth, 0
        self.first_free = self.last_out = 0.0
        self.phases: deque[str] = deque()  # of the steps in flight, oldest first (they land in order)

    def has_room(self, now: float) -> bool:
        return self.flying < self.depth and now >= self.first_free

    def waits_for_first_stage(self, now: float) -> bool:
        return self.flying < self.depth and now < self.first_free

    def launch(self, now: float, latency: float, interval: float, phase: str) -> float:
        """Starts a step of `phase` now; returns when its tokens are back."""
        self.flying += 1
        self.phases.append(phase)
        self.first_free = now + interval
        self.last_out = max(now + latency, self.last_out + interval)
        return self.last_out

    def landed(self) -> None:
        self.flying -= 1
        self.phases.popleft()


class DecodeGroups:
    """A decode batch as the engine's scheduler runs it with `depth` steps in flight: up to depth
    groups of similar size that take turns through the PP stages. A joining request waits for the
    next launch and goes to the smallest group not in flight."""

    def __init__(self, depth: int):
        self.groups = [RunningBatch() for _ in range(depth)]
        self.flying: set[int] = set()   # indices of groups in a step in flight
        self.joining: list[SimRequest] = []
        self.turn = 0

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups) + len(self.joining)

    def next_group(self, now: float) -> RunningBatch | None:
        """The group to step next (joining requests placed first), round robin; None if every
        group with requests is in flight."""
        idle = [i for i in range(len(self.groups)) if i not in self.flying]
        if not idle:
            return None
        for r in self.joining:
            if math.isnan(r.joined):  # colocated: joined at its first token, no transfer
                r.joined = now
            min((self.groups[i] for i in idle), key=len).join(r)
        self.joining = []
        for k in range(len(self.groups)):
            i = (self.turn + k) % len(self.groups)
            if i in idle and self.groups[i]:
                self.turn = i + 1
                self.flying.add(i)
                return self.groups[i]
        return None

    def landed(self, group: RunningBatch) -> list[SimRequest]:
        self.flying.discard(self.groups.index(group))
        return group.step_done()


def launch_decode(inst, group: RunningBatch, landed: Callable[[RunningBatch], None]) -> None:
    """Starts `group`'s decode step on `inst`'s pipeline; landed(group) once its tokens are back."""
    latency, interval, phase = step_cost(inst, [], group)
    inst.sim.loop.at(inst.pipe.launch(inst.sim.loop.now, latency, interval, phase), lambda: landed(group))


def wake_at(inst, at: float, retry: Callable[[], None]) -> None:
    """`retry` at time `at` unless a wake of `inst` is already due (one at a time)."""
    if inst.waking:
        return
    inst.waking = True

    def wake() -> None:
        inst.waking = False
        retry()
    inst.sim.loop.at(at, wake)


def wake_when_first_stage_frees(inst, retry: Callable[[], None]) -> bool:
    """With a step slot free but the first stage still busy, `retry` once it frees; says whether
    that is the case."""
    waiting = inst.pipe.waits_for_first_stage(inst.sim.loop.now)
    if waiting:
        wake_at(inst, inst.pipe.first_free, retry)
    return waiting
