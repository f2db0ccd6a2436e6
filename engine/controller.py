"""The controller (global rank 0): requests in, dispatch, results out.

It releases requests at their arrival times (all at t=0 for offline jobs), sends each to the
least-loaded prefill (or colocated) instance and names the least-loaded decode instance for it
(the prefill instance then deals with that decode instance directly), counts "prefill done"
notices to track each prefill instance's load, and writes each finished request as soon as it
arrives. What comes back to it is ids, tokens and timings: prompts go out once, tensors never.
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from engine import comm as c
from engine.blocks import blocks_for
from engine.comm import RankContext
from engine.results import Answered, ResultWriter
from engine.scheduler import reserved_blocks
from engine.tokenizer import TextCodec
from engine.watchdog import Watchdog
from launcher.batch_io import RequestSpec
from launcher.config import JobConfig
from launcher.protocol import (Heartbeat, InstanceStats, NextArrival, PrefillDone, Request, Result,
                               SamplingParams, Signal, Tag, check_sampling)
from launcher.stats import arrival_gap


@dataclass
class Pending(Answered):
    offset_s: float = 0.0                    # arrival, s after the start
    prompt_ids: tuple[int, ...] = ()
    params: Optional[SamplingParams] = None  # None: refused (spec.error says why)
    decode_instance: int = -1
    at: Optional[int] = None                 # the instance it waits at once dispatched, for a stall diagnosis


def arrival_offsets(n: int, arrival: str, rate: float, cv: float, seed: int) -> list[float]:
    """Arrival times (s from start): all at 0, Poisson, or gamma with coefficient of variation cv."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += arrival_gap(rng, arrival, rate, cv)
        out.append(t)
    return out


class Controller:
    def __init__(self, ctx: RankContext, cfg: JobConfig, codec: TextCodec, specs: list[RequestSpec],
                 writer: ResultWriter, vocab_size: int):
        self.ctx, self.cfg, self.codec, self.writer = ctx, cfg, codec, writer
        self.max_len = cfg.model.max_model_len
        self.vocab_size = vocab_size
        self.entry = [i for i in ctx.plan.instances if i.role in ("prefill", "colocated")]
        self.decoders = [i for i in ctx.plan.instances if i.role == "decode"]
        self.load = {i.id: 0 for i in ctx.plan.instances}
        w = cfg.workload
        offsets = arrival_offsets(len(specs), w.arrival, w.rate, w.cv, w.seed)
        self.pending = [self._prepare(s, off if s.arrival_s is None else s.arrival_s) for s, off in zip(specs, offsets)]
        self.by_id: dict[int, Pending] = {}

    def _prompt_ids(self, spec: RequestSpec) -> list[int]:
        """The request's token ids; raises ValueError with the reason it cannot run."""
        if spec.kind == "chat":
            if self.cfg.model.chat_template != "auto":
                raise ValueError("chat requests need model.chat_template: auto")
            try:
                text = self.codec.render_chat(spec.messages)
            except Exception as e:  # a template error fails this request only
                raise ValueError(f"cannot render the chat template ({e})") from None
        else:
            text = spec.prompt
        if not isinstance(text, list):
            return self.codec.encode(text)
        if max(text) >= self.vocab_size:
            raise ValueError(f"token id {max(text)} is outside the vocabulary ({self.vocab_size})")
        return list(text)

    def _prepare(self, spec: RequestSpec, offset: float) -> Pending:
        p = Pending(spec, offset_s=offset)
        if spec.error:
            return p
        try:
            ids = self._prompt_ids(spec)
            if len(ids) >= self.max_len:
                raise ValueError(f"prompt has {len(ids)} tokens; the limit is model.max_model_len - 1 = "
                                 f"{self.max_len - 1}")
            fields = check_sampling(dataclasses.asdict(self.cfg.sampling) | spec.sampling)
            fields["max_tokens"] = min(fields["max_tokens"], self.max_len - len(ids))
            self._check_fits(len(ids), fields["max_tokens"])
        except ValueError as e:
            spec.error = f"line {spec.index + 1}: {e}"
            return p
        p.prompt_ids, p.prompt_tokens, p.params = tuple(ids), len(ids), SamplingParams(**fields)
        return p

    def _check_fits(self, prompt: int, max_tokens: int) -> None:
        """Refuses a request that can never be scheduled (its KV exceeds an instance's whole cache):
        it would wait forever and hold up the ones behind it."""
        s = self.cfg.scheduler
        checks = [("scheduler.decode_kv_blocks", reserved_blocks(prompt, max_tokens, self.max_len, s.block_size),
                   s.decode_kv_blocks)]
        if self.decoders:  # disaggregated: the prefill hold area takes the prompt
            checks = [("scheduler.prefill_kv_blocks", blocks_for(prompt, s.block_size), s.prefill_kv_blocks)] + \
                (checks if max_tokens > 1 else [])
        for key, need, have in checks:
            if need > have:
                raise ValueError(f"needs {need} KV blocks of {s.block_size} tokens (prompt {prompt} + max_tokens "
                                 f"{max_tokens}) but {key} is {have}; raise it or send a shorter request")

    def _least_loaded(self, instances) -> int:
        return min(instances, key=lambda i: (self.load[i.id], i.id)).id

    def _dispatch(self, p: Pending, start: float, outbox: c.Outbox) -> None:
        p.arrival = start + p.offset_s
        target = self._least_loaded(self.entry)
        self.load[target] += 1
        if self.decoders:  # chosen now, so the prefill side can post its sends right away
            p.decode_instance = self._least_loaded(self.decoders)
            self.load[p.decode_instance] += 1
        req_id = p.spec.index
        self.by_id[req_id] = p
        p.at = target
        outbox.send(Request(req_id, p.prompt_ids, p.params, p.arrival, p.decode_instance),
                    self.ctx.plan.instances[target].leader, Tag.REQUEST)

    def _prefill_done(self, done: PrefillDone) -> None:
        p = self.by_id[done.req_id]
        p.prefill_instance, p.at = done.prefill_instance, p.decode_instance
        self.load[done.prefill_instance] -= 1

    def _finished(self, result: Result) -> None:
        p = self.by_id.pop(result.req_id)
        self.load[result.instance] -= 1
        if p.decode_instance >= 0 and result.instance != p.decode_instance:  # finished at prefill
            self.load[p.decode_instance] -= 1
        self.writer.write(p, result)

    def run(self) -> dict:
        world = self.ctx.world
        outbox = c.Outbox(world)
        for p in self.pending:
            if p.params is None:
                self.writer.write(p, None)
        queue = sorted((p for p in self.pending if p.params is not None), key=lambda p: p.offset_s)
        outstanding = len(queue)
        limit = self.cfg.scheduler.watchdog_s
        for inst in self.ctx.plan.instances:  # every instance has loaded its weights: start the clock
            c.poll(world, inst.leader, Tag.HEARTBEAT, timeout_s=max(limit, c.STARTUP_S),
                   waiting_for=f"{inst.role} instance {inst.id} to load the model")
        start = time.time()
        next_i = 0
        watchdog = Watchdog(self.ctx.plan, self.ctx.nodes, limit)
        idle = c.IdleWait(self.cfg.scheduler.idle_sleep_ms / 1e3)
        last_alive = last_check = 0.0
        announced = -1
        while outstanding:
            before = outstanding, next_i, len(self.by_id)
            now = time.time()
            if now - last_alive >= c.HEARTBEAT_S:
                last_alive = now
                for inst in self.ctx.plan.instances:
                    outbox.send(Signal(), inst.leader, Tag.ALIVE)
            beat: Heartbeat
            for _, beat in c.drain(world, Tag.HEARTBEAT):
                watchdog.beat(beat.instance, beat.steps)
            for src, _ in c.drain(world, Tag.RANK_ALIVE):
                watchdog.rank_seen[src] = now
            if now - last_check >= c.HEARTBEAT_S / 4:
                last_check = now
                watchdog.check(Counter(p.at for p in self.by_id.values()))
            now = time.time()
            if next_i != announced and next_i < len(queue):
                # sleeping leaders wake for the next arrival (decode ones too: its KV follows a prefill later)
                announced = next_i
                for inst in self.ctx.plan.instances:
                    outbox.send(NextArrival(start + queue[next_i].offset_s), inst.leader, Tag.NEXT_ARRIVAL)
            while next_i < len(queue) and queue[next_i].offset_s <= now - start:
                self._dispatch(queue[next_i], start, outbox)
                next_i += 1
            prefill_done = c.drain(world, Tag.PREFILL_DONE)
            for _, done in prefill_done:
                self._prefill_done(done)
            for _, result in c.drain(world, Tag.RESULT):
                self._finished(result)
                outstanding -= 1
            outbox.progress()
            if (outstanding, next_i, len(self.by_id)) != before or prefill_done:
                idle.worked()
                watchdog.progressed()
            next_due = queue[next_i].offset_s - (time.time() - start) if next_i < len(queue) else float("inf")
            if next_due > 0:
                idle.sleep(at_most=next_due)
        wall = time.time() - start
        for inst in self.ctx.plan.instances:
            outbox.send(Signal(), inst.leader, Tag.SHUTDOWN)
        outbox.flush()
        stats: list[InstanceStats] = [c.poll(world, inst.leader, Tag.STATS, timeout_s=limit,
                                             waiting_for="its final stats") for inst in self.ctx.plan.instances]
        return {"wall_s": wall, "instances": [dataclasses.asdict(s) for s in stats]}
