"""The workload arithmetic the engine and the simulator share, so they agree: percentiles and
arrival gaps. No torch."""
from __future__ import annotations

import random


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated percentile (numpy's default); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def arrival_gap(rng: random.Random, arrival: str, rate: float, cv: float) -> float:
    """Seconds from one arrival to the next: Poisson at `rate` req/s, gamma with coefficient of
    variation `cv`, or 0 (everything at t=0, arrival 'all')."""
    if arrival == "poisson":
        return rng.expovariate(rate)
    if arrival == "gamma":
        shape = 1.0 / (cv * cv)
        return rng.gammavariate(shape, 1.0 / (rate * shape))
    return 0.0
