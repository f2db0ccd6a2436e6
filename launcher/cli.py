"""`pdlaunch`: the command line. Arguments only; each command's work is in its own module
(launcher.jobs: generate, sbatch; launcher.profiling; launcher.placement: plan, simulate;
launcher.bench), imported when chosen. Every user mistake ends here as one line on stderr and
exit code 2, before any rank starts.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from launcher.errors import UserError


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
    p.add_argument("--overwrite", action="store_true",
                   help="run every request again over an output that holds results (kept as OUTPUT.bak)")
    p.add_argument("--dump-logits", metavar="DIR", help="save every generated token's logits (debugging)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"pdlaunch: {message}; see `pdlaunch --help`")


def main(argv=None) -> int:
    parser = _Parser(prog="pdlaunch", description="Disaggregated prefill/decode LLM inference launcher")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="offline batch generation on the configured placement")
    _add_job_args(gen)
    gen.set_defaults(func=("launcher.jobs", "generate"))
    sv = sub.add_parser("serve", help="serve the OpenAI API (completions, chat, streaming) from the configured "
                                      "placement until SIGTERM, which drains")
    sv.add_argument("config", help="job config YAML (see configs/)")
    sv.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port to listen on (default: serve.port, 8000)")
    sv.add_argument("--launcher", choices=("mpirun", "deepspeed", "srun"), default="mpirun",
                    help="how to start the ranks (srun: inside a Slurm allocation)")
    sv.add_argument("--plan", help="plan file to run (from `pdlaunch plan`), instead of placement.plan")
    sv.add_argument("--run-dir", help="where the job, plan and rank log go (default: run_dir)")
    sv.add_argument("--dry-run", action="store_true", help="print the launch command and stop")
    sv.set_defaults(func=("launcher.serving", "serve"))
    pl = sub.add_parser("plan", help="search the placement (DistServe Algorithm 1/2) and write a plan file")
    pl.add_argument("config")
    pl.add_argument("-o", "--output", default="plan.yaml", help="plan file to write (default: plan.yaml)")
    pl.add_argument("--quiet", action="store_true")
    pl.set_defaults(func=("launcher.placement", "plan"))
    pr = sub.add_parser("profile", help="time the real engine on this hardware and fit the latency model")
    pr.add_argument("config")
    pr.add_argument("-o", "--output", default="profile.json")
    pr.add_argument("--tp", help="TP degrees to profile, e.g. 1,2 (default: up to two that fit)")
    pr.add_argument("--alone", action="store_true", help="one instance at a time instead of every slot busy")
    pr.add_argument("--pp", help="PP degrees to measure too, e.g. 1,2: each one's stage hand-off and how far "
                                 "its stages overlap with batches in flight (default: none; the profile then "
                                 "assumes scheduler.batches_in_flight)")
    pr.add_argument("--run-dir")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=("launcher.profiling", "profile"))
    sb = sub.add_parser("sbatch", help="render an sbatch script that runs the job inside its allocation")
    sb.add_argument("config")
    sb.add_argument("-o", "--output", default="job.sbatch")
    sb.add_argument("--nodes", type=int, default=0, help="default: the hosts the plan uses")
    sb.add_argument("--time", default="01:00:00")
    sb.add_argument("--partition")
    sb.add_argument("--launcher", choices=("mpirun", "srun"), default="mpirun")
    sb.add_argument("--serve", action="store_true", help="serve the OpenAI API from the allocation instead of "
                                                         "generating (the job log prints the URL)")
    sb.add_argument("--port", type=int, help="with --serve: the port (default: serve.port)")
    sb.add_argument("--quiet", action="store_true")
    sb.set_defaults(func=("launcher.jobs", "sbatch"))
    si = sub.add_parser("simulate", help="replay a trace (arrival times and lengths) on a placement with the "
                                          "planner's simulator: per-request timings and SLO attainment")
    si.add_argument("config")
    si.add_argument("--trace", required=True,
                    help="JSON list of {start_time, prompt_len, output_len} (DistServe's form) or a pdlaunch results file")
    si.add_argument("--plan", help="plan file to simulate (default: the config's placement)")
    si.add_argument("--slo-scales", default="0.4,0.6,0.8,1.0,1.2", help="multiples of both SLOs to report")
    si.add_argument("-o", "--output", help="JSON report: per-request timings, attainment per SLO scale")
    si.add_argument("--quiet", action="store_true")
    si.set_defaults(func=("launcher.placement", "simulate"))
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
    be.set_defaults(func=("launcher.bench", "bench"))
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
