"""The OpenAI-compatible HTTP API of `pdlaunch serve`, on rank 0 beside the controller's loop.

FastAPI on uvicorn (what vLLM serves with: its users know the stack, and uvicorn runs in a thread
of its own, so the controller's MPI loop keeps the main thread). Endpoints: POST /v1/completions
and /v1/chat/completions (JSON, or server-sent events with `stream: true`, chunks shaped as
OpenAI's, `[DONE]` last, usage with `stream_options.include_usage`), GET /v1/models, /health,
/metrics. A request is checked exactly as an input line of `pdlaunch generate` is; what the
engine cannot do gets a 400 with an OpenAI error body, never a silent ignore. A client that goes
away aborts its request.

Before any route the guard (engine/http_guard.py) checks API keys and the body limit; the JSON
comes from engine/openai_shapes.py; uvicorn's thread is engine/http_server.py. Parsing and
tokenising run on worker threads (the tokenizer releases the GIL), so a large request never stalls
the event loop that answers /health and the streams.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from contracts.batch_io import RequestSpec, fill_request
from engine import openai_shapes as shapes
from engine.frontend import Finished, Frontend, Rejected, StreamedTokens
from engine.http_guard import Guard
from engine.stops import StreamedText
from engine.tokenizer import TextCodec

DISCONNECT_CHECK_S = 0.5  # how often a waiting handler looks whether its client is still there


def error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
          retry_after: Optional[int] = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(shapes.error_body(status, message, param, code), status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


class ClientGone(Exception):
    pass


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
        spec.custom_id = f"{shapes.KINDS[kind][0]}-{run_tag}{spec.index}"  # unique across restarts, as the log needs
        try:
            fill_request(spec, body)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return spec, stream, bool(options.get("include_usage"))

    async def next_event(events: asyncio.Queue, request: Request) -> StreamedTokens | Finished:
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None

    def envelope(spec: RequestSpec, created: int, obj: str, choices: list, usage: Optional[dict] = None) -> dict:
        return shapes.envelope(spec.custom_id, created, obj, model_name, choices, usage)

    def usage_of(prompt_tokens: int, result) -> dict:
        return shapes.usage(prompt_tokens, len(result.output))

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
            while isinstance(event, StreamedTokens):
                event = await next_event(events, request)
        except ClientGone:
            frontend.cancel(spec.index)
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except asyncio.CancelledError:
            frontend.cancel(spec.index)
            raise
        result = event.result
        if result.finish_reason == "abort":
            return error(503, "the server shut down before the request finished; send it again", retry_after=5)
        choice = shapes.answer_choice(kind, final_text(result), result.finish_reason)
        return JSONResponse(envelope(spec, created, shapes.KINDS[kind][1], [choice], usage_of(p.prompt_tokens, result)))

    async def sse(request: Request, p, events: asyncio.Queue, created: int, include_usage: bool) -> AsyncIterator[str]:
        spec = p.spec
        chat = spec.kind == "chat"
        obj = shapes.CHUNK_OBJECTS[spec.kind]
        text = StreamedText(codec.decode, p.params.stop)
        done = False

        def chunk(piece: Optional[str], finish: Optional[str] = None) -> str:
            return shapes.sse_line(envelope(spec, created, obj, [shapes.chunk_choice(spec.kind, piece, finish)]))

        try:
            if chat:
                yield shapes.sse_line(envelope(spec, created, obj, [shapes.role_choice()]))
            while True:
                event = await next_event(events, request)
                if isinstance(event, StreamedTokens):
                    piece = text.add(list(event.tokens))
                    if piece:
                        yield chunk(piece)
                    continue
                done, result = True, event.result
                if result.finish_reason == "abort":
                    yield shapes.sse_line(shapes.error_body(503, "the server shut down before the request finished"))
                else:
                    rest = text.finish(final_text(result))
                    if rest:
                        yield chunk(rest)
                    yield chunk(None if chat else "", result.finish_reason)
                    if include_usage:
                        yield shapes.sse_line(envelope(spec, created, obj, [], usage_of(p.prompt_tokens, result)))
                yield shapes.SSE_DONE
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
