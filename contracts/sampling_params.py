"""A request's sampling parameters and their one validation, shared by the config file's
`sampling` section, the input lines and the HTTP requests (each caller places the error it raises:
a config key or a line). Pure Python: part of the request message (contracts/protocol.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

MIN_TEMPERATURE = 1e-5  # below it, logits / temperature overflow: use 0 for greedy


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def check_sampling(fields: dict) -> dict:
    """Validates sampling fields (any subset of SamplingParams'); returns them normalised (`stop`
    as a tuple). Raises ValueError naming the field, for the caller to place (config key or line)."""
    out = dict(fields)
    for key in ("max_tokens", "top_k", "seed"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool)):
            raise ValueError(f"'{key}' must be an integer, got {out[key]!r}")
    for key in ("temperature", "top_p"):
        value = out.get(key, 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"'{key}' must be a finite number, got {value!r}")
    if "max_tokens" in out and out["max_tokens"] < 1:
        raise ValueError("'max_tokens' must be >= 1")
    if "temperature" in out and out["temperature"] < 0:
        raise ValueError("'temperature' must be >= 0 (0 = greedy)")
    if 0 < out.get("temperature", 0) < MIN_TEMPERATURE:
        raise ValueError(f"'temperature' {out['temperature']!r} is too small to sample with; use 0 for greedy "
                         f"or at least {MIN_TEMPERATURE:g}")
    if "ignore_eos" in out and not isinstance(out["ignore_eos"], bool):
        raise ValueError(f"'ignore_eos' must be true or false, got {out['ignore_eos']!r}")
    if "top_p" in out and not 0 < out["top_p"] <= 1:
        raise ValueError(f"'top_p' must be in (0, 1], got {out['top_p']!r}")
    if "top_k" in out and out["top_k"] < 0:
        raise ValueError("'top_k' must be >= 0 (0 = off)")
    if out.get("stop") is not None:
        stop = [out["stop"]] if isinstance(out["stop"], str) else out["stop"]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError("'stop' must be a non-empty string or a list of them")
        out["stop"] = tuple(stop)
    else:
        out.pop("stop", None)
    return out
