"""The leader's scheduler: which sequences run this step, and where their KV blocks live.

One class serves the three roles; a role is the set of phases an instance runs:
- prefill:   FCFS batches under the token budget L_m; a request that may decode is announced to
             its decode instance when its prefill starts; after prefill the KV is *held*; its sends
             are posted once its decode instance pulled it, in the order that instance's pulls came
             (per rank pair the sends then follow the receives' order: NCCL matches by order, not
             tag); no blocks free = no new prefill (backpressure).
- decode:    pulls an announced request's KV (posts its receives and tells the prefill instance)
             only when it has blocks (prompt + max_tokens) and batch room for it; a pulled request
             joins the continuous batch once every rank has its KV and its first token is known.
             Announcing at prefill start lets the receives be posted while the prefill runs, so the
             transfer starts at the first token instead of at the decode side's next step boundary
             after it.
- colocated: both phases on the same ranks, prefill-prioritised (vLLM's default): a step is a
             prefill batch whenever one is admissible, else a decode step.
Reserving prompt + max_tokens blocks on admission means a decode step never runs out of blocks.
An aborted request (client gone, drain timed out) leaves at once if it waits; one whose KV is
already moving or in the batch finishes with reason "abort" at its next join or step, so every
transfer posted still completes in order and every block is freed by the usual path.
`schedule()` returns one SchedulerOutput: the step plan for the instance's ranks and the messages
for peer instances and the controller; `on_step()` returns the messages its tokens cause.
Pure Python: no torch, no MPI.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.blocks import BlockAllocator, blocks_for
from engine.stops import Decode, TextState, stop_cut
from launcher.protocol import (FirstToken, KVIncoming, KVPost, KVPull, PrefillDone, Pulled, Request, Result,
                               SeqChunk, StepPlan, Tag, TokensOut)

CONTROLLER = -1  # the controller's address in SchedulerOutput.messages (others: instance ids)


@dataclass
class SchedulerOutput:
    step: StepPlan
    messages: list[tuple[int, Tag, Any]] = field(default_factory=list)  # (instance id or CONTROLLER, tag, message)


@dataclass
class Sequence:
    request: Request
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    times: dict = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list)
    logits: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_text: Optional[str] = None  # the text cut before the stop string that ended it
    text_state: TextState = field(default_factory=TextState)  # for stop strings
    source_instance: int = -1
    announced: bool = False  # prefill side: its decode instance expects its KV

    @property
    def req_id(self) -> int:
        return self.request.req_id

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output)


def reserved_blocks(prompt_len: int, max_tokens: int, max_model_len: int, block_size: int) -> int:
    """Blocks a sequence needs for its whole life on a decoding instance."""
    return blocks_for(min(prompt_len + max_tokens, max_model_len), block_size)


@dataclass(frozen=True)
class InstanceLimits:
    """What an instance's scheduler works within."""

    num_blocks: int
    block_size: int
    token_budget: int  # L_m: most prompt tokens in one prefill batch
    max_batch: int
    max_model_len: int
    pipeline_depth: int = 1  # steps in flight at once: PP with batches in flight, else 1


class Scheduler:
    def __init__(self, role: str, instance_id: int, instance_size: int, limits: InstanceLimits,
                 eos_ids: tuple[int, ...] = (), decode: Optional[Decode] = None, want_logits: bool = False):
        """`decode` (token ids -> text) is needed only for requests with stop strings."""
        self.role, self.instance_id, self.instance_size = role, instance_id, instance_size
        self.block_size, self.token_budget = limits.block_size, limits.token_budget
        self.max_batch, self.max_model_len = limits.max_batch, limits.max_model_len
        self.allocator = BlockAllocator(limits.num_blocks)
        self.eos_ids, self.decode, self.want_logits = set(eos_ids), decode, want_logits
        self.waiting: deque[Sequence] = deque()      # to prefill
        self.running: list[Sequence] = []            # decoding
        self.depth = limits.pipeline_depth
        self.in_flight: deque[list[Sequence]] = deque()  # the sequences of each step not answered yet, oldest first
        self.held: dict[int, Sequence] = {}          # prefill: KV kept until pulled
        self.incoming: deque[KVIncoming] = deque()   # decode: announced, receives not posted yet
        self.firsts: dict[int, FirstToken] = {}      # decode: first tokens of requests not pulled yet
        self.pulling: dict[int, Sequence] = {}       # decode: receives posted
        self.arrived: dict[int, int] = {}            # decode: req -> ranks whose receives completed
        self.pulls: dict[int, deque[int]] = {}       # prefill: decode instance -> pulled req_ids, in order
        self.pull_blocks: dict[int, tuple[int, ...]] = {}  # prefill: req -> the decode side's blocks for it
        self.pending_releases: list[int] = []
        self.aborted: set[int] = set()               # to finish with reason "abort" (decode: maybe not here yet)
        self.dropped: set[int] = set()               # decode: dropped before its pull; its first token is still due
        self.peak_blocks = 0
        self.peak_batch = 0
        self.steps = 0

    # ---- inputs from the control plane -------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.waiting.append(Sequence(request))

    def add_incoming(self, incoming: KVIncoming) -> list[tuple[int, Tag, Any]]:
        self.incoming.append(incoming)
        if incoming.request.req_id in self.aborted:  # the abort came first
            return self.abort(incoming.request.req_id)
        return []

    def add_first_token(self, first: FirstToken) -> None:
        """The first token of an announced request (which may not be pulled yet)."""
        if first.req_id in self.dropped:
            self.dropped.discard(first.req_id)
            return
        seq = self.pulling.get(first.req_id)
        if seq is None:
            self.firsts[first.req_id] = first
        else:
            self._apply_first(seq, first)

    @staticmethod
    def _apply_first(seq: Sequence, first: FirstToken) -> None:
        seq.output = [first.token]
        seq.times = {**first.times, **seq.times}
        seq.token_times = [first.times["first_token"]]
        seq.logits = list(first.logits)

    def add_pull(self, pull: KVPull) -> None:
        self.pulls.setdefault(pull.decode_instance, deque()).append(pull.req_id)
        self.pull_blocks[pull.req_id] = pull.blocks

    def pulled(self, req_id: int) -> None:
        """The decode side has all of the request's KV: free the held blocks."""
        self.allocator.free(self.held.pop(req_id).blocks)
        self.pending_releases.append(req_id)

    def abort(self, req_id: int) -> list[tuple[int, Tag, Any]]:
        """Ends a request early; returns the messages that causes. A prefill instance ends only
        requests it has not started (the controller tells the decode instance about later ones)."""
        waiting = next((seq for seq in self.waiting if seq.req_id == req_id), None)
        if waiting is not None:
            self.waiting.remove(waiting)
            waiting.finish_reason = "abort"
            return [(CONTROLLER, Tag.RESULT, self._result(waiting))]
        incoming = next((i for i in self.incoming if i.request.req_id == req_id), None)
        if incoming is not None:  # announced, not pulled: the prefill side frees its held KV, no transfer
            self.incoming.remove(incoming)
            self.aborted.discard(req_id)
            if self.firsts.pop(req_id, None) is None:
                self.dropped.add(req_id)
            seq = Sequence(incoming.request, finish_reason="abort")
            return [(incoming.prefill_instance, Tag.PULLED, Pulled(req_id)), (CONTROLLER, Tag.RESULT, self._result(seq))]
        if self.role != "prefill":
            self.aborted.add(req_id)
        return []

    def rank_arrived(self, req_id: int) -> None:
        self.arrived[req_id] = self.arrived.get(req_id, 0) + 1

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.pulling) + len(self.incoming)

    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.pulling or self.incoming or self.firsts
                    or any(self.pulls.values()) or self.pending_releases or self.in_flight)

    def _decode_group(self) -> list[Sequence]:
        """The running sequences of the next decode step: those not in a step in flight, at most
        1/depth of the batch, so that `depth` groups take turns through the PP stages."""
        size = -(-len(self.running) // self.depth)
        flying = self._flying()
        return [seq for seq in self.running if seq.req_id not in flying][:size]

    def _flying(self) -> set[int]:
        """Ids of the sequences in steps in flight."""
        return {seq.req_id for step in self.in_flight for seq in step}

    # ---- scheduling ------------------------------------------------------------------------
    def _reserve(self, seq: Sequence) -> int:
        return reserved_blocks(len(seq.request.prompt_ids), seq.request.sampling.max_tokens, self.max_model_len,
                               self.block_size)

    def _decodes_later(self, seq: Sequence) -> bool:
        """A prefill-role request that may need a decode step (known before its first token)."""
        n = len(seq.request.prompt_ids)
        return self.role == "prefill" and seq.request.sampling.max_tokens > 1 and n + 1 < self.max_model_len

    def _prefill_batch(self, out: SchedulerOutput) -> list[Sequence]:
        batch, tokens = [], 0
        while self.waiting:
            seq = self.waiting[0]
            n = len(seq.request.prompt_ids)
            if batch and tokens + n > self.token_budget:
                break
            if self.role == "colocated":
                if len(self.running) + len(batch) >= self.max_batch:
                    break
                need = self._reserve(seq)
            else:
                need = blocks_for(n, self.block_size)
            if not self.allocator.can_allocate(need):
                break  # backpressure: the hold area / cache is full
            seq.blocks = self.allocator.allocate(need)
            self.waiting.popleft()
            batch.append(seq)
            tokens += n
            if self._decodes_later(seq):
                seq.announced = True
                out.messages.append((seq.request.decode_instance, Tag.KV_INCOMING,
                                     KVIncoming(seq.request, self.instance_id, tuple(seq.blocks))))
        return batch

    def _start_pulls(self, out: SchedulerOutput) -> list[KVPost]:
        recvs = []
        while self.incoming and len(self.running) + len(self.pulling) < self.max_batch:
            incoming = self.incoming[0]
            seq = Sequence(incoming.request, source_instance=incoming.prefill_instance)
            need = self._reserve(seq)
            if not self.allocator.can_allocate(need):
                break
            self.incoming.popleft()
            seq.blocks = self.allocator.allocate(need)
            seq.times["pull_start"] = time.time()
            self.pulling[seq.req_id] = seq
            if seq.req_id in self.firsts:
                self._apply_first(seq, self.firsts.pop(seq.req_id))
            recvs.append(KVPost(seq.req_id, tuple(seq.blocks), len(seq.request.prompt_ids), seq.source_instance,
                                incoming.blocks))
            # the prefill side posts its sends in the order these pulls reach it
            out.messages.append((seq.source_instance, Tag.KV_PULL, KVPull(seq.req_id, self.instance_id,
                                                                          tuple(seq.blocks))))
        return recvs

    def _joins(self, out: SchedulerOutput) -> list[int]:
        """Requests whose KV is on every rank and whose first token is known join the batch; one
        whose first token already ends it (EOS, a stop string) finishes here, without a step."""
        joined = []
        for req_id, count in list(self.arrived.items()):
            seq = self.pulling[req_id]
            if count < self.instance_size or not seq.output:
                continue
            del self.pulling[req_id], self.arrived[req_id]
            seq.times["transfer_end"] = time.time()
            joined.append(req_id)
            out.messages.append((seq.source_instance, Tag.PULLED, Pulled(req_id)))
            if self._finished(seq):
                self.allocator.free(seq.blocks)
                out.messages.append((CONTROLLER, Tag.RESULT, self._result(seq)))
            else:
                self.running.append(seq)
        return joined

    def _post_sends(self) -> list[KVPost]:
        """Sends of pulled requests whose KV is held, strictly in each decode instance's pull order:
        a pull that comes before its prefill ends holds back the pulls behind it."""
        sends = []
        for decode_instance, queue in self.pulls.items():
            while queue and queue[0] in self.held:
                seq = self.held[queue.popleft()]
                sends.append(KVPost(seq.req_id, tuple(seq.blocks), len(seq.request.prompt_ids), decode_instance,
                                    self.pull_blocks.pop(seq.req_id)))
        return sends

    def _reap_aborted(self, out: SchedulerOutput) -> None:
        """Aborted sequences of the batch that no step in flight holds leave before the next step."""
        flying = self._flying()
        for seq in [s for s in self.running if s.req_id in self.aborted and s.req_id not in flying]:
            self.running.remove(seq)
            self.allocator.free(seq.blocks)
            seq.finish_reason = "abort"
            out.messages.append((CONTROLLER, Tag.RESULT, self._result(seq)))

    def schedule(self) -> SchedulerOutput:
        """The next step for the instance's ranks and the messages it causes."""
        out = SchedulerOutput(StepPlan())
        if self.aborted:
            self._reap_aborted(out)
        releases, self.pending_releases = tuple(self.pending_releases), []
        sends = self._post_sends()
        joins, recvs = [], []
        if self.role == "decode":
            joins = self._joins(out)
            recvs = self._start_pulls(out)
        batch = self._prefill_batch(out) if self.role in ("prefill", "colocated") else []
        now = time.time()
        if batch:
            for seq in batch:
                seq.times["prefill_start"] = now
            chunks = [SeqChunk(seq.req_id, tuple(seq.request.prompt_ids), 0, tuple(seq.blocks), seq.request.sampling, 0)
                      for seq in batch]
        else:
            batch = self._decode_group()
            chunks = [SeqChunk(seq.req_id, (seq.output[-1],), seq.num_tokens - 1, tuple(seq.blocks),
                               seq.request.sampling, len(seq.output)) for seq in batch]
        if batch:
            self.in_flight.append(batch)
        out.step = StepPlan(tuple(chunks), tuple(sends), tuple(recvs), tuple(joins), releases,
                            want_logits=self.want_logits and bool(chunks))
        self.peak_blocks = max(self.peak_blocks, self.allocator.num_used)
        self.peak_batch = max(self.peak_batch, len(chunks))
        self.steps += bool(chunks)
        return out

    def state(self) -> dict:
        """What the heartbeat reports: queue, batch and KV occupancy."""
        return {"waiting": len(self.waiting) + len(self.incoming), "running": len(self.running),
                "kv_used": self.allocator.num_used, "kv_blocks": self.allocator.num_blocks}

    def stats(self) -> dict:
        import resource

        return {"kv_blocks": self.allocator.num_blocks, "peak_kv_blocks": self.peak_blocks,
                "peak_batch": self.peak_batch, "forward_steps": self.steps,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    # ---- results of a step -------------------------------------------------------------------
    def _finished(self, seq: Sequence) -> bool:
        """EOS, then stop strings (decided here, once: the text is cut where one begins), then length."""
        sampling = seq.request.sampling
        if seq.req_id in self.aborted:
            seq.finish_reason = "abort"
        elif seq.output[-1] in self.eos_ids and not sampling.ignore_eos:
            seq.finish_reason = "stop"
        elif sampling.stop and self.decode is not None and \
                (cut := stop_cut(seq.text_state, seq.output, sampling.stop, self.decode)) is not None:
            seq.finish_reason, seq.stop_text = "stop", cut
        elif len(seq.output) >= sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _result(self, seq: Sequence) -> Result:
        self.aborted.discard(seq.req_id)
        return Result(seq.req_id, self.instance_id, tuple(seq.output), seq.finish_reason, dict(seq.times),
                      tuple(seq.token_times), seq.stop_text, tuple(seq.logits) if self.want_logits else ())

    def on_step(self, tokens: list[int], logits: Optional[list] = None) -> list[tuple[int, Tag, Any]]:
        """Appends the sampled tokens (and, for --dump-logits, their logits as lists) of the oldest
        step in flight; returns the messages they cause: first tokens of held KV, finished requests."""
        now = time.time()
        messages = []
        streamed = []
        step = self.in_flight.popleft()
        for i, (seq, token) in enumerate(zip(step, tokens)):
            if seq.request.stream:
                streamed.append((seq.req_id, len(seq.output), token))
            seq.output.append(token)
            seq.token_times.append(now)
            if logits is not None:
                seq.logits.append(logits[i])
            first = len(seq.output) == 1
            if first:
                seq.times["prefill_end"] = seq.times["first_token"] = now
            if first and seq.announced:  # its decode instance expects the KV, even if EOS came first
                self.held[seq.req_id] = seq  # sent once pulled (_post_sends)
                seq.times["transfer_start"] = now
                messages.append((seq.request.decode_instance, Tag.FIRST_TOKEN,
                                 FirstToken(seq.req_id, self.instance_id, token, dict(seq.times), tuple(seq.logits))))
                messages.append((CONTROLLER, Tag.PREFILL_DONE, PrefillDone(seq.req_id, self.instance_id, now)))
            elif self._finished(seq):
                self.allocator.free(seq.blocks)
                if seq in self.running:
                    self.running.remove(seq)
                messages.append((CONTROLLER, Tag.RESULT, self._result(seq)))
            elif first:
                self.running.append(seq)
                messages.append((CONTROLLER, Tag.PREFILL_DONE, PrefillDone(seq.req_id, self.instance_id, now)))
        if streamed:  # before the results: the controller keeps what a result makes redundant out anyway
            messages.insert(0, (CONTROLLER, Tag.TOKENS_OUT, TokensOut(self.instance_id, tuple(streamed))))
        return messages
