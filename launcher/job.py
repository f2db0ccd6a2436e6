"""The job file: the only contract between the launcher and the ranks.

The launcher writes RUN_DIR/job.json once; every rank reads it back into the same typed JobFile
(the validated JobConfig, the Plan, the paths), so the engine never reads untyped keys.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

from launcher.config import JobConfig, config_from_dict
from launcher.plan import Plan, plan_from_dict
from launcher.planner.latency import prefill_token_budget

MODES = ("generate", "profile", "serve")


@dataclass
class JobFile:
    config: JobConfig
    plan: Plan
    model_dir: str                  # the HF directory the ranks load
    mode: str = "generate"          # generate: the input file; serve: the HTTP API; profile: time steps of fixed shapes
    input: str = ""                 # the run directory's copy of the requests
    output: str = ""                # results JSONL (serve: the request log), appended to
    report: str = ""                # report.json: summary, per-instance stats, step timings
    quiet: bool = False
    log_interval: float = 10.0      # seconds between progress lines (unless quiet)
    skip_ids: tuple[str, ...] = ()  # custom_ids whose results --resume keeps
    model_hash: str = ""            # the model's identity, written with each result (launcher.answer_key)
    pending_requests: int = 0
    dump_logits: Optional[str] = None  # directory for every generated token's logits
    profile_samples: Optional[str] = None  # profile mode: where the controller writes the timings
    drain_file: Optional[str] = None  # serve mode: the launcher creates it to drain the server
    token_budgets: tuple[int, ...] = ()  # L_m of each instance (plan order); empty: resolved from the config

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"job file: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.token_budgets:
            self.token_budgets = instance_token_budgets(self.config, self.plan)
        if len(self.token_budgets) != len(self.plan.instances):
            raise ValueError(f"job file: {len(self.token_budgets)} token budgets for {len(self.plan.instances)} instances")

    def write(self, path: str) -> None:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["config"] = dataclasses.asdict(self.config)
        data["plan"] = self.plan.to_dict()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds serve.api_key: the user's only
        os.fchmod(fd, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def read(cls, path: str) -> "JobFile":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data["config"] = config_from_dict(data["config"])
        data["plan"] = plan_from_dict(data["plan"])
        data["skip_ids"] = tuple(data.get("skip_ids") or ())
        data["token_budgets"] = tuple(data.get("token_budgets") or ())
        return cls(**data)


def instance_token_budgets(cfg: JobConfig, plan: Plan) -> tuple[int, ...]:
    """Each instance's L_m: `scheduler.prefill_token_budget` when a number; auto: the planner
    profile's for the instance's TP degree (the colocated profile for colocated instances), the
    same value the simulator uses. A chunked colocated instance's budget is per step:
    `scheduler.step_token_budget` when a number, else the one its plan gives (the planner's
    pick), else its L_m."""
    s = cfg.scheduler
    configured = s.token_budget
    if configured is not None or not cfg.planner.profile:
        disagg = colo = None
    else:
        from launcher.planner.planning import latency_models

        disagg, colo = latency_models(cfg, check_dtype=False)
    configured_step = s.step_token_budget if s.step_token_budget != "auto" else None

    def step_budget(inst) -> int | None:
        if inst.role != "colocated" or s.colocated_policy != "chunked":
            return None
        return configured_step or inst.step_token_budget

    return tuple(step_budget(inst) or prefill_token_budget(configured, colo if inst.role == "colocated" else disagg, inst.tp)
                 for inst in plan.instances)
