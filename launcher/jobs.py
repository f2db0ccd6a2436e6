"""What `pdlaunch generate` and `pdlaunch sbatch` do, and the set-up every command shares: the
cluster's hosts, the model directory, the plan, the job file and the command that starts the ranks.

Data flows one way: config -> plan -> job file -> launch command -> ranks. Every user mistake ends
as a UserError before any rank starts. No torch here.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from launcher import commands
from launcher.batch_io import INPUT_ENCODING, RequestSpec, parse_requests, read_input_text
from launcher.config import JobConfig, load_config
from launcher.errors import UserError
from launcher.hostfile import Host, hosts_from_slurm, read_hostfile
from launcher.job import JobFile
from launcher.model_files import embedded_gguf, read_shape, resolve_model_dir
from launcher.network import LOCAL_NAMES, check_hosts_resolve, rendezvous_address
from launcher.plan import Plan, check_layouts, map_onto_allocation, plan_from_config, read_plan, write_plan
from launcher.resume import reconcile
from launcher.supervise import PACKAGE_ROOT, STOP_SIGNALS, launch


def cluster_hosts(cfg: JobConfig) -> list[Host]:
    """Hosts of the Slurm allocation when inside one, else the config's hostfile."""
    return hosts_from_slurm(os.environ) or read_hostfile(cfg.resolve(cfg.cluster.hostfile))


def in_slurm_allocation() -> bool:
    return hosts_from_slurm(os.environ) is not None


def check_hosts(cfg: JobConfig, plan: Plan) -> None:
    """Before a real launch outside Slurm (whose nodes are known to it): every planned host resolves.
    Where rank 0 runs here, the rendezvous address it will choose is one remote ranks can reach."""
    hosts = plan.rank_hosts()
    if not in_slurm_allocation():
        source = f"plan {cfg.placement.plan}" if cfg.placement.plan else f"hostfile {cfg.cluster.hostfile}"
        check_hosts_resolve(hosts, source)
    if hosts[0] in LOCAL_NAMES and not cfg.cluster.interface:
        rendezvous_address(cfg.cluster.master_addr, cfg.cluster.interface, hosts)


def model_dir_of(cfg: JobConfig) -> str:
    """The HF directory the ranks load (a GGUF file or the embedded default converted once)."""
    return resolve_model_dir(cfg.model.path if cfg.model.path == "embedded" else cfg.resolve(cfg.model.path))


def served_model_name(cfg: JobConfig) -> str:
    """The model's name in the API and in batch results: serve.model_name, else the model file's or
    directory's name."""
    if cfg.serve.model_name:
        return cfg.serve.model_name
    path = embedded_gguf() if cfg.model.path == "embedded" else cfg.resolve(cfg.model.path)
    return os.path.basename(path.rstrip("/")).removesuffix(".gguf")


def build_plan(cfg: JobConfig, hosts: list[Host], model_dir: str) -> Plan:
    shape = read_shape(model_dir)
    if cfg.placement.plan:
        plan = read_plan(cfg.resolve(cfg.placement.plan))
        if in_slurm_allocation():
            plan = map_onto_allocation(plan, hosts)
        check_layouts(plan, shape, hosts, key="plan")
    elif cfg.placement.mode == "auto":
        from launcher.auto_plan import plan_at_launch
        plan = plan_at_launch(cfg, hosts, shape)
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


def writable_run_dir(path: str) -> str:
    run_dir = os.path.abspath(path)
    try:
        os.makedirs(run_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as e:
        raise UserError(f"run_dir: cannot write in '{run_dir}' ({e.strerror}); pass a writable --run-dir") from None
    return run_dir


def prepare_generate(args) -> tuple[JobFile, list[str], dict]:
    """Validates everything and writes RUN_DIR/job.json; returns (the job, its launch command, the
    command's environment)."""
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
    run_dir = writable_run_dir(args.run_dir or cfg.resolve(cfg.run_dir))
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
    job = JobFile(cfg, plan, model_dir, input=input_path, output=output, quiet=args.quiet,
                  log_interval=args.log_interval,
                  report=os.path.join(run_dir, "report.json"), skip_ids=tuple(sorted(done)),
                  pending_requests=sum(s.custom_id not in done for s in specs))
    if args.dump_logits:
        os.makedirs(args.dump_logits, exist_ok=True)
        job.dump_logits = os.path.abspath(args.dump_logits)
    return job, *launch_command(job, run_dir, args.launcher)


def launch_command(job: JobFile, run_dir: str, launcher: str = "mpirun") -> tuple[list[str], dict]:
    """Writes the job file every rank reads (and the plan beside it, for people); returns the
    command (and environment) that starts the ranks with the chosen launcher."""
    job_path = os.path.join(run_dir, "job.json")
    job.write(job_path)
    write_plan(job.plan, os.path.join(run_dir, "plan.yaml"))
    hosts, env = job.plan.rank_hosts(), {}
    interface = job.config.cluster.interface
    if launcher == "deepspeed":
        cmd = commands.deepspeed_command(hosts, job_path, run_dir, interface)
        if job.config.cluster.device == "cpu":  # on GPUs DeepSpeed's own accelerator (CUDA) stays
            env["DS_ACCELERATOR"] = "cpu"
    elif launcher == "srun":
        cmd, env = commands.srun_command(hosts, job_path, run_dir, interface)
    else:
        cmd = commands.mpirun_command(hosts, job_path, run_dir, interface)
    return cmd, env


def run_job(job: JobFile, run_dir: str, what: str) -> None:
    """Starts a job on its own (profile and bench runs) and waits for it; a failure is a UserError."""
    cmd, env = launch_command(job, run_dir)
    rc = launch(cmd, job.plan, env)
    if rc != 0:
        raise UserError(f"{what} failed (exit {rc}); see its messages above", exit_code=rc)


def generate(args) -> int:
    job, cmd, env = prepare_generate(args)
    if args.dry_run:
        print(" ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + commands.render(cmd))
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
        written = _count_lines(job.output)
        with open(report, "w") as f:
            json.dump({"status": status, "exit_code": rc, "results_written": written, "output": job.output,
                       "ranks_log": ranks_log}, f, indent=1)
        print(f"pdlaunch: {status} (exit {rc}); {written} finished result(s) are in {job.output}; "
              f"`--resume` runs the rest (all messages: {ranks_log})", file=sys.stderr)
    return rc


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def private_key_file(path: str) -> str:
    """An API key for a served job in a file only its owner can read: a new one, or the key already
    there (re-rendering a script keeps its clients working). Refuses a file others can read."""
    import secrets
    import stat

    path = os.path.abspath(path)
    if os.path.exists(path):
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            raise UserError(f"sbatch: the API key file '{path}' is readable by others; `chmod 600 {path}` or "
                            "remove it (a new key is then made)")
        with open(path, encoding="utf-8") as f:
            if f.read().strip():
                return path
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise UserError(f"sbatch: cannot write the API key file '{path}' ({e.strerror}); pass another -o") from None
    os.fchmod(fd, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def sbatch(args) -> int:
    if args.log_interval is not None and not args.log_interval > 0:
        raise UserError(f"--log-interval must be > 0 seconds, got {args.log_interval:g}")
    cfg = load_config(args.config)
    model_dir = model_dir_of(cfg)
    hosts = cluster_hosts(cfg)
    plan = build_plan(cfg, hosts, model_dir)
    nodes = max(args.nodes, len(set(plan.rank_hosts())))
    run_dir = writable_run_dir(cfg.resolve(cfg.run_dir))  # Slurm writes the job log there: it must exist
    plan_path = os.path.abspath(args.output) + ".plan.yaml"
    write_plan(plan, plan_path)
    serve = (args.port or cfg.serve.port, cfg.serve.drain_s, private_key_file(args.output + ".api_key")) \
        if args.serve else None
    script = commands.sbatch_script(os.path.abspath(args.config), plan_path, nodes, plan.ranks_per_host(),
                                    cfg.cluster.device == "cuda", args.time, args.partition, run_dir, PACKAGE_ROOT,
                                    args.launcher, serve, args.log_interval)
    with open(args.output, "w") as f:
        f.write(script)
    if not args.quiet:
        what = f"; it serves on port {serve[0]} of the first node (the URL is in {run_dir}/slurm-<job id>.out), " \
               f"clients need the API key in {serve[2]}" if serve else ""
        print(f"wrote {args.output} and its plan {plan_path}: {nodes} node(s), {plan.world_size} ranks{what}; "
              f"submit with `sbatch {args.output}`")
    return 0
