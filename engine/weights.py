"""Loads a rank's shard of a Hugging Face safetensors checkpoint into a LlamaStage.

Which checkpoint tensors make which stage parameter is contracts/model_tensors.py's table (the same
one the launcher checks the checkpoint against before launch).

Only the rows/columns this TP rank owns are read from disk (safetensors slices), one tensor
at a time; layers outside the rank's PP stage are never touched. Fused parameters take each
HF part's TP chunk and concatenate them, which is megatron's partition_stride idea.
Never unpickles: safetensors only.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from contracts.model_shape import ModelShape
from contracts.model_tensors import TensorSource, canonical_name, global_sources, layer_prefix, layer_sources
from engine.model import LlamaStage


class Checkpoint:
    """Tensor name -> file of a (possibly sharded) safetensors checkpoint, opened lazily."""

    def __init__(self, model_dir: str):
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = {canonical_name(k): (v, k) for k, v in json.load(f)["weight_map"].items()}
        else:
            files = {}
            for name in sorted(os.listdir(model_dir)):
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(model_dir, name), framework="pt") as st:
                        files.update({canonical_name(k): (name, k) for k in st.keys()})
        self.dir, self.files, self._open = model_dir, files, {}  # canonical name -> (file, name in the file)

    def read(self, name: str, dim: int | None, rank: int, parts: int) -> torch.Tensor:
        """Chunk `rank` of `parts` along `dim` (the whole tensor when dim is None)."""
        if name not in self.files:
            raise KeyError(f"checkpoint {self.dir} has no tensor {name!r}")
        path, stored = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(os.path.join(self.dir, path), framework="pt")
        sl = self._open[path].get_slice(stored)
        if dim is None:
            return sl[:]
        size = sl.get_shape()[dim]
        lo, hi = rank * size // parts, (rank + 1) * size // parts
        return sl[lo:hi] if dim == 0 else sl[:, lo:hi]


def load_stage(stage: LlamaStage, model_dir: str, shape: ModelShape, tp_rank: int, tp: int) -> None:
    ckpt = Checkpoint(model_dir)

    def fill(param: torch.nn.Parameter, names: list[str], dim: int | None) -> None:
        chunks = [ckpt.read(n, dim, tp_rank, tp) for n in names]
        data = torch.cat(chunks, dim=0) if len(chunks) > 1 else chunks[0]
        if tuple(data.shape) != tuple(param.shape):
            raise ValueError(f"{names[0]}: checkpoint shard {tuple(data.shape)} does not fit "
                             f"parameter {tuple(param.shape)}; config.json does not match the weights")
        with torch.no_grad():
            param.copy_(data)

    def fill_all(module: torch.nn.Module, sources: list[TensorSource], prefix: str = "") -> None:
        params = dict(module.named_parameters())
        for src in sources:
            fill(params[src.param], [prefix + n for n in src.names], src.tp_dim)

    groups = global_sources(shape)
    if stage.embed_tokens is not None:
        fill_all(stage, groups["first"])
    for i, layer in enumerate(stage.layers):
        fill_all(layer, layer_sources(shape), layer_prefix(shape, stage.first_layer + i))
    if stage.lm_head is not None:
        fill_all(stage, groups["last"])
