"""`pdlaunch plan`: config -> latency model + workload -> placement search -> plan file with hosts."""
from __future__ import annotations

import time

from launcher.config import JobConfig
from launcher.errors import UserError
from launcher.hostfile import Host
from launcher.dtypes import planned_dtype
from launcher.plan import InstancePlan, Plan
from launcher.planner.latency import KNOWN_MODELS, LatencyModel, ModelSpec, load_profile
from launcher.planner.goodput import Settings, probe_span_s
from launcher.planner.search import TIE_RULE, PlacementResult, algorithm1, algorithm2, colocated_best
from launcher.planner.replay import trace_lengths
from launcher.planner.simulator import InstanceSpec
from launcher.planner.workload import LengthDist


def model_spec(cfg: JobConfig, shape=None) -> ModelSpec:
    if cfg.planner.model:
        if cfg.planner.model not in KNOWN_MODELS:
            raise UserError(f"config: 'planner.model' {cfg.planner.model!r} is unknown; known: "
                            f"{', '.join(KNOWN_MODELS)} (or leave it out to plan model.path)")
        return KNOWN_MODELS[cfg.planner.model]
    dtype_bytes = 4 if planned_dtype(cfg.model.dtype, cfg.cluster.device) == "float32" else 2
    return ModelSpec("model", shape.num_layers, shape.hidden_size, shape.num_kv_heads, shape.head_dim,
                     shape.param_count(), dtype_bytes)


def settings_from(cfg: JobConfig) -> Settings:
    p = cfg.planner
    lengths = LengthDist(p.lengths, p.input_len, p.output_len, p.length_cv, max_len=cfg.model.max_model_len)
    if p.lengths == "uniform":
        lengths.low, lengths.high = (1, 1), (int(2 * p.input_len), int(2 * p.output_len))
    if p.lengths == "trace":
        if not p.trace:
            raise UserError("config: 'planner.lengths: trace' needs 'planner.trace' (a JSONL file)")
        lengths.pairs = trace_lengths(cfg.resolve(p.trace))
    step_budget = None if cfg.scheduler.step_token_budget == "auto" else cfg.scheduler.step_token_budget
    return Settings(cfg.slo.ttft_ms, cfg.slo.tpot_ms, cfg.slo.attainment, rule=p.rule, num_requests=p.num_requests,
                    lengths=lengths, arrival="gamma" if cfg.workload.arrival == "gamma" else "poisson",
                    cv=cfg.workload.cv, seed=cfg.workload.seed, precision=p.precision, span_s=p.span_s,
                    max_requests=p.max_requests, token_budget=cfg.scheduler.token_budget,
                    max_decode_batch=cfg.scheduler.max_decode_batch, memory_gb=p.memory_gb,
                    intra_node_gbps=cfg.cluster.intra_node_bandwidth_gbps,
                    inter_node_gbps=cfg.cluster.inter_node_bandwidth_gbps, model_transfer=p.include_transfer,
                    colocated_policy=cfg.scheduler.colocated_policy, step_token_budget=step_budget)


def profile_path(cfg: JobConfig, path: str) -> str:
    """A profile path from the config, with `{dtype}` standing for the dtype the job runs in: a
    profile predicts only the dtype it was measured in, and `model.dtype: auto` runs bf16 on some
    machines and fp32 on others, so a config can name one profile per dtype."""
    return cfg.resolve(path.replace("{dtype}", planned_dtype(cfg.model.dtype, cfg.cluster.device)))


def latency_models(cfg: JobConfig, check_dtype: bool = True) -> tuple[LatencyModel, LatencyModel]:
    """The profiles of the disaggregated and the colocated instances; with check_dtype, a profile
    measured in another dtype than the job runs in is an error (its predictions would be off)."""
    p = cfg.planner
    if not p.profile:
        raise UserError("config: 'planner.profile' is empty; run `pdlaunch profile CONFIG` or point it at "
                        "configs/profiles/distserve-profile-a100-80g.json")
    model = p.profile_model or p.model
    disagg = load_profile(profile_path(cfg, p.profile), model)
    colo = load_profile(profile_path(cfg, p.colocated_profile), model) if p.colocated_profile else disagg
    dtype = planned_dtype(cfg.model.dtype, cfg.cluster.device)
    for latency in {id(disagg): disagg, id(colo): colo}.values() if check_dtype else ():
        measured = latency.meta.get("dtype")
        if measured and measured != dtype:
            raise UserError(f"planner: the profile '{latency.source}' was measured in {measured} but the job runs in "
                            f"{dtype}; set model.dtype: {measured}, or profile again: `pdlaunch profile CONFIG -o FILE`")
    return disagg, colo


def to_plan(specs: list[tuple[str, InstanceSpec]], hosts: list[Host], gpus_per_node: int) -> Plan:
    """Instances with contiguous ranks; each rank on the host its instance's stage lives on."""
    instances, rank = [], 1
    for role, s in specs:
        hostnames = []
        for local in range(s.tp * s.pp):
            stage = local // s.tp
            node = s.node + stage * s.span // s.pp
            if node >= len(hosts):
                raise UserError(f"planner: the placement needs node {node + 1} but the hostfile has {len(hosts)}")
            hostnames.append(hosts[node].name)
        instances.append(InstancePlan(len(instances), role, s.tp, s.pp, rank, hostnames))
        rank += s.tp * s.pp
    return Plan(instances, hosts[0].name)


def run_planner(cfg: JobConfig, hosts: list[Host], shape=None) -> tuple[Plan, PlacementResult, dict]:
    started = time.time()
    gpus = cfg.planner.gpus_per_node or max(h.slots for h in hosts)
    nodes = len(hosts)
    spec = model_spec(cfg, shape)
    settings = settings_from(cfg)
    disagg, colo = latency_models(cfg)
    search = algorithm2 if cfg.planner.affinity == "low" else algorithm1
    try:
        result = search(disagg, spec, settings, nodes, gpus, cfg.planner.target_rate)
        baseline = colocated_best(colo, spec, settings, gpus, nodes * gpus)
    except ValueError as e:
        raise UserError(f"planner: {e}") from None
    result.colocated = baseline
    plan = to_plan([("prefill", s) for s in result.prefill] + [("decode", s) for s in result.decode], hosts, gpus)
    predicted = {
        "algorithm": "2 (low node-affinity)" if result.affinity == "low" else "1 (high node-affinity)",
        "layout": result.layout, "per_device_goodput": round(result.per_device_goodput, 4),
        "capacity_per_device": round(result.capacity_per_device, 4),
        "devices": result.devices, "goodput_req_s": round(result.per_device_goodput * result.devices, 4),
        "colocated": {"tp": baseline.tp, "pp": baseline.pp, "per_device_goodput": round(baseline.per_device, 4),
                      "policy": settings.colocated_policy} if baseline else None,
        "slo": {"ttft_ms": settings.ttft_ms, "tpot_ms": settings.tpot_ms, "attainment": settings.target,
                "rule": settings.rule},
        "probe_span_s": round(probe_span_s(settings), 1), "tie_rule": TIE_RULE,
        "planning_s": round(time.time() - started, 2),
    }
    plan.predicted = predicted
    return plan, result, predicted


def print_report(result: PlacementResult, predicted: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"candidates (Algorithm {predicted['algorithm']}), best first; {TIE_RULE}")
    for col in ("role", "TP", "PP", "devices", "goodput req/s", "per device", "capacity req/s", "mean TPOT ms"):
        table.add_column(col, justify="right" if col not in ("role",) else "left")
    for c in sorted(result.candidates, key=lambda c: (c.role, -c.per_device, c.devices, c.mean_tpot_ms)):
        table.add_row(c.label or c.role, str(c.tp), str(c.pp), str(c.devices), f"{c.goodput:.2f}", f"{c.per_device:.3f}",
                      f"{c.capacity:.2f}", f"{c.mean_tpot_ms:.1f}" if c.goodput else "-")
    console.print(table)
    console.print(f"goodput = the highest rate sustained over {predicted['probe_span_s']:g} s of arrivals, "
                  "below each layout's analytic capacity" + (
                      f"; {result.bounded_out} more layouts not simulated: their capacity is below the best goodput"
                      if result.bounded_out else ""))
    col = predicted["colocated"]
    ratio = predicted["per_device_goodput"] / col["per_device_goodput"] if col and col["per_device_goodput"] else float("inf")
    console.print(f"[bold]chosen:[/] {predicted['layout']} on {predicted['devices']} devices: "
                  f"{predicted['per_device_goodput']:.3f} req/s per device (simulated end to end)")
    if col:
        console.print(f"[bold]colocated baseline ({col['policy']}):[/] TP{col['tp']} x PP{col['pp']}: "
                      f"{col['per_device_goodput']:.3f} req/s per device; disaggregated / colocated = {ratio:.2f}x")
    console.print(f"planned in {predicted['planning_s']:.2f} s")
