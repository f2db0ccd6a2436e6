"""The OpenAI API's JSON shapes the server answers with, built in one place: responses, stream
chunks (server-sent events), usage and error objects. Plain dicts; no web framework here."""
from __future__ import annotations

import json
from typing import Optional

KINDS = {"completion": ("cmpl", "text_completion"), "chat": ("chatcmpl", "chat.completion")}  # id prefix, object
CHUNK_OBJECTS = {"completion": "text_completion", "chat": "chat.completion.chunk"}
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI's error object, for a response or a stream's error event."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def envelope(req_id: str, created: int, obj: str, model: str, choices: list, usage: Optional[dict] = None) -> dict:
    out = {"id": req_id, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def answer_choice(kind: str, text: str, finish_reason: str) -> dict:
    """A whole answer's choice: a chat message or a completion's text."""
    choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
    return choice


def chunk_choice(kind: str, piece: Optional[str], finish_reason: Optional[str] = None) -> dict:
    """A stream chunk's choice: new text (None: none, as in the last chat chunk), maybe the end."""
    if kind == "chat":
        return {"index": 0, "delta": {} if piece is None else {"content": piece}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}


def role_choice() -> dict:
    """A chat stream's first chunk: the assistant's role, no text yet."""
    return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def sse_line(obj: dict) -> str:
    """One server-sent event carrying obj."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
