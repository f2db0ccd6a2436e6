"""A request as an instance's scheduler tracks it, and the limits the scheduler works within.
Pure Python: no torch, no MPI."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from contracts.protocol import FirstToken, Request, Result, SeqChunk, Timings
from engine.blocks import blocks_for
from engine.stops import Decode, TextState, stop_cut


@dataclass
class Sequence:
    request: Request
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    times: Timings = Timings()
    token_times: list[float] = field(default_factory=list)
    logits: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_text: Optional[str] = None  # the text cut before the stop string that ended it
    text_state: TextState = field(default_factory=TextState)  # for stop strings
    source_instance: int = -1  # decode side: the prefill instance its KV comes from
    prefilled: int = 0  # prompt tokens given to steps so far (chunked prefill), or found in the prefix cache
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    block_hashes: list = field(default_factory=list)  # names of its full prompt blocks (prefix caching)

    @property
    def req_id(self) -> int:
        return self.request.req_id

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output)

    def take_first_token(self, first: FirstToken) -> None:
        """Decode side: the first token (and its timings) that the prefill instance sampled."""
        self.output = [first.token]
        self.cached_tokens = first.cached_tokens
        self.times = self.times.filled_from(first.times)
        self.token_times = [first.times.first_token]
        self.logits = list(first.logits)

    def reserved_blocks(self, max_model_len: int, block_size: int) -> int:
        """Blocks it needs for its whole life on a decoding instance."""
        return reserved_blocks(len(self.request.prompt_ids), self.request.sampling.max_tokens, max_model_len, block_size)

    def decode_chunk(self) -> SeqChunk:
        """Its next decode step: its last token, at its position."""
        return SeqChunk(self.req_id, (self.output[-1],), self.num_tokens - 1, tuple(self.blocks), self.request.sampling,
                        len(self.output))

    def append_token(self, token: int, at: float, logits: Optional[list]) -> None:
        self.output.append(token)
        self.token_times.append(at)
        if logits is not None:
            self.logits.append(logits)

    def passed(self, **points: float) -> None:
        """Notes when it passed these points of its path (Timings' fields)."""
        self.times = replace(self.times, **points)

    def ends(self, eos_ids: set[int], max_model_len: int, decode: Optional[Decode], aborted: bool) -> bool:
        """Whether its last token ends it, and why (finish_reason): an abort, EOS, then stop strings
        (decided here, once: the text is cut where one begins), then length."""
        sampling = self.request.sampling
        if aborted:
            self.finish_reason = "abort"
        elif self.output[-1] in eos_ids and not sampling.ignore_eos:
            self.finish_reason = "stop"
        elif sampling.stop and decode is not None and \
                (cut := stop_cut(self.text_state, self.output, sampling.stop, decode)) is not None:
            self.finish_reason, self.stop_text = "stop", cut
        elif len(self.output) >= sampling.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def result(self, instance: int, with_logits: bool) -> Result:
        """The finished sequence as the controller gets it."""
        return Result(self.req_id, instance, tuple(self.output), self.finish_reason, self.times,
                      tuple(self.token_times), self.stop_text, tuple(self.logits) if with_logits else (),
                      self.cached_tokens)


def reserved_blocks(prompt_len: int, max_tokens: int, max_model_len: int, block_size: int) -> int:
    """Blocks a sequence needs for its whole life on a decoding instance."""
    return blocks_for(min(prompt_len + max_tokens, max_model_len), block_size)


@dataclass(frozen=True)
class InstanceLimits:
    """What an instance's scheduler works within."""

    num_blocks: int
    block_size: int
    token_budget: int  # L_m: most prompt tokens in one prefill batch; chunked colocated: most tokens in one step
    max_batch: int
    max_model_len: int
    pipeline_depth: int = 1  # steps in flight at once: PP with batches in flight, else 1
    colocated_policy: str = "prefill_first"  # chunked | prefill_first (colocated instances only)
    prefix_caching: bool = False  # share the KV blocks of equal prompt prefixes (decode: reuse those it holds)
