"""The server's frontend in one process, no job and no HTTP: admission (max_queue places, 429 with a
Retry-After from the recent first-token rate), cancellation before and after dispatch, the drain
(503s, the drain file, aborting what outlives serve.drain_s), health from heartbeats, and the
request log, driven through the calls the HTTP thread and the controller's loop make."""
from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from contracts.batch_io import RequestSpec
from contracts.config import JobConfig
from contracts.plan import InstancePlan, Plan
from contracts.protocol import Heartbeat, Result, SchedulerState, Timings
from engine import control_plane
from engine.controller import Controller
from engine.frontend import STALE_BEATS, Frontend, Rejected
from engine.serve_metrics import ServeMetrics


class Clock:
    """The frontend's time.monotonic: moves only when the test says so (time.time stays real)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("engine.frontend.time", SimpleNamespace(monotonic=clock, time=time.time))
    return clock


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_frontend(tmp_path, max_queue: int = 2, drain_s: float = 30.0, drain_file: str | None = None) -> Frontend:
    cfg = JobConfig()
    cfg.serve.max_queue, cfg.serve.drain_s = max_queue, drain_s
    plan = Plan([InstancePlan(0, "prefill", 1, 1, 1, ["localhost"]), InstancePlan(1, "decode", 1, 1, 2, ["localhost"])])
    controller = Controller(SimpleNamespace(plan=plan), cfg, codec=None, vocab_size=100)
    return Frontend(controller, cfg.serve, ServeMetrics(cfg.slo, cfg.scheduler.block_size), drain_file,
                    str(tmp_path / "requests.jsonl"))


def admit(frontend: Frontend, loop, prompt=(5, 6, 7)):
    """What the HTTP handler does with a good request: a place, the checks, then submit."""
    frontend.reserve()
    index = frontend.new_id()
    spec = RequestSpec(index, f"cmpl-{index}", prompt=list(prompt), sampling={"max_tokens": 4})
    p = frontend.controller.prepare(spec, where="request")
    assert p.params is not None, spec.error
    return p, frontend.submit(p, loop, time.time())


def result(p, tokens=(8, 9), finish_reason: str = "length") -> Result:
    now = time.time()
    return Result(p.spec.index, 1, tuple(tokens), finish_reason, Timings(first_token=now), (now,) * len(tokens))


def logged(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]


def test_max_queue_places_then_429_and_a_first_token_frees_a_place(tmp_path, loop, clock):
    frontend = make_frontend(tmp_path, max_queue=2)
    first, _ = admit(frontend, loop)
    frontend.reserve()  # the second place: a request still being read
    with pytest.raises(Rejected) as full:
        frontend.reserve()
    assert full.value.status == 429 and full.value.retry_after == 1 and "serve.max_queue = 2" in str(full.value)
    frontend.release()  # the one being read was a bad request
    frontend.reserve()
    frontend.release()
    frontend.take(0.0)
    frontend.first_token(first)  # no longer waits for its first token: its place is free
    admit(frontend, loop)
    admit(frontend, loop)
    with pytest.raises(Rejected):
        frontend.reserve()


def test_retry_after_is_the_time_the_recent_first_token_rate_needs_to_free_a_place(tmp_path, loop, clock):
    frontend = make_frontend(tmp_path, max_queue=1)
    for _ in range(5):  # one first token every 4 s
        p, _ = admit(frontend, loop)
        frontend.take(0.0)
        frontend.first_token(p)
        clock.now += 4
    admit(frontend, loop)
    with pytest.raises(Rejected) as full:
        frontend.reserve()
    assert full.value.status == 429 and full.value.retry_after == 4


def test_a_cancel_before_dispatch_takes_the_request_back_and_after_it_becomes_an_abort(tmp_path, loop, clock):
    frontend = make_frontend(tmp_path)
    early, _ = admit(frontend, loop)
    frontend.cancel(early.spec.index)
    assert frontend.take(0.0) == [] and frontend.aborts() == []  # never reached the controller
    late, events = admit(frontend, loop)
    assert frontend.take(0.0) == [late]
    frontend.cancel(late.spec.index)
    frontend.cancel(late.spec.index)  # a second cancel of a gone request changes nothing
    assert frontend.aborts() == [late.spec.index] and frontend.aborts() == []
    frontend.write(late, result(late, (), "abort"))  # the instances' abort comes back as its end
    assert events.qsize() == 0  # the client is gone: nothing is pushed to it
    assert [r["outcome"] for r in logged(tmp_path)] == ["aborted"]
    assert frontend.metrics.requests.labels("aborted")._value.get() == 2
    assert frontend.metrics.in_flight._value.get() == 0


def test_a_finished_request_reaches_its_stream_the_log_and_the_metrics(tmp_path, loop, clock):
    frontend = make_frontend(tmp_path)
    p, events = admit(frontend, loop)
    (taken,) = frontend.take(0.0)
    frontend.first_token(taken)
    frontend.tokens(taken, [8])
    frontend.tokens(taken, [9])
    frontend.write(taken, result(taken))
    loop.run_until_complete(asyncio.sleep(0))  # the pushes are call_soon_threadsafe callbacks on the loop
    pushed = [events.get_nowait() for _ in range(events.qsize())]
    assert [type(e).__name__ for e in pushed] == ["StreamedTokens", "StreamedTokens", "Finished"]
    (record,) = logged(tmp_path)
    assert record["id"] == p.spec.custom_id and record["outcome"] == "finished" and record["finish_reason"] == "length"
    assert record["prompt_tokens"] == 3 and record["completion_tokens"] == 2 and record["decode_instance"] == 1
    assert frontend.metrics.requests.labels("finished")._value.get() == 1
    assert frontend.metrics.generation_tokens._value.get() == 2


def test_drain_refuses_new_requests_and_aborts_what_outlives_drain_s(tmp_path, loop, clock, capsys):
    frontend = make_frontend(tmp_path, drain_s=5)
    frontend.controller.started = True
    running, _ = admit(frontend, loop)
    frontend.take(0.0)
    frontend.reserve()  # a request being read when the drain begins
    frontend.drain()
    frontend.drain()  # a second signal does not restart the clock
    with pytest.raises(Rejected) as refused:
        frontend.reserve()
    assert refused.value.status == 503 and refused.value.retry_after == 5
    spec = RequestSpec(frontend.new_id(), "late", prompt=[5, 6], sampling={"max_tokens": 2})
    with pytest.raises(Rejected):  # the one being read is refused at submit, and gives its place back
        frontend.submit(frontend.controller.prepare(spec, where="request"), loop, time.time())
    frontend.release()
    assert frontend.health() == (False, "draining: the server is shutting down")
    assert frontend.exhausted()
    clock.now += 4
    assert frontend.aborts() == [] and frontend.drain_seconds() == 4
    clock.now += 2
    assert frontend.aborts() == [running.spec.index] and frontend.aborts() == []  # aborted once
    frontend.write(running, result(running, (), "abort"))
    assert [r["outcome"] for r in logged(tmp_path)] == ["aborted by the drain"]
    err = capsys.readouterr().err
    assert err.count("draining: no new requests; 1 running may take up to 5 s") == 1
    assert "serve.drain_s = 5 s passed; aborting 1 request(s)" in err


def test_the_launchers_drain_file_starts_the_drain(tmp_path, loop, clock):
    drain_file = tmp_path / "drain"
    frontend = make_frontend(tmp_path, drain_file=str(drain_file))
    admit(frontend, loop)
    assert len(frontend.take(0.0)) == 1 and frontend.drain_at is None
    drain_file.touch()
    frontend.take(0.0)
    assert frontend.drain_at is None  # looked for at most every DRAIN_POLL_S
    clock.now += 1
    frontend.take(0.0)
    assert frontend.drain_at == clock.now
    with pytest.raises(Rejected):
        frontend.reserve()


def test_health_waits_for_the_model_and_names_an_instance_whose_heartbeats_stopped(tmp_path, clock, capsys):
    frontend = make_frontend(tmp_path)
    frontend.announce = "pdlaunch: serving on http://127.0.0.1:1"
    assert frontend.health() == (False, "loading the model")
    frontend.controller.started = True
    frontend.instance_state(Heartbeat(0, steps=1))
    assert "serving" not in capsys.readouterr().err  # the decode instance has not beaten yet
    frontend.instance_state(Heartbeat(1, steps=1, state=SchedulerState(kv_used=3, kv_blocks=64)))
    frontend.instance_state(Heartbeat(1, steps=2, state=SchedulerState(kv_used=3, kv_blocks=64)))
    assert capsys.readouterr().err.count("pdlaunch: serving") == 1  # said once, when every instance is up
    assert frontend.health() == (True, "ok")
    assert frontend.metrics.kv_used.labels("1", "decode")._value.get() == 3
    clock.now += STALE_BEATS * control_plane.HEARTBEAT_S / 2
    frontend.instance_state(Heartbeat(0, steps=5))
    clock.now += STALE_BEATS * control_plane.HEARTBEAT_S * 0.75
    ok, detail = frontend.health()
    assert not ok and detail.startswith("no heartbeat from decode instance 1") and "prefill" not in detail
