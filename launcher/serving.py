"""`pdlaunch serve`: the same MPI job as `generate`, with rank 0 serving the OpenAI API over HTTP
instead of reading an input file. The first SIGTERM (or Ctrl-C) drains: the launcher creates the
run directory's drain file, rank 0 stops admitting, lets running requests finish within
`serve.drain_s`, and ends every rank. No torch here.
"""
from __future__ import annotations

import os
import sys

from launcher import commands
from launcher.config import load_config
from launcher.errors import UserError
from launcher.job import JobFile
from launcher.model_files import embedded_gguf
from launcher.network import listening_socket, single_host
from launcher.jobs import build_plan, check_hosts, cluster_hosts, launch_command, model_dir_of, writable_run_dir
from launcher.supervise import STOP_SIGNALS, launch

DRAIN_GRACE_S = 30.0  # beyond serve.drain_s: shutting the ranks down, before the launcher ends them by force


def _check_port_free(host: str, port: int) -> None:
    """When rank 0 runs here: a port in use is a one-line error before any rank starts."""
    try:
        listening_socket(host, port).close()
    except OSError as e:
        raise UserError(f"serve: cannot listen on {host}:{port} ({e.strerror}); pass another --port "
                        "(or --host)") from None


def served_model_name(cfg) -> str:
    """The `model` clients send: serve.model_name, else the model file's or directory's name."""
    if cfg.serve.model_name:
        return cfg.serve.model_name
    path = embedded_gguf() if cfg.model.path == "embedded" else cfg.resolve(cfg.model.path)
    return os.path.basename(path.rstrip("/")).removesuffix(".gguf")


def serve(args) -> int:
    cfg = load_config(args.config)
    if args.host:
        cfg.serve.host = args.host
    if args.port is not None:
        if not 0 < args.port <= 65535:
            raise UserError(f"serve: --port must be in [1, 65535], got {args.port}")
        cfg.serve.port = args.port
    if args.plan:
        cfg.placement.plan = os.path.abspath(args.plan)
    cfg.serve.model_name = served_model_name(cfg)
    hosts = cluster_hosts(cfg)
    model_dir = model_dir_of(cfg)
    plan = build_plan(cfg, hosts, model_dir)
    run_dir = os.path.abspath(args.run_dir or cfg.resolve(cfg.run_dir))
    if not args.dry_run:  # a dry run writes nothing
        writable_run_dir(run_dir)
    drain_file = os.path.join(run_dir, "drain")
    job = JobFile(cfg, plan, model_dir, mode="serve", quiet=True, report=os.path.join(run_dir, "report.json"),
                  output=os.path.join(run_dir, "requests.jsonl"), drain_file=drain_file)
    files = {} if args.dry_run else None
    cmd, env = launch_command(job, run_dir, args.launcher, files)
    if args.dry_run:
        print(commands.render_dry_run(cmd, env, files))
        return 0
    check_hosts(cfg, plan)
    if single_host(plan.rank_hosts()[:1]):
        _check_port_free(cfg.serve.host, cfg.serve.port)
    if os.path.exists(drain_file):
        os.remove(drain_file)  # a previous server's
    ranks_log = os.path.join(run_dir, "ranks.log")
    rc = launch(cmd, plan, env, log_path=ranks_log, drain=(drain_file, cfg.serve.drain_s + DRAIN_GRACE_S))
    if rc != 0:
        how = "stopped" if rc - 128 in STOP_SIGNALS else "failed"
        print(f"pdlaunch: the server {how} (exit {rc}); all messages: {ranks_log}", file=sys.stderr)
    return rc
