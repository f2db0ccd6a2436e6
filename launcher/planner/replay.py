"""`pdlaunch simulate`: replay an explicit workload on a placement with the planner's simulator.

A trace is either DistServe's workload form, a JSON list (or JSONL) of {"start_time": s,
"prompt_len", "output_len"} (optionally "cached_len": prompt tokens a prefix cache serves), or a
pdlaunch results file (its usage, arrival times and measured prefix-cache hits), so a run's own
workload can be asked "would it have met the SLOs on another placement?". Arrival times are
kept exactly (shifted so the first request arrives at 0); with scheduler.prefix_caching off the
cached tokens are prefilled like the rest. The simulator sees the same policies and
KV capacities the engine would run with: the scheduler's blocks, or for a planned model
(planner.model) the memory left beside its weights.
"""
from __future__ import annotations

import json
import math
import statistics

from contracts.config import JobConfig
from contracts.errors import UserError, read_text
from contracts.plan import Plan
from launcher.planner.latency import LatencyModel, ModelSpec, kv_capacity_tokens
from launcher.planner.simulator import InstanceSpec, Policy, Simulation
from launcher.planner.workload import SimRequest
from launcher.stats import percentile

DEFAULT_SLO_SCALES = (0.4, 0.6, 0.8, 1.0, 1.2)


def _trace_record(obj, where: str) -> tuple[float | None, int, int, int]:
    """(start time in s or None, prompt tokens, output tokens, cached prompt tokens) of one trace
    record; a start time must be a finite number of seconds >= 0."""
    record = _lengths_and_start(obj, where)
    start = record[0]
    if start is not None and (not isinstance(start, (int, float)) or isinstance(start, bool)
                              or not math.isfinite(start) or start < 0):
        raise UserError(f"trace: {where} has start_time {start!r}; it must be a finite number of seconds >= 0")
    return record


def _lengths_and_start(obj, where: str) -> tuple[float | None, int, int, int]:
    if not isinstance(obj, dict):
        raise UserError(f"trace: {where} is not an object")
    try:
        if "prompt_len" in obj:
            return float(obj["start_time"]), int(obj["prompt_len"]), int(obj["output_len"]), \
                int(obj.get("cached_len", 0))
        if "input_len" in obj:
            return obj.get("start_time"), int(obj["input_len"]), int(obj["output_len"]), int(obj.get("cached_len", 0))
        usage = obj.get("usage") or ((obj.get("response") or {}).get("body") or {}).get("usage")
        if usage:
            metrics = obj.get("metrics") or {}
            arrival = metrics.get("arrival")
            return (None if arrival is None else float(arrival)), int(usage["prompt_tokens"]), \
                int(usage["completion_tokens"]), int(metrics.get("cached_tokens", 0))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise UserError(f"trace: {where} has a missing or non-numeric field ({e})") from None
    raise UserError(f"trace: {where} needs start_time, prompt_len and output_len (DistServe's form) or a "
                    "pdlaunch results record with usage")


def read_trace(path: str) -> list[tuple[float | None, int, int]]:
    """Records of a trace file: a JSON list, or one JSON object per line. Error records of a
    results file (no usage) are skipped; anything else unreadable is an error naming the line."""
    text = read_text(path, f"trace: '{path}' not found; pass a JSON list of {{start_time, prompt_len, output_len}} "
                           "or a pdlaunch results file", f"trace: '{path}' is not a UTF-8 text file")
    records = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"trace: '{path}' is not valid JSON (line {e.lineno}: {e.msg})") from None
        records = [_trace_record(obj, f"'{path}' item {n}") for n, obj in enumerate(items)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"trace: '{path}' line {n} is not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and "error" in obj and not obj.get("usage") and "prompt_len" not in obj:
                continue  # a request that failed in the run: no lengths to replay
            records.append(_trace_record(obj, f"'{path}' line {n}"))
    if not records:
        raise UserError(f"trace: '{path}' has no requests")
    bad = next((r for r in records if r[1] < 1 or r[2] < 1), None)
    if bad:
        raise UserError(f"trace: '{path}' has a request with prompt_len {bad[1]} and output_len {bad[2]}; "
                        "both must be >= 1")
    bad = next((r for r in records if not 0 <= r[3] < r[1]), None)
    if bad:
        raise UserError(f"trace: '{path}' has a request with cached_len {bad[3]} of prompt_len {bad[1]}; it must be "
                        ">= 0 and below the prompt (its last token always runs)")
    return records


def trace_requests(path: str) -> list[SimRequest]:
    """Simulator requests at the trace's arrival times (ms from the first arrival)."""
    records = read_trace(path)
    if any(start is None for start, *_ in records):
        raise UserError(f"trace: '{path}' lacks arrival times (start_time, or metrics.arrival in a results "
                        "file); use it for lengths (planner.lengths: trace) instead")
    first = min(start for start, *_ in records)
    return sorted((SimRequest((start - first) * 1e3, prompt, output, cached_len=cached)
                   for start, prompt, output, cached in records),
                  key=lambda r: r.arrival)  # a trace in any order is replayed in arrival order


def check_trace(reqs: list[SimRequest], cfg: JobConfig, plan: Plan, spec: ModelSpec) -> None:
    """Like generate's checks of its input: every request fits model.max_model_len and the KV cache
    of an instance that would run it (one that fits none could never run: the engine answers it
    with an error record); this also bounds the simulation's work."""
    instances = placement_instances(cfg, plan, spec)

    def total(r: SimRequest) -> int:
        return r.input_len + r.output_len

    limits = [("model.max_model_len", cfg.model.max_model_len, total)]
    if instances["colocated"]:
        limits.append(("any colocated instance's KV cache", max(i.kv_tokens for i in instances["colocated"]), total))
    else:
        limits += [("any prefill instance's KV cache", max(i.kv_tokens for i in instances["prefill"]),
                    lambda r: r.input_len),
                   ("any decode instance's KV cache", max(i.kv_tokens for i in instances["decode"]), total)]
    for what, capacity, need in limits:
        over = [r for r in reqs if need(r) > capacity]
        if over:
            raise UserError(f"trace: {len(over)} request(s) need more tokens than {what} holds ({capacity}), e.g. "
                            f"prompt_len {over[0].input_len} + output_len {over[0].output_len}; drop them from the "
                            "trace or raise that limit")


def trace_lengths(path: str) -> list[tuple[int, int]]:
    """(prompt, output) lengths of a trace, for planner.lengths: trace."""
    return [(prompt, output) for _, prompt, output, _ in read_trace(path)]


def placement_instances(cfg: JobConfig, plan: Plan, spec: ModelSpec) -> dict[str, list[InstanceSpec]]:
    """The simulator's instances of a plan, by role: layouts, KV capacity in tokens, first node and
    the nodes they span (hosts in the plan's order of first use)."""
    nodes = list(dict.fromkeys(h for inst in plan.instances for h in inst.hosts))
    s = cfg.scheduler
    out: dict[str, list[InstanceSpec]] = {"prefill": [], "decode": [], "colocated": []}
    for inst in plan.instances:
        if cfg.planner.model:
            kv = kv_capacity_tokens(spec, cfg.planner.memory_gb, inst.tp, inst.pp)
        else:
            kv = (s.prefill_kv_blocks if inst.role == "prefill" else s.decode_kv_blocks) * s.block_size
        out[inst.role].append(InstanceSpec(inst.tp, inst.pp, kv, nodes.index(inst.hosts[0]), len(set(inst.hosts)),
                                           inst.step_token_budget))
    return out


def simulate_plan(cfg: JobConfig, plan: Plan, spec: ModelSpec, latency: LatencyModel, reqs: list[SimRequest],
                  with_transfer: bool = True, cold_cache: bool = False) -> list[SimRequest]:
    """Fresh copies of `reqs` through the plan's instances with the engine's policies (cold_cache:
    see Simulation: a drawn trace replayed as a whole job)."""
    c = cfg.cluster

    def bandwidth(p: InstanceSpec, d: InstanceSpec) -> float:
        return c.intra_node_bandwidth_gbps if p.node == d.node else c.inter_node_bandwidth_gbps

    s = cfg.scheduler
    policy = Policy(s.token_budget, s.max_decode_batch, spec.kv_bytes_per_token() if with_transfer else 0, bandwidth,
                    s.colocated_policy, None if s.step_token_budget == "auto" else s.step_token_budget, s.prefix_caching)
    fresh = [SimRequest(r.arrival, r.input_len, r.output_len, cached_len=r.cached_len if s.prefix_caching else 0)
             for r in reqs]
    instances = placement_instances(cfg, plan, spec)
    if instances["colocated"]:
        sim = Simulation(latency, policy, colocated=instances["colocated"], cold_cache=cold_cache)
    else:
        sim = Simulation(latency, policy, instances["prefill"], instances["decode"], cold_cache=cold_cache)
    return sim.run(fresh)


def _ms(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def replay_report(reqs: list[SimRequest], ttft_ms: float, tpot_ms: float, scales=DEFAULT_SLO_SCALES) -> dict:
    """Per request (input order) timings and, per SLO scale, the share meeting TTFT, TPOT and both;
    a request that never finished meets neither."""
    done = [r for r in reqs if not math.isnan(r.finish)]
    attainment = {}
    for k in scales:
        ttft_ok = [not math.isnan(r.finish) and r.ttft <= ttft_ms * k for r in reqs]
        tpot_ok = [not math.isnan(r.finish) and r.tpot <= tpot_ms * k for r in reqs]
        attainment[f"{k:g}"] = {"ttft": sum(ttft_ok) / len(reqs), "tpot": sum(tpot_ok) / len(reqs),
                                "both": sum(a and b for a, b in zip(ttft_ok, tpot_ok)) / len(reqs)}
    ttft = [r.ttft for r in done]
    tpot = [r.tpot for r in done if r.output_len > 1]
    return {
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
        "num_requests": len(reqs), "unfinished": len(reqs) - len(done),
        "ttft_ms": {"mean": statistics.fmean(ttft) if ttft else 0.0, "p90": percentile(ttft, 0.9)},
        "tpot_ms": {"mean": statistics.fmean(tpot) if tpot else 0.0, "p90": percentile(tpot, 0.9)},
        "attainment": attainment,
        "requests": [{"arrival_ms": round(r.arrival, 3), "prompt_len": r.input_len, "output_len": r.output_len,
                      "cached_len": r.cached_len,
                      "ttft_ms": _ms(r.ttft), "tpot_ms": _ms(r.tpot) if r.output_len > 1 else 0.0,
                      "queue_ms": _ms(r.queue_ms), "transfer_ms": _ms(r.transfer_ms),
                      "prefill_instance": r.prefill_instance, "decode_instance": r.decode_instance}
                     for r in reqs],
    }


def print_replay(report: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("SLO scale", "TTFT <=", "TPOT <=", "TTFT met", "TPOT met", "both met"):
        table.add_column(col, justify="right")
    slo = report["slo"]
    for k, a in report["attainment"].items():
        table.add_row(k, f"{slo['ttft_ms'] * float(k):.0f} ms", f"{slo['tpot_ms'] * float(k):.0f} ms",
                      f"{a['ttft']:.1%}", f"{a['tpot']:.1%}", f"{a['both']:.1%}")
    console = Console()
    console.print(table)
    console.print(f"{report['num_requests']} requests ({report['unfinished']} never finished): TTFT mean "
                  f"{report['ttft_ms']['mean']:.1f} ms, p90 {report['ttft_ms']['p90']:.1f} ms; TPOT mean "
                  f"{report['tpot_ms']['mean']:.1f} ms, p90 {report['tpot_ms']['p90']:.1f} ms")
