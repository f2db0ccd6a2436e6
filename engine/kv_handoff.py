"""The scheduler half of the KV hand-off from a prefill to a decode instance: per request, one
small state machine on each side (vLLM v1 keeps its KV connector's scheduler side apart alike).

    ANNOUNCED --pull--> PULLED --sent--> SENT --join--> JOINED
        '--drop (aborted before its pull)--> DROPPED

Prefill side (KVSender): ANNOUNCED when its prefill starts (the decode instance is told,
KVIncoming); its KV is *held* once its first token is sampled, which may come before or after its
pull; PULLED when the decode instance's KVPull comes; SENT once its sends are posted (the KV held
and every earlier pull of that decode instance sent: per rank pair the sends follow the receives'
order, as NCCL matches by order, not tag); JOINED when the decode side has all of it (Pulled): its
blocks are freed. DROPPED: Pulled came without a pull (the decode side dropped it): freed, no transfer.

Decode side (KVReceiver): ANNOUNCED when KVIncoming comes (it waits for blocks and batch room);
PULLED once its receives are posted (KVPull sent); SENT once every rank's receives completed;
JOINED once its first token is known too: it joins the batch. DROPPED: aborted while announced;
a first token still due is swallowed when it comes.

A message the protocol does not allow in a request's state raises HandoffError, naming both.
Pure Python: no torch, no MPI.
"""
from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Optional

from contracts.protocol import FirstToken, KVIncoming, KVPost, KVPull
from engine.sequence import Sequence


class KVStage(Enum):
    ANNOUNCED = "announced"
    PULLED = "pulled"
    SENT = "sent"
    JOINED = "joined"
    DROPPED = "dropped"


NEXT = {KVStage.ANNOUNCED: (KVStage.PULLED, KVStage.DROPPED), KVStage.PULLED: (KVStage.SENT,),
        KVStage.SENT: (KVStage.JOINED,)}


class HandoffError(RuntimeError):
    """A hand-off message that the request's state does not allow: the two sides disagree."""


class _Stages:
    """Each request's stage on one side; JOINED and DROPPED requests are forgotten (the decode
    side remembers a DROPPED one until its first token came)."""

    side = ""

    def __init__(self):
        self.stages: dict[int, KVStage] = {}

    def stage(self, req_id: int) -> Optional[KVStage]:
        return self.stages.get(req_id)

    def _start(self, req_id: int) -> None:
        if req_id in self.stages:
            raise HandoffError(f"{self.side} side of the KV hand-off: request {req_id} announced twice "
                               f"(it is {self.stages[req_id].value})")
        self.stages[req_id] = KVStage.ANNOUNCED

    def _move(self, req_id: int, to: KVStage, why: str = "") -> None:
        now = self.stages.get(req_id)
        if to not in NEXT.get(now, ()):
            allowed = ", ".join(s.value for s in NEXT.get(now, ())) or "nothing"
            raise HandoffError(f"{self.side} side of the KV hand-off: request {req_id} cannot become {to.value} "
                               f"from {now.value if now else 'unknown'}{why} (from there: {allowed})")
        self.stages[req_id] = to

    def _require(self, req_id: int, stages: tuple[KVStage, ...], event: str) -> None:
        now = self.stages.get(req_id)
        if now not in stages:
            raise HandoffError(f"{self.side} side of the KV hand-off: {event} for request {req_id}, which is "
                               f"{now.value if now else 'unknown'} (expected {' or '.join(s.value for s in stages)})")

    def _end(self, req_id: int, to: KVStage, why: str = "") -> None:
        """Moves to JOINED or DROPPED and forgets the request."""
        self._move(req_id, to, why)
        del self.stages[req_id]


class KVSender(_Stages):
    """The prefill side: announced requests, their pulls in each decode instance's order, the
    sends to post, the held KV to free."""

    side = "prefill"

    def __init__(self, block_size: int):
        super().__init__()
        self.block_size = block_size
        self.seqs: dict[int, Sequence] = {}         # announced, not freed yet
        self.held: set[int] = set()                 # first token sampled: the KV is complete
        self.pulls: dict[int, KVPull] = {}          # pulled, not sent yet
        self.order: dict[int, deque[int]] = {}      # decode instance -> its pulls' req_ids, in arrival order
        self.releases: list[int] = []               # freed since the last step: the ranks drop their buffers

    def announce(self, seq: Sequence) -> None:
        self._start(seq.req_id)
        self.seqs[seq.req_id] = seq

    def expects(self, req_id: int) -> bool:
        """Whether a decode instance expects this request's KV."""
        return req_id in self.seqs

    def hold(self, req_id: int) -> None:
        self._require(req_id, (KVStage.ANNOUNCED, KVStage.PULLED), "its first token")
        self.held.add(req_id)

    def pull(self, pull: KVPull) -> None:
        self._move(pull.req_id, KVStage.PULLED)
        self.pulls[pull.req_id] = pull
        self.order.setdefault(pull.decode_instance, deque()).append(pull.req_id)

    def sends(self) -> list[KVPost]:
        """The sends to post now: pulled requests whose KV is held, strictly in each decode
        instance's pull order (a pull that came before its prefill ended holds back those behind it)."""
        posts = []
        for decode_instance, queue in self.order.items():
            while queue and queue[0] in self.held:
                req_id = queue.popleft()
                self._move(req_id, KVStage.SENT)
                seq, pull = self.seqs[req_id], self.pulls.pop(req_id)
                skip = pull.held_blocks  # the blocks the decode side has already
                posts.append(KVPost(req_id, tuple(seq.blocks[skip:]), len(seq.request.prompt_ids) - skip * self.block_size,
                                    decode_instance, pull.blocks[skip:]))
        return posts

    def pulled(self, req_id: int) -> Sequence:
        """The decode side has all of the KV, or dropped it before its pull: returns the sequence
        whose blocks to free."""
        if self.stage(req_id) is KVStage.SENT:
            self._end(req_id, KVStage.JOINED)
        elif req_id not in self.held:
            self._end(req_id, KVStage.JOINED, why=" before its KV completed")
        else:
            self._end(req_id, KVStage.DROPPED)
        self.held.discard(req_id)
        self.releases.append(req_id)
        return self.seqs.pop(req_id)

    def take_releases(self) -> tuple[int, ...]:
        releases, self.releases = tuple(self.releases), []
        return releases

    def busy(self) -> bool:
        return bool(any(self.order.values()) or self.releases)


class KVReceiver(_Stages):
    """The decode side: announced requests waiting for room, posted receives, ranks' arrivals,
    first tokens (which may come before the pull), and the joins."""

    side = "decode"

    def __init__(self, instance_size: int, block_size: int):
        super().__init__()
        self.instance_size, self.block_size = instance_size, block_size
        self.waiting: dict[int, KVIncoming] = {}   # announced, in arrival order
        self.pulling: dict[int, Sequence] = {}     # receives posted (PULLED, SENT)
        self.arrived: dict[int, int] = {}          # req -> ranks whose receives completed, in first-arrival order
        self.firsts: dict[int, FirstToken] = {}    # first tokens of requests not pulled yet

    def announce(self, incoming: KVIncoming) -> None:
        self._start(incoming.request.req_id)
        self.waiting[incoming.request.req_id] = incoming

    def first_token(self, first: FirstToken) -> None:
        """The first token of an announced (maybe not yet pulled, or dropped) request."""
        if self.stage(first.req_id) is KVStage.DROPPED:
            del self.stages[first.req_id]  # nothing more comes for it
        elif first.req_id in self.pulling:
            self.pulling[first.req_id].take_first_token(first)
        else:
            self.firsts[first.req_id] = first

    def next_waiting(self) -> Optional[KVIncoming]:
        return next(iter(self.waiting.values()), None)

    def pull(self, seq: Sequence, held_blocks: int, decode_instance: int) -> tuple[KVPost, KVPull]:
        """Posts the receives of the oldest announced request into `seq.blocks` (its first
        `held_blocks` blocks hold a cached prefix already): the receives and the pull to send."""
        self._move(seq.req_id, KVStage.PULLED)
        incoming = self.waiting.pop(seq.req_id)
        self.pulling[seq.req_id] = seq
        if seq.req_id in self.firsts:
            seq.take_first_token(self.firsts.pop(seq.req_id))
        return (KVPost(seq.req_id, tuple(seq.blocks[held_blocks:]),
                       len(seq.request.prompt_ids) - held_blocks * self.block_size, seq.source_instance,
                       incoming.blocks[held_blocks:]),
                KVPull(seq.req_id, decode_instance, tuple(seq.blocks), held_blocks))

    def rank_arrived(self, req_id: int) -> None:
        self._require(req_id, (KVStage.PULLED,), "a rank's receives completed")
        self.arrived[req_id] = self.arrived.get(req_id, 0) + 1
        if self.arrived[req_id] == self.instance_size:
            self._move(req_id, KVStage.SENT)

    def joins(self) -> list[Sequence]:
        """Requests whose KV is on every rank and whose first token is known: they join."""
        joined = []
        for req_id in list(self.arrived):
            seq = self.pulling[req_id]
            if self.stage(req_id) is KVStage.SENT and seq.output:
                self._end(req_id, KVStage.JOINED)
                del self.pulling[req_id], self.arrived[req_id]
                joined.append(seq)
        return joined

    def drop(self, req_id: int) -> KVIncoming:
        """An announced request is aborted before its pull: no transfer."""
        self._move(req_id, KVStage.DROPPED)
        if self.firsts.pop(req_id, None) is not None:
            del self.stages[req_id]  # its first token came already: nothing more comes
        return self.waiting.pop(req_id)

    def busy(self) -> bool:
        return bool(self.waiting or self.pulling or self.firsts)
