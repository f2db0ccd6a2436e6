"""`pdlaunch generate`: offline batch generation on the configured placement. Validates everything
(config, plan, input, output, run directory, --resume) before a rank starts, writes the job file and
runs the ranks; a failed or interrupted run says how to resume it. No torch."""
from __future__ import annotations

import os
import sys

from contracts.answer_key import answer_hash, model_hash
from contracts.batch_io import parse_requests, read_input_text, write_checked
from contracts.config import load_config
from contracts.errors import UserError
from contracts.job_file import JobFile
from contracts.run_report import write_report
from launcher import rank_launch
from launcher.job_setup import (CHECKED_REQUESTS, build_plan, check_hosts, cluster_hosts, launch_command, model_dir_of, new_job,
                                served_model_name)
from launcher.resume import reconcile
from launcher.run_files import (backup_path, check_run_dir, count_lines, hold_output, holds_results, same_file,
                                start_over, writable_output, writable_run_dir)
from launcher.supervise import STOP_SIGNALS, launch


def resume_command() -> str:
    """This very command line with --resume (and without --overwrite): what runs the rest."""
    import shlex

    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    return "pdlaunch " + shlex.join(args + ([] if "--resume" in args else ["--resume"]))


def prepare_generate(args) -> tuple[JobFile, list[str], dict, dict | None]:
    """Validates everything and, unless a dry run (which writes nothing anywhere), owns the run
    directory and writes RUN_DIR/job.json; returns (the job, its launch command, the command's
    environment, and for a dry run the files the command names, unwritten)."""
    if not args.log_interval > 0:
        raise UserError(f"--log-interval must be > 0 seconds, got {args.log_interval:g}")
    cfg = load_config(args.config)
    if args.input:
        cfg.workload.input = args.input if args.input == "-" else os.path.abspath(args.input)
    if args.output:
        cfg.workload.output = os.path.abspath(args.output)
    if args.plan:
        cfg.placement.plan = os.path.abspath(args.plan)
    cfg.serve.model_name = served_model_name(cfg)  # the results name the model as the server would
    if args.dry_run:
        cfg.planner.calibrate = False  # placement: auto on another machine's profile: a dry run starts no probe
    if args.resume and args.overwrite:
        raise UserError("pdlaunch: --resume keeps the output's results and --overwrite replaces them; pass one")
    hosts = cluster_hosts(cfg)
    model_dir = model_dir_of(cfg)
    plan = build_plan(cfg, hosts, model_dir)
    source = cfg.workload.input if cfg.workload.input == "-" else cfg.resolve(cfg.workload.input)
    output = cfg.resolve(cfg.workload.output)
    if source != "-" and same_file(source, output):
        raise UserError(f"output: '{output}' is the input file; pass another --output (results never overwrite "
                        "the input)")
    if os.path.isdir(output):
        raise UserError(f"output: '{output}' is a directory; pass a file path as --output")
    run_dir = os.path.abspath(args.run_dir or cfg.resolve(cfg.run_dir))
    check_run_dir(run_dir)
    if not args.dry_run:
        writable_run_dir(run_dir)  # owned before anything else is written
    writable_output(output, args.dry_run)
    text = read_input_text(source)
    specs = parse_requests(text, source)  # whole-input problems stop here; bad lines become error records
    if not args.dry_run:
        check_hosts(cfg, plan)
        hold_output(output)
    if not args.resume and not args.overwrite and holds_results(output):
        raise UserError(f"output: '{output}' already holds results; pass --resume to keep them and run the rest, or "
                        f"--overwrite to run everything again (the old file is kept as {backup_path(output)})")
    model = model_hash(cfg, model_dir)
    done = set()
    if args.resume:
        answers = {s.custom_id: answer_hash(s, cfg, model) for s in specs}
        state = reconcile(output, specs, apply=not args.dry_run, answers=answers, model=model)
        done = state.reused
        print(state.message(output, sum(s.custom_id not in done for s in specs), args.dry_run), file=sys.stderr)
    elif not args.dry_run:
        start_over(output)
    pending = [s for s in specs if s.custom_id not in done]
    requests = os.path.join(run_dir, CHECKED_REQUESTS)
    if not args.dry_run:
        write_checked(pending, requests)  # rank 0 runs these as checked here: nothing parses the input again
    job = new_job(cfg, plan, model_dir, requests=requests, output=output, quiet=args.quiet,
                  log_interval=args.log_interval, report=os.path.join(run_dir, "report.json"),
                  pending_requests=len(pending), model_hash=model)
    if args.dump_logits:
        if not args.dry_run:
            os.makedirs(args.dump_logits, exist_ok=True)
        job.dump_logits = os.path.abspath(args.dump_logits)
    files = {} if args.dry_run else None
    return job, *launch_command(job, run_dir, args.launcher, files), files


def generate(args) -> int:
    job, cmd, env, files = prepare_generate(args)
    if args.dry_run:
        print(rank_launch.render_dry_run(cmd, env, files))
        return 0
    if job.pending_requests == 0:
        print(f"pdlaunch: nothing to do: every request of the input already has a result in {job.output}",
              file=sys.stderr)
        return 0
    report = job.report
    if os.path.exists(report):
        os.remove(report)  # never leave the previous run's report beside this run's results
    ranks_log = os.path.join(os.path.dirname(report), "ranks.log")
    rc = launch(cmd, job.plan, env, log_path=ranks_log)
    if rc != 0:
        status = "interrupted" if rc - 128 in STOP_SIGNALS else "failed"
        written = count_lines(job.output)
        write_report(report, status, {"exit_code": rc, "results_written": written, "output": job.output,
                                      "ranks_log": ranks_log})
        print(f"pdlaunch: {status} (exit {rc}); {written} finished result(s) are in {job.output}; "
              f"`{resume_command()}` runs the rest (all messages: {ranks_log})", file=sys.stderr)
    return rc
