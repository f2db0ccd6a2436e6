"""The step plan: the only contract between an instance's leader and its ranks.

The leader schedules; every rank of the instance receives the same StepPlan and executes it
(the SchedulerOutput idea of vLLM v1). Plain dataclasses, pickled over MPI; no tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class SeqChunk:
    """New tokens of one sequence to run through the model this step."""

    req_id: int
    token_ids: list[int]
    start_pos: int              # tokens of this sequence already in the cache
    block_table: list[int]
    sampling: SamplingParams
    output_index: int           # index of the token this step samples (seeds sampled decoding)


@dataclass
class KVSend:
    """Prefill side: post the sends of a request's KV to a decode instance."""

    req_id: int
    block_table: list[int]
    num_tokens: int
    peer_instance: int


@dataclass
class KVRecv:
    """Decode side: post the receives of a request's KV from a prefill instance."""

    req_id: int
    num_tokens: int
    peer_instance: int


@dataclass
class KVJoin:
    """Decode side: the request's KV arrived on every rank; copy it into its blocks."""

    req_id: int
    block_table: list[int]


@dataclass
class StepPlan:
    seqs: list[SeqChunk] = field(default_factory=list)
    kv_sends: list[KVSend] = field(default_factory=list)
    kv_recvs: list[KVRecv] = field(default_factory=list)
    kv_joins: list[KVJoin] = field(default_factory=list)
    kv_releases: list[int] = field(default_factory=list)  # prefill side: sends done, drop buffers
    want_logits: bool = False
    shutdown: bool = False

    @property
    def has_forward(self) -> bool:
        return bool(self.seqs)
