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

from launcher import commands, locks
from launcher.answer_key import answer_hash, model_hash
from launcher.batch_io import INPUT_ENCODING, parse_requests, read_input_text
from launcher.config import JobConfig, load_config
from launcher.errors import UserError
from launcher.hostfile import Host, hosts_from_slurm, read_hostfile
from launcher.job import JobFile
from launcher.model_files import embedded_gguf, read_shape, resolve_model_dir
from launcher.network import LOCAL_NAMES, check_hosts_resolve, rendezvous_address
from launcher.plan import Plan, check_layouts, map_onto_allocation, plan_from_config, read_plan, write_plan
from launcher.resume import reconcile
from launcher.supervise import PACKAGE_ROOT, STOP_SIGNALS, end_ranks, launch


def cluster_hosts(cfg: JobConfig) -> list[Host]:
    """Hosts of the Slurm allocation when inside one, else the config's hostfile."""
    return hosts_from_slurm(os.environ) or read_hostfile(cfg.resolve(cfg.cluster.hostfile))


def in_slurm_allocation() -> bool:
    return hosts_from_slurm(os.environ) is not None


def check_hosts(cfg: JobConfig, plan: Plan) -> None:
    """Before a real launch outside Slurm (whose nodes are known to it): every planned host resolves.
    Where the first instance rank (the rendezvous' host, engine/control_plane.py) runs here, the
    address it will choose is one remote ranks can reach."""
    hosts = plan.rank_hosts()
    if not in_slurm_allocation():
        source = f"plan {cfg.placement.plan}" if cfg.placement.plan else f"hostfile {cfg.cluster.hostfile}"
        check_hosts_resolve(hosts, source)
    if hosts[plan.instances[0].first_rank] in LOCAL_NAMES and not cfg.cluster.interface:
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


def _writable_output(path: str, dry_run: bool) -> None:
    """Opens the output for appending (as the controller will) and removes it again if it is new:
    permission bits alone miss /sys, read-only mounts and root's exemptions. A dry run writes
    nothing: it checks the permission bits of what exists."""
    folder = os.path.dirname(os.path.abspath(path))
    if dry_run:
        existing = path if os.path.exists(path) else folder
        if os.path.exists(existing) and not os.access(existing, os.W_OK):
            raise UserError(f"output: cannot write '{path}'; pass a writable --output path")
        return
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


def hold_output(output: str) -> None:
    """Takes an exclusive lock on the output file for this launcher's lifetime: a second run with
    the same --output is refused instead of deleting the file under the first one."""
    locks.hold(output, f"output: another pdlaunch run is writing '{output}'; wait for it or pass another --output")


def snapshot_input(text: str, run_dir: str) -> str:
    """Keeps the copy of the input the ranks read in the (owned) run directory: nothing reads the
    source again. Returns the copy's path."""
    path = os.path.join(run_dir, "input.jsonl")
    with open(path, "w", **INPUT_ENCODING) as f:
        f.write(text)
    return path


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_run_dir(run_dir: str) -> None:
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"run_dir: '{run_dir}' is a file, not a directory; pass another --run-dir (or move the file)")


def writable_run_dir(path: str) -> str:
    """The run directory, created, checked writable and owned by this launcher for its whole life:
    its lock (RUN_DIR/run.lock) is taken before anything else is written there, so a second run on
    the same directory fails at once, before touching any file of the first one. Processes that an
    earlier, killed launcher left running on it are ended first."""
    run_dir = os.path.abspath(path)
    lock = os.path.join(run_dir, "run.lock")
    if locks.holds(lock):
        return run_dir
    _check_run_dir(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as e:
        raise UserError(f"run_dir: cannot write in '{run_dir}' ({e.strerror}); pass a writable --run-dir") from None
    locks.hold(lock, f"run_dir: another pdlaunch run is using '{run_dir}'; wait for it to end or pass another "
                     "--run-dir")
    left = end_ranks(os.path.join(run_dir, "job.json"))
    if left:
        print(f"pdlaunch: ended {len(left)} process(es) an earlier run in {run_dir} left behind", file=sys.stderr)
    return run_dir


def _holds_results(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return any(line.strip() for line in f)
    except FileNotFoundError:
        return False


def backup_path(output: str) -> str:
    return output + ".bak"


def _start_over(output: str) -> None:
    """--overwrite: the output's results are copied to OUTPUT.bak, then the output is emptied in
    place (the locked file stays the one the ranks append to)."""
    import shutil

    if _holds_results(output):
        shutil.copyfile(output, backup_path(output))
    with open(output, "w", encoding="utf-8"):
        pass


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
    if source != "-" and _same_file(source, output):
        raise UserError(f"output: '{output}' is the input file; pass another --output (results never overwrite "
                        "the input)")
    if os.path.isdir(output):
        raise UserError(f"output: '{output}' is a directory; pass a file path as --output")
    run_dir = os.path.abspath(args.run_dir or cfg.resolve(cfg.run_dir))
    _check_run_dir(run_dir)
    if not args.dry_run:
        writable_run_dir(run_dir)  # owned before anything else is written
    _writable_output(output, args.dry_run)
    text = read_input_text(source)
    specs = parse_requests(text, source)  # whole-input problems stop here; bad lines become error records
    if not args.dry_run:
        check_hosts(cfg, plan)
        hold_output(output)
    if not args.resume and not args.overwrite and _holds_results(output):
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
        _start_over(output)
    input_path = os.path.join(run_dir, "input.jsonl") if args.dry_run else snapshot_input(text, run_dir)
    job = JobFile(cfg, plan, model_dir, input=input_path, output=output, quiet=args.quiet,
                  log_interval=args.log_interval,
                  report=os.path.join(run_dir, "report.json"), skip_ids=tuple(sorted(done)),
                  pending_requests=sum(s.custom_id not in done for s in specs), model_hash=model)
    if args.dump_logits:
        if not args.dry_run:
            os.makedirs(args.dump_logits, exist_ok=True)
        job.dump_logits = os.path.abspath(args.dump_logits)
    files = {} if args.dry_run else None
    return job, *launch_command(job, run_dir, args.launcher, files), files


def launch_command(job: JobFile, run_dir: str, launcher: str = "mpirun",
                   files: dict | None = None) -> tuple[list[str], dict]:
    """Writes the job file every rank reads (and the plan beside it, for people) into the run
    directory this launcher owns; returns the command (and environment) that starts the ranks with
    the chosen launcher. With `files` (a dry run) nothing is written: the command's own files
    (rankfile, hostfile) go into `files`."""
    job_path = os.path.join(run_dir, "job.json")
    if files is None:
        writable_run_dir(run_dir)  # a no-op when already owned
        job.write(job_path)
        write_plan(job.plan, os.path.join(run_dir, "plan.yaml"))
    hosts, env = job.plan.rank_hosts(), {}
    interface = job.config.cluster.interface
    if launcher == "deepspeed":
        cmd = commands.deepspeed_command(hosts, job_path, run_dir, interface, files=files)
        if job.config.cluster.device == "cpu":  # on GPUs DeepSpeed's own accelerator (CUDA) stays
            env["DS_ACCELERATOR"] = "cpu"
    elif launcher == "srun":
        cmd, env = commands.srun_command(hosts, job_path, run_dir, interface, files=files)
    else:
        cmd = commands.mpirun_command(hosts, job_path, run_dir, interface, files=files)
    return cmd, env


def run_job(job: JobFile, run_dir: str, what: str) -> None:
    """Starts a job on its own (profile and bench runs) and waits for it; a failure is a UserError."""
    cmd, env = launch_command(job, run_dir)
    rc = launch(cmd, job.plan, env)
    if rc != 0:
        raise UserError(f"{what} failed (exit {rc}); see its messages above", exit_code=rc)


def generate(args) -> int:
    job, cmd, env, files = prepare_generate(args)
    if args.dry_run:
        print(commands.render_dry_run(cmd, env, files))
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
              f"`{resume_command()}` runs the rest (all messages: {ranks_log})", file=sys.stderr)
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
    run_dir = os.path.abspath(cfg.resolve(cfg.run_dir))
    _check_run_dir(run_dir)
    os.makedirs(run_dir, exist_ok=True)  # Slurm writes the job log there: it must exist
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
