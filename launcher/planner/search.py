"""Goodput search and DistServe's placement algorithms.

goodput = the highest per-device request rate at which >= target of requests meet the SLOs,
found by bisection on the rate until the bracket is narrower than `precision` (req/s/device).
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
    num_requests: int = 300
    lengths: LengthDist = field(default_factory=LengthDist)
    arrival: str = "poisson"
    cv: float = 1.0
    seed: int = 0
    precision: float = 0.25
    max_rate: float = 0.0          # per device; 0 = find by doubling
    token_budget: int = 512
    max_decode_batch: int = 256
    memory_gb: float = 80.0
    intra_node_gbps: float = 300.0
    inter_node_gbps: float = 3.125
    model_transfer: bool = True    # DistServe's search ignores KV transfer; we include it unless told


@dataclass
class Candidate:
    role: str
    tp: int
    pp: int
    goodput: float                 # req/s for the whole unit
    devices: int
    label: str = ""

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


def goodput(run, settings: Settings, devices: int, ttft: float | None, tpot: float | None) -> float:
    """Per-device goodput of `run(requests) -> requests` by bisection on the per-device rate."""
    def ok(rate: float) -> bool:
        reqs = make_requests(settings.num_requests, rate * devices, settings.lengths, settings.arrival,
                             settings.cv, settings.seed)
        return attainment(run(reqs), ttft, tpot, settings.rule) >= settings.target

    if settings.max_rate:
        return bisect_rate(ok, 0.0, settings.max_rate, settings.precision, hi_fails=True)[0]
    return bisect_rate(ok, 0.0, settings.precision * 4, settings.precision, ceiling=1e6)[0]


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

        def run_prefill(reqs: list[SimRequest]):
            for r in reqs:
                r.output_len = 1
            return Simulation(latency, policy, [inst], [big]).run(reqs)

        g = goodput(run_prefill, settings, tp * pp, settings.ttft_ms, None)
        out.append(Candidate("prefill", tp, pp, g * tp * pp, tp * pp))
        free = _PrefillOnly(latency)
        g = goodput(lambda reqs: Simulation(free, policy, [InstanceSpec(1, 1, UNLIMITED)], [inst]).run(reqs),
                    settings, tp * pp, None, settings.tpot_ms)
        out.append(Candidate("decode", tp, pp, g * tp * pp, tp * pp))
    return out


def _best(cands: list[Candidate], role: str) -> Candidate:
    pool = [c for c in cands if c.role == role and c.goodput > 0]
    if not pool:
        raise ValueError(f"no {role} layout meets the SLOs at any rate; loosen the SLOs or add devices")
    return max(pool, key=lambda c: (c.per_device, -c.devices))


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
    the pair of layouts whose best split of the budget sustains the highest rate."""
    if target_rate > 0:
        p, d = _best(cands, "prefill"), _best(cands, "decode")
        n_p, n_d, _ = replicate(p, d, total_gpus, target_rate)
        return p, d, n_p, n_d
    _best(cands, "prefill"), _best(cands, "decode")  # a clear error when a phase has no layout
    options = [(replicate(p, d, total_gpus, 0), p, d) for p in cands if p.role == "prefill" and p.goodput > 0
               for d in cands if d.role == "decode" and d.goodput > 0]
    (n_p, n_d, rate), p, d = max(options, key=lambda o: (o[0][2], -(o[0][0] * o[1].devices + o[0][1] * o[2].devices)))
    if rate <= 0:
        raise ValueError(f"no prefill + decode pair fits in {total_gpus} devices; add devices")
    return p, d, n_p, n_d


def simulate_placement(latency: LatencyModel, spec: ModelSpec, settings: Settings, prefill: list[InstanceSpec],
                       decode: list[InstanceSpec]) -> float:
    """Per-device goodput of a whole placement, end to end, joint SLO, transfer times included."""
    devices = sum(i.tp * i.pp for i in prefill + decode)

    def bandwidth(p: InstanceSpec, d: InstanceSpec) -> float:
        return settings.intra_node_gbps if p.node == d.node else settings.inter_node_gbps

    policy = _policy(settings, spec, bandwidth)
    return goodput(lambda reqs: Simulation(latency, policy, prefill, decode).run(reqs), settings, devices,
                   settings.ttft_ms, settings.tpot_ms)


def colocated_best(latency: LatencyModel, spec: ModelSpec, settings: Settings, gpus_per_node: int,
                   total_gpus: int) -> Candidate:
    best = None
    policy = _policy(settings, spec, lambda p, d: float("inf"))
    for tp, pp in _layouts(latency, spec, gpus_per_node, total_gpus):
        inst = _instance(spec, settings, tp, pp)
        if inst is None:
            continue
        g = goodput(lambda reqs: Simulation(latency, policy, colocated=[inst]).run(reqs), settings, tp * pp,
                    settings.ttft_ms, settings.tpot_ms)
        cand = Candidate("colocated", tp, pp, g * tp * pp, tp * pp)
        if best is None or cand.per_device > best.per_device:
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
    return PlacementResult("high", prefill, decode, g, sum(i.tp * i.pp for i in prefill + decode), cands,
                           layout=f"{n_p} x P(tp{p.tp},pp{p.pp}) + {n_d} x D(tp{d.tp},pp{d.pp})")


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
    """Low node-affinity: segments of one prefill + one decode instance share each node."""
    cands: list[Candidate] = []
    shapes: dict[int, tuple] = {}
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
                        g = simulate_placement(latency, spec, settings, [p], [d])
                        shapes[len(cands)] = (inter, p_tp, p_pp, d_tp, d_pp)
                        cands.append(Candidate("pair", p_tp, p_pp, g * devices, devices,
                                               f"{inter} node(s): P tp{p_tp} pp{p_pp} + D tp{d_tp} pp{d_pp}"))
    if not cands:
        raise ValueError("no low-affinity layout fits the model in the cluster's memory")
    best = max(range(len(cands)), key=lambda i: cands[i].per_device)
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
                           layout=f"{units} x [P(tp{p_tp},pp{p_pp}) + D(tp{d_tp},pp{d_pp})], {inter} node(s) per unit")
