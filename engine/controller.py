"""The controller (global rank 0): requests in, dispatch, results out.

Requests come from a source (a replayed input file, or the server's frontend), outcomes go to a
sink (the results file, or the server's streams). It releases requests at their arrival times (all at t=0 for offline jobs), sends each to the
least-loaded prefill (or colocated) instance (with prefix caching: the one where the fewest uncached
prompt tokens stand before it, engine.dispatch) and names the least-loaded decode instance for it
(the prefill instance then deals with that decode instance directly), counts "prefill done"
notices to track each prefill instance's load, and writes each finished request as soon as it
arrives. What comes back to it is ids, tokens and timings: prompts go out once, tensors never.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from contracts.batch_io import RequestSpec
from contracts.config import JobConfig
from contracts.protocol import (Abort, Alive, Heartbeat, InstanceStats, NextArrival, PrefillDone, RankAlive, Request,
                                Result, Shutdown, TokensOut)
from contracts.sampling_params import SamplingParams, check_sampling
from engine import control_plane as c
from engine.arrivals import Replay, arrival_offsets
from engine.blocks import blocks_for
from engine.control_plane import RankContext
from engine.dispatch import CacheAwareDispatch
from engine.results import Answered, Sink
from engine.sequence import reserved_blocks
from engine.tokenizer import TextCodec
from engine.watchdog import Watchdog


@dataclass
class RequestState(Answered):
    """One request as the controller tracks it, from its arrival (or refusal) to its result."""

    offset_s: float = 0.0                    # arrival, s after the start
    prompt_ids: tuple[int, ...] = ()
    params: Optional[SamplingParams] = None  # None: refused (spec.error says why)
    decode_instance: int = -1
    entry: int = -1                          # the prefill or colocated instance it was sent to
    at: Optional[int] = None                 # the instance it waits at once dispatched, for a stall diagnosis
    stream: bool = False                     # its tokens go to the sink as they come
    first_at: Optional[float] = None         # when its first token came
    aborted: bool = False
    tokens: dict = field(default_factory=dict)  # streamed tokens by output index, until handed on in order
    handed: int = 0                          # streamed tokens handed to the sink
    queued_tokens: int = 0                   # prompt tokens its entry instance is expected to run (cache-aware dispatch)


class Controller:
    def __init__(self, ctx: RankContext, cfg: JobConfig, codec: TextCodec, vocab_size: int):
        self.ctx, self.cfg, self.codec = ctx, cfg, codec
        self.max_len = cfg.model.max_model_len
        self.vocab_size = vocab_size
        self.entry = [i for i in ctx.plan.instances if i.role in ("prefill", "colocated")]
        self.decoders = [i for i in ctx.plan.instances if i.role == "decode"]
        self.load = {i.id: 0 for i in ctx.plan.instances}
        s = cfg.scheduler
        self.cache_aware = CacheAwareDispatch(
            {i.id: s.prefill_kv_blocks if i.role == "prefill" else s.decode_kv_blocks for i in self.entry},
            s.block_size) if s.prefix_caching else None
        self.by_id: dict[int, RequestState] = {}
        self.started = False     # every instance has loaded its model

    def replay(self, specs: list[RequestSpec], sink: Sink) -> Replay:
        """The input's requests at their arrival times (workload.arrival, or each line's arrival_s);
        the ones that cannot run are answered with their error at once."""
        w = self.cfg.workload
        offsets = arrival_offsets(len(specs), w.arrival, w.rate, w.cv, w.seed)
        requests = [self.prepare(s, off if s.arrival_s is None else s.arrival_s) for s, off in zip(specs, offsets)]
        for p in requests:
            if p.params is None:
                sink.write(p, None)
        return Replay([p for p in requests if p.params is not None])

    def _prompt_ids(self, spec: RequestSpec) -> list[int]:
        """The request's token ids; raises ValueError with the reason it cannot run."""
        if spec.kind == "chat":
            if self.cfg.model.chat_template != "auto":
                raise ValueError("chat requests need model.chat_template: auto")
            try:
                return self.codec.chat_ids(spec.messages)
            except ValueError:
                raise
            except Exception as e:  # a template error fails this request only
                raise ValueError(f"cannot render the chat template ({e})") from None
        text = spec.prompt
        if not isinstance(text, list):
            return self.codec.encode(text)
        if max(text) >= self.vocab_size:
            raise ValueError(f"token id {max(text)} is outside the vocabulary ({self.vocab_size})")
        return list(text)

    def prepare(self, spec: RequestSpec, offset: float = 0.0, where: Optional[str] = None) -> RequestState:
        """The request checked and tokenised; spec.error says why it cannot run, after `where` (default:
        its input line). Pure: the server's thread calls it too."""
        p = RequestState(spec, offset_s=offset)
        if spec.error:
            return p
        try:
            ids = self._prompt_ids(spec)
            if len(ids) >= self.max_len:
                raise ValueError(f"prompt has {len(ids)} tokens; the limit is model.max_model_len - 1 = "
                                 f"{self.max_len - 1}")
            fields = check_sampling(dataclasses.asdict(self.cfg.sampling) | spec.sampling)
            if "max_tokens" in spec.sampling and len(ids) + fields["max_tokens"] > self.max_len:
                raise ValueError(f"this model's maximum context length is {self.max_len} tokens (model.max_model_len); "
                                 f"the request asks for {len(ids) + fields['max_tokens']} ({len(ids)} in the prompt, "
                                 f"{fields['max_tokens']} in the completion); lower max_tokens or shorten the prompt")
            fields["max_tokens"] = min(fields["max_tokens"], self.max_len - len(ids))  # the config's default fits
            self._check_fits(len(ids), fields["max_tokens"])
        except ValueError as e:
            spec.error = f"{f'line {spec.index + 1}' if where is None else where}: {e}"
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

    def _dispatch(self, p: RequestState, start: float, outbox: c.Outbox) -> None:
        p.arrival = start + p.offset_s
        if self.cache_aware:
            target, p.queued_tokens = self.cache_aware.pick(p.prompt_ids, self.load)
        else:
            target = self._least_loaded(self.entry)
        self.load[target] += 1
        if self.decoders:  # chosen now, so the prefill side can post its sends right away
            p.decode_instance = self._least_loaded(self.decoders)
            self.load[p.decode_instance] += 1
        req_id = p.spec.index
        self.by_id[req_id] = p
        p.at = p.entry = target
        outbox.send(Request(req_id, p.prompt_ids, p.params, p.arrival, p.decode_instance, p.stream),
                    self._leader(target))

    def _leader(self, instance: int) -> int:
        return self.ctx.plan.instances[instance].leader

    def _abort(self, req_id: int, outbox: c.Outbox) -> None:
        """Tells the instance that has the request to end it; a prefill instance that already
        started it leaves that to the decode instance, told once the prefill is done."""
        p = self.by_id.get(req_id)
        if p is not None and not p.aborted:
            p.aborted = True
            outbox.send(Abort(req_id), self._leader(p.at))

    def _first_token(self, p: RequestState, at: float, sink: Sink) -> None:
        if p.first_at is None:
            p.first_at = at
            sink.first_token(p)

    def _prefill_done(self, done: PrefillDone, sink: Sink, outbox: c.Outbox) -> None:
        p = self.by_id.get(done.req_id)
        if p is None:  # its result came first
            return
        self._first_token(p, done.at, sink)
        self._prefilled(p)
        if self.ctx.plan.instances[done.prefill_instance].role != "prefill":
            return  # colocated: it decodes where it is
        p.prefill_instance, p.at = done.prefill_instance, p.decode_instance
        self.load[done.prefill_instance] -= 1
        if p.aborted:
            outbox.send(Abort(p.spec.index), self._leader(p.decode_instance))

    def _prefilled(self, p: RequestState) -> None:
        """Its prompt left its entry instance's queue (cache-aware dispatch counts the rest)."""
        if self.cache_aware and p.queued_tokens:
            self.cache_aware.prefilled(p.entry, p.queued_tokens)
            p.queued_tokens = 0

    def _streamed(self, out: TokensOut, sink: Sink) -> None:
        """Hands each streamed request's new tokens on in output order (the first token comes from
        the prefill instance, the rest from the decode instance: they may arrive out of order)."""
        for req_id, index, token in out.tokens:
            p = self.by_id.get(req_id)
            if p is None or index < p.handed:
                continue
            p.tokens[index] = token
            new = []
            while p.handed in p.tokens:
                new.append(p.tokens.pop(p.handed))
                p.handed += 1
            if new:
                sink.tokens(p, new)

    def _finished(self, result: Result, sink: Sink) -> None:
        p = self.by_id.pop(result.req_id)
        self._prefilled(p)
        if self.cache_aware and self.ctx.plan.instances[p.entry].role == "colocated":
            self.cache_aware.finished(p.entry, [*p.prompt_ids, *result.output[:-1]])
        if p.prefill_instance is None:  # it never left its entry instance (or its notice is still coming)
            self.load[p.entry] -= 1
        if p.decode_instance >= 0:
            self.load[p.decode_instance] -= 1
        sink.write(p, result)

    def run(self, source, sink: Sink) -> dict:
        """Serves the source's requests until it is exhausted and none is in flight; returns the
        wall time and every instance's final stats."""
        world = self.ctx.world
        outbox = c.Outbox(world)
        limit = self.cfg.scheduler.watchdog_s
        for inst in self.ctx.plan.instances:  # every instance has loaded its weights: start the clock
            beat = c.receive(world, inst.leader, (Heartbeat,), timeout_s=max(limit, c.STARTUP_S),
                             waiting_for=f"{inst.role} instance {inst.id} to load the model")
            sink.instance_state(beat)
        self.started = True
        start = time.time()
        watchdog = Watchdog(self.ctx.plan, self.ctx.nodes, limit)
        idle = c.IdleWait(self.cfg.scheduler.idle_sleep_ms / 1e3)
        last_alive = last_check = 0.0
        announced = None
        while self.by_id or not source.exhausted():
            before = len(self.by_id)
            now = time.time()
            if now - last_alive >= c.HEARTBEAT_S:
                last_alive = now
                for inst in self.ctx.plan.instances:
                    outbox.send(Alive(), inst.leader)
            for src, msg in c.drain(world, (Heartbeat, RankAlive)):
                if isinstance(msg, Heartbeat):
                    watchdog.beat(msg.instance, msg.steps)
                    sink.instance_state(msg)
                else:
                    watchdog.rank_seen[src] = now
            if now - last_check >= c.HEARTBEAT_S / 4:
                last_check = now
                watchdog.check(Counter(p.at for p in self.by_id.values()))
            next_offset = source.next_offset()
            if next_offset is not None and next_offset != announced:
                # sleeping leaders wake for the next arrival (decode ones too: its KV follows a prefill later)
                announced = next_offset
                for inst in self.ctx.plan.instances:
                    outbox.send(NextArrival(start + next_offset), inst.leader)
            due = source.take(time.time() - start)
            for p in due:
                self._dispatch(p, start, outbox)
            for req_id in source.aborts():
                self._abort(req_id, outbox)
            firsts = False
            for _, msg in c.drain(world, (PrefillDone, TokensOut, Result)):
                if isinstance(msg, PrefillDone):
                    firsts = True
                    self._prefill_done(msg, sink, outbox)
                elif isinstance(msg, TokensOut):
                    self._streamed(msg, sink)
                else:
                    self._finished(msg, sink)
            outbox.progress()
            if due or firsts or len(self.by_id) != before:
                idle.worked()
                watchdog.progressed()
            next_offset = source.next_offset()
            next_due = next_offset - (time.time() - start) if next_offset is not None else float("inf")
            if next_due > 0:
                idle.sleep(at_most=next_due, wake=source.wake)
        wall = time.time() - start
        for inst in self.ctx.plan.instances:
            outbox.send(Shutdown(), inst.leader)
        outbox.flush()
        stats: list[InstanceStats] = [c.receive(world, inst.leader, (InstanceStats,), timeout_s=limit,
                                                waiting_for="its final stats") for inst in self.ctx.plan.instances]
        return {"wall_s": wall, "instances": [s.report() for s in stats]}
