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
Pure Python: no torch, no MPI.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from engine.blocks import BlockAllocator, blocks_for
from engine.step import KVPost, SamplingParams, SeqChunk, StepPlan


@dataclass
class Request:
    req_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    arrival: float  # wall-clock seconds
    decode_instance: int = -1  # chosen by the controller at dispatch (disaggregated mode)


@dataclass
class KVIncoming:
    """A prefill instance started this request's prefill; its KV will be sent to the receiver."""

    request: Request
    prefill_instance: int


@dataclass
class KVPull:
    """A decode instance posted its receives for this request: the prefill side posts the sends,
    in the order the pulls of that decode instance arrive."""

    req_id: int
    decode_instance: int


@dataclass
class ReadyNotice:
    """A prefill instance holds this request's KV and sampled its first token; sent to the decode
    instance (which joins the request with it) and to the controller (which tracks load)."""

    request: Request
    prefill_instance: int
    first_token: int
    times: dict
    logits: list = field(default_factory=list)  # debug: the first token's logits


@dataclass
class Sequence:
    request: Request
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    times: dict = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list)
    logits: list = field(default_factory=list)
    finish_reason: Optional[str] = None
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


class Scheduler:
    def __init__(self, role: str, num_blocks: int, block_size: int, token_budget: int, max_batch: int,
                 max_model_len: int, eos_ids: tuple[int, ...], hits_stop: Callable[[Sequence], bool],
                 instance_size: int):
        self.role, self.block_size = role, block_size
        self.allocator = BlockAllocator(num_blocks)
        self.token_budget, self.max_batch, self.max_model_len = token_budget, max_batch, max_model_len
        self.eos_ids, self.hits_stop, self.instance_size = set(eos_ids), hits_stop, instance_size
        self.waiting: deque[Sequence] = deque()      # to prefill
        self.running: list[Sequence] = []            # decoding
        self.held: dict[int, Sequence] = {}          # prefill: KV kept until pulled
        self.incoming: deque[KVIncoming] = deque()   # decode: announced, receives not posted yet
        self.firsts: dict[int, ReadyNotice] = {}     # decode: first tokens of requests not pulled yet
        self.pulling: dict[int, Sequence] = {}       # decode: receives posted
        self.announcements: list[Sequence] = []      # prefill: to announce to their decode instances
        self.arrived: dict[int, int] = {}            # decode: req -> ranks whose receives completed
        self.pulls: dict[int, deque[int]] = {}       # prefill: decode instance -> pulled req_ids, in order
        self.pending_releases: list[int] = []
        self.peak_blocks = 0
        self.peak_batch = 0
        self.steps = 0

    # ---- inputs from the control plane -------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.waiting.append(Sequence(request))

    def add_incoming(self, incoming: KVIncoming) -> None:
        self.incoming.append(incoming)

    def add_ready(self, notice: ReadyNotice) -> None:
        """The first token of an announced request (which may not be pulled yet)."""
        seq = self.pulling.get(notice.request.req_id)
        if seq is None:
            self.firsts[notice.request.req_id] = notice
        else:
            self._apply_first(seq, notice)

    @staticmethod
    def _apply_first(seq: Sequence, notice: ReadyNotice) -> None:
        seq.output = [notice.first_token]
        seq.times = {**notice.times, **seq.times}
        seq.token_times = [notice.times["first_token"]]
        seq.logits = list(notice.logits)

    def add_pull(self, pull: KVPull) -> None:
        self.pulls.setdefault(pull.decode_instance, deque()).append(pull.req_id)

    def take_announcements(self) -> list[Sequence]:
        out, self.announcements = self.announcements, []
        return out

    def pulled(self, req_id: int) -> None:
        """The decode side has all of the request's KV: free the held blocks."""
        self.allocator.free(self.held.pop(req_id).blocks)
        self.pending_releases.append(req_id)

    def rank_arrived(self, req_id: int) -> None:
        self.arrived[req_id] = self.arrived.get(req_id, 0) + 1

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.pulling) + len(self.incoming)

    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.pulling or self.incoming or self.firsts
                    or any(self.pulls.values()) or self.pending_releases)

    # ---- scheduling ------------------------------------------------------------------------
    def _reserve(self, seq: Sequence) -> int:
        return reserved_blocks(len(seq.request.prompt_ids), seq.request.sampling.max_tokens, self.max_model_len,
                               self.block_size)

    def _decodes_later(self, seq: Sequence) -> bool:
        """A prefill-role request that may need a decode step (known before its first token)."""
        n = len(seq.request.prompt_ids)
        return self.role == "prefill" and seq.request.sampling.max_tokens > 1 and n + 1 < self.max_model_len

    def _prefill_batch(self) -> list[Sequence]:
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
                self.announcements.append(seq)
        return batch

    def _start_pulls(self, step: StepPlan) -> None:
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
            step.kv_recvs.append(KVPost(seq.req_id, seq.blocks, len(seq.request.prompt_ids), seq.source_instance))

    def _joins(self, step: StepPlan) -> list[Sequence]:
        """Requests whose KV is on every rank and whose first token is known join the batch; one
        whose first token already ends it (EOS, a stop string) finishes here, without a step."""
        joined = []
        for req_id, count in list(self.arrived.items()):
            seq = self.pulling[req_id]
            if count < self.instance_size or not seq.output:
                continue
            del self.pulling[req_id], self.arrived[req_id]
            seq.times["transfer_end"] = time.time()
            step.kv_joins.append(req_id)
            joined.append(seq)
            if self._finished(seq):
                self.allocator.free(seq.blocks)
            else:
                self.running.append(seq)
        return joined

    def _post_sends(self, step: StepPlan) -> None:
        """Sends of pulled requests whose KV is held, strictly in each decode instance's pull order:
        a pull that comes before its prefill ends holds back the pulls behind it."""
        for decode_instance, queue in self.pulls.items():
            while queue and queue[0] in self.held:
                seq = self.held[queue.popleft()]
                step.kv_sends.append(KVPost(seq.req_id, seq.blocks, len(seq.request.prompt_ids), decode_instance))

    def schedule(self) -> tuple[StepPlan, list[Sequence]]:
        """The next step and the sequences whose KV joined in it (finished ones have a finish_reason)."""
        step = StepPlan(kv_releases=self.pending_releases)
        self.pending_releases = []
        self._post_sends(step)
        joined = []
        if self.role == "decode":
            joined = self._joins(step)
            self._start_pulls(step)
        batch = self._prefill_batch() if self.role in ("prefill", "colocated") else []
        now = time.time()
        if batch:
            for seq in batch:
                seq.times["prefill_start"] = now
                step.seqs.append(SeqChunk(seq.req_id, list(seq.request.prompt_ids), 0, seq.blocks,
                                          seq.request.sampling, 0))
            self._in_step = batch
        elif self.running:
            for seq in self.running:
                step.seqs.append(SeqChunk(seq.req_id, [seq.output[-1]], seq.num_tokens - 1, seq.blocks,
                                          seq.request.sampling, len(seq.output)))
            self._in_step = list(self.running)
        else:
            self._in_step = []
        self.peak_blocks = max(self.peak_blocks, self.allocator.num_used)
        self.peak_batch = max(self.peak_batch, len(step.seqs))
        self.steps += bool(step.seqs)
        return step, joined

    def stats(self) -> dict:
        import resource

        return {"kv_blocks": self.allocator.num_blocks, "peak_kv_blocks": self.peak_blocks,
                "peak_batch": self.peak_batch, "forward_steps": self.steps,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    # ---- results of a step -------------------------------------------------------------------
    def _finished(self, seq: Sequence) -> bool:
        last = seq.output[-1]
        if last in self.eos_ids and not seq.request.sampling.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output) >= seq.request.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        elif seq.request.sampling.stop and self.hits_stop(seq):
            seq.finish_reason = "stop"
        return seq.finish_reason is not None

    def on_step(self, tokens: list[int], logits) -> tuple[list[Sequence], list[Sequence]]:
        """Appends sampled tokens. Returns (sequences whose KV is now held for a pull, finished)."""
        now = time.time()
        ready, finished = [], []
        for i, (seq, token) in enumerate(zip(self._in_step, tokens)):
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
                ready.append(seq)
            elif self._finished(seq):
                finished.append(seq)
                self.allocator.free(seq.blocks)
                if seq in self.running:
                    self.running.remove(seq)
            elif first:
                self.running.append(seq)
        self._in_step = []
        return ready, finished
