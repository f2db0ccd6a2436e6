"""The job's watchdogs: nothing waits silently.

The controller's Watchdog covers every instance rank (beacon threads, leader heartbeats, steps,
requests moving); each leader's ControllerWatch covers the controller. Either ends the job with
a diagnosis naming the rank or instance, its host, and what it stopped doing.
"""
from __future__ import annotations

import time

from engine import control_plane as c
from engine.control_plane import RankContext

BEACON_SILENT_S = 3 * c.HEARTBEAT_S  # a beacon this late has stopped (it speaks every HEARTBEAT_S)


class Watchdog:
    """Ends the job, naming the culprit, when
    - a rank's beacon thread went silent: its process is stopped or dead;
    - an instance stopped sending heartbeats: a rank of it is stuck (its leader waits on it);
    - a decode or colocated instance holds requests but took no step (it depends on nothing else);
    - requests are in flight but none moved anywhere (no step, dispatch or result).
    Each after `limit_s`."""

    def __init__(self, plan, nodes: list[str], limit_s: float):
        self.plan, self.nodes, self.limit_s = plan, nodes, limit_s
        now = time.time()
        self.seen = {i.id: (now, 0) for i in plan.instances}        # last heartbeat, steps then
        self.stepped = {i.id: now for i in plan.instances}          # when its step count last grew
        self.rank_seen = {r: now for i in plan.instances for r in i.ranks}  # beacon threads
        self.holding_since: dict[int, float] = {}                    # instance -> when requests came to it
        self.last_progress = now

    def beat(self, inst_id: int, steps: int) -> None:
        now = time.time()
        if steps != self.seen[inst_id][1]:
            self.progressed()
            self.stepped[inst_id] = now
        self.seen[inst_id] = (now, steps)

    def progressed(self) -> None:
        self.last_progress = time.time()

    def _rank(self, rank: int) -> str:
        return f"rank {rank} on {self.nodes[rank]} ({self.plan.describe_rank(rank)})"

    def _instance(self, inst) -> str:
        return (f"{inst.role} instance {inst.id} (ranks {inst.ranks[0]}-{inst.ranks[-1]} on "
                f"{', '.join(sorted({self.nodes[r] for r in inst.ranks}))})")

    def _stopped(self, rank: int, now: float) -> TimeoutError:
        return TimeoutError(f"{self._rank(rank)} sent nothing for {now - self.rank_seen[rank]:.0f} s: its process is "
                            "stopped or dead (SIGSTOP, a hung node, or swapped out)")

    def check(self, in_flight: dict[int, int]) -> None:
        now = time.time()
        for rank, when in self.rank_seen.items():
            if now - when > self.limit_s:
                raise self._stopped(rank, now)
        for inst_id, (when, steps) in self.seen.items():
            if now - when > self.limit_s:
                # a stopped leader's last heartbeat may predate its beacon's last word by up to a step:
                # a rank of the instance whose beacon is silent too is the culprit, named as such
                quietest = min(self.plan.instances[inst_id].ranks, key=self.rank_seen.get)
                if now - self.rank_seen[quietest] > BEACON_SILENT_S:
                    raise self._stopped(quietest, now)
                raise TimeoutError(f"{self._instance(self.plan.instances[inst_id])} sent no heartbeat for "
                                   f"{now - when:.0f} s after step {steps}: a rank of it is stuck (every process "
                                   "of it runs)")
        for inst in self.plan.instances:
            held = in_flight.get(inst.id, 0)
            if not held:
                self.holding_since.pop(inst.id, None)
                continue
            since = max(self.stepped[inst.id], self.holding_since.setdefault(inst.id, now))
            if inst.role != "prefill" and now - since > self.limit_s:  # prefill may wait on decode room
                raise TimeoutError(f"{self._instance(inst)} holds {held} request(s) but took no step for "
                                   f"{now - since:.0f} s: it is stalled (a transfer or a rank never completes)")
        if not in_flight:
            self.last_progress = now  # nothing dispatched is waiting: idle, not stalled
        elif now - self.last_progress > self.limit_s:
            held = ", ".join(f"{n} at {self.plan.instances[i].role} instance {i}" for i, n in sorted(in_flight.items()))
            raise TimeoutError(f"no request moved for {now - self.last_progress:.0f} s although every instance is "
                               f"alive ({held}): the engine is stalled; raise scheduler.watchdog_s if steps can "
                               "really take that long")


class ControllerWatch:
    """A leader's watch on the controller: the controller's watchdog covers every instance, this
    covers the controller (stopped or dead, nothing else would end the job while instances idle).
    The first beat comes once every instance has loaded, so until then the start-up limit holds."""

    def __init__(self, ctx: RankContext, limit_s: float):
        self.ctx, self.limit_s = ctx, limit_s
        self.deadline = time.time() + max(limit_s, c.STARTUP_S)

    def alive(self) -> None:
        """The controller's Alive came."""
        self.deadline = time.time() + self.limit_s

    def check(self) -> None:
        if time.time() > self.deadline:
            raise TimeoutError(f"the controller (rank 0 on {self.ctx.nodes[0]}) sent nothing for "
                               f"{self.limit_s:.0f} s: it is stuck or dead")
