"""The controller (global rank 0): requests in, dispatch, results out.

It releases requests at their arrival times (all at t=0 for offline jobs), sends each to the
least-loaded prefill (or colocated) instance and names the least-loaded decode instance for it
(the prefill instance then deals with that decode instance directly), counts "KV ready" notices
to track each prefill instance's load, and writes each finished request as soon as it arrives.
Only small pickled messages pass through it; tensors never do.
"""
from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass

from engine import comm as c
from engine.comm import RankContext
from engine.blocks import blocks_for
from engine.scheduler import Request, reserved_blocks
from engine.step import SamplingParams
from engine.tokenizer import TextCodec
from launcher.batch_io import RequestSpec
from launcher.stats import arrival_gap


@dataclass
class Pending:
    spec: RequestSpec
    request: Request | None
    offset_s: float
    prompt_text: str = ""
    prefill_instance: int | None = None
    at: int | None = None  # the instance it waits at once dispatched, for a stall diagnosis


def arrival_offsets(n: int, arrival: str, rate: float, cv: float, seed: int) -> list[float]:
    """Arrival times (s from start): all at 0, Poisson, or gamma with coefficient of variation cv."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += arrival_gap(rng, arrival, rate, cv)
        out.append(t)
    return out


def metrics_of(event: dict, arrival: float) -> dict:
    times, token_times = event["times"], event["token_times"]
    first = times.get("first_token", token_times[0] if token_times else arrival)
    n = len(token_times)
    out = {
        "ttft_ms": (first - arrival) * 1e3,
        "tpot_ms": ((token_times[-1] - token_times[0]) / (n - 1) * 1e3) if n > 1 else 0.0,
        "queue_ms": (times.get("prefill_start", arrival) - arrival) * 1e3,
        "prefill_ms": (times.get("prefill_end", first) - times.get("prefill_start", first)) * 1e3,
        "e2e_ms": ((token_times[-1] if token_times else first) - arrival) * 1e3,
        "arrival": arrival,
        "token_times": [round((t - arrival) * 1e3, 3) for t in token_times],
    }
    if "transfer_end" in times:
        out["transfer_ms"] = (times["transfer_end"] - times.get("transfer_start", times["transfer_end"])) * 1e3
    return out


class Controller:
    def __init__(self, ctx: RankContext, job: dict, codec: TextCodec, specs: list[RequestSpec], writer,
                 vocab_size: int):
        self.ctx, self.job, self.codec, self.writer = ctx, job, codec, writer
        cfg = job["config"]
        self.max_len = cfg["model"]["max_model_len"]
        self.vocab_size = vocab_size
        self.defaults = cfg["sampling"]
        self.chat = cfg["model"]["chat_template"] == "auto"
        self.entry = [i for i in ctx.plan.instances if i.role in ("prefill", "colocated")]
        self.decoders = [i for i in ctx.plan.instances if i.role == "decode"]
        self.load = {i.id: 0 for i in ctx.plan.instances}
        w = cfg["workload"]
        offsets = arrival_offsets(len(specs), w["arrival"], w["rate"], w["cv"], w["seed"])
        self.pending = [self._prepare(s, off if s.arrival_s is None else s.arrival_s) for s, off in zip(specs, offsets)]
        self.by_id: dict[int, Pending] = {}

    def _prepare(self, spec: RequestSpec, offset: float) -> Pending:
        if spec.error:
            return Pending(spec, None, offset)
        try:
            if spec.kind == "chat":
                if not self.chat:
                    raise ValueError("chat requests need model.chat_template: auto")
                text = self.codec.render_chat(spec.messages)
            else:
                text = spec.prompt
        except Exception as e:  # a template error fails this request only
            spec.error = f"line {spec.index + 1}: cannot render the chat template ({e})"
            return Pending(spec, None, offset)
        if isinstance(text, list):
            ids, text = list(text), ""
            if max(ids) >= self.vocab_size:
                spec.error = f"line {spec.index + 1}: token id {max(ids)} is outside the vocabulary ({self.vocab_size})"
                return Pending(spec, None, offset)
        else:
            ids = self.codec.encode(text)
        if len(ids) >= self.max_len:
            spec.error = (f"line {spec.index + 1}: prompt has {len(ids)} tokens; the limit is "
                          f"model.max_model_len - 1 = {self.max_len - 1}")
            return Pending(spec, None, offset)
        merged = {**self.defaults, **spec.sampling}
        merged["max_tokens"] = min(merged["max_tokens"], self.max_len - len(ids))
        spec.error = self._never_fits(spec.index, len(ids), merged["max_tokens"])
        if spec.error:
            return Pending(spec, None, offset)
        merged["stop"] = tuple(merged.get("stop") or ())
        params = SamplingParams(**{k: merged[k] for k in SamplingParams.__dataclass_fields__ if k in merged})
        return Pending(spec, Request(spec.index, ids, params, 0.0), offset, text)

    def _never_fits(self, index: int, prompt: int, max_tokens: int) -> str | None:
        """Why a request can never be scheduled (its KV exceeds an instance's whole cache), or
        None: such a request would wait forever and hold up the ones behind it."""
        s = self.job["config"]["scheduler"]
        size = s["block_size"]
        checks = [("scheduler.decode_kv_blocks", reserved_blocks(prompt, max_tokens, self.max_len, size),
                   s["decode_kv_blocks"])]
        if self.decoders:  # disaggregated: the prefill hold area takes the prompt
            checks = [("scheduler.prefill_kv_blocks", blocks_for(prompt, size), s["prefill_kv_blocks"])] + \
                (checks if max_tokens > 1 else [])
        for key, need, have in checks:
            if need > have:
                return (f"line {index + 1}: needs {need} KV blocks of {size} tokens (prompt {prompt} + max_tokens "
                        f"{max_tokens}) but {key} is {have}; raise it or send a shorter request")
        return None

    def _least_loaded(self, instances) -> int:
        return min(instances, key=lambda i: (self.load[i.id], i.id)).id

    def run(self) -> dict:
        world = self.ctx.world
        outbox = c.Outbox(world)
        for p in self.pending:
            if p.request is None:
                self.writer.write(p, None, self)
        queue = sorted((p for p in self.pending if p.request is not None), key=lambda p: p.offset_s)
        outstanding = len(queue)
        limit = self.job["config"]["scheduler"]["watchdog_s"]
        for inst in self.ctx.plan.instances:  # every instance has loaded its weights: start the clock
            c.poll(world, inst.leader, c.TAG_HEARTBEAT, timeout_s=max(limit, c.STARTUP_S),
                   waiting_for=f"{inst.role} instance {inst.id} to load the model")
        start = time.time()
        next_i = 0
        watchdog = Watchdog(self.ctx.plan, self.ctx.nodes, limit)
        idle = c.IdleWait(self.job["config"]["scheduler"]["idle_sleep_ms"] / 1e3)
        last_alive = last_check = 0.0
        announced = -1
        while outstanding:
            before = outstanding, next_i, len(self.by_id)
            now = time.time()
            if now - last_alive >= c.HEARTBEAT_S:
                last_alive = now
                for inst in self.ctx.plan.instances:
                    outbox.send(None, inst.leader, c.TAG_ALIVE)
            for src, (inst_id, steps) in c.drain(world, c.TAG_HEARTBEAT):
                watchdog.beat(inst_id, steps)
            for src, _ in c.drain(world, c.TAG_RANK_ALIVE):
                watchdog.rank_seen[src] = now
            if now - last_check >= c.HEARTBEAT_S / 4:
                last_check = now
                watchdog.check(self._in_flight())
            now = time.time()
            if next_i != announced and next_i < len(queue):
                # sleeping leaders wake for the next arrival (decode ones too: its KV follows a prefill later)
                announced = next_i
                for inst in self.ctx.plan.instances:
                    outbox.send(start + queue[next_i].offset_s, inst.leader, c.TAG_NEXT_ARRIVAL)
            while next_i < len(queue) and queue[next_i].offset_s <= now - start:
                p = queue[next_i]
                next_i += 1
                p.request.arrival = start + p.offset_s
                target = self._least_loaded(self.entry)
                self.load[target] += 1
                if self.decoders:  # chosen now, so the prefill side can post its sends right away
                    p.request.decode_instance = self._least_loaded(self.decoders)
                    self.load[p.request.decode_instance] += 1
                self.by_id[p.request.req_id] = p
                p.at = target
                outbox.send(p.request, self.ctx.plan.instances[target].leader, c.TAG_REQUEST)
            kv_ready = c.drain(world, c.TAG_KV_READY)
            for src, notice in kv_ready:
                p = self.by_id[notice.request.req_id]
                p.prefill_instance = notice.prefill_instance
                p.at = p.request.decode_instance
                self.load[notice.prefill_instance] -= 1
            for src, event in c.drain(world, c.TAG_RESULT):
                p = self.by_id.pop(event["req_id"])
                self.load[event["instance"]] -= 1
                decode = p.request.decode_instance
                if decode >= 0 and event["instance"] != decode:  # finished at prefill: never reached decode
                    self.load[decode] -= 1
                self.writer.write(p, event, self)
                outstanding -= 1
            outbox.progress()
            if (outstanding, next_i, len(self.by_id)) != before or kv_ready:
                idle.worked()
                watchdog.progressed()
            next_due = queue[next_i].offset_s - (time.time() - start) if next_i < len(queue) else float("inf")
            if next_due > 0:
                idle.sleep(at_most=next_due)
        wall = time.time() - start
        for inst in self.ctx.plan.instances:
            outbox.send(None, inst.leader, c.TAG_SHUTDOWN)
        outbox.flush()
        instances = [c.poll(world, inst.leader, c.TAG_STATS, timeout_s=limit, waiting_for="its final stats")
                     for inst in self.ctx.plan.instances]
        return {"wall_s": wall, "instances": instances}

    def _in_flight(self) -> dict[int, int]:
        """Dispatched, unfinished requests per instance they wait at: for the stall diagnosis."""
        return Counter(p.at for p in self.by_id.values())


class Watchdog:
    """Ends the job, naming the culprit, when
    - a rank's beacon thread went silent: its process is stopped or dead;
    - an instance stopped sending heartbeats: a rank of it is stuck (its leader waits on it);
    - a decode or colocated instance holds requests but took no step (it depends on nothing else);
    - requests are in flight but none moved anywhere (no step, dispatch or result).
    Each after `limit_s`."""

    def __init__(self, plan, nodes: list[str], limit_s: float):
        self.plan, self.nodes, self.limit_s = plan, nodes, limit_s
        now = time.time()
        self.seen = {i.id: (now, 0) for i in plan.instances}        # last heartbeat, steps then
        self.stepped = {i.id: now for i in plan.instances}          # when its step count last grew
        self.rank_seen = {r: now for i in plan.instances for r in i.ranks}  # beacon threads
        self.holding_since: dict[int, float] = {}                    # instance -> when requests came to it
        self.last_progress = now

    def beat(self, inst_id: int, steps: int) -> None:
        now = time.time()
        if steps != self.seen[inst_id][1]:
            self.progressed()
            self.stepped[inst_id] = now
        self.seen[inst_id] = (now, steps)

    def progressed(self) -> None:
        self.last_progress = time.time()

    def _rank(self, rank: int) -> str:
        return f"rank {rank} on {self.nodes[rank]} ({self.plan.describe_rank(rank)})"

    def _instance(self, inst) -> str:
        return (f"{inst.role} instance {inst.id} (ranks {inst.ranks[0]}-{inst.ranks[-1]} on "
                f"{', '.join(sorted({self.nodes[r] for r in inst.ranks}))})")

    def check(self, in_flight: dict[int, int]) -> None:
        now = time.time()
        for rank, when in self.rank_seen.items():
            if now - when > self.limit_s:
                raise TimeoutError(f"{self._rank(rank)} sent nothing for {now - when:.0f} s: its process is stopped "
                                   "or dead (SIGSTOP, a hung node, or swapped out)")
        for inst_id, (when, steps) in self.seen.items():
            if now - when > self.limit_s:
                raise TimeoutError(f"{self._instance(self.plan.instances[inst_id])} sent no heartbeat for "
                                   f"{now - when:.0f} s after step {steps}: a rank of it is stuck (every process "
                                   "of it runs)")
        for inst in self.plan.instances:
            held = in_flight.get(inst.id, 0)
            if not held:
                self.holding_since.pop(inst.id, None)
                continue
            since = max(self.stepped[inst.id], self.holding_since.setdefault(inst.id, now))
            if inst.role != "prefill" and now - since > self.limit_s:  # prefill may wait on decode room
                raise TimeoutError(f"{self._instance(inst)} holds {held} request(s) but took no step for "
                                   f"{now - since:.0f} s: it is stalled (a transfer or a rank never completes)")
        if not in_flight:
            self.last_progress = now  # nothing dispatched is waiting: idle, not stalled
        elif now - self.last_progress > self.limit_s:
            held = ", ".join(f"{n} at {self.plan.instances[i].role} instance {i}" for i, n in sorted(in_flight.items()))
            raise TimeoutError(f"no request moved for {now - self.last_progress:.0f} s although every instance is "
                               f"alive ({held}): the engine is stalled; raise scheduler.watchdog_s if steps can "
                               "really take that long")


class ResultWriter:
    """Appends one JSON line per request as it finishes (flushed), and keeps the metrics."""

    def __init__(self, path: str, codec: TextCodec, model_name: str, logits_dir: str | None = None,
                 on_result=None):
        self.codec, self.model_name, self.logits_dir, self.on_result = codec, model_name, logits_dir, on_result
        self.file = open(path, "a", encoding="utf-8")
        self.records: list[dict] = []

    def close(self) -> None:
        self.file.close()

    def _text(self, p: Pending, event: dict) -> tuple[str, str]:
        text = self.codec.decode(event["output"])
        reason = event["finish_reason"]
        for stop in p.request.sampling.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        return text, reason

    def write(self, p: Pending, event: dict | None, controller: Controller) -> None:
        spec = p.spec
        record: dict = {"custom_id": spec.custom_id}
        body = None
        if event is None:
            record["error"] = {"code": "invalid_request", "message": spec.error}
        else:
            try:
                body = self._answer(p, event, record)
            except Exception as e:  # noqa: BLE001 - one request's failure is its own error record
                record = {"custom_id": spec.custom_id,
                          "error": {"code": "engine_error", "message": f"line {spec.index + 1}: {type(e).__name__}: "
                                                                       f"{e} (rerun with --resume to retry)"}}
        if spec.openai:
            record = self._openai(record, spec, body)
        record["request_hash"] = spec.digest
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.on_result:
            self.on_result(record)

    def _answer(self, p: Pending, event: dict, record: dict) -> tuple:
        """Fills a finished request's record; returns (text, finish reason, usage)."""
        text, reason = self._text(p, event)
        metrics = metrics_of(event, p.request.arrival)
        metrics["prefill_instance"] = p.prefill_instance if p.prefill_instance is not None else event["instance"]
        metrics["decode_instance"] = event["instance"]
        usage = {"prompt_tokens": len(p.request.prompt_ids), "completion_tokens": len(event["output"]),
                 "total_tokens": len(p.request.prompt_ids) + len(event["output"])}
        record.update(text=text, token_ids=event["output"], finish_reason=reason, usage=usage, metrics=metrics)
        if self.logits_dir and event.get("logits"):
            import torch
            from safetensors.torch import save_file

            save_file({"logits": torch.tensor(event["logits"])},
                      os.path.join(self.logits_dir, f"{p.spec.index}.safetensors"))
        return text, reason, usage

    def _openai(self, record: dict, spec: RequestSpec, body) -> dict:
        """The OpenAI Batch API output line for this request."""
        out = {"id": f"batch_req_{spec.index}", "custom_id": spec.custom_id, "response": None,
               "error": record.get("error")}
        if body is not None:
            text, reason, usage = body
            choice = {"index": 0, "finish_reason": reason}
            if spec.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
                obj = "chat.completion"
            else:
                choice["text"] = text
                obj = "text_completion"
            out["response"] = {"status_code": 200, "request_id": f"req_{spec.index}",
                               "body": {"id": f"cmpl-{spec.index}", "object": obj, "created": int(time.time()),
                                        "model": self.model_name, "choices": [choice], "usage": usage}}
            out["metrics"] = record["metrics"]
            out["token_ids"] = record["token_ids"]
        return out
