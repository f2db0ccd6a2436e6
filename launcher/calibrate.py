"""The profile against the machine the planner plans for (`plan`, `simulate`, `placement: auto`).

A profile records the machine it was measured on (launcher/machine.py). Where that is this kind of
machine, its timings stand. Where it is another, a short probe on this one (the calibration probe
`pdlaunch bench` runs: single requests of the shapes the profile timed alone, under a minute)
scales the profile's prefill and decode costs by the ratio measured; with calibration off
(`--no-calibrate`, planner.calibrate: false) the plan rests on the other machine's timings and says
so. A profile without a fingerprint (the shipped ones) is an unknown machine: a warning, no probe.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from launcher.config import JobConfig
from launcher.dtypes import planned_dtype
from launcher.hostfile import Host
from launcher.machine import differences, fingerprint
from launcher.planner.latency import LatencyModel
from launcher.planner.config_to_plan import latency_models


@dataclass
class MachineCheck:
    """How the profile relates to this machine: same, unknown (no fingerprint), other (not
    calibrated) or calibrated (factors applied), with one line for the user."""

    status: str
    note: str
    factors: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"status": self.status, "note": self.note} | ({"factors": self.factors} if self.factors else {})


def check_machine(models: list[LatencyModel], here: dict) -> tuple[str, str]:
    """(status, what differs) of the profiles against this machine's fingerprint."""
    for latency in models:
        recorded = latency.meta.get("fingerprint")
        if not recorded:
            return "unknown", f"the profile '{latency.source}' records no machine fingerprint"
        diff = differences(recorded, here)
        if diff:
            return "other", f"the profile '{latency.source}' was measured on another machine ({'; '.join(diff)})"
    return "same", ""


def planning_models(cfg: JobConfig, hosts: list[Host], probe=None) -> tuple[LatencyModel, LatencyModel, MachineCheck]:
    """The disaggregated and colocated latency models to plan with on this machine, and how they
    relate to it. probe(cfg, hosts, latency) -> {"prefill": x, "decode": y} measures the drift
    (default: run_probe, an engine job)."""
    from launcher.bench_calibration import scaled

    disagg, colo = latency_models(cfg)
    models = list({id(disagg): disagg, id(colo): colo}.values())
    status, what = check_machine(models, fingerprint(cfg.cluster.device, planned_dtype(cfg.model.dtype,
                                                                                      cfg.cluster.device)))
    if status == "same":
        return disagg, colo, MachineCheck("same", "the profile was measured on this kind of machine")
    if status == "unknown":
        return disagg, colo, MachineCheck("unknown", f"warning: {what}: the plan rests on timings of an unknown machine; "
                                                     "`pdlaunch profile CONFIG -o FILE` measures this one")
    if not cfg.planner.calibrate:
        return disagg, colo, MachineCheck("other", f"warning: {what}; the plan rests on that machine's timings "
                                                   "(calibration is off)")
    factors = (probe or run_probe)(cfg, hosts, disagg)
    disagg, colo = scaled(disagg, factors["prefill"], factors["decode"]), \
        (scaled(colo, factors["prefill"], factors["decode"]) if colo is not disagg else None)
    unseen = [phase for phase, n in factors.get("steps", {}).items() if n == 0]
    return disagg, colo or disagg, MachineCheck(
        "calibrated", f"{what}; calibrated by a probe on this machine: prefill at {factors['prefill']:.2f}x and "
                      f"decode at {factors['decode']:.2f}x the profile's timings" +
                      (f" (the probe saw no {' or '.join(unseen)} step of the profiled shapes: left unscaled; "
                       "the machine may be busy)" if unseen else ""), factors)


def run_probe(cfg: JobConfig, hosts: list[Host], latency: LatencyModel) -> dict:
    """The bench's calibration probe alone, on one TP1 instance: its drift factors."""
    import sys

    from launcher.bench_trace import build_trace, engine_lines
    from launcher.bench_calibration import calibration, probe_window
    from launcher.job_setup import check_hosts, model_dir_of, new_job, run_job
    from launcher.model_files import read_shape
    from launcher.plan import packed_plan
    from launcher.run_files import writable_run_dir
    from launcher.planner.config_to_plan import model_spec

    model_dir = model_dir_of(cfg)
    shape = read_shape(model_dir)
    plan = packed_plan([("colocated", 1, 1, 1)], hosts)
    check_hosts(cfg, plan)
    trace, segment = build_trace(cfg, plan, model_spec(cfg, shape), [], 1)
    run_dir = writable_run_dir(os.path.join(cfg.resolve(cfg.run_dir), "calibration"))
    inp, out, report = (os.path.join(run_dir, name) for name in ("probe.jsonl", "results.jsonl", "report.json"))
    with open(inp, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in engine_lines(trace, segment, shape.vocab_size, cfg.workload.seed))
    if os.path.exists(out):
        os.remove(out)
    print(f"pdlaunch: calibrating the profile on this machine ({len(trace)} probe requests, about "
          f"{trace[-1].arrival / 1e3 + 20:.0f} s) ...", file=sys.stderr)
    run_job(new_job(cfg, plan, model_dir, input=inp, output=out, quiet=True, report=report), run_dir,
            "the calibration probe")
    with open(report) as f:
        factors = calibration(cfg, plan, json.load(f), probe_window(out, trace, segment), latency)
    return {"prefill": round(factors["prefill"], 3), "decode": round(factors["decode"], 3), "steps": factors["steps"]}
