"""The job file: what every rank of a job is told.

The launcher writes RUN_DIR/job.json once; every rank reads it back into the same typed JobFile
(the validated JobConfig, the Plan, the paths: the checked requests among them), so the engine never
reads untyped keys.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

from contracts.config import JobConfig, config_from_dict
from contracts.plan import Plan, plan_from_dict

MODES = ("generate", "profile", "serve")


@dataclass
class JobFile:
    config: JobConfig
    plan: Plan
    model_dir: str                  # the HF directory the ranks load
    token_budgets: tuple[int, ...]  # L_m of each instance, in plan order (worked out in launcher/job_setup.py)
    mode: str = "generate"          # generate: the checked requests; serve: the HTTP API; profile: time steps of fixed shapes
    requests: str = ""              # the launcher's checked requests still to run (contracts/batch_io.write_checked)
    output: str = ""                # results JSONL (serve: the request log), appended to
    report: str = ""                # report.json: summary, per-instance stats, step timings
    quiet: bool = False
    log_interval: float = 10.0      # seconds between progress lines (unless quiet)
    model_hash: str = ""            # the model's identity, written with each result (contracts.answer_key)
    pending_requests: int = 0
    dump_logits: Optional[str] = None  # directory for every generated token's logits
    profile_samples: Optional[str] = None  # profile mode: where the controller writes the timings
    drain_file: Optional[str] = None  # serve mode: the launcher creates it to drain the server

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"job file: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
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
        data["token_budgets"] = tuple(data.get("token_budgets") or ())
        return cls(**data)
