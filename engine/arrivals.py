"""When an offline job's requests arrive: all at once, Poisson or gamma gaps (workload.arrival), or
each input line's own arrival_s; the controller takes them from a `Replay` as their time comes (the
server's frontend is the other source it takes requests from)."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional

from launcher.stats import arrival_gap

if TYPE_CHECKING:
    from engine.controller import RequestState


def arrival_offsets(n: int, arrival: str, rate: float, cv: float, seed: int) -> list[float]:
    """Arrival times (s from start): all at 0, Poisson, or gamma with coefficient of variation cv."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += arrival_gap(rng, arrival, rate, cv)
        out.append(t)
    return out


class Replay:
    """An input file's requests, released at their arrival offsets (s after the start)."""

    def __init__(self, requests: list[RequestState]):
        self.queue = sorted(requests, key=lambda p: p.offset_s)
        self.next_i = 0

    def take(self, elapsed: float) -> list[RequestState]:
        due = []
        while self.next_i < len(self.queue) and self.queue[self.next_i].offset_s <= elapsed:
            due.append(self.queue[self.next_i])
            self.next_i += 1
        return due

    def next_offset(self) -> Optional[float]:
        return self.queue[self.next_i].offset_s if self.next_i < len(self.queue) else None

    def exhausted(self) -> bool:
        return self.next_i == len(self.queue)

    def aborts(self) -> list[int]:
        return []

    wake = None  # nothing else adds work: sleep until the next arrival
