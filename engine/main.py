"""Rank entry point: `python -m engine.main --job RUN_DIR/job.json`, one process per rank.

Every rank reads the same job file (contracts/job_file.py: config + plan + paths), learns its role from its global rank, and
runs the controller, an instance leader, or an instance follower. Any exception on any rank
prints a one-line diagnosis naming the rank, host and what it was doing, then aborts the whole
MPI job so that no rank is left waiting.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Known library warnings that say nothing to a pdlaunch user, silenced by their text (others still
# show): megatron-core's optional packages the engine never uses (Transformer Engine, Apex, absl),
# and torch's deprecation of the all_gather_into_tensor that megatron's gather calls.
for _message in (r".*Transformer Engine", r".*Apex", r".*absl", r".*all_gather_into_tensor.* is deprecated"):
    warnings.filterwarnings("ignore", message=_message)

from contracts.job_file import JobFile  # noqa: E402
from launcher.model_files import read_shape  # noqa: E402

DOING = {"what": "starting up"}
# What a rank's error says when the rank at the other end of a connection went away (gloo, NCCL, sockets).
PEER_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe", "remote process exited",
             "socket closed")
PEER_LOST_GRACE_S = 5.0  # how long such a rank waits for the launcher to report the rank that died first


def _lost_a_peer(error: BaseException) -> bool:
    """A rank that failed only because a peer died must not speak first: Open MPI reports just the
    first rank that aborts, so an instant abort here would hide the dead rank's name (measured: a
    SIGKILLed PP stage blamed on its neighbour's 'Connection reset by peer')."""
    text = str(error).lower()
    return any(words in text for words in PEER_LOST)


def _run_controller(ctx, job: JobFile) -> None:
    from contracts.answer_key import answer_hash
    from contracts.batch_io import read_checked
    from engine.controller import Controller
    from engine.progress import Reporter
    from engine.results import ResultWriter
    from engine.tokenizer import TextCodec

    codec = TextCodec(job.model_dir)
    specs = read_checked(job.requests)
    reporter = Reporter(len(specs), quiet=job.quiet, slo=job.config.slo, interval=job.log_interval)
    name = job.config.serve.model_name or os.path.basename(job.model_dir.rstrip("/"))  # the launcher sets it
    writer = ResultWriter(job.output, codec, name, job.dump_logits,
                          on_result=reporter.advance,
                          keys=lambda spec: {"answer_hash": answer_hash(spec, job.config, job.model_hash),
                                             "model_hash": job.model_hash})
    DOING["what"] = "dispatching requests and collecting results"
    with reporter:
        controller = Controller(ctx, job.config, codec, read_shape(job.model_dir).vocab_size)
        _freeze_startup_heap()
        stats = controller.run(controller.replay(specs, writer), writer)
    writer.close()
    reporter.summary(writer.records, stats, job.report, ctx.dtype, job.output,
                     job.plan.predicted.get("mode") and job.plan.predicted)


def _freeze_startup_heap() -> None:
    """Moves what start-up allocated (modules, weights' wrappers, the tokenizer, the web stack) out of
    the garbage collector's sight: a full collection over it stalled rank 0's controller and HTTP
    threads together for 0.4-0.7 s under a burst of requests (measured), as it would a step loop."""
    import gc

    gc.collect()
    gc.freeze()


def _run_server(ctx, job: JobFile) -> None:
    """Serve mode: the OpenAI-compatible HTTP server on a thread, the controller's loop on this one,
    until a drain (SIGTERM, or the launcher's drain file) ends it."""
    import signal

    from engine.controller import Controller
    from engine.frontend import Frontend
    from engine.http_api import build_app
    from engine.http_server import HttpServer
    from engine.serve_metrics import ServeMetrics
    from engine.tokenizer import TextCodec

    cfg = job.config
    codec = TextCodec(job.model_dir)
    controller = Controller(ctx, cfg, codec, read_shape(job.model_dir).vocab_size)
    frontend = Frontend(controller, cfg.serve, ServeMetrics(cfg.slo, cfg.scheduler.block_size), job.drain_file,
                        job.output or None)
    name = cfg.serve.model_name or os.path.basename(job.model_dir.rstrip("/"))  # the launcher sets it
    DOING["what"] = f"opening the HTTP port {cfg.serve.host}:{cfg.serve.port}"
    app = build_app(frontend, codec, name, cfg.model.max_model_len, cfg.serve.api_key, cfg.serve.max_body_bytes)
    server = HttpServer(app, cfg.serve.host, cfg.serve.port)
    host = socket.gethostname() if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    auth = f"{len(cfg.serve.api_key)} API key(s) required on /v1" if cfg.serve.api_key else "no API key"
    frontend.announce = (f"pdlaunch: serving '{name}' at http://{host}:{server.port}/v1 (OpenAI completions and "
                         f"chat, {auth}; /health, /metrics open); SIGTERM drains")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, frontend.drain)
    server.start()
    _freeze_startup_heap()
    DOING["what"] = "serving requests"
    stats = controller.run(frontend, frontend)
    server.stop()
    frontend.close()
    served = sum(s["forward_steps"] for s in stats["instances"])
    print(f"pdlaunch: drained in {frontend.drain_seconds():.1f} s, after serving for {stats['wall_s']:.0f} s "
          f"({served} forward steps); every rank ends", file=sys.stderr, flush=True)


def _run_profile_controller(ctx, job: JobFile) -> None:
    """Profile mode: collect each instance's timings and write them for the launcher to fit."""
    import json

    from contracts.protocol import Heartbeat, ProfileSamples
    from engine.control_plane import receive

    DOING["what"] = "waiting for profile timings"
    out = {}
    for inst in ctx.plan.instances:
        while True:  # heartbeats mark progress; the timings end the wait
            msg = receive(ctx.world, inst.leader, (Heartbeat, ProfileSamples), idle_s=0.01,
                          timeout_s=max(job.config.scheduler.watchdog_s, 600.0),
                          waiting_for=f"{inst.role} instance {inst.id}'s profile timings")
            if isinstance(msg, ProfileSamples):
                out[str(inst.id)] = {"tp": inst.tp, "dtype": ctx.dtype, "samples": msg.samples}
                break
    with open(job.profile_samples, "w") as f:
        json.dump(out, f)


def _run_instance(ctx, job: JobFile) -> None:
    from engine.instance import Leader, follow
    from engine.runner import ModelRunner
    from engine.scheduler import Scheduler
    from engine.sequence import InstanceLimits
    from engine.watchdog import ControllerWatch

    cfg = job.config
    shape = read_shape(job.model_dir)
    s = cfg.scheduler
    limits = InstanceLimits(s.prefill_kv_blocks if ctx.instance.role == "prefill" else s.decode_kv_blocks,
                            s.block_size, job.token_budgets[ctx.instance.id], s.max_decode_batch, cfg.model.max_model_len,
                            ctx.instance.pp if s.batches_in_flight else 1, s.colocated_policy,
                            s.decode_prefix_reuse if ctx.instance.role == "decode" else s.prefix_caching)
    DOING["what"] = "loading weights"
    runner = ModelRunner(ctx, shape, job.model_dir, ctx.dtype, limits.num_blocks, s.block_size,
                         cfg.model.max_model_len, limits.pipeline_depth)
    DOING["what"] = f"serving as {ctx.instance.role} instance {ctx.instance.id}"
    _freeze_startup_heap()
    if not ctx.is_leader:
        follow(ctx, runner, s.idle_sleep_ms / 1e3)
        return
    if job.mode == "profile":
        from contracts.protocol import CONTROLLER, Heartbeat, ProfileSamples
        from engine.control_plane import send
        from engine.step_timing import pipeline_profile, run_profile

        DOING["what"] = "profiling"
        send(ctx.world, Heartbeat(ctx.instance.id, 0), CONTROLLER)
        timings = (pipeline_profile if ctx.instance.pp > 1 else run_profile)(ctx, runner, limits)
        send(ctx.world, ProfileSamples(ctx.instance.id, timings), CONTROLLER)
        return
    from engine.tokenizer import TextCodec

    codec = TextCodec(job.model_dir)
    sched = Scheduler(ctx.instance.role, ctx.instance.id, ctx.instance.size, limits, shape.eos_token_ids,
                      codec.decode, want_logits=bool(job.dump_logits),
                      leaders=tuple(i.leader for i in ctx.plan.instances))
    Leader(ctx, runner, sched, s.idle_sleep_ms / 1e3, ControllerWatch(ctx, s.watchdog_s)).run()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="pdlaunch rank entry point")
    parser.add_argument("--job", required=True, help="job file written by the launcher")
    args, _ = parser.parse_known_args(argv)  # the deepspeed launcher appends --local_rank
    job = JobFile.read(args.job)
    ctx = None
    try:
        from engine.control_plane import join

        DOING["what"] = "initialising MPI"
        ctx = join(job.plan, job.config.cluster)
        if ctx.is_controller:  # no model, no torch: it takes no part in the data plane
            ctx.agree_dtype(job.config.model.dtype, native_bf16=True)
        else:
            from engine.data_plane import start

            DOING["what"] = "initialising torch.distributed"
            start(ctx, job.config.cluster, job.config.model.dtype)
        if ctx.is_controller and job.mode == "profile":
            _run_profile_controller(ctx, job)
        elif ctx.is_controller and job.mode == "serve":
            _run_server(ctx, job)
        elif ctx.is_controller:
            _run_controller(ctx, job)
        else:
            from engine.control_plane import Beacon

            if job.mode == "serve":  # rank 0 drains on SIGTERM and then ends every rank; a direct one must not cut that short
                import signal

                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            beacon = Beacon(ctx.world)
            _run_instance(ctx, job)
            beacon.stop()
        ctx.world.Barrier()
        if not ctx.is_controller:
            import torch.distributed as dist

            dist.destroy_process_group()  # NCCL's communicators end here, not in interpreter teardown (which can hang)
        return 0
    except BaseException as e:  # noqa: BLE001 - any failure must end the whole job
        rank = ctx.rank if ctx else os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "?"))
        role = "controller" if ctx and ctx.is_controller else \
            (f"{ctx.instance.role} instance {ctx.instance.id} (tp {ctx.tp_rank}, pp {ctx.pp_stage})" if ctx else "?")
        detail = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
        if _lost_a_peer(e):  # mpirun ends this rank during the wait if the peer died; else its word is all there is
            time.sleep(PEER_LOST_GRACE_S)
            detail += " (its peer went away; no rank was reported dead)"
        print(f"pdlaunch: rank {rank} on {socket.gethostname()} ({role}) failed while {DOING['what']}: "
              f"{detail}", file=sys.stderr, flush=True)
        if os.environ.get("PDLAUNCH_TRACEBACK"):
            traceback.print_exc()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(3)
        return 3


if __name__ == "__main__":
    sys.exit(main())
