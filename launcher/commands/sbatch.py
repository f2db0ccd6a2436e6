"""`pdlaunch sbatch`: an sbatch script that runs the job (or serves it) inside its Slurm allocation,
with the plan beside it and, for a served job, an API key file only its owner can read. No torch."""
from __future__ import annotations

import os

from contracts.config import load_config
from contracts.errors import UserError
from contracts.plan import write_plan
from launcher import rank_launch
from launcher.job_setup import build_plan, cluster_hosts, model_dir_of
from launcher.run_files import check_run_dir
from launcher.supervise import PACKAGE_ROOT


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
    check_run_dir(run_dir)
    os.makedirs(run_dir, exist_ok=True)  # Slurm writes the job log there: it must exist
    plan_path = os.path.abspath(args.output) + ".plan.yaml"
    write_plan(plan, plan_path)
    serve = (args.port or cfg.serve.port, cfg.serve.drain_s, private_key_file(args.output + ".api_key")) \
        if args.serve else None
    script = rank_launch.sbatch_script(os.path.abspath(args.config), plan_path, nodes, plan.ranks_per_host(),
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
