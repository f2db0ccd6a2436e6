"""`pdlaunch bench`: checks the options, runs one engine job per system over every rate (and, with
--compare-colocated, both colocated policies on as many devices), prints and plots. The machinery:
launcher/bench.py."""
from __future__ import annotations

import math
import os

from contracts.config import load_config
from contracts.errors import UserError
from contracts.plan import packed_plan
from launcher.bench import engine_runner, run_bench
from launcher.bench_report import print_bench
from launcher.job_setup import build_plan, check_hosts, cluster_hosts, model_dir_of
from launcher.model_files import read_shape
from launcher.planner.config_to_plan import model_spec


def _rates(text: str, option: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise UserError(f"bench: {option} must be numbers separated by commas, got {text!r}") from None
    if not all(math.isfinite(r) for r in rates):
        raise UserError(f"bench: {option} must be finite request rates, got {text!r}")
    if min(rates) <= 0:
        raise UserError(f"bench: {option} must be positive request rates, got {text!r}")
    return rates


def bench(args) -> int:
    """`pdlaunch bench`: validates the options, runs one engine job per system, prints and plots."""
    cfg = load_config(args.config)
    hosts = cluster_hosts(cfg)
    model_dir = model_dir_of(cfg)
    shape = read_shape(model_dir)
    rates = _rates(args.rates, "--rates")
    if args.requests < 1:
        raise UserError(f"bench: --requests must be >= 1, got {args.requests}")
    if not 0 < args.bisect_to < 1:
        raise UserError(f"bench: --bisect-to must be a share of the rate in (0, 1), e.g. 0.1; got {args.bisect_to:g}")
    if args.bisect < 0:
        raise UserError(f"bench: --bisect must be 0 or a positive number of engine runs, got {args.bisect}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UserError(f"bench: --time-budget must be a positive number of minutes, got {args.time_budget:g}")
    plan = build_plan(cfg, hosts, model_dir)
    main_system = f"colocated-{cfg.scheduler.colocated_policy}" if plan.by_role("colocated") else "disaggregated"
    systems = {main_system: plan}
    check_hosts(cfg, plan)
    per_system = {main_system: rates}
    if args.compare_colocated and plan.by_role("colocated"):
        raise UserError("bench: --compare-colocated compares a disaggregated placement with a colocated one, and "
                        "the config's placement is colocated; set placement.mode: disaggregated (or a plan file)")
    if args.compare_colocated:  # both colocated policies, on one TP1 instance per device
        devices = sum(i.size for i in next(iter(systems.values())).instances)
        colocated_rates = _rates(args.colocated_rates, "--colocated-rates") if args.colocated_rates else rates
        for system in ("colocated-chunked", "colocated-prefill_first"):
            systems.setdefault(system, packed_plan([("colocated", devices, 1, 1)], hosts))
            per_system.setdefault(system, colocated_rates)
    out_dir = os.path.abspath(args.output)
    result = run_bench(cfg, systems, per_system, args.requests, shape.vocab_size, model_spec(cfg, shape),
                       engine_runner(cfg, model_dir, out_dir),
                       out_dir, args.quiet, args.bisect, math.inf if args.time_budget is None else args.time_budget * 60,
                       args.bisect_to)
    if not args.quiet:
        print_bench(result)
        print(f"wrote {out_dir}/bench.json and attainment.png")
    return 0
