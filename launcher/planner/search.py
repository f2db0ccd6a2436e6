"""Goodput search and DistServe's placement algorithms.

goodput = the highest per-device request rate the placement *sustains*: >= target of requests
meet the SLOs over an arrival span long against a request's lifetime (so a burst that fits in
memory at once cannot pass), and its queues do not grow. Bisection on a grid of `precision`
(req/s/device), bounded above by the placement's analytic capacity: a rate at or above what the
phases can process at all fails without simulation, so no search returns its own ceiling.
- Algorithm 1 (high node-affinity): each phase alone — prefill against TTFT, decode against TPOT —
  over every (TP, PP) the cluster allows; keep each phase's best per-device goodput; replicate.
- Algorithm 2 (low node-affinity): prefill stage i and decode stage i share a node, so KV moves
  over the intra-node link; enumerate inter-node PP and the per-node segments; simulate the pair.
- Colocated baseline: one instance type doing both phases, joint SLO.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from launcher.planner.latency import LatencyModel, ModelSpec, kv_capacity_tokens
from launcher.planner.simulator import (InstanceSpec, LengthDist, Policy, Simulation, SimRequest, attainment,
                                        make_requests)

UNLIMITED = 10 ** 12


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
    token_budget: int = 512
    max_decode_batch: int = 256
    memory_gb: float = 80.0
    intra_node_gbps: float = 300.0
    inter_node_gbps: float = 3.125
    model_transfer: bool = True    # DistServe's search ignores KV transfer; we include it unless told


@dataclass
class Goodput:
    """A bisection's outcome, per device: the sustained rate, the analytic capacity that bounded
    the search, and the mean latencies at that rate (0 when no rate passes)."""

    rate: float
    capacity: float
    mean_ttft_ms: float = 0.0
    mean_tpot_ms: float = 0.0


@dataclass
class Candidate:
    role: str
    tp: int
    pp: int
    goodput: float                 # req/s for the whole unit
    devices: int
    label: str = ""
    capacity: float = math.inf     # analytic bound of the unit, req/s
    mean_tpot_ms: float = 0.0      # at its goodput: the second tie-breaker

    @property
    def per_device(self) -> float:
        return self.goodput / self.devices if self.devices else 0.0


@dataclass
class PlacementResult:
    affinity: str
    prefill: list[InstanceSpec]
    decode: list[InstanceSpec]
    per_device_goodput: float       # simulated end to end, joint SLO
    devices: int
    candidates: list[Candidate]
    colocated: Candidate | None = None
    layout: str = ""
    capacity_per_device: float = math.inf
    bounded_out: int = 0            # layouts not simulated: their capacity is below the best goodput found


class _PrefillOnly(LatencyModel):
    """Decode-phase goodput: requests reach decode already prefilled."""

    def __init__(self, base: LatencyModel):
        super().__init__(base.model, base.by_tp, base.source, base.pipelined_pp, base.meta)

    def prefill_ms(self, lens, tp, pp=1):
        return 0.0

    def prefill_interval_ms(self, lens, tp, pp=1):
        return 0.0


def bisect_rate(ok, lo: float, hi: float, precision: float, hi_fails: bool = False,
                max_probes: int = 64, ceiling: float = math.inf) -> tuple[float, float]:
    """Bracket the highest rate where ok(rate) holds, given that it holds at lo (or lo is 0): while
    no rate has failed, probe hi and double it (up to `ceiling`); then halve [lo, hi] until it is
    narrower than `precision` or `max_probes` probes are spent. Returns (lo, hi), hi = inf if
    nothing failed."""
    for _ in range(max_probes):
        if (hi_fails and hi - lo <= precision) or (not hi_fails and hi > ceiling):
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
    verdict is known) by bisection on the per-device rate over a
    grid of settings.precision: the grid's top is the first power-of-two multiple of the precision
    at or above `capacity` (req/s for the whole unit, analytic), and any rate at or above the
    capacity fails unsimulated. Same grid for every candidate, so equal goodputs tie exactly."""
    cap = capacity / devices
    if not cap > 0:
        return Goodput(0.0, 0.0)
    seen: dict[float, list[SimRequest]] = {}

    def ok(rate: float) -> bool:
        if rate >= cap:
            return False
        total = rate * devices
        reqs = make_requests(probe_requests(settings, total), total, settings.lengths, settings.arrival,
                             settings.cv, settings.seed)
        early_stop = (ttft, tpot) if settings.rule == "joint" else None
        seen[rate] = run(reqs, early_stop, settings.target)
        return attainment(seen[rate], ttft, tpot, settings.rule) >= settings.target and not queues_grow(seen[rate])

    top = settings.precision * 2 ** max(0, math.ceil(math.log2(cap / settings.precision)))
    lo = bisect_rate(ok, 0.0, top, settings.precision, hi_fails=True)[0]
    if lo <= 0:
        return Goodput(0.0, cap)
    done = [r for r in seen[lo] if not math.isnan(r.finish)]
    decoded = [r.tpot for r in done if r.output_len > 1]
    return Goodput(lo, cap, sum(r.ttft for r in done) / len(done), sum(decoded) / len(decoded) if decoded else 0.0)


def prefill_capacity(latency: LatencyModel, settings: Settings, inst: InstanceSpec) -> float:
    """Requests/s a prefill instance can process at best: batches filled to L_m (the a-term and
    the step's fixed cost shared by L_m / mean prompt requests), each prompt at the mean length
    (E[len^2] >= mean^2, so this is an upper bound), one batch per stage interval."""
    mean_in = settings.lengths.mean()[0]
    per_batch = max(1.0, settings.token_budget / mean_in)
    fixed = latency.prefill_interval_ms([], inst.tp, inst.pp)
    per_request = latency.prefill_interval_ms([mean_in], inst.tp, inst.pp) - fixed
    return 1e3 / (fixed / per_batch + per_request)


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


def _policy(settings: Settings, spec: ModelSpec, bandwidth) -> Policy:
    return Policy(settings.token_budget, settings.max_decode_batch,
                  spec.kv_bytes_per_token() if settings.model_transfer else 0, bandwidth)


def _layouts(latency: LatencyModel, spec: ModelSpec, max_tp: int, max_devices: int) -> list[tuple[int, int]]:
    out = []
    for tp in latency.tp_degrees():
        if tp > max_tp:
            continue
        for pp in range(1, max_devices // tp + 1):
            if spec.num_layers % pp == 0 and pp <= 8:
                out.append((tp, pp))
    return out


def _instance(spec: ModelSpec, settings: Settings, tp: int, pp: int, node: int = 0) -> InstanceSpec | None:
    cap = kv_capacity_tokens(spec, settings.memory_gb, tp, pp)
    return InstanceSpec(tp, pp, cap, node) if cap > 0 else None


def phase_candidates(latency: LatencyModel, spec: ModelSpec, settings: Settings, gpus_per_node: int,
                     total_gpus: int) -> list[Candidate]:
    """Algorithm 1's inner loop: every (TP, PP) of each phase, simulated alone."""
    out = []
    big = InstanceSpec(1, 1, UNLIMITED)
    for tp, pp in _layouts(latency, spec, gpus_per_node, total_gpus):
        inst = _instance(spec, settings, tp, pp)
        if inst is None:
            continue
        policy = _policy(settings, spec, lambda p, d: float("inf"))

        def run_prefill(reqs: list[SimRequest], slo, target):
            for r in reqs:
                r.output_len = 1
            return Simulation(latency, policy, [inst], [big]).run(reqs, slo, target)

        cap = prefill_capacity(latency, settings, inst)
        out.append(_candidate("prefill", inst, goodput(run_prefill, settings, tp * pp, settings.ttft_ms, None, cap), cap))
        free = _PrefillOnly(latency)
        cap = decode_capacity(latency, settings, inst)
        g = goodput(lambda reqs, *stop: Simulation(free, policy, [InstanceSpec(1, 1, UNLIMITED)], [inst]).run(reqs, *stop),
                    settings, tp * pp, None, settings.tpot_ms, cap)
        out.append(_candidate("decode", inst, g, cap))
    return out


def _candidate(role: str, inst: InstanceSpec, g: Goodput, capacity: float) -> Candidate:
    devices = inst.tp * inst.pp
    return Candidate(role, inst.tp, inst.pp, g.rate * devices, devices, capacity=capacity, mean_tpot_ms=g.mean_tpot_ms)


def rank_key(per_device: float, devices: int, mean_tpot_ms: float) -> tuple:
    """The order candidates are chosen in: highest goodput per device; ties (goodputs sit on one
    grid of planner.precision) go to fewer devices, then to the lower mean TPOT."""
    return per_device, -devices, -mean_tpot_ms


TIE_RULE = "ties: fewer devices, then lower mean TPOT"


def _best(cands: list[Candidate], role: str) -> Candidate:
    pool = [c for c in cands if c.role == role and c.goodput > 0]
    if not pool:
        raise ValueError(f"no {role} layout meets the SLOs at any rate; loosen the SLOs or add devices")
    return max(pool, key=lambda c: rank_key(c.per_device, c.devices, c.mean_tpot_ms))


def replicate(p: Candidate, d: Candidate, total_gpus: int, target_rate: float) -> tuple[int, int, float]:
    """Instance counts and the rate they sustain: enough for target_rate, else the best split of
    total_gpus (rate 0 when not even one of each fits)."""
    if target_rate > 0:
        n_p, n_d = max(1, math.ceil(target_rate / p.goodput)), max(1, math.ceil(target_rate / d.goodput))
        return n_p, n_d, min(n_p * p.goodput, n_d * d.goodput)
    best = (0, 0, 0.0)
    for n_p in range(1, total_gpus // p.devices + 1):
        n_d = (total_gpus - n_p * p.devices) // d.devices
        if n_d < 1:
            break
        rate = min(n_p * p.goodput, n_d * d.goodput)
        if rate > best[2]:
            best = (n_p, n_d, rate)
    return best


def choose_phases(cands: list[Candidate], total_gpus: int, target_rate: float) -> tuple[Candidate, Candidate, int, int]:
    """With a target rate: each phase's best per-device layout (Algorithm 1). With a device budget:
    the pair of layouts whose best split of the budget sustains the highest rate (ties as rank_key)."""
    if target_rate > 0:
        p, d = _best(cands, "prefill"), _best(cands, "decode")
        n_p, n_d, _ = replicate(p, d, total_gpus, target_rate)
        return p, d, n_p, n_d
    _best(cands, "prefill"), _best(cands, "decode")  # a clear error when a phase has no layout
    options = [(replicate(p, d, total_gpus, 0), p, d) for p in cands if p.role == "prefill" and p.goodput > 0
               for d in cands if d.role == "decode" and d.goodput > 0]
    (n_p, n_d, rate), p, d = max(options, key=lambda o: rank_key(
        o[0][2], o[0][0] * o[1].devices + o[0][1] * o[2].devices, o[2].mean_tpot_ms))
    if rate <= 0:
        raise ValueError(f"no prefill + decode pair fits in {total_gpus} devices; add devices")
    return p, d, n_p, n_d


def placement_capacity(latency: LatencyModel, settings: Settings, prefill: list[InstanceSpec],
                       decode: list[InstanceSpec]) -> float:
    """req/s a placement can process at best: the slower phase's summed instance capacities."""
    return min(sum(prefill_capacity(latency, settings, i) for i in prefill),
               sum(decode_capacity(latency, settings, i) for i in decode))


def simulate_placement(latency: LatencyModel, spec: ModelSpec, settings: Settings, prefill: list[InstanceSpec],
                       decode: list[InstanceSpec]) -> Goodput:
    """Per-device goodput of a whole placement, end to end, joint SLO, transfer times included."""
    devices = sum(i.tp * i.pp for i in prefill + decode)

    def bandwidth(p: InstanceSpec, d: InstanceSpec) -> float:
        return settings.intra_node_gbps if p.node == d.node else settings.inter_node_gbps

    policy = _policy(settings, spec, bandwidth)
    return goodput(lambda reqs, *stop: Simulation(latency, policy, prefill, decode).run(reqs, *stop), settings, devices,
                   settings.ttft_ms, settings.tpot_ms, placement_capacity(latency, settings, prefill, decode))


def colocated_capacity(latency: LatencyModel, settings: Settings, inst: InstanceSpec) -> float:
    """A colocated instance time-shares both phases: per request, its prefill share plus its decode share."""
    return 1.0 / (1.0 / prefill_capacity(latency, settings, inst) + 1.0 / decode_capacity(latency, settings, inst))


def colocated_best(latency: LatencyModel, spec: ModelSpec, settings: Settings, gpus_per_node: int,
                   total_gpus: int) -> Candidate:
    best = None
    policy = _policy(settings, spec, lambda p, d: float("inf"))
    for tp, pp in _layouts(latency, spec, gpus_per_node, total_gpus):
        inst = _instance(spec, settings, tp, pp)
        if inst is None:
            continue
        cap = colocated_capacity(latency, settings, inst)
        g = goodput(lambda reqs, *stop: Simulation(latency, policy, colocated=[inst]).run(reqs, *stop), settings, tp * pp,
                    settings.ttft_ms, settings.tpot_ms, cap)
        cand = _candidate("colocated", inst, g, cap)
        if best is None or rank_key(cand.per_device, cand.devices, cand.mean_tpot_ms) > \
                rank_key(best.per_device, best.devices, best.mean_tpot_ms):
            best = cand
    return best


def algorithm1(latency: LatencyModel, spec: ModelSpec, settings: Settings, nodes: int, gpus_per_node: int,
               target_rate: float = 0.0) -> PlacementResult:
    total = nodes * gpus_per_node
    cands = phase_candidates(latency, spec, settings, gpus_per_node, total)
    p, d, n_p, n_d = choose_phases(cands, total, target_rate)
    prefill = [InstanceSpec(p.tp, p.pp, kv_capacity_tokens(spec, settings.memory_gb, p.tp, p.pp)) for _ in range(n_p)]
    decode = [InstanceSpec(d.tp, d.pp, kv_capacity_tokens(spec, settings.memory_gb, d.tp, d.pp)) for _ in range(n_d)]
    _assign_nodes(prefill + decode, nodes, gpus_per_node)
    g = simulate_placement(latency, spec, settings, prefill, decode)
    return PlacementResult("high", prefill, decode, g.rate, sum(i.tp * i.pp for i in prefill + decode), cands,
                           layout=f"{n_p} x P(tp{p.tp},pp{p.pp}) + {n_d} x D(tp{d.tp},pp{d.pp})",
                           capacity_per_device=g.capacity)


def _assign_nodes(instances: list[InstanceSpec], nodes: int, gpus_per_node: int) -> None:
    """First fit: an instance stays inside one node when it fits in one."""
    free = [gpus_per_node] * max(nodes, 1)
    for inst in instances:
        size = inst.tp * inst.pp
        node = next((n for n in range(len(free)) if free[n] >= size), None)
        if node is None:
            node = max(range(len(free)), key=lambda n: free[n])
        inst.node, inst.span = node, max(1, math.ceil(size / gpus_per_node))
        free[node] -= min(size, free[node])


def algorithm2(latency: LatencyModel, spec: ModelSpec, settings: Settings, nodes: int, gpus_per_node: int,
               target_rate: float = 0.0) -> PlacementResult:
    """Low node-affinity: segments of one prefill + one decode instance share each node. Pairs are
    simulated in order of their analytic capacity per device; a pair whose capacity is at or below
    the best goodput found so far cannot beat it (goodput < capacity) and is not simulated."""
    pairs = []
    tps = [t for t in latency.tp_degrees() if t <= gpus_per_node]
    for inter in range(1, nodes + 1):
        if spec.num_layers % inter:
            continue
        for p_tp in tps:
            for d_tp in tps:
                for p_intra in range(1, gpus_per_node // p_tp + 1):
                    for d_intra in range(1, (gpus_per_node - p_tp * p_intra) // d_tp + 1):
                        p_pp, d_pp = inter * p_intra, inter * d_intra
                        if spec.num_layers % p_pp or spec.num_layers % d_pp or max(p_intra, d_intra) > 2:
                            continue
                        p = _instance(spec, settings, p_tp, p_pp)
                        d = _instance(spec, settings, d_tp, d_pp)
                        if p is None or d is None:
                            continue
                        devices = p_tp * p_pp + d_tp * d_pp
                        cap = placement_capacity(latency, settings, [p], [d]) / devices
                        pairs.append((cap, devices, (inter, p_tp, p_pp, d_tp, d_pp), p, d))
    cands: list[Candidate] = []
    shapes: dict[int, tuple] = {}
    best_rate = 0.0
    for cap, devices, shape, p, d in sorted(pairs, key=lambda x: -x[0]):
        if cap <= best_rate:
            break
        g = simulate_placement(latency, spec, settings, [p], [d])
        best_rate = max(best_rate, g.rate)
        inter, p_tp, p_pp, d_tp, d_pp = shape
        shapes[len(cands)] = shape
        cands.append(Candidate("pair", p_tp, p_pp, g.rate * devices, devices,
                               f"{inter} node(s): P tp{p_tp} pp{p_pp} + D tp{d_tp} pp{d_pp}",
                               g.capacity * devices, g.mean_tpot_ms))
    if not cands:
        raise ValueError("no low-affinity layout fits the model in the cluster's memory")
    best = max(range(len(cands)), key=lambda i: rank_key(cands[i].per_device, cands[i].devices, cands[i].mean_tpot_ms))
    if cands[best].goodput <= 0:
        raise ValueError("no low-affinity layout meets the SLOs at any rate; loosen the SLOs or add devices")
    g = cands[best].per_device
    inter, p_tp, p_pp, d_tp, d_pp = shapes[best]
    seg = p_tp * (p_pp // inter) + d_tp * (d_pp // inter)
    unit_devices = seg * inter
    units_max = (nodes // inter) * (gpus_per_node // seg)
    units = min(units_max, max(1, math.ceil(target_rate / (g * unit_devices)))) if target_rate > 0 else units_max
    prefill, decode = [], []
    for u in range(units):
        node = (u // (gpus_per_node // seg)) * inter  # first node of this unit's stage group
        prefill.append(InstanceSpec(p_tp, p_pp, kv_capacity_tokens(spec, settings.memory_gb, p_tp, p_pp), node, inter))
        decode.append(InstanceSpec(d_tp, d_pp, kv_capacity_tokens(spec, settings.memory_gb, d_tp, d_pp), node, inter))
    return PlacementResult("low", prefill, decode, g, units * unit_devices, cands,
                           layout=f"{units} x [P(tp{p_tp},pp{p_pp}) + D(tp{d_tp},pp{d_pp})], {inter} node(s) per unit",
                           capacity_per_device=cands[best].capacity / unit_devices,
                           bounded_out=len(pairs) - len(cands))
