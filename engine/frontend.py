"""The server's bridge between its HTTP thread and the controller's loop (rank 0's main thread).

The HTTP side submits checked requests and cancels them; the controller's loop takes them as its
source and hands back tokens and results as its sink. Each request's events go to an asyncio
queue on the server's event loop (call_soon_threadsafe): the controller never waits on a client,
and MPI stays on the main thread.

Admission: a request takes a place in the queue when its handler starts, before its body is read
and tokenised, and keeps it until its first token (or its end); with `serve.max_queue` places
taken it is refused at once (429 with Retry-After), so never more than max_queue wait. The queue
fills when the prefill side cannot keep up or its hold area and the decode KV are full; nothing
admitted is ever dropped.
Every request that ends gets a line in the request log (RUN_DIR/requests.jsonl): its id as the
client saw it, outcome, token counts and latencies, so one client's complaint can be looked up.
Drain (SIGTERM, or the launcher's drain file): new requests get 503, running ones have
`serve.drain_s` to finish, then the rest are aborted and the job ends.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from contracts.protocol import Heartbeat, Result
from engine import control_plane as c
from engine.controller import Controller, RequestState
from engine.results import Sink
from engine.serve_metrics import ServeMetrics

DRAIN_POLL_S = 0.25  # how often the drain file is looked for
STALE_BEATS = 3      # /health fails when an instance's heartbeat is this many periods old


class Rejected(Exception):
    """A request the server will not take now: HTTP status, message, and when to retry (s)."""

    def __init__(self, status: int, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass(frozen=True)
class StreamedTokens:
    """A request's event: tokens that came since its last one (in output order)."""

    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """A request's last event: its result (reason "abort" when it did not finish)."""

    result: Optional[Result]


@dataclass
class Live:
    """An admitted request and where its events (StreamedTokens, then one Finished) go."""

    request: RequestState
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue


class Frontend(Sink):
    def __init__(self, controller: Controller, serve_cfg, metrics: ServeMetrics, drain_file: Optional[str] = None,
                 request_log: Optional[str] = None):
        self.controller, self.cfg, self.metrics, self.drain_file = controller, serve_cfg, metrics, drain_file
        self.log = open(request_log, "a", encoding="utf-8") if request_log else None
        self.roles = {i.id: i.role for i in controller.ctx.plan.instances}
        self.lock = threading.Lock()
        self.inbox: deque[RequestState] = deque()
        self.live: dict[int, Live] = {}
        self.cancelled: list[int] = []
        self.places = 0                          # requests being read and checked, each holding a place
        self.waiting: set[int] = set()           # admitted requests without their first token
        self.ids = itertools.count()
        self.wake = threading.Event()            # the controller's sleep ends when a request comes
        self.drain_at: Optional[float] = None    # monotonic time the drain began
        self.drain_aborted = False
        self.next_drain_check = 0.0
        self.beats: dict[int, float] = {}        # instance -> monotonic time of its last heartbeat
        self.firsts: deque[float] = deque(maxlen=64)  # monotonic times of recent first tokens
        self.announce: Optional[str] = None      # printed once every instance is up

    def close(self) -> None:
        if self.log:
            self.log.close()

    # ---- the HTTP thread ------------------------------------------------------------------------
    def new_id(self) -> int:
        return next(self.ids)

    def reserve(self) -> None:
        """A place in the queue for a request whose handler just started; raises Rejected when
        draining or when max_queue places are taken. `submit` or `release` gives it back."""
        with self.lock:
            if self.drain_at is not None:
                raise Rejected(503, "the server is shutting down; send the request to another replica", 5)
            queued = self.places + len(self.waiting)
            if queued >= self.cfg.max_queue:
                raise Rejected(429, f"the server is at capacity ({queued} requests wait for their first token, "
                                    f"serve.max_queue = {self.cfg.max_queue}); retry later", self._retry_after(queued))
            self.places += 1

    def release(self) -> None:
        """The reserved request was refused (bad request) or never sent: its place is free again."""
        with self.lock:
            self.places -= 1

    def submit(self, p: RequestState, loop: asyncio.AbstractEventLoop, arrival: float) -> asyncio.Queue:
        """Admits a checked request that holds a place (reserve) and arrived at `arrival` (wall-clock
        s, when its handler began), which then waits with its place; raises Rejected when draining
        began meanwhile (the caller then releases the place)."""
        with self.lock:
            if self.drain_at is not None:
                raise Rejected(503, "the server is shutting down; send the request to another replica", 5)
            self.places -= 1
            p.arrival = arrival
            live = Live(p, loop, asyncio.Queue())
            self.live[p.spec.index] = live
            self.waiting.add(p.spec.index)
            self.inbox.append(p)
            self._waiting_changed()
        self.metrics.in_flight.inc()
        self.wake.set()
        return live.events

    def _waiting_changed(self) -> None:
        """The gauge of requests waiting for their first token follows the set max_queue counts, from
        the moment one is admitted (the controller's own count starts at its dispatch). Under the lock."""
        self.metrics.waiting_first.set(len(self.waiting))

    def _retry_after(self, queued: int) -> int:
        """Seconds until the queue has room at the recent rate of first tokens (at least 1)."""
        if len(self.firsts) < 2 or self.firsts[-1] <= self.firsts[0]:
            return 1
        rate = (len(self.firsts) - 1) / (self.firsts[-1] - self.firsts[0])
        return max(1, math.ceil((queued - self.cfg.max_queue + 1) / rate))

    def cancel(self, req_id: int) -> None:
        """The client went away: the request ends and its KV is freed on every instance."""
        with self.lock:
            live = self.live.pop(req_id, None)
            if live is None:
                return
            self.waiting.discard(req_id)
            self._waiting_changed()
            if live.request in self.inbox:  # not dispatched yet
                self.inbox.remove(live.request)
            else:
                self.cancelled.append(req_id)
        self.metrics.requests.labels("aborted").inc()
        self.metrics.in_flight.dec()
        self.wake.set()

    def health(self) -> tuple[bool, str]:
        if not self.controller.started:
            return False, "loading the model"
        if self.drain_at is not None:
            return False, "draining: the server is shutting down"
        now = time.monotonic()
        stale = [f"{self.roles[i]} instance {i} ({now - t:.0f} s)" for i, t in sorted(self.beats.items())
                 if now - t > STALE_BEATS * c.HEARTBEAT_S]
        if stale:
            return False, "no heartbeat from " + ", ".join(stale)
        return True, "ok"

    # ---- signals (main thread) ------------------------------------------------------------------
    def drain_seconds(self) -> float:
        """How long the drain took so far (0 when none began)."""
        return time.monotonic() - self.drain_at if self.drain_at is not None else 0.0

    def drain(self, *_signal) -> None:
        if self.drain_at is None:
            self.drain_at = time.monotonic()
            print(f"pdlaunch: draining: no new requests; {len(self.live)} running may take up to "
                  f"{self.cfg.drain_s:g} s", file=sys.stderr, flush=True)
            self.wake.set()

    # ---- the controller's source --------------------------------------------------------------
    def take(self, elapsed: float) -> list[RequestState]:
        self._look_for_drain_file()
        with self.lock:
            due, self.inbox = list(self.inbox), deque()
        start = time.time() - elapsed
        for p in due:
            p.offset_s = p.arrival - start
        return due

    def next_offset(self) -> Optional[float]:
        return None  # arrivals are not known in advance

    def _look_for_drain_file(self) -> None:
        now = time.monotonic()
        if self.drain_file and self.drain_at is None and now >= self.next_drain_check:
            self.next_drain_check = now + DRAIN_POLL_S
            if os.path.exists(self.drain_file):
                self.drain()

    def exhausted(self) -> bool:
        return self.drain_at is not None and not self.inbox

    def aborts(self) -> list[int]:
        with self.lock:
            out, self.cancelled = self.cancelled, []
            if self.drain_at is not None and not self.drain_aborted and \
                    time.monotonic() - self.drain_at > self.cfg.drain_s:
                self.drain_aborted = True
                out += list(self.live)
                print(f"pdlaunch: drain: serve.drain_s = {self.cfg.drain_s:g} s passed; aborting {len(self.live)} "
                      "request(s)", file=sys.stderr, flush=True)
        return out

    # ---- the controller's sink ----------------------------------------------------------------
    @staticmethod
    def _push(live: Live, event: StreamedTokens | Finished) -> None:
        try:
            live.loop.call_soon_threadsafe(live.events.put_nowait, event)
        except RuntimeError:  # the server's loop is closed: nobody listens any more
            pass

    def tokens(self, req: RequestState, new: list[int]) -> None:
        live = self.live.get(req.spec.index)
        if live is not None:
            self._push(live, StreamedTokens(tuple(new)))

    def first_token(self, req: RequestState) -> None:
        with self.lock:
            self.waiting.discard(req.spec.index)
            self._waiting_changed()
        self.firsts.append(time.monotonic())

    def write(self, req: RequestState, result: Optional[Result]) -> None:
        with self.lock:
            live = self.live.pop(req.spec.index, None)
            self.waiting.discard(req.spec.index)
            self._waiting_changed()
        record = {"id": req.spec.custom_id, "arrival": round(req.arrival, 6), "prompt_tokens": req.prompt_tokens,
                  "completion_tokens": len(result.output) if result is not None else 0}
        if result is not None and result.finish_reason != "abort":
            self.metrics.requests.labels("finished").inc()
            self.metrics.generation_tokens.inc(len(result.output))
            m = self.metrics.finished(req.prompt_tokens, result, req.arrival)
            record.update(outcome="finished", finish_reason=result.finish_reason, slo_met=m["slo_met"],
                          prefill_instance=req.prefill_instance if req.prefill_instance is not None else result.instance,
                          decode_instance=result.instance,
                          **{k: round(v, 3) for k, v in m.items() if k.endswith("_ms")})
        else:
            record["outcome"] = "aborted" if live is None else "aborted by the drain"
            if live is not None:  # a client's own abort is counted when it leaves
                self.metrics.requests.labels("aborted").inc()
        if self.log:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        if live is not None:
            self.metrics.in_flight.dec()
            self._push(live, Finished(result))

    def instance_state(self, beat: Heartbeat) -> None:
        self.beats[beat.instance] = time.monotonic()
        self.metrics.instance(beat, self.roles[beat.instance])
        if self.announce and len(self.beats) == len(self.roles):
            print(self.announce, file=sys.stderr, flush=True)
            self.announce = None
