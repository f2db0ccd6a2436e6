"""Workloads for the simulator: requests with their timings, length distributions, arrivals, and
SLO attainment over a run (times in ms)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from launcher.stats import arrival_gap


@dataclass
class SimRequest:
    arrival: float          # ms
    input_len: int
    output_len: int
    first_token: float = math.nan
    finish: float = math.nan
    prefill_start: float = math.nan
    joined: float = math.nan          # entered the decode batch (disaggregated)
    prefill_instance: int = -1
    decode_instance: int = -1
    cached_len: int = 0               # prompt tokens its prefill finds in a prefix cache

    @property
    def uncached_len(self) -> int:
        """The prompt tokens its prefill runs."""
        return self.input_len - self.cached_len

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        """(last token - first token) / (tokens - 1): the engine's definition."""
        return (self.finish - self.first_token) / (self.output_len - 1) if self.output_len > 1 else 0.0

    @property
    def queue_ms(self) -> float:
        return self.prefill_start - self.arrival

    @property
    def transfer_ms(self) -> float:
        """First token -> decode join: the KV pull as the engine reports it."""
        return self.joined - self.first_token


@dataclass
class LengthDist:
    """Input/output lengths: fixed, uniform [low, high], lognormal (mean, cv) or a trace's pairs."""

    kind: str = "fixed"
    input: float = 128
    output: float = 32
    cv: float = 0.5
    low: tuple[int, int] = (16, 8)
    high: tuple[int, int] = (256, 64)
    pairs: list = field(default_factory=list)
    max_len: int = 4096
    _mean: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def mean(self) -> tuple[float, float]:
        """Mean (input, output) lengths of what draw() gives; the lognormal's, clipped and floored
        as draw() does, from a fixed sample (computed once per distribution)."""
        key = (self.kind, self.input, self.output, self.cv, self.low, self.high, self.max_len, len(self.pairs))
        if self._mean is None or self._mean[0] != key:
            self._mean = (key, self._compute_mean())
        return self._mean[1]

    def _compute_mean(self) -> tuple[float, float]:
        if self.kind == "trace":
            return (sum(p[0] for p in self.pairs) / len(self.pairs), sum(p[1] for p in self.pairs) / len(self.pairs))
        if self.kind == "uniform":
            return (self.low[0] + self.high[0]) / 2, (self.low[1] + self.high[1]) / 2
        if self.kind == "lognormal":
            rng = random.Random(0)
            sample = [self.draw(rng) for _ in range(20000)]
            return sum(i for i, _ in sample) / len(sample), sum(o for _, o in sample) / len(sample)
        return float(int(self.input)), float(int(self.output))

    def draw(self, rng: random.Random) -> tuple[int, int]:
        if self.kind == "trace":
            return rng.choice(self.pairs)
        if self.kind == "uniform":
            return rng.randint(self.low[0], self.high[0]), rng.randint(self.low[1], self.high[1])
        if self.kind == "lognormal":
            sigma = math.sqrt(math.log(1 + self.cv ** 2))

            def ln(mean):
                return max(1, min(self.max_len, int(rng.lognormvariate(math.log(mean) - sigma ** 2 / 2, sigma))))

            return ln(self.input), ln(self.output)
        return int(self.input), int(self.output)


@dataclass(frozen=True)
class SharedPrefix:
    """A prefix (a system prompt, a few-shot block) that a share of the requests begin with; with
    prefix caching their prefill runs only what follows its full blocks (the first request of an
    instance, which fills its cache, is not told apart: one in hundreds)."""

    length: int = 0        # tokens, part of the prompt length
    share: float = 0.0     # of the requests
    block_size: int = 16

    def cached_tokens(self, input_len: float) -> int:
        """Prompt tokens a request that begins with the prefix finds cached: the prefix's full
        blocks before its last token."""
        return int(min(self.length, input_len - 1)) // self.block_size * self.block_size

    def cached(self, rng: random.Random, input_len: int) -> int:
        """A drawn request's cached tokens: the prefix's for `share` of them, else none."""
        return self.cached_tokens(input_len) if rng.random() < self.share else 0


def make_requests(n: int, rate: float, lengths: LengthDist, arrival: str = "poisson", cv: float = 1.0,
                  seed: int = 0, prefix: SharedPrefix | None = None) -> list[SimRequest]:
    """n requests at `rate` req/s (Poisson, gamma with coefficient of variation cv, or all at t=0);
    with a shared prefix, the share of them that begin with it."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += arrival_gap(rng, arrival, rate, cv) * 1e3
        i, o = lengths.draw(rng)
        cached = prefix.cached(rng, i) if prefix else 0
        out.append(SimRequest(t, i, o, cached_len=cached))
    return out


def attainment(requests: list[SimRequest], ttft_ms: float | None, tpot_ms: float | None, rule: str = "joint") -> float:
    """'joint': share of requests meeting both SLOs. 'separate' (DistServe's artifact rule, P90 TTFT
    and P90 TPOT each within SLO): the smaller of the TTFT and TPOT attainments. None = no SLO."""
    done = [r for r in requests if not math.isnan(r.finish)]
    if not requests:
        return 0.0
    ok_ttft = [ttft_ms is None or r.ttft <= ttft_ms for r in done]
    ok_tpot = [tpot_ms is None or r.tpot <= tpot_ms for r in done]
    if rule == "joint":
        return sum(a and b for a, b in zip(ok_ttft, ok_tpot)) / len(requests)
    return min(sum(ok_ttft), sum(ok_tpot)) / len(requests)
