"""DistServe's placement algorithms over layouts, ranked by sustained goodput (planner/goodput.py).

- Algorithm 1 (high node-affinity): each phase alone — prefill against TTFT, decode against TPOT —
  over every (TP, PP) the cluster allows; keep each phase's best per-device goodput; replicate.
- Algorithm 2 (low node-affinity): prefill stage i and decode stage i share a node, so KV moves
  over the intra-node link; enumerate inter-node PP and the per-node segments; simulate the pair.
- Colocated: one instance type doing both phases, joint SLO; its best layout replicated over the
  same devices and simulated end to end, like a disaggregated placement.
The choice between the two modes is launcher/planner/modes.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from launcher.planner.latency import LatencyModel, ModelSpec, kv_capacity_tokens, prefill_token_budget
from launcher.planner.goodput import (Goodput, NoPrefillLatency, Settings, chunked_prefill_share_ms, decode_capacity,
                                      goodput, prefill_capacity)
from launcher.planner.simulator import InstanceSpec, Policy, Simulation
from launcher.planner.workload import SimRequest

UNLIMITED = 10 ** 12


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
    step_token_budget: int | None = None  # chunked colocated: the step budget it was simulated with

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
    layout: str = ""
    capacity_per_device: float = math.inf
    bounded_out: int = 0            # layouts not simulated: their capacity is below the best goodput found
    colocated: list[InstanceSpec] = field(default_factory=list)  # the instances of a colocated placement
    mean_tpot_ms: float = 0.0       # at its goodput: the tie-breaker between modes


def _policy(settings: Settings, spec: ModelSpec, bandwidth) -> Policy:
    return Policy(settings.token_budget, settings.max_decode_batch,
                  spec.kv_bytes_per_token() if settings.model_transfer else 0, bandwidth,
                  settings.colocated_policy, settings.step_token_budget, settings.prefix_caching)


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
        free = NoPrefillLatency(latency)
        cap = decode_capacity(latency, settings, inst)
        g = goodput(lambda reqs, *stop: Simulation(free, policy, [InstanceSpec(1, 1, UNLIMITED)], [inst]).run(reqs, *stop),
                    settings, tp * pp, None, settings.tpot_ms, cap)
        out.append(_candidate("decode", inst, g, cap))
    return out


def _candidate(role: str, inst: InstanceSpec, g: Goodput, capacity: float) -> Candidate:
    devices = inst.tp * inst.pp
    return Candidate(role, inst.tp, inst.pp, g.rate * devices, devices, capacity=capacity, mean_tpot_ms=g.mean_tpot_ms,
                     step_token_budget=inst.step_token_budget,
                     label=f"{role} ({inst.step_token_budget} per step)" if inst.step_token_budget else "")


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
    """A colocated instance time-shares both phases: per request, its prefill share plus its decode
    share; chunked, its prompt rides along decode steps and pays no step's fixed cost of its own."""
    prefill_share = 1e-3 * chunked_prefill_share_ms(latency, settings, inst) if settings.colocated_policy == "chunked" \
        else 1.0 / prefill_capacity(latency, settings, inst)
    return 1.0 / (prefill_share + 1.0 / decode_capacity(latency, settings, inst))


def step_budgets(latency: LatencyModel, settings: Settings, tp: int) -> list[int | None]:
    """The per-step token budgets a chunked colocated instance is tried with: the configured one,
    else the powers of two above max_decode_batch (a full decode batch must leave room for a chunk)
    up to twice L_m, and L_m itself: small budgets bound the stall a prompt puts on running decodes
    (TPOT), large ones pay each step's fixed cost over more prompt tokens (TTFT and throughput)."""
    if settings.colocated_policy != "chunked" or settings.step_token_budget is not None:
        return [settings.step_token_budget]
    lm = prefill_token_budget(settings.token_budget, latency, tp)
    budgets = {2 ** k for k in range(1, 20) if settings.max_decode_batch < 2 ** k <= 2 * lm} | {lm}
    return sorted(b for b in budgets if b > settings.max_decode_batch) or [None]


def colocated_candidates(latency: LatencyModel, spec: ModelSpec, settings: Settings, gpus_per_node: int,
                         total_gpus: int) -> list[Candidate]:
    """Every (TP, PP) of a colocated instance, simulated alone against the joint SLO at its L_m
    (chunked: as its step budget); then the best layout again with each other step budget."""
    policy = _policy(settings, spec, lambda p, d: float("inf"))

    def simulate(inst: InstanceSpec, budget: int | None) -> Candidate:
        inst = replace(inst, step_token_budget=budget)
        cap = colocated_capacity(latency, settings, inst)
        g = goodput(lambda reqs, *stop: Simulation(latency, policy, colocated=[inst]).run(reqs, *stop), settings,
                    inst.tp * inst.pp, settings.ttft_ms, settings.tpot_ms, cap)
        return _candidate("colocated", inst, g, cap)

    def first_budget(tp: int) -> int | None:
        budgets = step_budgets(latency, settings, tp)
        lm = prefill_token_budget(settings.token_budget, latency, tp)
        return lm if lm in budgets else budgets[-1]

    layouts = [inst for tp, pp in _layouts(latency, spec, gpus_per_node, total_gpus)
               if (inst := _instance(spec, settings, tp, pp)) is not None]
    out = [simulate(inst, first_budget(inst.tp)) for inst in layouts]
    if out:
        best = max(range(len(out)), key=lambda i: rank_key(out[i].per_device, out[i].devices, out[i].mean_tpot_ms))
        out += [simulate(layouts[best], b) for b in step_budgets(latency, settings, layouts[best].tp)
                if b != out[best].step_token_budget]
    return out


def colocated_goodput(latency: LatencyModel, spec: ModelSpec, settings: Settings,
                      instances: list[InstanceSpec]) -> Goodput:
    """Per-device goodput of colocated instances, simulated end to end together."""
    policy = _policy(settings, spec, lambda p, d: float("inf"))
    devices = sum(i.tp * i.pp for i in instances)
    return goodput(lambda reqs, *stop: Simulation(latency, policy, colocated=instances).run(reqs, *stop), settings,
                   devices, settings.ttft_ms, settings.tpot_ms,
                   sum(colocated_capacity(latency, settings, i) for i in instances))


def colocated_placement(latency: LatencyModel, spec: ModelSpec, settings: Settings, nodes: int, gpus_per_node: int,
                        target_rate: float = 0.0) -> PlacementResult:
    """The colocated counterpart of algorithm1: the best per-device instance layout, replicated
    for the target rate (else over every device), simulated end to end."""
    total = nodes * gpus_per_node
    cands = colocated_candidates(latency, spec, settings, gpus_per_node, total)
    best = _best(cands, "colocated")
    count = max(1, math.ceil(target_rate / best.goodput)) if target_rate > 0 else max(1, total // best.devices)
    instances = [InstanceSpec(best.tp, best.pp, kv_capacity_tokens(spec, settings.memory_gb, best.tp, best.pp),
                              step_token_budget=best.step_token_budget) for _ in range(count)]
    _assign_nodes(instances, nodes, gpus_per_node)
    g = Goodput(best.per_device, best.capacity / best.devices, mean_tpot_ms=best.mean_tpot_ms) if count == 1 else \
        colocated_goodput(latency, spec, settings, instances)
    return PlacementResult("colocated", [], [], g.rate, count * best.devices, cands,
                           layout=f"{count} x C(tp{best.tp},pp{best.pp})" + (
                               f", {best.step_token_budget} tokens per step" if best.step_token_budget else ""), capacity_per_device=g.capacity,
                           colocated=instances, mean_tpot_ms=g.mean_tpot_ms)


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
                           capacity_per_device=g.capacity, mean_tpot_ms=g.mean_tpot_ms)


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
                           bounded_out=len(pairs) - len(cands), mean_tpot_ms=cands[best].mean_tpot_ms)
