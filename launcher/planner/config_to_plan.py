"""The planner from a job config (`pdlaunch plan`, `placement: auto`): config -> latency model +
workload -> placement search -> plan with hosts."""
from __future__ import annotations

import time
from dataclasses import replace

from contracts.config import JobConfig
from contracts.errors import UserError
from contracts.hostfile import Host
from contracts.plan import InstancePlan, Plan
from launcher.dtypes import planned_dtype
from launcher.planner.goodput import Settings, probe_span_s
from launcher.planner.latency import KNOWN_MODELS, LatencyModel, ModelSpec, load_profile
from launcher.planner.modes import MODES, ModeChoice, choose_mode
from launcher.planner.replay import trace_lengths
from launcher.planner.search import (TIE_RULE, PlacementResult, algorithm1, algorithm2, colocated_goodput,
                                     colocated_placement)
from launcher.planner.simulator import InstanceSpec
from launcher.planner.workload import LengthDist, SharedPrefix


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
                    colocated_policy=cfg.scheduler.colocated_policy, step_token_budget=step_budget,
                    prefix=shared_prefix(cfg), prefix_caching=cfg.scheduler.prefix_caching)


def workload_prefix(cfg: JobConfig) -> SharedPrefix | None:
    """The workload's shared prefix (planner.shared_prefix), cached or not: the prompts a bench
    sends begin with it either way."""
    p = cfg.planner
    if not (p.shared_prefix and p.shared_prefix_share):
        return None
    return SharedPrefix(p.shared_prefix, p.shared_prefix_share, cfg.scheduler.block_size)


def shared_prefix(cfg: JobConfig) -> SharedPrefix | None:
    """The planner's shared prefix where the engine caches it (prefix caching on), else None."""
    return workload_prefix(cfg) if cfg.scheduler.prefix_caching else None


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
        instances.append(InstancePlan(len(instances), role, s.tp, s.pp, rank, hostnames, s.step_token_budget))
        rank += s.tp * s.pp
    return Plan(instances, hosts[0].name)


def _figures(result: PlacementResult) -> dict:
    return {"layout": result.layout, "devices": result.devices,
            "per_device_goodput": round(result.per_device_goodput, 4),
            "capacity_per_device": round(result.capacity_per_device, 4),
            "mean_tpot_ms": round(result.mean_tpot_ms, 1)}


def search_modes(disagg: LatencyModel, colo: LatencyModel, spec: ModelSpec, settings: Settings, affinity: str,
                 nodes: int, gpus: int, target_rate: float, mode: str = "auto") -> ModeChoice:
    """Both architectures' best placements (Algorithm 1 or 2 for disaggregated, the colocated
    search on the colocated profile) and the choice between them; a mode none of whose layouts
    meets the SLOs is recorded with the reason, and only fails the search when it was requested
    or both fail."""
    if mode not in MODES:
        raise UserError(f"plan: --mode must be one of {', '.join(MODES)}, got {mode!r}")
    search = algorithm2 if affinity == "low" else algorithm1
    found, errors = {}, {}
    for name, run in (("disaggregated", lambda: search(disagg, spec, settings, nodes, gpus, target_rate)),
                      ("colocated", lambda: colocated_placement(colo, spec, settings, nodes, gpus, target_rate))):
        try:
            found[name] = run()
        except ValueError as e:
            found[name], errors[name] = None, str(e)
    try:
        return choose_mode(found["disaggregated"], found["colocated"], mode, errors)
    except ValueError as e:
        raise UserError(f"planner: {e}") from None


def run_planner(cfg: JobConfig, hosts: list[Host], shape=None, mode: str | None = None,
                models=None) -> tuple[Plan, ModeChoice, dict]:
    """Plans the job: both modes searched, the chosen one's plan (mode: auto, disaggregated or
    colocated; default planner.mode) with both modes' figures and the reason in plan.predicted.
    models: (disaggregated, colocated latency model, launcher.calibrate.MachineCheck) from
    planning_models; default: the config's profiles as they are, unchecked."""
    started = time.time()
    gpus = cfg.planner.gpus_per_node or max(h.slots for h in hosts)
    nodes = len(hosts)
    spec = model_spec(cfg, shape)
    settings = settings_from(cfg)
    disagg, colo, machine = models or (*latency_models(cfg), None)
    choice = search_modes(disagg, colo, spec, settings, cfg.planner.affinity, nodes, gpus, cfg.planner.target_rate,
                          mode or cfg.planner.mode)
    result = choice.chosen
    specs = [("prefill", s) for s in result.prefill] + [("decode", s) for s in result.decode] + \
        [("colocated", s) for s in result.colocated]
    plan = to_plan(specs, hosts, gpus)
    modes = {m: _figures(r) if r is not None and r.per_device_goodput > 0 else {"error": choice.errors[m]}
             for m, r in choice.placements.items()}
    predicted = {
        "mode": choice.mode, "reason": choice.reason, "modes": modes,
        "algorithm": "colocated search" if choice.mode == "colocated" else
        "2 (low node-affinity)" if result.affinity == "low" else "1 (high node-affinity)",
        "layout": result.layout, "per_device_goodput": round(result.per_device_goodput, 4),
        "capacity_per_device": round(result.capacity_per_device, 4),
        "devices": result.devices, "goodput_req_s": round(result.per_device_goodput * result.devices, 4),
        "colocated": dict(modes["colocated"], policy=settings.colocated_policy) if "error" not in modes["colocated"] else None,
        "slo": {"ttft_ms": settings.ttft_ms, "tpot_ms": settings.tpot_ms, "attainment": settings.target,
                "rule": settings.rule},
        "probe_span_s": round(probe_span_s(settings), 1), "tie_rule": TIE_RULE,
        "planning_s": round(time.time() - started, 2),
    }
    if settings.colocated_policy == "chunked" and choice.placements["colocated"] is not None:
        predicted["colocated_prefill_first"] = prefill_first_record(colo, spec, settings, choice.placements["colocated"])
    if machine is not None:
        predicted["machine"] = machine.to_dict()
    plan.predicted = predicted
    return plan, choice, predicted


def prefill_first_record(colo: LatencyModel, spec: ModelSpec, settings: Settings, chosen) -> dict:
    """For the record: the colocated placement's instances under prefill-first (whole prefills
    between decode steps, vLLM before 0.6), the baseline DistServe compared against; never chosen."""
    weak = [replace(i, step_token_budget=None) for i in chosen.colocated]
    g = colocated_goodput(colo, spec, replace(settings, colocated_policy="prefill_first"), weak)
    return {"layout": f"{len(weak)} x C(tp{weak[0].tp},pp{weak[0].pp})", "per_device_goodput": round(g.rate, 4),
            "capacity_per_device": round(g.capacity, 4), "mean_tpot_ms": round(g.mean_tpot_ms, 1)}


def choice_line(predicted: dict) -> str:
    """The planner's decision in one line: what it chose and why."""
    return (f"planner: {predicted['mode']} {predicted['layout']} on {predicted['devices']} devices, "
            f"{predicted['per_device_goodput']:.3g} req/s per device simulated; {predicted['reason']}")


def print_report(choice: ModeChoice, predicted: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"candidates of both modes, best first per role; {TIE_RULE}")
    for col in ("role", "TP", "PP", "devices", "goodput req/s", "per device", "capacity req/s", "mean TPOT ms"):
        table.add_column(col, justify="right" if col not in ("role",) else "left")
    cands = [c for r in choice.placements.values() if r is not None for c in r.candidates]
    for c in sorted(cands, key=lambda c: (c.role, -c.per_device, c.devices, c.mean_tpot_ms)):
        table.add_row(c.label or c.role, str(c.tp), str(c.pp), str(c.devices), f"{c.goodput:.2f}", f"{c.per_device:.3f}",
                      f"{c.capacity:.2f}", f"{c.mean_tpot_ms:.1f}" if c.goodput else "-")
    console.print(table)
    bounded = sum(r.bounded_out for r in choice.placements.values() if r is not None)
    console.print(f"goodput = the highest rate sustained over {predicted['probe_span_s']:g} s of arrivals, "
                  "below each layout's analytic capacity" + (
                      f"; {bounded} more layouts not simulated: their capacity is below the best goodput"
                      if bounded else ""))
    for mode, fig in predicted["modes"].items():
        mark = "[bold]chosen:[/]" if mode == predicted["mode"] else "not chosen:"
        console.print(f"{mark} {mode}, " + (fig["error"] if "error" in fig else
                      f"{fig['layout']} on {fig['devices']} devices: {fig['per_device_goodput']:.3f} req/s per device "
                      f"(simulated end to end), mean TPOT {fig['mean_tpot_ms']:.0f} ms"))
    weak = predicted.get("colocated_prefill_first")
    if weak:
        console.print("for the record, colocated with prefill-first (whole prefills between decode steps, DistServe's "
                      "baseline): " + (weak["error"] if "error" in weak else
                                       f"{weak['layout']}: {weak['per_device_goodput']:.3f} req/s per device"))
    console.print(f"[bold]why:[/] {predicted['reason']}")
    if "machine" in predicted:
        console.print(f"[bold]machine:[/] {predicted['machine']['note']}")
    console.print(f"planned in {predicted['planning_s']:.2f} s")
