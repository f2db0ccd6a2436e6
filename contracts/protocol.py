"""The messages between a job's ranks: one frozen dataclass per kind of message, whose class names
its MPI tag (TAGS: a message is sent and received by its class alone, never by a tag beside it).

Control messages are pickled over MPI and hold plain Python values only; tensors never cross MPI
(they travel over torch.distributed). No torch here: the launcher, the scheduler and the tests
import this without it. A request's sampling parameters are in contracts/sampling_params.py (the
config file and the input lines are checked by the same function there).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Optional

from contracts.sampling_params import SamplingParams

CONTROLLER = 0  # the controller's global rank: where every message for it goes (the instances take the rest)


class Tag(IntEnum):
    """MPI tags: who sends which message to whom."""

    REQUEST = 1        # controller -> prefill/colocated leader: Request
    FIRST_TOKEN = 2    # prefill leader -> decode leader: FirstToken (KV held, first token sampled)
    KV_INCOMING = 3    # prefill leader -> decode leader: KVIncoming (prefill started; post receives)
    PULLED = 4         # decode leader -> prefill leader: Pulled (every rank has the KV; free it)
    RESULT = 5         # leader -> controller: Result (a finished request)
    STEP = 6           # leader -> its instance's ranks: StepPlan
    TOKENS = 7         # last PP stage -> leader: StageTokens
    RECV_DONE = 8      # decode rank -> its leader: RecvDone
    SHUTDOWN = 9       # controller -> leaders: no more work: Shutdown
    KV_PULL = 10       # decode leader -> prefill leader: KVPull (receives posted; sends follow in this order)
    HEARTBEAT = 11     # leader -> controller: Heartbeat
    STATS = 12         # leader -> controller at shutdown: InstanceStats
    ALIVE = 13         # controller -> leaders: still alive: Alive
    RANK_ALIVE = 14    # every instance rank's beacon thread -> controller: this process runs: RankAlive
    NEXT_ARRIVAL = 15  # controller -> leaders -> followers: NextArrival
    PREFILL_DONE = 16  # prefill leader -> controller: PrefillDone (the request left the prefill queue)
    PROFILE = 17       # leader -> controller in profile mode: ProfileSamples
    TOKENS_OUT = 18    # leader -> controller: TokensOut (streamed requests' new tokens, one message a step)
    ABORT = 19         # controller -> leader: Abort (the client went away or the drain timed out)
    PROFILE_PEER = 20  # profile mode, instance 0's leader <-> the others: ProfilePeer


@dataclass(frozen=True)
class Shutdown:
    """No more work: finish what is in flight, send the final stats, end."""


@dataclass(frozen=True)
class Alive:
    """The controller is alive (a leader's ControllerWatch)."""


@dataclass(frozen=True)
class RankAlive:
    """This instance rank's process runs (its beacon thread; the controller's Watchdog)."""


# ---- controller <-> leaders ----------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """A request as the engine sees it: token ids, sampling, when it arrived (wall-clock s) and
    the decode instance the controller chose for it (-1: colocated)."""

    req_id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival: float
    decode_instance: int = -1
    stream: bool = False        # its leaders report each token as it comes (TokensOut)


@dataclass(frozen=True)
class Abort:
    """Stop this request and free its KV: at once if it waits, else at its next step or join."""

    req_id: int


@dataclass(frozen=True)
class TokensOut:
    """A step's new tokens of streamed requests: (req_id, index in its output, token) each."""

    instance: int
    tokens: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Timings:
    """When (wall-clock s) a request passed each point of its path that a scheduler sees; None
    where it did not pass it there. Its first token also ends its prefill."""

    prefill_start: Optional[float] = None
    first_token: Optional[float] = None
    transfer_start: Optional[float] = None    # prefill side: its KV held for the decode instance
    pull_start: Optional[float] = None        # decode side: its receives posted
    transfer_end: Optional[float] = None      # decode side: every rank has its KV

    def filled_from(self, earlier: Timings) -> Timings:
        """These timings, the points not passed here taken from `earlier` (the prefill instance's)."""
        return Timings(*(getattr(self, f.name) if getattr(self, f.name) is not None else getattr(earlier, f.name)
                         for f in dataclasses.fields(self)))


@dataclass(frozen=True)
class Result:
    """A finished request: its tokens and timings. `text` is set when a stop string ended it: the
    leader decided it and cut the text there (the writer decodes the tokens otherwise)."""

    req_id: int
    instance: int
    output: tuple[int, ...]
    finish_reason: str
    times: Timings
    token_times: tuple[float, ...]
    text: Optional[str] = None
    logits: tuple = ()  # debug (--dump-logits): one list of floats per generated token
    cached_tokens: int = 0  # prompt tokens its prefill took from the prefix cache


@dataclass(frozen=True)
class PrefillDone:
    """The request has its first token (a prefill instance: its KV now waits for the decode side)."""

    req_id: int
    prefill_instance: int
    at: float = 0.0             # when its first token came (wall-clock s)


@dataclass(frozen=True)
class SchedulerState:
    """An instance scheduler's queue, batch and KV occupancy now (the server's /metrics)."""

    waiting: int = 0            # requests queued for prefill (prefill, colocated) or for a pull (decode)
    running: int = 0            # sequences decoding
    kv_used: int = 0            # KV blocks taken (a prefill instance: its hold area)
    kv_blocks: int = 0
    prefix_query_tokens: int = 0  # prompt tokens admitted so far (prefix caching)
    prefix_hit_tokens: int = 0    # of those, served from the prefix cache
    kv_cached: int = 0            # blocks cached that no request holds (free room, counted apart from kv_used)


@dataclass(frozen=True)
class Heartbeat:
    """Alive, how far it got, and its scheduler's state."""

    instance: int
    steps: int
    state: SchedulerState = SchedulerState()


@dataclass(frozen=True)
class NextArrival:
    wall_time: float


@dataclass(frozen=True)
class SchedulerStats:
    """What an instance's scheduler did over the run."""

    kv_blocks: int
    peak_kv_blocks: int
    peak_batch: int
    forward_steps: int
    peak_rss_mb: float
    prefix_query_tokens: int = 0    # prompt tokens admitted (prefix caching)
    prefix_hit_tokens: int = 0      # of those, served from the prefix cache
    kv_cached: int = 0              # at the end: blocks cached that no request holds


@dataclass(frozen=True)
class PrefillSample:
    """What a prefill step (whole prompts from position 0) cost under the run's own load, in
    `pdlaunch profile`'s sample format, for `pdlaunch bench` to fit a latency model to."""

    lens: tuple[int, ...]       # its prompts' tokens
    ms: float
    t: float                    # wall-clock s when it ended: lets a bench pick a window's steps


@dataclass(frozen=True)
class DecodeSample:
    batch: int                  # sequences, one token each
    context_sum: int            # their context tokens, the new ones included
    ms: float
    t: float


@dataclass(frozen=True)
class MixedSample:
    """Chunked prefill: prompt chunks (from `starts`) beside a decode batch."""

    lens: tuple[int, ...]
    starts: tuple[int, ...]
    batch: int
    context_sum: int
    ms: float
    t: float


@dataclass(frozen=True)
class StepSamples:
    prefill: tuple[PrefillSample, ...] = ()
    decode: tuple[DecodeSample, ...] = ()
    mixed: tuple[MixedSample, ...] = ()


@dataclass(frozen=True)
class InstanceStats:
    """An instance's final report (at shutdown)."""

    instance: int
    role: str
    nodes: tuple[str, ...]
    scheduler: SchedulerStats
    kv_cache_mb: float
    weights_mb: float
    token_budget: int               # L_m this instance batched prefills under
    step_samples: StepSamples = StepSamples()  # its most recent steps' costs

    def report(self) -> dict:
        """One flat record of report.json's "instances"."""
        record = dataclasses.asdict(self)
        return {**record.pop("scheduler"), **record}


@dataclass(frozen=True)
class ProfileSamples:
    instance: int
    samples: dict


class PeerLoad(Enum):
    """Profile mode's hand-shake between instance 0's leader (the timer) and the others."""

    READY = "ready"      # a neighbour is ready to load the node
    IDLE = "idle"        # run nothing
    PREFILL = "prefill"  # run prefill steps back to back
    DECODE = "decode"    # run decode steps back to back
    DONE = "done"        # the timings are taken: stop


@dataclass(frozen=True)
class ProfilePeer:
    """A load to switch to (timer -> neighbour), or its acknowledgement (neighbour -> timer)."""

    load: PeerLoad


# ---- prefill <-> decode leaders ------------------------------------------------------------------
@dataclass(frozen=True)
class KVIncoming:
    """A prefill instance started this request's prefill; its KV will be sent to the receiver."""

    request: Request
    prefill_instance: int
    blocks: tuple[int, ...] = ()  # its block table there: the receives match the sends' messages to it


@dataclass(frozen=True)
class KVPull:
    """A decode instance posted its receives for this request: the prefill side posts the sends,
    in the order the pulls of that decode instance arrive."""

    req_id: int
    decode_instance: int
    blocks: tuple[int, ...] = ()  # the blocks the KV lands in there
    held_blocks: int = 0          # leading blocks it holds already (scheduler.decode_prefix_reuse): not sent


@dataclass(frozen=True)
class FirstToken:
    """The prefill instance holds this request's KV and sampled its first token."""

    req_id: int
    prefill_instance: int
    token: int
    times: Timings
    logits: tuple = ()  # debug: the first token's logits
    cached_tokens: int = 0  # prompt tokens its prefill took from the prefix cache


@dataclass(frozen=True)
class Pulled:
    req_id: int


# ---- a leader <-> its instance's ranks -----------------------------------------------------------
@dataclass(frozen=True)
class SeqChunk:
    """New tokens of one sequence to run through the model this step."""

    req_id: int
    token_ids: tuple[int, ...]
    start_pos: int              # tokens of this sequence already in the cache
    block_table: tuple[int, ...]
    sampling: SamplingParams
    output_index: int           # index of the token this step samples (seeds sampled decoding)


@dataclass(frozen=True)
class KVPost:
    """Post a request's KV transfer with a peer instance: its sends (prefill side) or its receives
    into the blocks it was given (decode side)."""

    req_id: int
    block_table: tuple[int, ...]
    num_tokens: int
    peer_instance: int
    peer_blocks: tuple[int, ...]  # the peer's block table for the request (engine.kv_transfer)


@dataclass(frozen=True)
class StepPlan:
    """The only contract between an instance's leader and its ranks (vLLM v1's SchedulerOutput
    idea): every rank receives the same plan and executes its share."""

    seqs: tuple[SeqChunk, ...] = ()
    kv_sends: tuple[KVPost, ...] = ()
    kv_recvs: tuple[KVPost, ...] = ()
    kv_joins: tuple[int, ...] = ()     # decode side: KV landed on every rank; join the batch
    kv_releases: tuple[int, ...] = ()  # prefill side: sends done, drop buffers
    want_logits: bool = False
    shutdown: bool = False

    @property
    def has_forward(self) -> bool:
        return bool(self.seqs)

    @property
    def is_empty(self) -> bool:
        return not (self.seqs or self.kv_sends or self.kv_recvs or self.kv_joins or self.kv_releases
                    or self.shutdown)


@dataclass(frozen=True)
class StageTokens:
    """The last stage's sampled tokens of one micro-batch (and, for --dump-logits, their logits)."""

    tokens: tuple[int, ...]
    logits: Optional[tuple] = None


@dataclass(frozen=True)
class RecvDone:
    req_ids: tuple[int, ...]


TAGS: dict[type, Tag] = {
    Request: Tag.REQUEST, FirstToken: Tag.FIRST_TOKEN, KVIncoming: Tag.KV_INCOMING, Pulled: Tag.PULLED,
    Result: Tag.RESULT, StepPlan: Tag.STEP, StageTokens: Tag.TOKENS, RecvDone: Tag.RECV_DONE, Shutdown: Tag.SHUTDOWN,
    KVPull: Tag.KV_PULL, Heartbeat: Tag.HEARTBEAT, InstanceStats: Tag.STATS, Alive: Tag.ALIVE,
    RankAlive: Tag.RANK_ALIVE, NextArrival: Tag.NEXT_ARRIVAL, PrefillDone: Tag.PREFILL_DONE,
    ProfileSamples: Tag.PROFILE, TokensOut: Tag.TOKENS_OUT, Abort: Tag.ABORT, ProfilePeer: Tag.PROFILE_PEER,
}  # one class per tag, one tag per class


def tag_of(kind: type) -> Tag:
    """The MPI tag a message of this class travels under."""
    return TAGS[kind]
