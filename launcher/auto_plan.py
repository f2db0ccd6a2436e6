"""`placement: mode: auto`: the job is planned when it starts — profile + hostfile + SLOs -> the
planner's choice of architecture and layout -> the plan the ranks run. The choice goes to stderr
in one line and into the plan (and so report.json) with both modes' figures."""
from __future__ import annotations

import sys

from contracts.config import JobConfig
from contracts.hostfile import Host
from contracts.plan import Plan


def plan_at_launch(cfg: JobConfig, hosts: list[Host], shape) -> Plan:
    from launcher.calibrate import planning_models
    from launcher.planner.config_to_plan import choice_line, run_planner

    models = planning_models(cfg, hosts)
    plan, _, predicted = run_planner(cfg, hosts, None if cfg.planner.model else shape, models=models)
    predicted["planned_at_launch"] = True
    print(choice_line(predicted), file=sys.stderr)
    if models[2].status != "same":
        print(f"pdlaunch: {models[2].note}", file=sys.stderr)
    return plan
