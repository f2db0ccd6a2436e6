"""Batch input lines -> request specs; a bad line becomes an error for that line, not for the batch.

Accepted lines: the OpenAI Batch API form ({"custom_id", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions", "body": {...}}) or a plain {"prompt": ...} /
{"messages": [...]} object with optional sampling fields. No torch here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Optional

from contracts.errors import UserError
from contracts.sampling_params import check_sampling

SAMPLING_FIELDS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
                   "ignore_eos"}
IGNORED_FIELDS = {"model", "stream", "user"}
UNSUPPORTED_WHEN_SET = {"logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "tools", "tool_choice",
                        "response_format"}  # refused, not silently dropped, unless absent, null, false or 0
CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}
URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
MAX_ARRIVAL_S = 86400.0  # a replayed arrival more than a day out is a mistake, not a plan


@dataclass
class RequestSpec:
    index: int                    # line number - 1
    custom_id: str
    kind: str = "completion"      # "completion" (prompt) or "chat" (messages)
    prompt: Optional[str | list[int]] = None  # text, or token ids as OpenAI's completions API allows
    messages: Optional[list] = None
    sampling: dict = field(default_factory=dict)
    openai: bool = False          # answer in the OpenAI batch output form
    arrival_s: Optional[float] = None  # replayed arrival time (s from start), overrides workload.arrival
    error: Optional[str] = None   # set: this line is answered with an error record
    digest: str = ""              # hash of the request's content (custom_id aside): what --resume matches


def request_digest(obj) -> str:
    """A request's content hash: the JSON object without its id, keys sorted, so re-serialising the
    same request gives the same hash and any change to it a different one."""
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in ("custom_id", "id")}
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) if not isinstance(obj, str) \
        else obj
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


_ID = re.compile(r'"custom_id"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _readable_id(line: str) -> str | None:
    """The custom_id of a line that is not valid JSON or not UTF-8, when it can still be read: its
    error record then answers under the id the user will look for."""
    found = _ID.search(line)
    if not found:
        return None
    try:
        cid = json.loads(f'"{found.group(1)}"')
    except json.JSONDecodeError:
        return None
    return cid if cid and _bad_utf8_column(cid) is None else None


def _bad_utf8_column(line: str) -> int | None:
    """1-based column of the first byte that was not UTF-8 (read with surrogateescape), or None."""
    return next((i + 1 for i, ch in enumerate(line) if "\udc80" <= ch <= "\udcff"), None)


def _check_sampling(body: dict) -> dict:
    out = {}
    for key, value in body.items():
        if key in ("prompt", "messages") or key in IGNORED_FIELDS:
            continue
        if key in UNSUPPORTED_WHEN_SET:
            if value not in (None, False, 0):
                raise ValueError(f"'{key}' is not supported by this engine; remove it")
            continue
        if key not in SAMPLING_FIELDS:
            raise ValueError(f"unknown field '{key}'; supported: {', '.join(sorted(SAMPLING_FIELDS))}")
        out[key] = value
    n = out.pop("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n != 1:
        raise ValueError(f"n={n!r} is not supported; send n=1 and repeat the request instead")
    _max_completion_tokens(out)
    return check_sampling(out)


def _max_completion_tokens(fields: dict) -> None:
    """OpenAI's current name for the output limit (what the openai client sends) becomes
    max_tokens, its older alias; both given must agree."""
    for key in ("max_tokens", "max_completion_tokens"):  # null: the default, as OpenAI's API takes it
        if key in fields and fields[key] is None:
            del fields[key]
    if "max_completion_tokens" not in fields:
        return
    limit = fields.pop("max_completion_tokens")
    if fields.get("max_tokens") not in (None, limit):
        raise ValueError(f"'max_tokens' ({fields['max_tokens']!r}) and 'max_completion_tokens' ({limit!r}) differ; "
                         "send one of them")
    fields["max_tokens"] = limit


def _content_text(content) -> str:
    """A message's text: a string, or OpenAI content parts of type 'text' joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds != {"text"} or not all(isinstance(p.get("text"), str) for p in content):
            raise ValueError(f"message content parts of type {sorted(map(str, kinds - {'text'}))} are not supported; "
                             "send text parts ({type: text, text: ...}) or a string")
        return "".join(p["text"] for p in content)
    raise ValueError("a message's 'content' must be a string or a list of {type: text, text} parts")


def _messages(msgs) -> list[dict]:
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for m in msgs:
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"message role {m.get('role')!r} is unknown; use one of {', '.join(sorted(CHAT_ROLES))}")
        out.append({"role": m["role"], "content": _content_text(m.get("content"))})
    return out


def _prompt(prompt):
    """A completion prompt: non-empty text, or a non-empty list of token ids (integers >= 0)."""
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt:
        bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or t < 0), None)
        if bad is not None:
            raise ValueError(f"'prompt' token ids must be integers >= 0, got {bad!r}")
        return prompt
    raise ValueError("missing 'prompt' (a non-empty string or list of token ids) or 'messages'")


def fill_request(spec: RequestSpec, body: dict) -> None:
    """The prompt (or messages) and sampling fields of a request body, as the OpenAI API names
    them, checked into `spec` (whose kind is set); raises ValueError naming what is wrong."""
    if spec.kind == "chat":
        spec.messages = _messages(body.get("messages"))
    else:
        spec.prompt = _prompt(body.get("prompt"))
    spec.sampling = _check_sampling(body)


def parse_line(index: int, line: str) -> RequestSpec:
    """One input line's request; a line without custom_id is named by its content hash (not its
    line number), so inserting lines into the input never moves an answer to another prompt."""
    spec = RequestSpec(index, "")
    bad_byte = _bad_utf8_column(line)
    try:
        obj = json.loads(line) if bad_byte is None else None
    except json.JSONDecodeError as e:
        obj, spec.error = None, f"line {index + 1} is not valid JSON: {e.msg}"
    if bad_byte is not None:
        spec.error = f"line {index + 1} is not UTF-8 text (column {bad_byte}); save the file as UTF-8"
    elif obj is not None and not isinstance(obj, dict):
        spec.error = f"line {index + 1} must be a JSON object"
    spec.digest = request_digest(line.strip() if obj is None else obj)
    spec.custom_id = _readable_id(line) or f"request-{spec.digest[:12]}"
    if spec.error:
        return spec
    try:
        if "body" in obj or "url" in obj:
            spec.openai = True
            spec.custom_id = str(obj.get("custom_id", spec.custom_id))
            if obj.get("method", "POST") != "POST":
                raise ValueError(f"method {obj.get('method')!r} is not supported; use POST")
            if obj.get("url") not in URLS:
                raise ValueError(f"url {obj.get('url')!r} is not supported; use one of {', '.join(URLS)}")
            body = obj.get("body")
            if not isinstance(body, dict):
                raise ValueError("'body' must be an object")
            spec.kind = URLS[obj["url"]]
        else:
            spec.custom_id = str(obj.pop("custom_id", obj.pop("id", spec.custom_id)))
            arrival = obj.pop("arrival_s", None)
            if arrival is not None and (not isinstance(arrival, (int, float)) or isinstance(arrival, bool)
                                        or not 0 <= arrival <= MAX_ARRIVAL_S):
                raise ValueError(f"'arrival_s' must be a number of seconds in [0, {MAX_ARRIVAL_S:g}], got {arrival!r}")
            spec.arrival_s = arrival
            body = obj
            spec.kind = "chat" if "messages" in body else "completion"
        fill_request(spec, body)
    except ValueError as e:
        spec.error = f"line {index + 1}: {e}"
    return spec


INPUT_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}  # a non-UTF-8 byte fails its line only


def read_input_text(path: str) -> str:
    """The input's text, read once: a file, a FIFO, /dev/stdin, or '-' for standard input. Bytes
    that are not UTF-8 are kept (as surrogates) for parse_line to refuse their line alone."""
    if path == "-":
        import sys

        return _without_bom(sys.stdin.buffer.read().decode(**INPUT_ENCODING))
    try:
        with open(path, **INPUT_ENCODING) as f:
            return _without_bom(f.read())
    except FileNotFoundError:
        raise UserError(f"input file '{path}' not found; pass a JSONL file of prompts "
                        "(see examples/prompts.jsonl)") from None
    except IsADirectoryError:
        raise UserError(f"input '{path}' is a directory; pass a JSONL file") from None


def _without_bom(text: str) -> str:
    """A UTF-8 byte order mark (Windows editors write one) is not part of the first request."""
    return text.removeprefix("\ufeff")


def read_requests(path: str) -> list[RequestSpec]:
    return parse_requests(read_input_text(path), path)


def parse_requests(text: str, path: str) -> list[RequestSpec]:
    """Request specs of an input's text; whole-input problems are UserErrors, bad lines error records."""
    lines = [(i, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise UserError(f"input file '{path}' has no requests; add one JSON object per line")
    if all(_bad_utf8_column(line) for _, line in lines):  # not a text file at all, not a few bad lines
        raise UserError(f"input file '{path}' is not UTF-8 text; pass a JSONL file")
    specs = [parse_line(i, line) for i, line in lines]
    seen: dict[str, int] = {}
    for s in specs:  # the k-th copy of an id-less request is '<id>-k'
        if s.custom_id == f"request-{s.digest[:12]}":
            seen[s.custom_id] = seen.get(s.custom_id, 0) + 1
            if seen[s.custom_id] > 1:
                s.custom_id += f"-{seen[s.custom_id]}"
    lines_of: dict[str, list[int]] = {}
    for s in specs:
        lines_of.setdefault(s.custom_id, []).append(s.index + 1)
    dup = next((cid for cid, at in lines_of.items() if len(at) > 1), None)
    if dup is not None:
        at = lines_of[dup]
        raise UserError(f"input file '{path}': custom_id '{dup}' appears on lines {', '.join(map(str, at))}; ids must "
                        "be unique")
    return specs


def write_checked(specs: list[RequestSpec], path: str) -> str:
    """The requests as the launcher checked them (bad lines already error records), for rank 0 to
    read without parsing the input again; a lone surrogate (a non-UTF-8 byte) stays escaped."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dataclasses.asdict(s)) + "\n" for s in specs)
    return path


def read_checked(path: str) -> list[RequestSpec]:
    """write_checked's requests back, as they were written: no check runs twice (JSON keeps no
    tuple: `stop` comes back as the tuple check_sampling made it)."""
    specs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            spec = RequestSpec(**json.loads(line))
            if "stop" in spec.sampling:
                spec.sampling["stop"] = tuple(spec.sampling["stop"])
            specs.append(spec)
    return specs
