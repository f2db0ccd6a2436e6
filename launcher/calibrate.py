"""The profile against the machine the planner plans for (`plan`, `simulate`, `placement: auto`).

A profile records the machine it was measured on (launcher/machine.py). Where that is this kind of
machine, its timings stand. Where it is another, or the profile does not say (a profile without a
fingerprint), a short probe on this one (the calibration probe `pdlaunch bench` runs: single
requests of the shapes the profile timed alone, under a minute) scales the profile's prefill and
decode costs by the ratio measured. The factors are kept for a day per (profile, machine) in
pdlaunch's cache (model_files.cache_dir: $PDLAUNCH_CACHE, else ~/.cache/pdlaunch), so only the
first plan on a new kind of machine pays the probe. With calibration off (`--no-calibrate`, planner.calibrate: false,
and every dry run) the plan rests on the profile's timings as they are and says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from contracts.config import JobConfig
from contracts.hostfile import Host
from launcher.dtypes import planned_dtype
from launcher.machine import differences, fingerprint, gpus
from launcher.model_files import cache_dir
from launcher.network import LOCAL_NAMES
from launcher.planner.config_to_plan import latency_models
from launcher.planner.latency import LatencyModel


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


CACHE_MAX_AGE_S = 24 * 3600  # a day: these shared machines drift 10-35 % within the hour, not by 2x


def factors_cache_path(models: list[LatencyModel], here: dict) -> str:
    """Where the probe's factors for these profiles on this kind of machine are kept."""
    digest = hashlib.sha256(json.dumps(here, sort_keys=True).encode())
    for latency in models:
        digest.update(latency.model.encode())
        with open(latency.source, "rb") as f:
            digest.update(f.read())
    return os.path.join(cache_dir(), "calibration", f"{digest.hexdigest()[:16]}.json")


def cached_factors(path: str) -> dict | None:
    """Factors a probe measured here within CACHE_MAX_AGE_S, else None."""
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
        return entry if time.time() - entry["measured_at"] < CACHE_MAX_AGE_S else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep_factors(path: str, factors: dict) -> None:
    """Best effort: a cache that cannot be written costs the next plan a probe, nothing else."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(dict(factors, measured_at=time.time()), f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


def measures_the_cluster(cfg: JobConfig, hosts: list[Host]) -> bool:
    """Whether a probe here measures the machines planned for: this machine is one of the hosts
    (a plan for another cluster, such as the paper's A100 nodes, cannot be calibrated here) and
    has the job's kind of device."""
    return bool({h.name for h in hosts} & LOCAL_NAMES) and (cfg.cluster.device != "cuda" or bool(gpus()))


def planning_models(cfg: JobConfig, hosts: list[Host], probe=None) -> tuple[LatencyModel, LatencyModel, MachineCheck]:
    """The disaggregated and colocated latency models to plan with on this machine, and how they
    relate to it. probe(cfg, hosts, latency) -> {"prefill": x, "decode": y} measures the drift
    (default: run_probe, an engine job); its factors are reused for a day from the cache."""
    from launcher.bench_calibration import scaled

    disagg, colo = latency_models(cfg)
    models = list({id(disagg): disagg, id(colo): colo}.values())
    here = fingerprint(cfg.cluster.device, planned_dtype(cfg.model.dtype, cfg.cluster.device))
    status, what = check_machine(models, here)
    if status == "same":
        return disagg, colo, MachineCheck("same", "the profile was measured on this kind of machine")
    rests = "an unknown machine's timings" if status == "unknown" else "that machine's timings"
    if not cfg.planner.calibrate:
        return disagg, colo, MachineCheck(status, f"warning: {what}; the plan rests on {rests} (calibration is off; "
                                                  "`pdlaunch profile CONFIG -o FILE` measures this machine)")
    if not measures_the_cluster(cfg, hosts):
        return disagg, colo, MachineCheck(status, f"note: {what}; the plan is for hosts this machine is not one of "
                                                  f"(or lacks their {cfg.cluster.device} devices), so it rests on {rests}; "
                                                  "plan on one of them to calibrate")
    path = factors_cache_path(models, here)
    factors = cached_factors(path)
    when = "" if factors is None else time.strftime(" at %Y-%m-%d %H:%M", time.localtime(factors["measured_at"]))
    if factors is None:
        factors = (probe or run_probe)(cfg, hosts, disagg)
        keep_factors(path, factors)
    disagg, colo = scaled(disagg, factors["prefill"], factors["decode"]), \
        (scaled(colo, factors["prefill"], factors["decode"]) if colo is not disagg else None)
    unseen = [phase for phase, n in factors.get("steps", {}).items() if n == 0]
    return disagg, colo or disagg, MachineCheck(
        "calibrated", f"{what}; calibrated by a probe on this machine{when}: prefill at {factors['prefill']:.2f}x and "
                      f"decode at {factors['decode']:.2f}x the profile's timings" +
                      (f" (the probe saw no {' or '.join(unseen)} step of the profiled shapes: left unscaled; "
                       "the machine may be busy)" if unseen else "") +
                      (f"; reused from {path} (delete it to probe again)" if when else ""), factors)


def run_probe(cfg: JobConfig, hosts: list[Host], latency: LatencyModel) -> dict:
    """The bench's calibration probe alone, on one TP1 instance: its drift factors."""
    import sys

    from contracts.plan import packed_plan
    from launcher.bench_calibration import calibration, probe_window
    from launcher.bench_trace import build_trace, engine_lines
    from launcher.job_setup import check_hosts, checked_requests, model_dir_of, new_job, run_job
    from launcher.model_files import read_shape
    from launcher.planner.config_to_plan import model_spec
    from launcher.run_files import writable_run_dir

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
    run_job(new_job(cfg, plan, model_dir, requests=checked_requests(inp, run_dir), output=out, quiet=True,
                    report=report), run_dir, "the calibration probe")
    with open(report) as f:
        factors = calibration(cfg, plan, json.load(f), probe_window(out, trace, segment), latency)
    return {"prefill": round(factors["prefill"], 3), "decode": round(factors["decode"], 3), "steps": factors["steps"]}
