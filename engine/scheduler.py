"""The leader's scheduler: which sequences run this step, and where their KV blocks live.

One class serves the three roles; a role is the set of phases an instance runs:
- prefill:   FCFS batches under the token budget L_m (engine/prompt_queue.py: whole prompts, one
             longer than L_m in chunks that fill the budget); a request that may
             decode is announced to its decode instance when its prefill starts, and its KV is
             held after prefill until that instance pulled it (engine/kv_handoff.py); no blocks
             free = no new prefill (backpressure).
- decode:    pulls an announced request's KV only when it has blocks (prompt + max_tokens) and
             batch room for it; a pulled request joins the continuous batch once every rank has
             its KV and its first token is known. Announcing at prefill start lets the receives be
             posted while the prefill runs, so the transfer starts at the first token.
- colocated: both phases on the same ranks, under one of two policies:
             chunked (vLLM >= 0.6, Sarathi-Serve): every step carries the running decodes (one token
             each, first) plus prompt chunks up to the step token budget, decode tokens included;
             a prompt's first token is sampled with its last chunk;
             prefill_first (vLLM before 0.6): a step is a prefill batch of whole prompts whenever
             one is admissible, else a decode step.
With PP, up to `depth` steps are in flight (engine/steps_in_flight.py). Reserving prompt + max_tokens blocks on admission means a decode step never runs out of blocks.
An aborted request (client gone, drain timed out) leaves at once if it waits; one whose KV is
already moving or in the batch finishes with reason "abort" at its next join or step, so every
transfer posted still completes in order and every block is freed by the usual path.
`schedule()` returns one SchedulerOutput: the step plan for the instance's ranks and the messages
for peer instances' leaders and the controller; `on_step()` returns the messages its tokens cause.
Pure Python: no torch, no MPI.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from contracts.protocol import (CONTROLLER, FirstToken, KVIncoming, KVPost, KVPull, PrefillDone, Pulled, Request,
                                Result, SchedulerState, SchedulerStats, StepPlan, TokensOut)
from engine.blocks import blocks_for
from engine.kv_handoff import KVReceiver, KVSender
from engine.prompt_queue import PromptQueue
from engine.seq_blocks import SequenceBlocks
from engine.sequence import InstanceLimits, Sequence
from engine.steps_in_flight import StepsInFlight
from engine.stops import Decode


@dataclass(frozen=True)
class Outgoing:
    """A message for another rank: a peer instance's leader, or the CONTROLLER."""

    dest: int  # global rank
    msg: Any


@dataclass
class SchedulerOutput:
    step: StepPlan
    messages: list[Outgoing] = field(default_factory=list)


class Scheduler:
    def __init__(self, role: str, instance_id: int, instance_size: int, limits: InstanceLimits,
                 eos_ids: tuple[int, ...] = (), decode: Optional[Decode] = None, want_logits: bool = False,
                 leaders: tuple[int, ...] = ()):
        """`decode` (token ids -> text) is needed only for requests with stop strings; `leaders`
        (every instance's leader's global rank) only by instances that talk to peers."""
        self.role, self.instance_id, self.instance_size = role, instance_id, instance_size
        self.leaders = leaders
        self.block_size, self.token_budget = limits.block_size, limits.token_budget
        self.max_batch, self.max_model_len = limits.max_batch, limits.max_model_len
        self.blocks = SequenceBlocks(limits.num_blocks, limits.block_size, limits.prefix_caching)
        self.eos_ids, self.decode, self.want_logits = set(eos_ids), decode, want_logits
        self.chunked = role == "colocated" and limits.colocated_policy == "chunked"
        # to prefill: prompts of a chunked colocated instance split anywhere, a prefill instance's past L_m
        self.prompts = PromptQueue(self.blocks, 0 if self.chunked else self.token_budget if role == "prefill" else None)
        self.starting: set[int] = set()              # admitted, first token not back yet
        self.running: list[Sequence] = []            # decoding
        self.depth = limits.pipeline_depth
        self.in_flight = StepsInFlight(self.depth)
        self.sender = KVSender(self.block_size)      # prefill: the KV hand-off's sending side
        self.receiver = KVReceiver(instance_size, self.block_size)  # decode: its receiving side
        self.aborted: set[int] = set()               # to finish with reason "abort" (decode: maybe not here yet)
        self.peak_blocks = 0
        self.peak_batch = 0
        self.steps = 0

    # ---- inputs from the control plane -------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.prompts.add(Sequence(request, block_hashes=self.blocks.hashes(request.prompt_ids)))

    def add_incoming(self, incoming: KVIncoming) -> list[Outgoing]:
        self.receiver.announce(incoming)
        if incoming.request.req_id in self.aborted:  # the abort came first
            return self.abort(incoming.request.req_id)
        return []

    def add_first_token(self, first: FirstToken) -> None:
        """The first token of an announced request (which may not be pulled yet)."""
        self.receiver.first_token(first)

    def add_pull(self, pull: KVPull) -> None:
        self.sender.pull(pull)

    def pulled(self, req_id: int) -> None:
        """The decode side has all of the request's KV (or dropped it): free the held blocks."""
        self.blocks.free(self.sender.pulled(req_id))

    def abort(self, req_id: int) -> list[Outgoing]:
        """Ends a request early; returns the messages that causes. A prefill instance ends only
        requests it has not started (the controller tells the decode instance about later ones)."""
        waiting = self.prompts.drop_waiting(req_id)
        if waiting is not None:
            waiting.finish_reason = "abort"
            return [Outgoing(CONTROLLER, self._result(waiting))]
        if req_id in self.receiver.waiting:  # announced, not pulled: the prefill side frees its held KV, no transfer
            incoming = self.receiver.drop(req_id)
            self.aborted.discard(req_id)
            seq = Sequence(incoming.request, finish_reason="abort")
            return [Outgoing(self.leaders[incoming.prefill_instance], Pulled(req_id)),
                    Outgoing(CONTROLLER, self._result(seq))]
        if self.role != "prefill":
            self.aborted.add(req_id)
        return []

    def rank_arrived(self, req_id: int) -> None:
        self.receiver.rank_arrived(req_id)

    def busy(self) -> bool:
        return bool(self.prompts or self.running or self.in_flight or self.receiver.busy()
                    or self.sender.busy())

    # ---- scheduling ------------------------------------------------------------------------
    def _decodes_later(self, seq: Sequence) -> bool:
        """A prefill-role request that may need a decode step (known before its first token)."""
        n = len(seq.request.prompt_ids)
        return self.role == "prefill" and seq.request.sampling.max_tokens > 1 and n + 1 < self.max_model_len

    def _admit(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Takes the blocks a waiting prompt needs (colocated: for its whole life, and batch room);
        False when they are not there (backpressure). Announces one that will decode elsewhere."""
        n = len(seq.request.prompt_ids)
        if self.role == "colocated":
            if len(self.running) + len(self.starting) >= self.max_batch:
                return False
            need = seq.reserved_blocks(self.max_model_len, self.block_size)
        else:
            need = blocks_for(n, self.block_size)
        hits = self.blocks.take(seq, need)
        if hits is None:
            return False
        seq.cached_tokens = seq.prefilled = hits * self.block_size
        self.starting.add(seq.req_id)
        seq.passed(prefill_start=time.time())
        if self._decodes_later(seq):
            self.sender.announce(seq)
            out.messages.append(Outgoing(self.leaders[seq.request.decode_instance],
                                         KVIncoming(seq.request, self.instance_id, tuple(seq.blocks))))
        return True

    def _start_pulls(self, out: SchedulerOutput) -> list[KVPost]:
        """Posts the receives of announced requests, oldest first, while blocks and batch room last."""
        recvs = []
        while (incoming := self.receiver.next_waiting()) and len(self.running) + len(self.receiver.pulling) < self.max_batch:
            seq = Sequence(incoming.request, source_instance=incoming.prefill_instance,
                           block_hashes=self.blocks.hashes(incoming.request.prompt_ids))
            held = self.blocks.take(seq, seq.reserved_blocks(self.max_model_len, self.block_size))  # with decode_prefix_reuse: the prompt's leading blocks held here
            if held is None:
                break
            seq.passed(pull_start=time.time())
            recv, pull = self.receiver.pull(seq, held, self.instance_id)
            recvs.append(recv)
            out.messages.append(Outgoing(self.leaders[seq.source_instance], pull))  # the sends follow the pulls' order
        return recvs

    def _joins(self, out: SchedulerOutput) -> list[int]:
        """Requests whose KV is on every rank and whose first token is known join the batch; one
        whose first token already ends it (EOS, a stop string) finishes here, without a step."""
        joined = []
        for seq in self.receiver.joins():
            seq.passed(transfer_end=time.time())
            self.blocks.written(seq, len(seq.request.prompt_ids))  # later pulls of the same prefix reuse it
            joined.append(seq.req_id)
            out.messages.append(Outgoing(self.leaders[seq.source_instance], Pulled(seq.req_id)))
            if self._finished(seq):
                self.blocks.free(seq)
                out.messages.append(Outgoing(CONTROLLER, self._result(seq)))
            else:
                self.running.append(seq)
        return joined

    def _reap_aborted(self, out: SchedulerOutput) -> None:
        """Aborted sequences of the batch that no step in flight holds leave before the next step."""
        flying = self.in_flight.flying()
        for seq in [s for s in self.running if s.req_id in self.aborted and s.req_id not in flying]:
            self.running.remove(seq)
            self.blocks.free(seq, keep_output=True)
            seq.finish_reason = "abort"
            out.messages.append(Outgoing(CONTROLLER, self._result(seq)))

    def schedule(self) -> SchedulerOutput:
        """The next step for the instance's ranks and the messages it causes."""
        out = SchedulerOutput(StepPlan())
        if self.aborted:
            self._reap_aborted(out)
        releases = self.sender.take_releases()
        sends = self.sender.sends()
        joins, recvs = [], []
        if self.role == "decode":
            joins = self._joins(out)
            recvs = self._start_pulls(out)
        decodes = self.in_flight.decode_group(self.running) if self.role == "decode" or self.chunked else []
        budget = self.token_budget - len(decodes)
        prompts = self.prompts.take(budget, lambda seq: self._admit(seq, out)) if self.role != "decode" else []
        if self.role == "colocated" and not self.chunked and not prompts:  # prefill_first: decode when no prefill
            decodes = self.in_flight.decode_group(self.running)
        self.in_flight.add(decodes, prompts)
        chunks = [seq.decode_chunk() for seq in decodes] + [chunk for _, chunk in prompts]
        out.step = StepPlan(tuple(chunks), tuple(sends), tuple(recvs), tuple(joins), releases,
                            want_logits=self.want_logits and bool(chunks))
        self.peak_blocks = max(self.peak_blocks, self.blocks.num_used)
        self.peak_batch = max(self.peak_batch, len(chunks))
        self.steps += bool(chunks)
        return out

    def state(self) -> SchedulerState:
        """What the heartbeat reports: queue, batch and KV occupancy."""
        return SchedulerState(len(self.prompts) + len(self.receiver.waiting), len(self.running),
                              self.blocks.num_used, self.blocks.num_blocks, *self.blocks.prefix_counts())

    def stats(self) -> SchedulerStats:
        return SchedulerStats(self.blocks.num_blocks, self.peak_blocks, self.peak_batch, self.steps,
                              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, *self.blocks.prefix_counts())

    # ---- results of a step -------------------------------------------------------------------
    def _finished(self, seq: Sequence) -> bool:
        return seq.ends(self.eos_ids, self.max_model_len, self.decode, aborted=seq.req_id in self.aborted)

    def _result(self, seq: Sequence) -> Result:
        self.aborted.discard(seq.req_id)
        return seq.result(self.instance_id, self.want_logits)

    def on_step(self, tokens: list[int], logits: Optional[list] = None) -> list[Outgoing]:
        """Appends the sampled tokens (and, for --dump-logits, their logits as lists) of the oldest
        step in flight; returns the messages they cause: first tokens of held KV, finished requests."""
        now = time.time()
        messages = []
        streamed = []
        step = self.in_flight.oldest()
        for i, ((seq, sampled), token) in enumerate(zip(step, tokens)):
            if not sampled:  # a chunk short of its prompt's end: only its KV counts
                continue
            if seq.request.stream:
                streamed.append((seq.req_id, len(seq.output), token))
            seq.append_token(token, now, None if logits is None else logits[i])
            first = len(seq.output) == 1
            if first:
                self.starting.discard(seq.req_id)
                seq.passed(first_token=now)
            if first and self.sender.expects(seq.req_id):  # its decode instance expects the KV, even if EOS came first
                self.sender.hold(seq.req_id)  # sent once pulled
                seq.passed(transfer_start=now)
                messages.append(Outgoing(self.leaders[seq.request.decode_instance],
                                         FirstToken(seq.req_id, self.instance_id, token, seq.times,
                                                    tuple(seq.logits), seq.cached_tokens)))
                messages.append(Outgoing(CONTROLLER, PrefillDone(seq.req_id, self.instance_id, now)))
            elif self._finished(seq):
                self.blocks.free(seq, keep_output=True)
                if seq in self.running:
                    self.running.remove(seq)
                messages.append(Outgoing(CONTROLLER, self._result(seq)))
            elif first:
                self.running.append(seq)
                messages.append(Outgoing(CONTROLLER, PrefillDone(seq.req_id, self.instance_id, now)))
        if streamed:  # before the results: the controller keeps what a result makes redundant out anyway
            messages.insert(0, Outgoing(CONTROLLER, TokensOut(self.instance_id, tuple(streamed))))
        return messages
