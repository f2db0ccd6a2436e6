"""`pdlaunch serve`: the same MPI job as `generate`, with rank 0 serving the OpenAI API over HTTP
instead of reading an input file. The first SIGTERM (or Ctrl-C) drains: the launcher creates the
run directory's drain file, rank 0 stops admitting, lets running requests finish within
`serve.drain_s`, and ends every rank. No torch here.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys

from contracts.config import load_config
from contracts.errors import UserError
from launcher import rank_launch
from launcher.job_setup import (build_plan, check_hosts, cluster_hosts, launch_command, model_dir_of, new_job,
                                served_model_name)
from launcher.network import listening_socket, single_host
from launcher.run_files import writable_run_dir
from launcher.supervise import STOP_SIGNALS, launch

API_KEY_ENV = "PDLAUNCH_API_KEY"
DRAIN_GRACE_S = 30.0  # beyond serve.drain_s: shutting the ranks down, before the launcher ends them by force


def _check_port_free(host: str, port: int) -> None:
    """When rank 0 runs here: a port in use is a one-line error before any rank starts."""
    try:
        listening_socket(host, port).close()
    except OSError as e:
        raise UserError(f"serve: cannot listen on {host}:{port} ({e.strerror}); pass another --port "
                        "(or --host)") from None


def api_keys(args, cfg) -> tuple[str, ...]:
    """The keys clients must send: --api-key (repeatable), else PDLAUNCH_API_KEY (comma-separated),
    else serve.api_key."""
    if args.api_key:
        keys = tuple(args.api_key)
    elif os.environ.get(API_KEY_ENV, "").strip():
        keys = tuple(k.strip() for k in os.environ[API_KEY_ENV].split(",") if k.strip())
    else:
        keys = cfg.serve.api_key
    if not all(k.strip() for k in keys):
        raise UserError("serve: --api-key got an empty key; give each key a value")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only loopback if it resolves to nothing else
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_auth(host: str, keys: tuple[str, ...], insecure: bool) -> None:
    """Serving beyond this machine without a key is refused unless the user says so."""
    if not keys and not insecure and not is_loopback(host):
        raise UserError(f"serve: listening on {host} without an API key lets anyone who reaches it use the "
                        f"server; set serve.api_key, --api-key or {API_KEY_ENV} (or pass --insecure-no-auth)")


def serve(args) -> int:
    cfg = load_config(args.config)
    if args.host:
        cfg.serve.host = args.host
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise UserError(f"serve: --port must be in [0, 65535] (0: any free port), got {args.port}")
        cfg.serve.port = args.port
    if args.plan:
        cfg.placement.plan = os.path.abspath(args.plan)
    cfg.serve.model_name = served_model_name(cfg)
    cfg.serve.api_key = api_keys(args, cfg)
    check_auth(cfg.serve.host, cfg.serve.api_key, args.insecure_no_auth)
    if args.dry_run:
        cfg.planner.calibrate = False  # placement: auto on another machine's profile: a dry run starts no probe
    hosts = cluster_hosts(cfg)
    model_dir = model_dir_of(cfg)
    plan = build_plan(cfg, hosts, model_dir)
    run_dir = os.path.abspath(args.run_dir or cfg.resolve(cfg.run_dir))
    if not args.dry_run:  # a dry run writes nothing
        writable_run_dir(run_dir)
    drain_file = os.path.join(run_dir, "drain")
    job = new_job(cfg, plan, model_dir, mode="serve", quiet=True, report=os.path.join(run_dir, "report.json"),
                  output=os.path.join(run_dir, "requests.jsonl"), drain_file=drain_file)
    files = {} if args.dry_run else None
    cmd, env = launch_command(job, run_dir, args.launcher, files)
    if args.dry_run:
        print(rank_launch.render_dry_run(cmd, env, files))
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
