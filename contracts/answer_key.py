"""What an answer depends on, as short hashes written with every result, so that `--resume` keeps
a result only when the job would give the same answer now.

- `model_hash`: the model's identity: its directory, each file's name, size and modification
  time (weights, config, tokenizer and chat template; cheap: nothing is read), the dtype and
  max_model_len.
- `answer_hash`: the request line's hash (`request_hash`: prompt or messages, its own sampling
  fields, the output form), its sampling after the config's defaults, and the model hash.
No torch here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from contracts.batch_io import RequestSpec
from contracts.config import JobConfig
from contracts.sampling_params import check_sampling


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def model_hash(cfg: JobConfig, model_dir: str) -> str:
    """The identity of the model the ranks load; any re-written, re-converted or swapped file changes it."""
    files = []
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if not name.startswith(".") and os.path.isfile(path):
            st = os.stat(path)
            files.append([name, st.st_size, st.st_mtime_ns])
    return _digest({"dir": os.path.realpath(model_dir), "files": files, "dtype": cfg.model.dtype,
                    "max_model_len": cfg.model.max_model_len, "chat_template": cfg.model.chat_template})


def answer_hash(spec: RequestSpec, cfg: JobConfig, model: str) -> str:
    """The hash of everything that shapes this request's answer line (a function of the line as
    parsed, never of what the controller later finds wrong with it: both sides must agree)."""
    try:
        sampling = check_sampling(dataclasses.asdict(cfg.sampling) | spec.sampling)
    except ValueError:
        sampling = spec.sampling  # an error record either way; what it says depends on the line
    return _digest({"request": spec.digest, "sampling": sorted(sampling.items()), "model": model})
