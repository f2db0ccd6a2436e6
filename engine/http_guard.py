"""The server's guard, ASGI middleware before any route: with API keys, every /v1/* request needs
`Authorization: Bearer KEY` (401 otherwise; /health and /metrics stay open for probes and
scrapers), and a body over `serve.max_body_bytes` gets 413 from its Content-Length, or as soon as
that many bytes came, without reading the rest. Keys are compared in constant time, every key
every time."""
from __future__ import annotations

import hmac
import json
from typing import Optional

from engine.openai_shapes import error_body


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the API key check on /v1/* and the request body limit (the module's docstring)."""

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
