"""Goodput of one placement: the highest per-device request rate it *sustains*, found by
bisection over simulated probes, and the analytic capacities that bound that search.

A probe's arrivals last long against a request's lifetime at the SLOs (so a burst that fits in
memory at once cannot pass); a rate passes when >= target of requests meet the SLOs and the queues
do not grow. Rates sit on a grid of `precision` (req/s/device) whose top is the placement's
analytic capacity: a rate at or above what the phases can process at all fails unsimulated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from launcher.planner.latency import LatencyModel, prefill_token_budget
from launcher.planner.simulator import InstanceSpec
from launcher.planner.workload import LengthDist, SharedPrefix, SimRequest, attainment, make_requests


@dataclass
class Settings:
    ttft_ms: float
    tpot_ms: float
    target: float = 0.9
    rule: str = "joint"
    num_requests: int = 300        # the fewest requests a probe simulates
    lengths: LengthDist = field(default_factory=LengthDist)
    arrival: str = "poisson"
    cv: float = 1.0
    seed: int = 0
    precision: float = 0.25
    span_s: float = 0.0            # arrival span of every probe; 0: SPAN_LIFETIMES request lifetimes at the SLOs
    max_requests: int = 6000       # a probe's request count is rate x span, capped here
    token_budget: int | None = None  # L_m; None: the profile's per TP degree (prefill_token_budget)
    max_decode_batch: int = 256
    memory_gb: float = 80.0
    intra_node_gbps: float = 300.0
    inter_node_gbps: float = 3.125
    model_transfer: bool = True    # DistServe's search ignores KV transfer; we include it unless told
    colocated_policy: str = "chunked"  # colocated instances: chunked | prefill_first (scheduler.colocated_policy)
    step_token_budget: int | None = None  # chunked colocated: tokens per step; None: the instance's L_m
    prefix: SharedPrefix | None = None  # a prefix a share of the requests begin with (prefix caching on)
    prefix_caching: bool = False   # scheduler.prefix_caching: cache-aware dispatch

    def mean_prefill_tokens(self) -> float:
        """The mean prompt tokens a prefill runs: past the shared prefix where one is cached (the
        prefix's blocks at the mean prompt length; by concavity no fewer on average than with the
        lengths drawn, so the capacities below stay upper bounds)."""
        mean_in = self.lengths.mean()[0]
        if self.prefix is None:
            return mean_in
        return mean_in - self.prefix.share * self.prefix.cached_tokens(mean_in)


@dataclass
class Goodput:
    """A bisection's outcome, per device: the sustained rate, the analytic capacity that bounded
    the search, and the mean TPOT at that rate (0 when no rate passes)."""

    rate: float
    capacity: float
    mean_tpot_ms: float = 0.0


class NoPrefillLatency(LatencyModel):
    """Decode-phase goodput: requests reach decode already prefilled."""

    def __init__(self, base: LatencyModel):
        super().__init__(base.model, base.by_tp, base.source, base.pipelined_pp, base.meta)

    def prefill_ms(self, lens, tp, pp=1, starts=None):
        return 0.0

    def prefill_interval_ms(self, lens, tp, pp=1, starts=None):
        return 0.0


def bisect_rate(ok, lo: float, hi: float, precision: float, hi_fails: bool = False,
                max_probes: int = 64, ceiling: float = math.inf, relative: float = 0.0) -> tuple[float, float]:
    """Bracket the highest rate where ok(rate) holds, given that it holds at lo (or lo is 0): while
    no rate has failed, probe hi and double it (up to `ceiling`); then halve [lo, hi] until it is
    narrower than `precision` (with `relative`: than that share of lo, once lo > 0) or `max_probes`
    probes are spent. Returns (lo, hi), hi = inf if nothing failed."""
    for _ in range(max_probes):
        width = relative * lo if relative and lo > 0 else precision
        if (hi_fails and hi - lo <= width) or (not hi_fails and hi > ceiling):
            break
        probe = (lo + hi) / 2 if hi_fails else hi
        if ok(probe):
            lo, hi = probe, (hi if hi_fails else 2 * probe)
        else:
            hi, hi_fails = probe, True
    return lo, hi if hi_fails else math.inf


SPAN_LIFETIMES = 10   # a probe's arrivals last this many SLO-bound request lifetimes
MIN_SPAN_S = 30.0
GROWTH_FACTOR = 1.5   # the last arrivals' time in system over the middle ones': queues are growing


SUB_GRID_STEPS = 4      # below a grid whose first step fails, look this many halvings further down
SUB_GRID_RELATIVE = 0.1  # ... and narrow a rate found there to this share of itself


def highest_passing_rate(ok, top: float, precision: float) -> float:
    """The highest rate on the grid of `precision` up to `top` where ok(rate) holds (0 if none).
    Where even the grid's first step fails, the search goes on below it, to a tenth of the rate
    it finds, so a placement that sustains a little is not priced at nothing (a colocated
    instance under a TPOT SLO its prefills break may still hold it at a trickle of arrivals)."""
    lo, hi = bisect_rate(ok, 0.0, top, precision, hi_fails=True)
    if lo > 0:
        return lo
    return bisect_rate(ok, 0.0, hi, hi / 2 ** SUB_GRID_STEPS, hi_fails=True, relative=SUB_GRID_RELATIVE)[0]


def probe_span_s(settings: Settings) -> float:
    """How long a probe's arrivals last: long against the time a request may spend in the system
    (its TTFT SLO plus its mean output at the TPOT SLO), so the drain after the last arrival is a
    small part of the run and only a sustainable rate passes."""
    if settings.span_s:
        return settings.span_s
    lifetime_ms = settings.ttft_ms + settings.lengths.mean()[1] * settings.tpot_ms
    return max(MIN_SPAN_S, SPAN_LIFETIMES * lifetime_ms / 1e3)


def probe_requests(settings: Settings, rate: float) -> int:
    """Requests of a probe at `rate` req/s (total): the span's worth, within [num_requests, max_requests]."""
    return int(min(settings.max_requests, max(settings.num_requests, math.ceil(rate * probe_span_s(settings)))))


def queues_grow(reqs: list[SimRequest]) -> bool:
    """True when the last tenth of the arrivals spend markedly longer per output token in the
    system than the middle fifth: the placement falls behind the arrivals (ignored under 100
    requests, where a tenth is noise)."""
    if len(reqs) < 100:
        return False
    order = sorted(reqs, key=lambda r: r.arrival)
    n = len(order)

    def per_token(chunk: list[SimRequest]) -> float:
        spent = [(r.finish - r.arrival) / max(1, r.output_len) for r in chunk]
        return math.inf if any(math.isnan(x) for x in spent) else sum(spent) / len(spent)

    middle, last = per_token(order[2 * n // 5:3 * n // 5]), per_token(order[9 * n // 10:])
    return last > GROWTH_FACTOR * middle


def goodput(run, settings: Settings, devices: int, ttft: float | None, tpot: float | None,
            capacity: float) -> Goodput:
    """Per-device goodput of `run(requests, slo, target) -> requests` (which may stop once the
    verdict is known) by bisection on the per-device rate over a grid of settings.precision (and
    below its first step where that fails: highest_passing_rate): the grid's top is the first
    power-of-two multiple of the precision at or above `capacity` (req/s for the whole unit,
    analytic), and any rate at or above the capacity fails unsimulated. Same grid for every
    candidate, so equal goodputs tie exactly."""
    cap = capacity / devices
    if not cap > 0:
        return Goodput(0.0, 0.0)
    seen: dict[float, list[SimRequest]] = {}

    def ok(rate: float) -> bool:
        if rate >= cap:
            return False
        total = rate * devices
        reqs = make_requests(probe_requests(settings, total), total, settings.lengths, settings.arrival,
                             settings.cv, settings.seed, settings.prefix)
        early_stop = (ttft, tpot) if settings.rule == "joint" else None
        seen[rate] = run(reqs, early_stop, settings.target)
        return attainment(seen[rate], ttft, tpot, settings.rule) >= settings.target and not queues_grow(seen[rate])

    top = settings.precision * 2 ** max(0, math.ceil(math.log2(cap / settings.precision)))
    lo = highest_passing_rate(ok, top, settings.precision)
    if lo <= 0:
        return Goodput(0.0, cap)
    done = [r for r in seen[lo] if not math.isnan(r.finish)]
    decoded = [r.tpot for r in done if r.output_len > 1]
    return Goodput(lo, cap, sum(decoded) / len(decoded) if decoded else 0.0)


def prefill_capacity(latency: LatencyModel, settings: Settings, inst: InstanceSpec) -> float:
    """Requests/s a prefill instance can process at best: batches filled to L_m (the a-term and
    the step's fixed cost shared by L_m / mean prompt requests; a prompt longer than L_m runs in
    chunks, each paying it), each prompt at the mean length (E[len^2] >= mean^2, so this is an
    upper bound; a cached prefix counts as not run), one batch per stage interval."""
    mean_in = settings.mean_prefill_tokens()
    per_batch = prefill_token_budget(settings.token_budget, latency, inst.tp) / mean_in
    fixed = latency.prefill_interval_ms([], inst.tp, inst.pp)
    per_request = latency.prefill_interval_ms([mean_in], inst.tp, inst.pp) - fixed
    return 1e3 / (fixed / per_batch + per_request)


def chunked_prefill_share_ms(latency: LatencyModel, settings: Settings, inst: InstanceSpec) -> float:
    """What a mean prompt adds to the steps of a chunked colocated instance at best: its chunks
    ride along decode steps, so it pays its prefill terms beyond the fixed cost, never the fixed
    cost itself (E[len^2] >= mean^2: a lower bound)."""
    mean_in = settings.mean_prefill_tokens()
    return latency.prefill_interval_ms([mean_in], inst.tp, inst.pp) - latency.prefill_interval_ms([], inst.tp, inst.pp)


def decode_capacity(latency: LatencyModel, settings: Settings, inst: InstanceSpec) -> float:
    """Requests/s a decode instance can finish at best: a batch held as full as its KV and
    max_decode_batch allow, every request at its shortest context, output_len - 1 steps each."""
    mean_in, mean_out = settings.lengths.mean()
    if mean_out <= 1:
        return math.inf
    batch_max = int(min(settings.max_decode_batch, inst.kv_tokens // (mean_in + mean_out)))
    best = max((b / latency.decode_ms(b, int(b * (mean_in + 1)), inst.tp, inst.pp)
                for b in range(1, batch_max + 1)), default=0.0)
    return best * 1e3 / (mean_out - 1)
