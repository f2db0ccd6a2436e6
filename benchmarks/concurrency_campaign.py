"""Concurrency and crash campaign: runs started together on one config, and kills of pdlaunch,
mpirun/prterun and every rank role at random moments, each followed at once by `--resume`. Every
output is checked line by line against an undisturbed run: each line whole JSON, each custom_id
once, each answer the undisturbed one's.

Trials alternate between two kinds:
- together: N `pdlaunch generate` started at once on one config: some share the run directory
  (one owns it, the others must fail before writing anything), some share an output under other
  run directories (one writes it, the others are refused), one has a run directory and output of
  its own, one or more are --dry-run (they must write nothing). Afterwards every output is
  finished with --resume.
- kill: one run, then SIGKILL of pdlaunch, of prterun, or of a rank (controller, prefill leader
  and follower, decode leader and follower) after a random number of results; then --resume.
The job: the fault campaign's tiny random Llama (benchmarks/fault_campaign.py shares its helpers),
on 1 prefill instance (TP 2) and 1 decode instance (PP 2): 5 ranks. Exits non-zero unless every
trial is clean.

    python benchmarks/concurrency_campaign.py [--trials 30] [--requests 24] [--out benchmarks/results/concurrency-campaign]
"""
from __future__ import annotations

import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fault_campaign import (build_model, campaign_args, count_lines, processes_of, start,  # noqa: E402
                            write_config)

LAYOUT = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 2, "pp": 1},
          "decode": {"instances": 1, "tp": 1, "pp": 2}}
# ranks: 0 controller; 1-2 prefill instance 0 (TP 0, 1); 3-4 decode instance 1 (PP 0, 1)
KILL_TARGETS = [("pdlaunch", None), ("prterun", None), ("controller", 0), ("prefill leader", 1),
                ("prefill follower", 2), ("decode leader", 3), ("decode follower", 4)]


def campaign_config(workdir: str, model_dir: str, requests: int, rate: float, watchdog_s: float) -> str:
    path = write_config(workdir, model_dir, requests, rate, watchdog_s)
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["placement"] = LAYOUT
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def check_output(path: str, reference: dict) -> dict:
    """Line by line against the undisturbed run: whole lines, each id once, each answer the same."""
    try:
        with open(path, "rb") as f:
            raw = f.read().split(b"\n")
    except FileNotFoundError:
        return {"lines": 0, "torn": 0, "duplicated": 0, "lost": len(reference), "wrong": 0, "exact": False}
    records, torn = [], 0
    for line in raw:
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    ids = [r.get("custom_id") for r in records]
    tokens = {r.get("custom_id"): r.get("token_ids") for r in records}
    row = {"lines": len(records), "torn": torn, "duplicated": len(ids) - len(set(ids)),
           "lost": len(set(reference) - set(ids)), "wrong": sum(tokens.get(k) != v for k, v in reference.items()
                                                                if k in tokens) + len(set(ids) - set(reference))}
    row["exact"] = not (row["torn"] or row["duplicated"] or row["lost"] or row["wrong"])
    return row


def resume(config: str, output: str, run_dir: str) -> tuple[int, str]:
    proc = start(config, output, run_dir, "--resume")
    _, err = proc.communicate(timeout=900)
    return proc.returncode, err


def together(index: int, config: str, workdir: str, rng: random.Random, reference: dict) -> dict:
    """N runs at once: who may run, who must be refused untouched, and every output exact after --resume."""
    base = os.path.join(workdir, f"t{index}")
    os.makedirs(base)
    shared_run, shared_out = os.path.join(base, "run-shared"), os.path.join(base, "shared.jsonl")
    runs = [("shared run_dir A", os.path.join(base, "a.jsonl"), shared_run, []),
            ("shared run_dir B", os.path.join(base, "b.jsonl"), shared_run, []),
            ("shared output C", shared_out, os.path.join(base, "run-c"), []),
            ("shared output D", shared_out, os.path.join(base, "run-d"), []),
            ("own E", os.path.join(base, "e.jsonl"), os.path.join(base, "run-e"), []),
            ("dry run F", os.path.join(base, "a.jsonl"), shared_run, ["--dry-run", "--overwrite"]),
            ("dry run G", os.path.join(base, "f.jsonl"), os.path.join(base, "run-g"), ["--dry-run", "--resume"])]
    rng.shuffle(runs)
    procs = []
    for name, out, run_dir, extra in runs:
        procs.append((name, out, run_dir, extra, start(config, out, run_dir, *extra)))
        time.sleep(rng.uniform(0, 0.3))
    row = {"trial": index, "kind": "together", "runs": len(runs), "refused": 0, "problems": []}
    for name, out, run_dir, extra, proc in procs:
        _, err = proc.communicate(timeout=900)
        if "--dry-run" in extra:
            if proc.returncode != 0:
                row["problems"].append(f"{name}: dry run exit {proc.returncode}: {err.strip()[-300:]}")
        elif proc.returncode == 2:
            row["refused"] += 1
            if "another pdlaunch run is" not in err or len(err.strip().splitlines()) != 1:
                row["problems"].append(f"{name}: refused without the one-line reason: {err.strip()[-300:]}")
        elif proc.returncode != 0:
            row["problems"].append(f"{name}: exit {proc.returncode}: {err.strip()[-300:]}")
    if os.path.exists(os.path.join(base, "f.jsonl")) or os.path.exists(os.path.join(base, "run-g")):
        row["problems"].append("a dry run wrote a file")
    outputs = {}
    for name, out, run_dir, extra, _ in procs:
        if "--dry-run" not in extra and out not in outputs:
            rc, err = resume(config, out, run_dir)
            if rc != 0:
                row["problems"].append(f"{name}: --resume exit {rc}: {err.strip()[-300:]}")
            outputs[out] = check_output(out, reference)
    row["outputs"] = len(outputs)
    for key in ("torn", "duplicated", "lost", "wrong"):
        row[key] = sum(o[key] for o in outputs.values())
    row["ok"] = not row["problems"] and all(o["exact"] for o in outputs.values())
    return row


def kill(index: int, config: str, workdir: str, rng: random.Random, reference: dict, requests: int) -> dict:
    """One run killed at a random moment, then --resume at once."""
    target, rank = KILL_TARGETS[(index // 2) % len(KILL_TARGETS)]
    out, run_dir = os.path.join(workdir, f"k{index}.jsonl"), os.path.join(workdir, f"run-k{index}")
    after = rng.randint(1, max(2, requests * 7 // 10))
    proc = start(config, out, run_dir)
    while count_lines(out) < after and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 0.5))
    row = {"trial": index, "kind": "kill", "target": target, "after_results": count_lines(out), "problems": []}
    if target == "pdlaunch":
        pid = proc.pid
    elif target == "prterun":
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            pid = int(f.read().split()[0])
    else:
        pid = processes_of(run_dir).get(rank)
    if pid is None or proc.poll() is not None:
        proc.kill()
        proc.communicate()
        return row | {"ok": False, "problems": ["the job ended before the kill"]}
    os.kill(pid, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        row["problems"].append("pdlaunch did not end")
    row["exit_code"] = proc.returncode
    if target != "pdlaunch" and processes_of(run_dir):
        row["problems"].append("a process of the job outlived pdlaunch's report")
    rc, resume_err = resume(config, out, run_dir)  # at once: no pause for leftovers to die
    if rc != 0:
        row["problems"].append(f"--resume exit {rc}: {resume_err.strip()[-300:]}")
    row |= check_output(out, reference)
    row["ok"] = not row["problems"] and row["exact"] and proc.returncode != 0
    return row


def reference_tokens(config: str, workdir: str) -> dict:
    out = os.path.join(workdir, "reference.jsonl")
    proc = start(config, out, os.path.join(workdir, "run-reference"))
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"concurrency campaign: the undisturbed run failed:\n{err[-3000:]}")
    with open(out) as f:
        return {r["custom_id"]: r["token_ids"] for r in map(json.loads, f)}


def write_summary(args, rows: list[dict], began: float) -> dict:
    os.makedirs(args.out, exist_ok=True)
    summary = {"date": datetime.date.today().isoformat(), "requests": args.requests, "layout": LAYOUT,
               "trials": len(rows), "clean": sum(r["ok"] for r in rows), "minutes": round((time.time() - began) / 60, 1),
               **{key: sum(r.get(key, 0) for r in rows) for key in ("torn", "duplicated", "lost", "wrong")},
               "rows": rows}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main() -> int:
    args = campaign_args(__doc__, 30, 24, "concurrency-campaign")
    from rich.console import Console
    from rich.table import Table

    rng = random.Random(args.seed)
    rows = []
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="pdlaunch-concurrency-") as workdir:
        model_dir = os.path.join(workdir, "model")
        build_model(model_dir)
        config = campaign_config(workdir, model_dir, args.requests, args.rate, args.watchdog)
        reference = reference_tokens(config, workdir)
        for i in range(args.trials):
            row = together(i, config, workdir, rng, reference) if i % 2 == 0 else \
                kill(i, config, workdir, rng, reference, args.requests)
            rows.append(row)
            print(f"trial {i + 1}/{args.trials}: {row['kind']} {row.get('target', '')} "
                  f"{'ok' if row['ok'] else 'FAILED ' + '; '.join(row['problems'])}", file=sys.stderr, flush=True)
            summary = write_summary(args, rows, began)  # after every trial: a cut-short campaign still counts
    table = Table(title=f"concurrency campaign: {summary['clean']}/{len(rows)} trials clean; torn "
                        f"{summary['torn']}, duplicated {summary['duplicated']}, lost {summary['lost']}, wrong "
                        f"{summary['wrong']} results ({args.requests} requests per output)")
    for col in ("trial", "kind", "target / runs", "after results", "exit", "refused", "lines", "ok"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["trial"]), r["kind"], r.get("target") or str(r.get("runs")), str(r.get("after_results", "")),
                      str(r.get("exit_code", "")), str(r.get("refused", "")), str(r.get("lines", r.get("outputs", ""))),
                      "yes" if r["ok"] else "NO")
    Console().print(table)
    return 0 if summary["clean"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
