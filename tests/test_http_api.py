"""The serve path in one process, no job: the real HTTP API (guard, routes, OpenAI shapes, streams)
and the real frontend and controller checks, with a thread in place of the controller's MPI loop
that answers every request it takes with fixed tokens. What an OpenAI client sees, without ranks."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from contracts.config import JobConfig
from contracts.plan import InstancePlan, Plan
from contracts.protocol import Result, Timings
from engine.controller import Controller
from engine.frontend import Frontend
from engine.http_api import build_app
from engine.http_server import HttpServer
from engine.serve_metrics import ServeMetrics

KEY = "test-key"
ANSWER = (5, 6, 7)  # every request's output tokens


class WordCodec:
    """Token i is the word 'w<i>'; a prompt's words are its tokens."""

    def encode(self, text: str) -> list[int]:
        return [10 + len(word) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return "".join(f" w{i}" for i in ids)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return [1] + [t for m in messages for t in self.encode(m["content"])] + [2]


def answer_everything(frontend: Frontend, stop: threading.Event) -> None:
    """The controller loop's part: each request taken gets its first token, then (streamed) its
    tokens one by one, then its result."""
    while not stop.is_set():
        for p in frontend.take(0.0):
            now = time.time()
            frontend.first_token(p)
            if p.stream:
                for token in ANSWER:
                    frontend.tokens(p, [token])
            frontend.write(p, Result(p.spec.index, 0, ANSWER, "length", Timings(first_token=now),
                                     (now, now + 0.01, now + 0.02)))
        time.sleep(0.002)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = JobConfig()
    cfg.serve.max_body_bytes = 2000
    ctx = SimpleNamespace(plan=Plan([InstancePlan(0, "colocated", 1, 1, 1, ["localhost"])]))
    controller = Controller(ctx, cfg, WordCodec(), vocab_size=100)
    log = tmp_path_factory.mktemp("serve") / "requests.jsonl"
    frontend = Frontend(controller, cfg.serve, ServeMetrics(cfg.slo, cfg.scheduler.block_size), None, str(log))
    http = HttpServer(build_app(frontend, WordCodec(), "tiny", cfg.model.max_model_len, (KEY,), 2000),
                      "127.0.0.1", 0)
    stop = threading.Event()
    loop = threading.Thread(target=answer_everything, args=(frontend, stop), daemon=True)
    http.start()
    loop.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{http.port}", controller=controller, log=log)
    stop.set()
    http.stop()
    frontend.close()


def call(server, path: str, body: dict | bytes | None = None, key: str | None = KEY,
         content_type: str = "application/json") -> tuple[int, str]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": content_type} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(server.url + path, data=data, headers=headers)
    for _ in range(100):  # uvicorn's thread may still be starting
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except urllib.error.URLError:
            time.sleep(0.05)
    raise AssertionError(f"{server.url} never answered")


def test_a_completion_comes_back_in_openais_shape_and_is_logged(server):
    status, text = call(server, "/v1/completions", {"prompt": "the capital of", "max_tokens": 3})
    assert status == 200, text
    body = json.loads(text)
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "length", "text": " w5 w6 w7"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    logged = [json.loads(line) for line in server.log.read_text().splitlines()]
    assert any(r["id"] == body["id"] and r["outcome"] == "finished" for r in logged)


def test_a_chat_stream_sends_the_role_the_pieces_the_end_and_the_usage(server):
    status, text = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there"}],
                                                         "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200, text
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert pieces == " w5 w6 w7"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_the_guard_and_the_checks_answer_with_openai_errors(server):
    status, text = call(server, "/v1/completions", {"prompt": "x"}, key=None)
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    status, text = call(server, "/v1/completions", {"prompt": "x" * 3000})
    assert status == 413 and "serve.max_body_bytes" in json.loads(text)["error"]["message"]
    status, text = call(server, "/v1/completions", b"{not json")
    assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"
    status, text = call(server, "/v1/completions", {"prompt": "x", "n": 2})
    assert status == 400, text
    status, text = call(server, "/v1/completions", {"prompt": "x", "model": "other"})
    assert status == 400 and json.loads(text)["error"]["code"] == "model_not_found"
    status, text = call(server, "/v1/completions", {"prompt": "x"}, content_type="text/plain")
    assert status == 400 and "Content-Type" in json.loads(text)["error"]["message"]


def test_models_health_and_metrics(server):
    status, text = call(server, "/v1/models")
    assert status == 200 and json.loads(text)["data"][0]["id"] == "tiny"
    server.controller.started = False
    status, text = call(server, "/health", key=None)
    assert status == 503 and json.loads(text)["status"] == "loading the model"
    server.controller.started = True
    status, text = call(server, "/health", key=None)
    assert status == 200 and json.loads(text)["status"] == "ok"
    status, text = call(server, "/metrics", key=None)
    assert status == 200 and "pdlaunch_requests" in text
