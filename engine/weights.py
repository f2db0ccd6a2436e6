"""Loads a rank's shard of a Hugging Face Llama safetensors checkpoint into a LlamaStage.

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

from engine.model import LlamaStage
from launcher.model_files import ModelShape

# stage parameter suffix -> (HF parts, TP partition dim or None for replicated)
LAYER_PARAMS = {
    "input_layernorm.weight": (["input_layernorm.weight"], None),
    "post_attention_layernorm.weight": (["post_attention_layernorm.weight"], None),
    "self_attn.qkv.weight": (["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                              "self_attn.v_proj.weight"], 0),
    "self_attn.o_proj.weight": (["self_attn.o_proj.weight"], 1),
    "mlp.gate_up.weight": (["mlp.gate_proj.weight", "mlp.up_proj.weight"], 0),
    "mlp.down.weight": (["mlp.down_proj.weight"], 1),
}


class Checkpoint:
    """Tensor name -> file of a (possibly sharded) safetensors checkpoint, opened lazily."""

    def __init__(self, model_dir: str):
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = json.load(f)["weight_map"]
        else:
            files = {}
            for name in sorted(os.listdir(model_dir)):
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(model_dir, name), framework="pt") as st:
                        files.update({k: name for k in st.keys()})
        self.dir, self.files, self._open = model_dir, files, {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, dim: int | None, rank: int, parts: int) -> torch.Tensor:
        """Chunk `rank` of `parts` along `dim` (the whole tensor when dim is None)."""
        if name not in self.files:
            raise KeyError(f"checkpoint {self.dir} has no tensor {name!r}")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(os.path.join(self.dir, path), framework="pt")
        sl = self._open[path].get_slice(name)
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

    if stage.embed_tokens is not None:
        fill(stage.embed_tokens.weight, ["model.embed_tokens.weight"], 0)
    for i, layer in enumerate(stage.layers):
        prefix = f"model.layers.{stage.first_layer + i}."
        params = dict(layer.named_parameters())
        for suffix, (parts, dim) in LAYER_PARAMS.items():
            fill(params[suffix], [prefix + p for p in parts], dim)
    if stage.lm_head is not None:
        fill(stage.norm.weight, ["model.norm.weight"], None)
        head = "lm_head.weight" if "lm_head.weight" in ckpt and not shape.tie_word_embeddings \
            else "model.embed_tokens.weight"
        fill(stage.lm_head.weight, [head], 0)
