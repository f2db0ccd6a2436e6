"""`pdlaunch`: validate a config, place the job, write the job file, start the ranks.

Data flows one way: config -> plan -> job file -> launch command -> ranks. Every user mistake
ends here as one line on stderr and exit code 2, before any rank starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys

import yaml

from launcher import commands
from launcher.batch_io import read_requests
from launcher.config import JobConfig, load_config
from launcher.errors import UserError
from launcher.hostfile import Host, hosts_from_slurm, read_hostfile
from launcher.model_files import read_shape, resolve_model_dir
from launcher.plan import Plan, check_layouts, plan_from_config, read_plan, write_plan

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cluster_hosts(cfg: JobConfig) -> list[Host]:
    """Hosts of the Slurm allocation when inside one, else the config's hostfile."""
    return hosts_from_slurm(os.environ) or read_hostfile(cfg.resolve(cfg.cluster.hostfile))


def build_plan(cfg: JobConfig, hosts: list[Host], model_dir: str) -> Plan:
    shape = read_shape(model_dir)
    if cfg.placement.plan:
        plan = read_plan(cfg.resolve(cfg.placement.plan))
        check_layouts(plan, shape, hosts, key="plan")
    else:
        plan = plan_from_config(cfg, hosts)
        check_layouts(plan, shape)
    if cfg.model.max_model_len > shape.max_position_embeddings:
        raise UserError(f"config: 'model.max_model_len' = {cfg.model.max_model_len} exceeds the model's "
                        f"{shape.max_position_embeddings} positions; lower it")
    return plan


def _writable_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"output: cannot create directory '{folder}' ({e.strerror}); pass another --output") from None
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"output: '{path}' is not writable; pass a writable --output path")


def finished_ids(output: str) -> set[str]:
    """custom_ids already answered in an output file; a torn last line (a crash mid-write) is cut
    off by rewriting the file through a temp file and a rename."""
    if not os.path.exists(output):
        return set()
    import json

    with open(output, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    kept, ids = [], set()
    for line in lines:
        try:
            ids.add(json.loads(line)["custom_id"])
            kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if len(kept) != len(lines):
        tmp = output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, output)
    return ids


def prepare_job(args) -> tuple[dict, list[str], str]:
    """Validates everything and writes RUN_DIR/job.yaml; returns (job, command, job path)."""
    cfg = load_config(args.config)
    if args.input:
        cfg.workload.input = os.path.abspath(args.input)
    if args.output:
        cfg.workload.output = os.path.abspath(args.output)
    hosts = cluster_hosts(cfg)
    model_path = cfg.model.path if cfg.model.path == "embedded" else cfg.resolve(cfg.model.path)
    model_dir = resolve_model_dir(model_path)
    plan = build_plan(cfg, hosts, model_dir)
    input_path = cfg.resolve(cfg.workload.input)
    read_requests(input_path)  # whole-file problems stop here; bad lines become error records
    output = cfg.resolve(cfg.workload.output)
    _writable_output(output)
    run_dir = os.path.abspath(args.run_dir or cfg.resolve(cfg.run_dir))
    os.makedirs(run_dir, exist_ok=True)
    done = finished_ids(output) if args.resume else set()
    if not args.resume and os.path.exists(output):
        os.remove(output)
    job = {"config": dataclasses.asdict(cfg), "plan": plan.to_dict(), "model_dir": model_dir,
           "input": input_path, "output": output, "quiet": args.quiet,
           "report": os.path.join(run_dir, "report.json"), "skip_ids": sorted(done)}
    if args.dump_logits:
        os.makedirs(args.dump_logits, exist_ok=True)
        job["dump_logits"] = os.path.abspath(args.dump_logits)
    job_path = os.path.join(run_dir, "job.yaml")
    with open(job_path, "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    write_plan(plan, os.path.join(run_dir, "plan.yaml"))
    return job, commands.mpirun_command(plan.rank_hosts(), job_path, run_dir), job_path


def cmd_generate(args) -> int:
    job, cmd, _ = prepare_job(args)
    if args.dry_run:
        print(commands.render(cmd))
        return 0
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True, bufsize=1)

    def forward_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, forward_term)
    plan = Plan.from_job(job)
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            dead = re.search(r"process rank (\d+) with PID \d+ on node (\S+)", line)
            if dead:
                print(f"pdlaunch: rank {dead.group(1)} on {dead.group(2)} died: it was "
                      f"{plan.describe_rank(int(dead.group(1)))}", file=sys.stderr)
        rc = proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        print(f"pdlaunch: interrupted; finished results are in {job['output']}", file=sys.stderr)
        return 130
    if rc != 0:
        print(f"pdlaunch: the job failed (exit {rc}); finished results are in {job['output']}", file=sys.stderr)
    return rc


def cmd_plan(args) -> int:
    from launcher.planner.planning import print_report, run_planner

    cfg = load_config(args.config)
    hosts = cluster_hosts(cfg)
    shape = None
    if not cfg.planner.model:
        shape = read_shape(resolve_model_dir(cfg.model.path if cfg.model.path == "embedded"
                                             else cfg.resolve(cfg.model.path)))
    plan, result, predicted = run_planner(cfg, hosts, shape)
    if shape is not None:
        check_layouts(plan, shape, hosts, key="plan")
    write_plan(plan, args.output)
    if not args.quiet:
        print_report(result, predicted)
        print(f"wrote {args.output}")
    return 0


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job config YAML (see configs/)")
    p.add_argument("--input", help="JSONL of requests (default: workload.input)")
    p.add_argument("--output", help="results JSONL (default: workload.output)")
    p.add_argument("--run-dir", help="where the job, plan and report files go (default: run_dir)")
    p.add_argument("--dry-run", action="store_true", help="print the launch command and stop")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    p.add_argument("--resume", action="store_true", help="keep the output file and run only the requests it lacks")
    p.add_argument("--dump-logits", metavar="DIR", help="save every generated token's logits (debugging)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"pdlaunch: {message}; see `pdlaunch --help`")


def main(argv=None) -> int:
    parser = _Parser(prog="pdlaunch", description="Disaggregated prefill/decode LLM inference launcher")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="offline batch generation on the configured placement")
    _add_job_args(gen)
    gen.set_defaults(func=cmd_generate)
    pl = sub.add_parser("plan", help="search the placement (DistServe Algorithm 1/2) and write a plan file")
    pl.add_argument("config")
    pl.add_argument("-o", "--output", default="plan.yaml", help="plan file to write (default: plan.yaml)")
    pl.add_argument("--quiet", action="store_true")
    pl.set_defaults(func=cmd_plan)
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"pdlaunch: error: {e}" if not str(e).startswith("pdlaunch") else str(e), file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
