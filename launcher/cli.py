"""`pdlaunch`: the command line. Arguments only; each command's work is in its own module of
launcher/commands/ (generate, serve, bench, plan: plan and simulate, profile, sbatch, init), imported
when chosen. Every user mistake ends here as one line on stderr and exit code 2, before any rank starts.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from contracts.errors import UserError
from launcher import __version__

CONFIG_HELP = "job config YAML (see configs/, or write a starter with `pdlaunch init`)"


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("--input", help="JSONL of requests (default: workload.input)")
    p.add_argument("--output", help="results JSONL (default: workload.output)")
    p.add_argument("--run-dir", help="where the job, plan and report files go (default: run_dir)")
    p.add_argument("--plan", help="plan file to run (from `pdlaunch plan`), instead of placement.plan")
    p.add_argument("--dry-run", action="store_true", help="print the launch command and stop")
    p.add_argument("--launcher", choices=("mpirun", "deepspeed", "srun"), default="mpirun",
                   help="how to start the ranks (srun: inside a Slurm allocation)")
    p.add_argument("--quiet", action="store_true", help="no progress lines or summary table")
    p.add_argument("--log-interval", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress lines (done/total, errors, tok/s, TTFT/TPOT p50, ETA; default 10)")
    p.add_argument("--resume", action="store_true", help="keep the output file and run only the requests it lacks")
    p.add_argument("--overwrite", action="store_true",
                   help="run every request again over an output that holds results (kept as OUTPUT.bak)")
    p.add_argument("--dump-logits", metavar="DIR", help="save every generated token's logits (debugging)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"pdlaunch: {message}; see `pdlaunch --help`")


def _add_no_calibrate(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--no-calibrate", action="store_true",
                   help=f"when the profile was measured on another kind of machine, {verb} on its timings as they "
                        "are (with a warning) instead of scaling them by a short probe here (planner.calibrate)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pdlaunch", description="Disaggregated prefill/decode LLM inference launcher")
    parser.add_argument("--version", action="version", version=f"pdlaunch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    it = sub.add_parser("init", help="write a starter config, hostfile, example input and planner profiles to copy")
    it.add_argument("dir", nargs="?", default=".", help="where to write them (default: the current directory)")
    it.set_defaults(func=("launcher.commands.init", "init"))
    gen = sub.add_parser("generate", help="offline batch generation on the configured placement")
    _add_job_args(gen)
    gen.set_defaults(func=("launcher.commands.generate", "generate"))
    sv = sub.add_parser("serve", help="serve the OpenAI API (completions, chat, streaming) from the configured "
                                      "placement until SIGTERM, which drains")
    sv.add_argument("config", help=CONFIG_HELP)
    sv.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port to listen on (default: serve.port, 8000; 0: any free port, named in the "
                                             "'serving' line)")
    sv.add_argument("--launcher", choices=("mpirun", "deepspeed", "srun"), default="mpirun",
                    help="how to start the ranks (srun: inside a Slurm allocation)")
    sv.add_argument("--plan", help="plan file to run (from `pdlaunch plan`), instead of placement.plan")
    sv.add_argument("--run-dir", help="where the job, plan and rank log go (default: run_dir)")
    sv.add_argument("--dry-run", action="store_true", help="print the launch command and stop")
    sv.add_argument("--api-key", action="append", metavar="KEY",
                    help="a key clients must send as 'Authorization: Bearer KEY' on /v1/* (repeat for several; "
                         "default: PDLAUNCH_API_KEY, comma-separated, else serve.api_key)")
    sv.add_argument("--insecure-no-auth", action="store_true",
                    help="allow listening on a non-loopback address without an API key (anyone who reaches "
                         "the port can use the server)")
    sv.set_defaults(func=("launcher.commands.serve", "serve"))
    pl = sub.add_parser("plan", help="search the placement (DistServe Algorithm 1/2) and write a plan file")
    pl.add_argument("config", help=CONFIG_HELP)
    pl.add_argument("-o", "--output", default="plan.yaml", help="plan file to write (default: plan.yaml)")
    pl.add_argument("--mode", choices=("auto", "disaggregated", "colocated"),
                    help="architecture: auto (default: planner.mode, itself auto) writes whichever sustains the SLOs "
                         "at the higher rate per device; the other two force it, and both are still reported")
    _add_no_calibrate(pl, "plan")
    pl.add_argument("--quiet", action="store_true", help="print nothing but errors")
    pl.set_defaults(func=("launcher.commands.plan", "plan"))
    pr = sub.add_parser("profile", help="time the real engine on this hardware and fit the latency model")
    pr.add_argument("config", help=CONFIG_HELP)
    pr.add_argument("-o", "--output", default="profile.json", help="profile file to write (default: profile.json)")
    pr.add_argument("--tp", help="TP degrees to profile, e.g. 1,2 (default: up to two that fit)")
    pr.add_argument("--alone", action="store_true", help="one instance at a time instead of every slot busy")
    pr.add_argument("--pp", help="PP degrees to measure too, e.g. 1,2: each one's stage hand-off and how far "
                                 "its stages overlap with batches in flight (default: none; the profile then "
                                 "assumes scheduler.batches_in_flight)")
    pr.add_argument("--run-dir", help="where the profiling job's files go (default: run_dir)")
    pr.add_argument("--quiet", action="store_true", help="print nothing but errors")
    pr.set_defaults(func=("launcher.commands.profile", "profile"))
    sb = sub.add_parser("sbatch", help="render an sbatch script that runs the job inside its allocation")
    sb.add_argument("config", help=CONFIG_HELP)
    sb.add_argument("-o", "--output", default="job.sbatch",
                    help="script to write (default: job.sbatch; its plan goes beside it, and with --serve its API key)")
    sb.add_argument("--nodes", type=int, default=0, help="nodes to ask for (default: the hosts the plan uses)")
    sb.add_argument("--time", default="01:00:00", help="the job's time limit, as sbatch takes it (default: 01:00:00)")
    sb.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    sb.add_argument("--launcher", choices=("mpirun", "srun"), default="mpirun",
                    help="how the job starts its ranks inside the allocation (default: mpirun)")
    sb.add_argument("--serve", action="store_true", help="serve the OpenAI API from the allocation instead of "
                                                         "generating (the job log prints the URL)")
    sb.add_argument("--port", type=int, help="with --serve: the port (default: serve.port)")
    sb.add_argument("--log-interval", type=float, metavar="SECONDS",
                    help="seconds between the job log's progress lines (default: generate's, 10)")
    sb.add_argument("--quiet", action="store_true", help="do not print what was written")
    sb.set_defaults(func=("launcher.commands.sbatch", "sbatch"))
    si = sub.add_parser("simulate", help="replay a trace (arrival times and lengths) on a placement with the "
                                          "planner's simulator: per-request timings and SLO attainment")
    si.add_argument("config", help=CONFIG_HELP)
    si.add_argument("--trace", required=True,
                    help="JSON list of {start_time, prompt_len, output_len} (DistServe's form) or a pdlaunch results file")
    si.add_argument("--plan", help="plan file to simulate (default: the config's placement)")
    si.add_argument("--slo-scales", default="0.4,0.6,0.8,1.0,1.2", help="multiples of both SLOs to report")
    si.add_argument("-o", "--output", help="JSON report: per-request timings, attainment per SLO scale")
    _add_no_calibrate(si, "simulate")
    si.add_argument("--quiet", action="store_true", help="no summary table")
    si.set_defaults(func=("launcher.commands.plan", "simulate"))
    be = sub.add_parser("bench", help="replay a workload at several rates; measured vs simulated attainment")
    be.add_argument("config", help=CONFIG_HELP)
    be.add_argument("--rates", required=True, help="total request rates, e.g. 0.5,1,2")
    be.add_argument("--requests", type=int, default=100, help="requests per rate (default 100)")
    be.add_argument("--compare-colocated", action="store_true",
                    help="also run colocated placements on the same ranks: chunked prefill and prefill-first")
    be.add_argument("--colocated-rates", help="total request rates for the colocated placement (default: --rates)")
    be.add_argument("--bisect", type=int, nargs="?", const=12, default=0, metavar="N",
                    help="narrow each system's goodput with up to N more engine runs each (default N: 12) at "
                         "bracket midpoints, the systems in turns, until each bracket is narrower than --bisect-to "
                         "of its rate (default 0: tested rates only)")
    be.add_argument("--bisect-to", type=float, default=0.1, metavar="SHARE",
                    help="with --bisect: the bracket width to stop at, as a share of the rate that passed (default 0.1)")
    be.add_argument("--time-budget", type=float, metavar="MIN",
                    help="start a bisection run only if it is expected to end within MIN minutes of the "
                         "bench's start (the tested rates always run)")
    be.add_argument("-o", "--output", default="runs/bench", help="directory for JSON, PNG and results")
    be.add_argument("--quiet", action="store_true", help="no progress or summary output")
    be.set_defaults(func=("launcher.commands.bench", "bench"))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        module, function = args.func
        return getattr(importlib.import_module(module), function)(args)
    except UserError as e:
        print(f"pdlaunch: error: {e}" if not str(e).startswith("pdlaunch") else str(e), file=sys.stderr)
        return e.exit_code
    finally:
        from launcher.locks import release_all

        release_all()  # the run directory and output this command owned


if __name__ == "__main__":
    sys.exit(main())
