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
class KVPost:
    """Post a request's KV transfer with a peer instance: its sends (prefill side) or its receives
    into the blocks it was given (decode side)."""

    req_id: int
    block_table: list[int]
    num_tokens: int
    peer_instance: int


@dataclass
class StepPlan:
    seqs: list[SeqChunk] = field(default_factory=list)
    kv_sends: list[KVPost] = field(default_factory=list)
    kv_recvs: list[KVPost] = field(default_factory=list)
    kv_joins: list[int] = field(default_factory=list)  # decode side: KV landed on every rank; join the batch
    kv_releases: list[int] = field(default_factory=list)  # prefill side: sends done, drop buffers
    want_logits: bool = False
    shutdown: bool = False

    @property
    def has_forward(self) -> bool:
        return bool(self.seqs)
