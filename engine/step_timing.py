"""`pdlaunch profile`: times real prefill batches and decode steps of one instance on this hardware.

The leader builds step plans of chosen shapes (ragged prefill batches of several lengths; decode
steps at several batch sizes and context lengths), runs each on all ranks of the instance like any
step, and reports median wall times to the controller, which writes them for the launcher to fit.
Where several instances profile at once, instance 0 then times some shapes while the others idle,
run the same phase and run the other phase (beside_other_phase): the contention ratios.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections import deque

from contracts.protocol import CONTROLLER, Heartbeat, PeerLoad, ProfilePeer, Request, SeqChunk, StepPlan
from contracts.sampling_params import SamplingParams
from engine.blocks import blocks_for
from engine.control_plane import StepSender, receive, send, take
from engine.scheduler import Scheduler
from engine.sequence import InstanceLimits

PREFILL_LENS = [16, 64, 128, 256, 512]
PREFILL_BATCHES = [1, 2, 4]
DECODE_BATCHES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]  # small batches are far from linear on CPUs
DECODE_CONTEXTS = [32, 128, 256, 768]
MAX_PREFILL_TOKENS = 2048
# chunked prefill's mixed steps: (decodes, their context, prompt chunk, tokens cached before it)
MIXED_SHAPES = [(4, 128, 64, 0), (8, 128, 128, 0), (8, 256, 128, 256), (16, 128, 256, 128), (16, 256, 64, 448)]
# extend steps: (prompts, tail tokens each, tokens cached before each: one shared prefix's blocks), as
# prefix caching runs tails behind a system prompt (and chunked prefill a long prompt's later chunks)
EXTEND_SHAPES = [(1, 16, 512), (4, 16, 512), (16, 16, 512), (8, 16, 256), (8, 32, 128), (4, 64, 256), (1, 128, 384),
                 (2, 256, 256)]
LOOP_PROMPTS = [16, 48, 96, 160, 256] * 3  # the loop-overhead phase's requests, max_tokens LOOP_TOKENS each
LOOP_TOKENS = 12


def _prefill_plan(batch: int, length: int, block_size: int, vocab: int) -> StepPlan:
    per = blocks_for(length + 1, block_size)
    return StepPlan(seqs=tuple(SeqChunk(i, tuple(3 + (i * 7 + j) % (vocab - 3) for j in range(length)), 0,
                                        tuple(range(i * per, (i + 1) * per)), SamplingParams(), 0)
                               for i in range(batch)))


def _decode_plan(batch: int, context: int, block_size: int) -> StepPlan:
    per = blocks_for(context + 1, block_size)
    return StepPlan(seqs=tuple(SeqChunk(i, (3,), context, tuple(range(i * per, (i + 1) * per)), SamplingParams(), 1)
                               for i in range(batch)))


def _mixed_plan(batch: int, context: int, chunk: int, start: int, block_size: int, vocab: int) -> StepPlan:
    """`batch` decodes over `context` cached tokens each, then one prompt chunk of `chunk` tokens
    after `start` cached ones (its blocks after theirs)."""
    decodes = _decode_plan(batch, context, block_size).seqs
    first = batch * blocks_for(context + 1, block_size)
    table = tuple(range(first, first + blocks_for(start + chunk, block_size)))
    tokens = tuple(3 + (j * 7) % (vocab - 3) for j in range(chunk))
    return StepPlan(seqs=decodes + (SeqChunk(batch, tokens, start, table, SamplingParams(), 0),))


def _extend_plan(batch: int, tail: int, cached: int, block_size: int, vocab: int) -> StepPlan:
    """`batch` prompt chunks of `tail` tokens, each after the same `cached` tokens (the prefix's
    blocks shared by every block table, as the prefix cache shares them), their own blocks after."""
    prefix = blocks_for(cached, block_size)
    own = blocks_for(cached + tail, block_size) - prefix
    return StepPlan(seqs=tuple(
        SeqChunk(i, tuple(3 + (i * 7 + j) % (vocab - 3) for j in range(tail)), cached,
                 tuple(range(prefix)) + tuple(range(prefix + i * own, prefix + (i + 1) * own)), SamplingParams(), 0)
        for i in range(batch)))


def loop_overhead(ctx, steps: StepSender, runner, limits: InstanceLimits) -> dict:
    """What a step costs the leader beyond its forward (scheduling, the step plan to the other
    ranks, taking the tokens back): the engine's own Scheduler drives synthetic requests through
    the real runner, and each step's loop time minus its runner.execute time is one sample, with
    the step's context tokens (prompt tokens for prefill, cached + new for decode). Prefill-first,
    so that every step is of one phase."""
    vocab = runner.shape.vocab_size
    sched = Scheduler("colocated", ctx.instance.id, ctx.instance.size,
                      dataclasses.replace(limits, colocated_policy="prefill_first"))
    for i, n in enumerate(p for p in LOOP_PROMPTS if p + LOOP_TOKENS < limits.max_model_len):
        prompt = [3 + (i * 11 + j) % (vocab - 3) for j in range(n)]
        sched.add_request(Request(i, tuple(prompt), SamplingParams(max_tokens=LOOP_TOKENS, ignore_eos=True), time.time()))
    samples = {"prefill": [], "decode": []}
    while sched.busy():
        started = time.perf_counter()
        step = sched.schedule().step
        if not step.seqs:
            break  # nothing fits the cache: no more samples to take
        steps.send(step)
        forward_started = time.perf_counter()
        tokens, logits = runner.execute(step)
        forward_ms = (time.perf_counter() - forward_started) * 1e3
        sched.on_step(tokens, logits)
        phase = "prefill" if all(x.start_pos == 0 for x in step.seqs) else "decode"
        samples[phase].append({"context_tokens": sum(x.start_pos + len(x.token_ids) for x in step.seqs),
                               "ms": (time.perf_counter() - started) * 1e3 - forward_ms})
    return samples


def _timed(steps: StepSender, runner, plan: StepPlan, repeats: int) -> float:
    """Median ms of `repeats` runs of one step on every rank of the instance, nothing else in flight."""
    times = []
    for _ in range(repeats):
        steps.send(plan)
        started = time.perf_counter()
        runner.execute(plan)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


PIPELINE_PREFILLS = [64, 128, 256]      # one-prompt prefill lengths timed on a PP instance (= the bench's probe)
# (batch, context) of the decode steps timed on a PP instance (smaller batches if the KV cache is
# small): batch 1 at the contexts `pdlaunch bench`'s probe reaches, then the groups a loaded instance runs
PIPELINE_DECODES = [(1, 64), (1, 256), (2, 64), (8, 64), (32, 64)]
PIPELINE_ROUNDS = 6                     # steps per in-flight window, for the interval


def pipeline_profile(ctx, runner, limits: InstanceLimits, repeats: int = 3) -> dict:
    """A PP instance's leader: for each shape, its latency (one step through every stage, nothing
    else in flight) and its interval (the time per step while `pipeline_depth` steps are in flight,
    as the engine runs with batches in flight). PP adds latency/stage hand-offs over PP1 and, if
    the stages overlap, divides the interval: both are measured, not assumed."""
    vocab, block_size = runner.shape.vocab_size, limits.block_size
    depth = max(1, limits.pipeline_depth)
    steps = StepSender(ctx)
    shapes = [("prefill", {"lens": [n]}, _prefill_plan(1, n, block_size, vocab)) for n in PIPELINE_PREFILLS
              if n < limits.max_model_len and blocks_for(n + 1, block_size) <= limits.num_blocks]
    decodes = set()
    for batch, context in PIPELINE_DECODES:
        context = min(context, limits.max_model_len - 2)
        decodes.add((min(batch, limits.num_blocks // blocks_for(context + 1, block_size)), context))
    for batch, context in sorted(d for d in decodes if d[0] > 0):
        shapes.append(("decode", {"batch": batch, "context_sum": batch * (context + 1)},
                       _decode_plan(batch, context, block_size)))

    def interval_ms(plan: StepPlan, latency_ms: float) -> float:
        """Steady-state time per step: a window of N steps with `depth` in flight lasts one
        latency (the pipeline filling and draining) plus N - 1 intervals."""
        in_flight: deque = deque()
        n = PIPELINE_ROUNDS * depth
        started = time.perf_counter()
        for _ in range(n):
            steps.send(plan)
            in_flight.append(runner.launch(plan))
            if len(in_flight) == depth:
                runner.collect(in_flight.popleft())
        while in_flight:
            runner.collect(in_flight.popleft())
        steady = ((time.perf_counter() - started) * 1e3 - latency_ms) / (n - 1)
        return max(steady, latency_ms / depth)  # noise aside, no step overlaps more than depth

    samples = []
    _timed(steps, runner, _prefill_plan(1, 16, block_size, vocab), 1)  # warm-up
    for phase, shape, plan in shapes:
        latency = _timed(steps, runner, plan, repeats)
        samples.append({"phase": phase, **shape, "latency_ms": latency,
                        "interval_ms": statistics.median(interval_ms(plan, latency) for _ in range(repeats))})
        send(ctx.world, Heartbeat(ctx.instance.id, len(samples)), CONTROLLER)
    steps.send(StepPlan(shutdown=True))
    steps.flush()
    return {"pipeline": samples, "depth": depth}


def _shapes(limits: InstanceLimits, vocab: int) -> dict[str, list[tuple[dict, StepPlan]]]:
    """Every prefill and decode shape the profile times that fits this instance's cache and
    context: (the sample's key fields, the step plan) per phase."""
    num_blocks, block_size, max_len = limits.num_blocks, limits.block_size, limits.max_model_len
    shapes = {"prefill": [], "decode": [], "mixed": [], "extend": []}
    for length in PREFILL_LENS:
        for batch in PREFILL_BATCHES:
            if (batch * length <= MAX_PREFILL_TOKENS and length < max_len
                    and batch * blocks_for(length + 1, block_size) <= num_blocks):
                shapes["prefill"].append(({"lens": [length] * batch}, _prefill_plan(batch, length, block_size, vocab)))
    for context in DECODE_CONTEXTS:
        for batch in DECODE_BATCHES:
            if context + 1 < max_len and batch * blocks_for(context + 1, block_size) <= num_blocks:
                shapes["decode"].append(({"batch": batch, "context_sum": batch * (context + 1)},
                                         _decode_plan(batch, context, block_size)))
    for batch, context, chunk, start in MIXED_SHAPES:
        blocks = batch * blocks_for(context + 1, block_size) + blocks_for(start + chunk, block_size)
        if max(context + 1, start + chunk) < max_len and blocks <= num_blocks:
            shapes["mixed"].append(({"lens": [chunk], "starts": [start], "batch": batch,
                                     "context_sum": batch * (context + 1)},
                                    _mixed_plan(batch, context, chunk, start, block_size, vocab)))
    for batch, tail, cached in EXTEND_SHAPES:
        blocks = blocks_for(cached, block_size) + batch * (blocks_for(cached + tail, block_size)
                                                           - blocks_for(cached, block_size))
        if cached + tail < max_len and blocks <= num_blocks:
            shapes["extend"].append(({"lens": [tail] * batch, "starts": [cached] * batch},
                                     _extend_plan(batch, tail, cached, block_size, vocab)))
    return shapes


def run_profile(ctx, runner, limits: InstanceLimits, repeats: int = 3, decode_repeats: int = 5) -> dict:
    """Leader side: every shape that fits the cache and the context, `repeats` times each (decode
    steps, short and noisier, `decode_repeats` times); median ms. Then, where several instances
    profile at once, each phase's steps beside the other phase (beside_other_phase), and the step
    loop's own cost beyond the forward (loop_overhead)."""
    steps = StepSender(ctx)
    shapes = _shapes(limits, runner.shape.vocab_size)
    _timed(steps, runner, _prefill_plan(1, 16, limits.block_size, runner.shape.vocab_size), repeats)  # warm-up
    samples = {"prefill": [], "decode": [], "mixed": [], "extend": []}
    for phase, count in (("prefill", repeats), ("decode", decode_repeats), ("mixed", repeats), ("extend", repeats)):
        for key, plan in shapes[phase]:
            samples[phase].append(key | {"ms": _timed(steps, runner, plan, count)})
            send(ctx.world, Heartbeat(ctx.instance.id, len(samples[phase])), CONTROLLER)
    if len(ctx.plan.instances) > 1:
        samples["beside_other_phase"] = beside_other_phase(ctx, steps, runner, limits, shapes, repeats,
                                                           decode_repeats)
    samples["overhead"] = loop_overhead(ctx, steps, runner, limits)
    steps.send(StepPlan(shutdown=True))
    steps.flush()
    return samples


BESIDE_PREFILL_LENS = (64, 128, 256)  # the shapes timed beside each load: a subset of the above
BESIDE_DECODE_CONTEXTS = (32, 256)
PEER_POLL_S = 0.01


def _await(ctx, peers: list[int], load: PeerLoad) -> None:
    """Waits for `load` from every other leader; any other means the two sides disagree."""
    for peer in peers:
        if receive(ctx.world, peer, (ProfilePeer,), idle_s=PEER_POLL_S).load is not load:
            raise RuntimeError(f"profile: leader {peer} broke the beside-other-phase hand-shake")


def _tell(ctx, peers: list[int], load: PeerLoad) -> None:
    """Every other leader switches to `load`; returns once each has finished the step it was in
    and switched."""
    for peer in peers:
        send(ctx.world, ProfilePeer(load), peer)
    _await(ctx, peers, load)


def beside_other_phase(ctx, steps: StepSender, runner, limits: InstanceLimits, shapes: dict, repeats: int,
                       decode_repeats: int) -> dict:
    """What a disaggregated node's instances do to each other. Instance 0's leader times some of
    its shapes three ways in a row, while every other instance idles, runs the same phase, and
    runs the other phase (a decode step beside prefills, a prefill beside decodes), so that the
    ratios come from side-by-side timings on a machine whose speed drifts. On CPUs whose cores
    share caches and memory, a step beside the other phase can cost more than beside its own
    (the bench's decode steps of 8-16 sequences ran 1.2-1.35x beside a prefill). Every other
    leader keeps up the load it is told until told "done". Returns instance 0's samples (ms: beside
    the other phase; same_ms, alone_ms), else {}."""
    leaders = [inst.leader for inst in ctx.plan.instances]
    timer, peers = leaders[0], leaders[1:]
    if ctx.rank != timer:
        _load_the_node(ctx, steps, runner, limits, timer, shapes)
        return {}
    _await(ctx, peers, PeerLoad.READY)
    chosen = {"prefill": [x for x in shapes["prefill"] if x[0]["lens"][0] in BESIDE_PREFILL_LENS],
              "decode": [x for x in shapes["decode"]
                         if x[0]["context_sum"] // x[0]["batch"] - 1 in BESIDE_DECODE_CONTEXTS]}
    out = {"prefill": [], "decode": []}
    for phase, other, count in (("decode", "prefill", decode_repeats), ("prefill", "decode", repeats)):
        for key, plan in chosen[phase]:
            ms = {}
            for load in (PeerLoad.IDLE, PeerLoad(phase), PeerLoad(other)):
                _tell(ctx, peers, load)
                ms[load.value] = _timed(steps, runner, plan, count)
            out[phase].append(key | {"ms": ms[other], "same_ms": ms[phase], "alone_ms": ms["idle"]})
            send(ctx.world, Heartbeat(ctx.instance.id, len(out[phase])), CONTROLLER)
    _tell(ctx, peers, PeerLoad.DONE)
    return out


def _load_the_node(ctx, steps: StepSender, runner, limits: InstanceLimits, timer: int, shapes: dict) -> None:
    """A neighbour of the timing instance: steps of the phase it is told, back to back, as a loaded
    instance runs them (a prefill batch of about L_m tokens; a decode batch of about max_batch),
    or none while told "idle"; each switch acknowledged."""
    load = {"prefill": min(shapes["prefill"], key=lambda x: abs(sum(x[0]["lens"]) - limits.token_budget))[1],
            "decode": min(shapes["decode"], key=lambda x: (abs(x[0]["batch"] - limits.max_batch),
                                                          x[0]["context_sum"]))[1]}
    send(ctx.world, ProfilePeer(PeerLoad.READY), timer)
    told = receive(ctx.world, timer, (ProfilePeer,), idle_s=PEER_POLL_S)
    while True:
        send(ctx.world, told, timer)
        if told.load is PeerLoad.DONE:
            return
        while (got := take(ctx.world, (ProfilePeer,), timer)) is None:
            if told.load is PeerLoad.IDLE:
                time.sleep(PEER_POLL_S)
            else:
                steps.send(load[told.load.value])
                runner.execute(load[told.load.value])
        told = got[1]
