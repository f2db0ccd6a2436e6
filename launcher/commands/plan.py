"""`pdlaunch plan` (the placement search, DistServe's Algorithm 1/2) and `pdlaunch simulate` (the
planner's simulator replaying a trace on a placement). No processes, no torch."""
from __future__ import annotations

import json
import os
import sys

from contracts.config import load_config
from contracts.errors import UserError
from contracts.plan import check_layouts, plan_from_config, read_plan, write_plan
from launcher.calibrate import planning_models
from launcher.job_setup import cluster_hosts, model_dir_of
from launcher.model_files import read_shape
from launcher.planner.config_to_plan import model_spec, print_report, run_planner
from launcher.planner.replay import check_trace, print_replay, replay_report, simulate_plan, trace_requests


def plan(args) -> int:
    cfg = load_config(args.config)
    hosts = cluster_hosts(cfg)
    shape = None
    if not cfg.planner.model:
        shape = read_shape(model_dir_of(cfg))
    if args.no_calibrate:
        cfg.planner.calibrate = False
    models = planning_models(cfg, hosts)
    plan, choice, predicted = run_planner(cfg, hosts, shape, args.mode, models)
    if shape is not None:
        check_layouts(plan, shape, hosts, key="plan")
    write_plan(plan, args.output)
    if not args.quiet:
        print_report(choice, predicted)
        print(f"wrote {args.output}")
    return 0


def simulate(args) -> int:
    cfg = load_config(args.config)
    try:
        scales = [float(x) for x in args.slo_scales.split(",")]
    except ValueError:
        raise UserError(f"simulate: --slo-scales must be numbers separated by commas, got {args.slo_scales!r}") from None
    if not scales or min(scales) <= 0:
        raise UserError("simulate: --slo-scales must be positive")
    reqs = trace_requests(os.path.abspath(args.trace))
    if args.plan:
        cfg.placement.plan = os.path.abspath(args.plan)
    hosts = cluster_hosts(cfg)
    shape = None if cfg.planner.model else read_shape(model_dir_of(cfg))
    if args.no_calibrate:
        cfg.planner.calibrate = False
    disagg, colo, machine = planning_models(cfg, hosts)
    if machine.status != "same" and not args.quiet:
        print(f"pdlaunch: {machine.note}", file=sys.stderr)
    if cfg.placement.plan:
        plan = read_plan(cfg.resolve(cfg.placement.plan))
    elif cfg.placement.mode == "auto":  # the placement the job would be planned with at launch
        plan = run_planner(cfg, hosts, shape, models=(disagg, colo, machine))[0]
    else:
        plan = plan_from_config(cfg, hosts)
    if shape is not None:
        check_layouts(plan, shape, hosts, key="plan")
    check_trace(reqs, cfg, plan, model_spec(cfg, shape))
    latency = colo if plan.by_role("colocated") else disagg
    simulated = simulate_plan(cfg, plan, model_spec(cfg, shape), latency, reqs, cfg.planner.include_transfer)
    report = replay_report(simulated, cfg.slo.ttft_ms, cfg.slo.tpot_ms, scales)
    report["placement"] = [f"{i.role} tp{i.tp} pp{i.pp}" for i in plan.instances]
    report["trace"] = os.path.abspath(args.trace)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    if not args.quiet:
        devices = sum(i.size for i in plan.instances)
        span_s = max(r.arrival for r in reqs) / 1e3
        print_replay(report, f"{len(reqs)} requests over {span_s:.1f} s on {len(plan.instances)} instances "
                             f"({devices} devices): SLO attainment")
        if args.output:
            print(f"wrote {args.output}")
    return 0
