"""`pdlaunch`: validate a config, place the job, write the job file, start the ranks.

Data flows one way: config -> plan -> job file -> launch command -> ranks. Every user mistake
ends here as one line on stderr and exit code 2, before any rank starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile

import yaml

from launcher import commands
from launcher.batch_io import INPUT_ENCODING, RequestSpec, parse_requests, read_input_text
from launcher.config import JobConfig, load_config
from launcher.errors import UserError
from launcher.hostfile import Host, hosts_from_slurm, read_hostfile
from launcher.model_files import read_shape, resolve_model_dir
from launcher.network import check_hosts_resolve
from launcher.plan import (Plan, check_layouts, map_onto_allocation, packed_plan, plan_from_config, read_plan,
                           write_plan)
from launcher.resume import reconcile
from launcher.supervise import PACKAGE_ROOT, STOP_SIGNALS, launch


def cluster_hosts(cfg: JobConfig) -> list[Host]:
    """Hosts of the Slurm allocation when inside one, else the config's hostfile."""
    return hosts_from_slurm(os.environ) or read_hostfile(cfg.resolve(cfg.cluster.hostfile))


def in_slurm_allocation() -> bool:
    return hosts_from_slurm(os.environ) is not None


def check_hosts(cfg: JobConfig, plan: Plan) -> None:
    """Before a real launch outside Slurm (whose nodes are known to it): every planned host resolves."""
    if not in_slurm_allocation():
        source = f"plan {cfg.placement.plan}" if cfg.placement.plan else f"hostfile {cfg.cluster.hostfile}"
        check_hosts_resolve(plan.rank_hosts(), source)


def model_dir_of(cfg: JobConfig) -> str:
    """The HF directory the ranks load (a GGUF file or the embedded default converted once)."""
    return resolve_model_dir(cfg.model.path if cfg.model.path == "embedded" else cfg.resolve(cfg.model.path))


def build_plan(cfg: JobConfig, hosts: list[Host], model_dir: str) -> Plan:
    shape = read_shape(model_dir)
    if cfg.placement.plan:
        plan = read_plan(cfg.resolve(cfg.placement.plan))
        if in_slurm_allocation():
            plan = map_onto_allocation(plan, hosts)
        check_layouts(plan, shape, hosts, key="plan")
    else:
        plan = plan_from_config(cfg, hosts)
        check_layouts(plan, shape)
    if cfg.model.max_model_len > shape.max_position_embeddings:
        raise UserError(f"config: 'model.max_model_len' = {cfg.model.max_model_len} exceeds the model's "
                        f"{shape.max_position_embeddings} positions; lower it")
    return plan


def _writable_output(path: str) -> None:
    """Opens the output for appending (as the controller will) and removes it again if it is new:
    permission bits alone miss /sys, read-only mounts and root's exemptions."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"output: cannot create directory '{folder}' ({e.strerror}); pass another --output") from None
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"output: cannot write '{path}' ({e.strerror}); pass a writable --output path") from None
    if not existed:
        os.remove(path)


_HELD_LOCKS = []  # output files this launcher writes; flock'ed until it exits


def hold_output(output: str) -> None:
    """Takes an exclusive lock on the output file for this launcher's lifetime: a second run with
    the same --output is refused instead of deleting the file under the first one."""
    import fcntl

    f = open(output, "a", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"output: another pdlaunch run is writing '{output}'; wait for it or pass another --output") from None
    _HELD_LOCKS.append(f)


def snapshot_input(source: str, run_dir: str) -> tuple[str, list[RequestSpec]]:
    """Reads the input once (a file, a FIFO, /dev/stdin or '-'), checks it, and keeps the copy the
    ranks read in the run directory: nothing reads the source again. Returns the copy's path and
    the requests."""
    text = read_input_text(source)
    specs = parse_requests(text, source)  # whole-input problems stop here; bad lines become error records
    path = os.path.join(run_dir, "input.jsonl")
    with open(path, "w", **INPUT_ENCODING) as f:
        f.write(text)
    return path, specs


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def prepare_job(args) -> tuple[dict, list[str], dict]:
    """Validates everything and writes RUN_DIR/job.yaml; returns (job, launch command, its environment)."""
    cfg = load_config(args.config)
    if args.input:
        cfg.workload.input = args.input if args.input == "-" else os.path.abspath(args.input)
    if args.output:
        cfg.workload.output = os.path.abspath(args.output)
    if args.plan:
        cfg.placement.plan = os.path.abspath(args.plan)
    hosts = cluster_hosts(cfg)
    model_dir = model_dir_of(cfg)
    plan = build_plan(cfg, hosts, model_dir)
    source = cfg.workload.input if cfg.workload.input == "-" else cfg.resolve(cfg.workload.input)
    output = cfg.resolve(cfg.workload.output)
    if source != "-" and _same_file(source, output):
        raise UserError(f"output: '{output}' is the input file; pass another --output (results never overwrite "
                        "the input)")
    if os.path.isdir(output):
        raise UserError(f"output: '{output}' is a directory; pass a file path as --output")
    _writable_output(output)
    run_dir = os.path.abspath(args.run_dir or cfg.resolve(cfg.run_dir))
    try:
        os.makedirs(run_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as e:
        raise UserError(f"run_dir: cannot write in '{run_dir}' ({e.strerror}); pass a writable --run-dir") from None
    input_path, specs = snapshot_input(source, run_dir)
    if not args.dry_run:
        check_hosts(cfg, plan)
        hold_output(output)
    done = set()
    if args.resume:
        state = reconcile(output, specs, apply=not args.dry_run)
        done = state.reused
        print(state.message(output, sum(s.custom_id not in done for s in specs)), file=sys.stderr)
    elif not args.dry_run:
        with open(output, "w", encoding="utf-8"):
            pass  # emptied in place: the locked file stays the one the ranks append to
    extra = {"input": input_path, "output": output, "quiet": args.quiet,
             "report": os.path.join(run_dir, "report.json"), "skip_ids": sorted(done),
             "pending_requests": sum(s.custom_id not in done for s in specs)}
    if args.dump_logits:
        os.makedirs(args.dump_logits, exist_ok=True)
        extra["dump_logits"] = os.path.abspath(args.dump_logits)
    return write_job(cfg, plan, model_dir, run_dir, launcher=args.launcher, **extra)


def write_job(cfg: JobConfig, plan: Plan, model_dir: str, run_dir: str, launcher: str = "mpirun",
              **extra) -> tuple[dict, list[str], dict]:
    """The job file every rank reads (config + plan + paths), and the command (and environment)
    that starts the ranks with the chosen launcher."""
    job = {"config": dataclasses.asdict(cfg), "plan": plan.to_dict(), "model_dir": model_dir, **extra}
    job_path = os.path.join(run_dir, "job.yaml")
    with open(job_path, "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    write_plan(plan, os.path.join(run_dir, "plan.yaml"))
    hosts, env = plan.rank_hosts(), {}
    interface = cfg.cluster.interface
    if launcher == "deepspeed":
        cmd = commands.deepspeed_command(hosts, job_path, run_dir, interface)
    elif launcher == "srun":
        cmd, env = commands.srun_command(hosts, job_path, run_dir, interface)
    else:
        cmd = commands.mpirun_command(hosts, job_path, run_dir, interface)
    return job, cmd, env


def cmd_generate(args) -> int:
    job, cmd, env = prepare_job(args)
    if args.dry_run:
        print(" ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + commands.render(cmd))
        return 0
    if job["pending_requests"] == 0:
        print(f"pdlaunch: nothing to do: every request of the input already has a result in {job['output']}",
              file=sys.stderr)
        return 0
    report = job["report"]
    if os.path.exists(report):
        os.remove(report)  # never leave the previous run's report beside this run's results
    ranks_log = os.path.join(os.path.dirname(report), "ranks.log")
    rc = launch(cmd, job, env, log_path=ranks_log)
    if rc != 0:
        status = "interrupted" if rc - 128 in STOP_SIGNALS else "failed"
        written = _count_lines(job["output"])
        with open(report, "w") as f:
            json.dump({"status": status, "exit_code": rc, "results_written": written, "output": job["output"],
                       "ranks_log": ranks_log}, f, indent=1)
        print(f"pdlaunch: {status} (exit {rc}); {written} finished result(s) are in {job['output']}; "
              f"`--resume` runs the rest (all messages: {ranks_log})", file=sys.stderr)
    return rc


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def cmd_sbatch(args) -> int:
    cfg = load_config(args.config)
    model_dir = model_dir_of(cfg)
    hosts = cluster_hosts(cfg)
    plan = build_plan(cfg, hosts, model_dir)
    nodes = max(args.nodes, len(set(plan.rank_hosts())))
    run_dir = os.path.abspath(cfg.resolve(cfg.run_dir))
    plan_path = os.path.abspath(args.output) + ".plan.yaml"
    write_plan(plan, plan_path)
    script = commands.sbatch_script(os.path.abspath(args.config), plan_path, nodes, plan.ranks_per_host(),
                                    cfg.cluster.device == "cuda", args.time, args.partition, run_dir, PACKAGE_ROOT,
                                    args.launcher)
    with open(args.output, "w") as f:
        f.write(script)
    if not args.quiet:
        print(f"wrote {args.output} and its plan {plan_path}: {nodes} node(s), {plan.world_size} ranks; "
              f"submit with `sbatch {args.output}`")
    return 0


def cmd_profile(args) -> int:
    import platform
    import time

    from launcher.planner.profile_fit import fit_entry, shared_slowdown

    cfg = load_config(args.config)
    hosts = cluster_hosts(cfg)
    model_dir = model_dir_of(cfg)
    shape = read_shape(model_dir)
    slots = sum(h.slots for h in hosts)
    tps = [int(t) for t in args.tp.split(",")] if args.tp else \
        [t for t in (1, 2, 4, 8) if t <= slots and shape.num_kv_heads % t == 0][:2]
    run_dir = os.path.abspath(args.run_dir or cfg.resolve(cfg.run_dir))
    os.makedirs(run_dir, exist_ok=True)
    def profiled(tp: int, count: int) -> dict:
        """Step samples of `count` instances of TP `tp` profiling at once."""
        plan = packed_plan([("colocated", count, tp, 1)], hosts)
        check_layouts(plan, shape, hosts, key="plan")
        check_hosts(cfg, plan)
        samples_path = os.path.join(run_dir, f"profile-samples-tp{tp}-x{count}.json")
        job, cmd, env = write_job(cfg, plan, model_dir, run_dir, mode="profile", profile_samples=samples_path)
        if not args.quiet:
            print(f"profiling TP={tp} on {count} concurrent instance(s) ...", file=sys.stderr)
        rc = launch(cmd, job, env)
        if rc != 0:
            raise UserError(f"profiling TP={tp} failed (exit {rc}); see its messages above", exit_code=rc)
        with open(samples_path) as f:
            per_instance = json.load(f)
        samples = {kind: [x for inst in per_instance.values() for x in inst["samples"][kind]]
                   for kind in ("prefill", "decode")}
        samples["overhead"] = {kind: [x for inst in per_instance.values() for x in inst["samples"]["overhead"][kind]]
                               for kind in ("prefill", "decode")}
        return samples

    entry = {}
    for tp in tps:
        # every slot busy at once, as in a real deployment: the timings include the contention
        # of ranks sharing memory bandwidth (and, on small machines, cores); then one instance
        # alone, so the simulator knows how much faster a step runs while its neighbours idle
        count = 1 if args.alone else max(1, slots // tp)
        samples = profiled(tp, count)
        entry[str(tp)] = fit_entry(samples) | {"concurrent_instances": count, "samples": samples}
        if count > 1:
            alone = profiled(tp, 1)
            entry[str(tp)] |= {"shared_slowdown": shared_slowdown(samples, alone), "samples_alone": alone}
    name = os.path.basename(model_dir.rstrip("/"))
    profile = {name: entry, "_meta": {"pipelined_pp": False, "date": time.strftime("%Y-%m-%d"),
                                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cfg.cluster.device}",
                                      "dtype": cfg.model.dtype, "source": "pdlaunch profile"}}
    with open(args.output, "w") as f:
        json.dump(profile, f, indent=1)
    if not args.quiet:
        for tp, e in entry.items():
            print(f"TP={tp}: prefill ms = {e['prefill'][0]:.2f} + {e['prefill'][1]:.4f}*sum(len) + "
                  f"{e['prefill'][2]:.2e}*sum(len^2) (max rel. error {e['fit_max_rel_error']['prefill']:.1%}); "
                  f"decode ms (batch >= {e['decoding_large_small_bs_threshold']}) = {e['decoding_largebs'][0]:.2f} + "
                  f"{e['decoding_largebs'][1]:.5f}*sum(ctx) + {e['decoding_largebs'][2]:.3f}*batch "
                  f"(max rel. error {e['fit_max_rel_error']['decode']:.1%}); "
                  f"L_m = {e['token_budget']}" + ("; all slots busy / alone: prefill {prefill:.2f}x, "
                                                   "decode {decode:.2f}x".format(**e["shared_slowdown"])
                                                   if "shared_slowdown" in e else "") +
                  "; step overhead ms: prefill {:.2f} + {:.2e}*tokens, decode {:.2f} + {:.2e}*context".format(
                      *e["step_overhead"]["prefill"], *e["step_overhead"]["decode"]))
        print(f"wrote {args.output}")
    return 0


def cmd_plan(args) -> int:
    from launcher.planner.planning import print_report, run_planner

    cfg = load_config(args.config)
    hosts = cluster_hosts(cfg)
    shape = None
    if not cfg.planner.model:
        shape = read_shape(model_dir_of(cfg))
    plan, result, predicted = run_planner(cfg, hosts, shape)
    if shape is not None:
        check_layouts(plan, shape, hosts, key="plan")
    write_plan(plan, args.output)
    if not args.quiet:
        print_report(result, predicted)
        print(f"wrote {args.output}")
    return 0


def cmd_simulate(args) -> int:

    from launcher.planner.planning import latency_models, model_spec
    from launcher.planner.replay import print_replay, replay_report, simulate_plan, trace_requests

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
    plan = read_plan(cfg.resolve(cfg.placement.plan)) if cfg.placement.plan else plan_from_config(cfg, hosts)
    if shape is not None:
        check_layouts(plan, shape, hosts, key="plan")
    disagg, colo = latency_models(cfg)
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


def _rates(text: str, option: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise UserError(f"bench: {option} must be numbers separated by commas, got {text!r}") from None
    if not rates or min(rates) <= 0 or not all(math.isfinite(r) for r in rates):
        raise UserError(f"bench: {option} must be positive request rates")
    return rates


def cmd_bench(args) -> int:
    import copy

    from launcher.bench import run_bench
    from launcher.planner.planning import model_spec

    cfg = load_config(args.config)
    hosts = cluster_hosts(cfg)
    model_dir = model_dir_of(cfg)
    shape = read_shape(model_dir)
    rates = _rates(args.rates, "--rates")
    if args.requests < 1:
        raise UserError(f"bench: --requests must be >= 1, got {args.requests}")
    if args.bisect < 0:
        raise UserError(f"bench: --bisect must be 0 or a positive number of engine runs, got {args.bisect}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UserError(f"bench: --time-budget must be a positive number of minutes, got {args.time_budget:g}")
    main_system = "disaggregated" if cfg.placement.mode == "disaggregated" else "colocated"
    systems = {main_system: build_plan(cfg, hosts, model_dir)}
    check_hosts(cfg, systems[main_system])
    per_system = {main_system: rates}
    if args.compare_colocated:
        devices = sum(i.size for i in next(iter(systems.values())).instances)
        systems["colocated"] = packed_plan([("colocated", devices, 1, 1)], hosts)
        per_system["colocated"] = _rates(args.colocated_rates, "--colocated-rates") if args.colocated_rates else rates
    out_dir = os.path.abspath(args.output)

    def run_one(system, plan, inp, out):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.workload.input, run_cfg.workload.output = inp, out
        if os.path.exists(out):
            os.remove(out)
        run_dir = os.path.join(out_dir, f"run-{system}")
        os.makedirs(run_dir, exist_ok=True)
        job, cmd, env = write_job(run_cfg, plan, model_dir, run_dir, input=inp, output=out, quiet=True,
                                  report=os.path.join(run_dir, "report.json"))
        rc = launch(cmd, job, env)
        if rc != 0:
            raise UserError(f"bench: the {system} job failed (exit {rc}); see its messages above")
        with open(job["report"]) as f:
            return json.load(f)

    result = run_bench(cfg, systems, per_system, args.requests, shape.vocab_size, model_spec(cfg, shape), run_one,
                       out_dir, args.quiet, args.bisect, math.inf if args.time_budget is None else args.time_budget * 60)
    if not args.quiet:
        print_bench(result)
        print(f"wrote {out_dir}/bench.json and attainment.png")
    return 0


def print_bench(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"pdlaunch bench: SLO attainment, engine vs simulator ({result['requests_per_rate']} "
                        "requests per rate, one job per system)")
    for col in ("system", "rate", "measured", "simulated (calibrated)", "error (pts)", "simulated (profile)",
                "error (pts)", "TTFT p90", "TPOT p90", "tok/s"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        m, p, cal = r["measured"], r["predicted"], r["calibrated"]
        table.add_row(r["system"], f"{r['rate']:g}", f"{m['attainment']:.1%}", f"{cal['attainment']:.1%}",
                      f"{r['error_points']:.1f}", f"{p['attainment']:.1%}", f"{r['error_points_profile']:.1f}",
                      f"{m['ttft_ms_p90']:.0f} ms", f"{m['tpot_ms_p90']:.0f} ms", f"{m['output_tokens_per_s']:.1f}")
    console.print(table)
    for system, f in result["fidelity"].items():
        cal, prof = f["calibrated"], f["profile"]
        repeat = f["engine_repeat_points"]
        console.print(f"{system}: error over {cal['rows']} rates: calibrated mean {cal['mean_points']:.1f} / worst "
                      f"{cal['worst_points']:.1f} points; profile mean {prof['mean_points']:.1f} / worst "
                      f"{prof['worst_points']:.1f}" + (f"; the engine's repeat of a rate differed by "
                                                       f"{', '.join(f'{x:.0f}' for x in repeat)} points" if repeat else ""))
    for system, g in result["goodput_per_device"].items():
        lo, hi = g["bracket"]
        upper = "no rate failed" if hi is None else f"{hi:.3f} failed"
        if g["stopped_by_time_budget"]:
            upper += "; bisection stopped by the time budget"
        console.print(f"{system}: goodput {g['measured']:.3f} req/s/device on the engine ({lo:.3f} met the SLOs, "
                      f"{upper}; {g['engine_runs']} rates); simulated {g['simulated_calibrated']:.3f} (calibrated), "
                      f"{g['simulated_profile']:.3f} (profile)")


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job config YAML (see configs/)")
    p.add_argument("--input", help="JSONL of requests (default: workload.input)")
    p.add_argument("--output", help="results JSONL (default: workload.output)")
    p.add_argument("--run-dir", help="where the job, plan and report files go (default: run_dir)")
    p.add_argument("--plan", help="plan file to run (from `pdlaunch plan`), instead of placement.plan")
    p.add_argument("--dry-run", action="store_true", help="print the launch command and stop")
    p.add_argument("--launcher", choices=("mpirun", "deepspeed", "srun"), default="mpirun",
                   help="how to start the ranks (srun: inside a Slurm allocation)")
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
    pr = sub.add_parser("profile", help="time the real engine on this hardware and fit the latency model")
    pr.add_argument("config")
    pr.add_argument("-o", "--output", default="profile.json")
    pr.add_argument("--tp", help="TP degrees to profile, e.g. 1,2 (default: up to two that fit)")
    pr.add_argument("--alone", action="store_true", help="one instance at a time instead of every slot busy")
    pr.add_argument("--run-dir")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_profile)
    sb = sub.add_parser("sbatch", help="render an sbatch script that runs the job inside its allocation")
    sb.add_argument("config")
    sb.add_argument("-o", "--output", default="job.sbatch")
    sb.add_argument("--nodes", type=int, default=0, help="default: the hosts the plan uses")
    sb.add_argument("--time", default="01:00:00")
    sb.add_argument("--partition")
    sb.add_argument("--launcher", choices=("mpirun", "srun"), default="mpirun")
    sb.add_argument("--quiet", action="store_true")
    sb.set_defaults(func=cmd_sbatch)
    si = sub.add_parser("simulate", help="replay a trace (arrival times and lengths) on a placement with the "
                                          "planner's simulator: per-request timings and SLO attainment")
    si.add_argument("config")
    si.add_argument("--trace", required=True,
                    help="JSON list of {start_time, prompt_len, output_len} (DistServe's form) or a pdlaunch results file")
    si.add_argument("--plan", help="plan file to simulate (default: the config's placement)")
    si.add_argument("--slo-scales", default="0.4,0.6,0.8,1.0,1.2", help="multiples of both SLOs to report")
    si.add_argument("-o", "--output", help="JSON report: per-request timings, attainment per SLO scale")
    si.add_argument("--quiet", action="store_true")
    si.set_defaults(func=cmd_simulate)
    be = sub.add_parser("bench", help="replay a workload at several rates; measured vs simulated attainment")
    be.add_argument("config")
    be.add_argument("--rates", required=True, help="total request rates, e.g. 0.5,1,2")
    be.add_argument("--requests", type=int, default=100, help="requests per rate (default 100)")
    be.add_argument("--compare-colocated", action="store_true", help="also run a colocated placement on the same ranks")
    be.add_argument("--colocated-rates", help="total request rates for the colocated placement (default: --rates)")
    be.add_argument("--bisect", type=int, default=0, metavar="N",
                    help="narrow each system's goodput with up to N more engine runs at bracket midpoints, "
                         "down to planner.precision req/s/device (default 0: tested rates only)")
    be.add_argument("--time-budget", type=float, metavar="MIN",
                    help="start a bisection run only if it is expected to end within MIN minutes of the "
                         "bench's start (the tested rates always run)")
    be.add_argument("-o", "--output", default="runs/bench", help="directory for JSON, PNG and results")
    be.add_argument("--quiet", action="store_true")
    be.set_defaults(func=cmd_bench)
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"pdlaunch: error: {e}" if not str(e).startswith("pdlaunch") else str(e), file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
