"""Result records: one JSON line per request, written as it finishes (flushed), in pdlaunch's own
form or the OpenAI Batch API's, with the request's timings as metrics."""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from contracts.batch_io import RequestSpec
from contracts.protocol import Result
from engine import openai_shapes as shapes
from engine.tokenizer import TextCodec


@dataclass
class Answered:
    """What the writer needs of a request besides its Result: its input line and how it ran."""

    spec: RequestSpec
    prompt_tokens: int = 0
    arrival: float = 0.0
    prefill_instance: Optional[int] = None


def metrics_of(result: Result, arrival: float) -> dict:
    times, token_times = result.times, result.token_times
    first = _or(times.first_token, token_times[0] if token_times else arrival)
    start = _or(times.prefill_start, arrival)
    n = len(token_times)
    out = {
        "ttft_ms": (first - arrival) * 1e3,
        "tpot_ms": ((token_times[-1] - token_times[0]) / (n - 1) * 1e3) if n > 1 else 0.0,
        "queue_ms": (start - arrival) * 1e3,
        "prefill_ms": (first - _or(times.prefill_start, first)) * 1e3,
        "e2e_ms": ((token_times[-1] if token_times else first) - arrival) * 1e3,
        "arrival": arrival,
        "token_times": [round((t - arrival) * 1e3, 3) for t in token_times],
        "cached_tokens": result.cached_tokens,  # prompt tokens its prefill found in the prefix cache
    }
    if times.transfer_end is not None:
        out["transfer_ms"] = (times.transfer_end - _or(times.transfer_start, times.transfer_end)) * 1e3
    return out


def _or(value: Optional[float], default: float) -> float:
    return default if value is None else value


class Sink:
    """Where the controller sends what becomes of each request: the results file, or the server's
    streams. Only `write` is required."""

    def write(self, req: Answered, result: Result | None) -> None:
        """The request finished (result), or was refused (None: req.spec.error says why)."""
        raise NotImplementedError

    def tokens(self, req: Answered, new: list[int]) -> None:
        """New tokens of a streamed request, in order."""

    def first_token(self, req: Answered) -> None:
        """The request has its first token."""

    def instance_state(self, beat) -> None:
        """An instance's heartbeat: its queue, batch and KV occupancy."""


class ResultWriter(Sink):
    def __init__(self, path: str, codec: TextCodec, model_name: str, logits_dir: str | None = None,
                 on_result=None, keys=None):
        """`keys(spec)`: the hashes --resume matches, besides request_hash (contracts.answer_key)."""
        self.codec, self.model_name, self.logits_dir, self.on_result = codec, model_name, logits_dir, on_result
        self.keys = keys
        self.file = open(path, "a", encoding="utf-8")
        self.records: list[dict] = []

    def close(self) -> None:
        self.file.close()

    def write(self, req: Answered, result: Result | None) -> None:
        """Appends the request's line: its answer, or its error (result None: the request was refused)."""
        spec = req.spec
        record: dict = {"custom_id": spec.custom_id}
        body = None
        if result is None:
            record["error"] = {"code": "invalid_request", "message": spec.error}
        else:
            try:
                body = self._answer(req, result, record)
            except Exception as e:  # noqa: BLE001 - one request's failure is its own error record
                record = {"custom_id": spec.custom_id,
                          "error": {"code": "engine_error", "message": f"line {spec.index + 1}: {type(e).__name__}: "
                                                                       f"{e} (rerun with --resume to retry)"}}
        if spec.openai:
            record = self._openai(record, spec, body)
        record["request_hash"] = spec.digest
        if self.keys:
            record.update(self.keys(spec))
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.on_result:
            self.on_result(record)

    def _answer(self, req: Answered, result: Result, record: dict) -> tuple:
        """Fills a finished request's record; returns (text, finish reason, usage)."""
        text = result.text if result.text is not None else self.codec.decode(list(result.output))
        metrics = metrics_of(result, req.arrival)
        metrics["prefill_instance"] = req.prefill_instance if req.prefill_instance is not None else result.instance
        metrics["decode_instance"] = result.instance
        usage = shapes.usage(req.prompt_tokens, len(result.output))
        record.update(text=text, token_ids=list(result.output), finish_reason=result.finish_reason, usage=usage,
                      metrics=metrics)
        if self.logits_dir and result.logits:
            import numpy as np
            from safetensors.numpy import save_file  # rank 0 imports no torch

            save_file({"logits": np.asarray(result.logits, dtype=np.float32)},
                      os.path.join(self.logits_dir, f"{req.spec.index}.safetensors"))
        return text, result.finish_reason, usage

    def _openai(self, record: dict, spec: RequestSpec, body) -> dict:
        """The OpenAI Batch API output line for this request."""
        out = {"id": f"batch_req_{spec.index}", "custom_id": spec.custom_id, "response": None,
               "error": record.get("error")}
        if body is not None:
            text, reason, usage = body
            prefix, obj = shapes.KINDS[spec.kind]
            out["response"] = {"status_code": 200, "request_id": f"req_{spec.index}",
                               "body": shapes.envelope(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), obj,
                                                       self.model_name, [shapes.answer_choice(spec.kind, text, reason)],
                                                       usage)}
            out["metrics"] = record["metrics"]
            out["token_ids"] = record["token_ids"]
        return out
