"""The OpenAI-compatible HTTP API of `pdlaunch serve`, on rank 0 beside the controller's loop.

FastAPI on uvicorn (what vLLM serves with: its users know the stack, and uvicorn runs in a thread
of its own, so the controller's MPI loop keeps the main thread). Endpoints: POST /v1/completions
and /v1/chat/completions (JSON, or server-sent events with `stream: true`, chunks shaped as
OpenAI's, `[DONE]` last, usage with `stream_options.include_usage`), GET /v1/models, /health,
/metrics. A request is checked exactly as an input line of `pdlaunch generate` is; what the
engine cannot do gets a 400 with an OpenAI error body, never a silent ignore. A client that goes
away aborts its request.

Guard (before any route): with API keys, every /v1/* request needs `Authorization: Bearer KEY`
(401 otherwise; /health and /metrics stay open for probes and scrapers), and a body over
`serve.max_body_bytes` gets 413 from its Content-Length, or as soon as that many bytes came,
without reading the rest. Parsing and tokenising run on worker threads (the tokenizer releases
the GIL), so a large request never stalls the event loop that answers /health and the streams.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.frontend import Frontend, Rejected
from engine.stops import TextState, advance, safe_length
from engine.tokenizer import TextCodec
from launcher.batch_io import RequestSpec, fill_request
from launcher.network import listening_socket

DISCONNECT_CHECK_S = 0.5  # how often a waiting handler looks whether its client is still there
KINDS = {"completion": ("cmpl", "text_completion"), "chat": ("chatcmpl", "chat.completion")}


ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI's error object, for a response or a stream's error event."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
          retry_after: Optional[int] = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


class ClientGone(Exception):
    pass


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the API key check on /v1/* and the request body limit (see the module's
    docstring). Keys are compared in constant time, every key every time."""

    def __init__(self, app, api_keys: tuple[str, ...], max_body_bytes: int):
        self.app, self.max_body = app, max_body_bytes
        self.keys = [k.encode() for k in api_keys]

    def authorized(self, header: bytes) -> bool:
        scheme, _, token = header.strip().partition(b" ")
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token.strip(), key)
        return scheme.lower() == b"bearer" and matched

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.keys and scope["path"].startswith("/v1/") and not self.authorized(headers.get(b"authorization", b"")):
            return await self._refuse(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY' with a "
                                                 "key the server was started with", "invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await self._refuse(send, 413, self._too_large(length.decode(errors="replace") + " bytes"))
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, 413, self._too_large(f"over {self.max_body} bytes"))

    def _too_large(self, size: str) -> str:
        return f"the request body is {size}; the limit is serve.max_body_bytes = {self.max_body}"

    @staticmethod
    async def _refuse(send, status: int, message: str, code: Optional[str] = None) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class StreamedText:
    """A streamed request's text as its tokens come: each piece shown once it can no longer
    change (incremental detokenisation; a tail a stop string may begin with is held back)."""

    def __init__(self, codec: TextCodec, stops: tuple[str, ...]):
        self.codec, self.stops = codec, stops
        self.state, self.output, self.shown = TextState(), [], 0

    def add(self, tokens: list[int]) -> str:
        self.output += tokens
        advance(self.state, self.output, self.codec.decode)
        return self._show(safe_length(self.state.text, self.stops))

    def finish(self, final_text: str) -> str:
        """The rest of the answer once the engine's result decided it (what was shown is a prefix of it)."""
        return final_text[self.shown:]

    def _show(self, upto: int) -> str:
        piece = self.state.text[self.shown:upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece


def build_app(frontend: Frontend, codec: TextCodec, model_name: str, max_model_len: int,
              api_keys: tuple[str, ...] = (), max_body_bytes: int = 4 << 20) -> FastAPI:
    app = FastAPI(title="pdlaunch", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_keys=api_keys, max_body_bytes=max_body_bytes)
    controller = frontend.controller
    run_tag = secrets.token_hex(4)  # this server's: request ids stay unique in the request log across restarts

    async def read_body(request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise BadRequest(f"Content-Type must be application/json, got {content_type or 'none'!r}")
        return await request.body()

    def parsed(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def prepared(raw: bytes, kind: str):
        """The request parsed, checked and tokenised (on a worker thread); raises BadRequest."""
        spec, stream, include_usage = checked(parsed(raw), kind)
        p = controller.prepare(spec, where="request")
        if p.params is None:
            raise BadRequest(spec.error.removeprefix("request: "))
        p.stream = stream
        return p, include_usage

    def checked(body: dict, kind: str) -> tuple[RequestSpec, bool, bool]:
        """The request as the engine takes it, whether to stream, and whether to send usage then."""
        model = body.pop("model", model_name)
        if model != model_name:
            raise BadRequest(f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                             "model_not_found")
        stream = body.pop("stream", False)
        options = body.pop("stream_options", None) or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise BadRequest("'stream' must be true or false and 'stream_options' an object", "stream")
        if set(options) - {"include_usage"}:
            raise BadRequest(f"stream_options {sorted(set(options) - {'include_usage'})} are not supported",
                             "stream_options")
        spec = RequestSpec(frontend.new_id(), "", kind=kind)
        spec.custom_id = f"{KINDS[kind][0]}-{run_tag}{spec.index}"  # unique across restarts, as the log needs
        try:
            fill_request(spec, body)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return spec, stream, bool(options.get("include_usage"))

    async def next_event(events: asyncio.Queue, request: Request) -> tuple:
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None

    def envelope(spec: RequestSpec, created: int, obj: str, choices: list, usage: Optional[dict] = None) -> dict:
        out = {"id": spec.custom_id, "object": obj, "created": created, "model": model_name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def usage_of(prompt_tokens: int, result) -> dict:
        n = len(result.output)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

    def final_text(result) -> str:
        return result.text if result.text is not None else codec.decode(list(result.output))

    async def serve(request: Request, kind: str):
        arrival = time.time()  # TTFT counts reading, checking and tokenising the request too
        submitted = False
        try:
            frontend.reserve()  # before the body is read: a full queue answers 429 at once
            try:
                p, include_usage = await asyncio.to_thread(prepared, await read_body(request), kind)
                events = frontend.submit(p, asyncio.get_running_loop(), arrival)
                submitted = True
            finally:
                if not submitted:
                    frontend.release()
        except BadRequest as e:
            frontend.metrics.requests.labels("invalid").inc()
            return error(400, str(e), e.param, e.code)
        except Rejected as e:
            frontend.metrics.requests.labels("rejected").inc()
            return error(e.status, str(e), retry_after=e.retry_after)
        spec, stream = p.spec, p.stream
        created = int(arrival)
        if stream:
            return StreamingResponse(sse(request, p, events, created, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            event = await next_event(events, request)
            while event[0] == "tokens":
                event = await next_event(events, request)
        except ClientGone:
            frontend.cancel(spec.index)
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except asyncio.CancelledError:
            frontend.cancel(spec.index)
            raise
        result = event[1]
        if result.finish_reason == "abort":
            return error(503, "the server shut down before the request finished; send it again", retry_after=5)
        text = final_text(result)
        choice = {"index": 0, "logprobs": None, "finish_reason": result.finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
        return JSONResponse(envelope(spec, created, KINDS[kind][1], [choice], usage_of(p.prompt_tokens, result)))

    async def sse(request: Request, p, events: asyncio.Queue, created: int, include_usage: bool) -> AsyncIterator[str]:
        spec = p.spec
        chat = spec.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        text = StreamedText(codec, p.params.stop)
        done = False

        def chunk(piece: Optional[str], finish: Optional[str] = None) -> str:
            if chat:
                delta = {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return sse_line(envelope(spec, created, obj, [choice], None))

        try:
            if chat:
                yield sse_line(envelope(spec, created, obj, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}]))
            while True:
                kind, payload = await next_event(events, request)
                if kind == "tokens":
                    piece = text.add(payload)
                    if piece:
                        yield chunk(piece)
                    continue
                done = True
                if payload.finish_reason == "abort":
                    yield sse_line(error_body(503, "the server shut down before the request finished"))
                else:
                    rest = text.finish(final_text(payload))
                    if rest:
                        yield chunk(rest)
                    yield chunk(None if chat else "", payload.finish_reason)
                    if include_usage:
                        yield sse_line(envelope(spec, created, obj, [], usage_of(p.prompt_tokens, payload)))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not done:  # the client went away (or the server is stopping): free the request's KV
                frontend.cancel(spec.index)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, "chat")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "pdlaunch",
                                            "max_model_len": max_model_len}]}

    @app.get("/health")
    async def health():
        ok, detail = frontend.health()
        return JSONResponse({"status": detail}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(frontend.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class HttpServer:
    """uvicorn on a socket bound here, in the calling thread (a port in use is a clear error on
    the rank, not a failure inside the server's thread), served from a thread of its own."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        try:
            self.sock = listening_socket(host, port)
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="pdlaunch-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
