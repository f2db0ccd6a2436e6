"""The GPU path's device discipline, checked without a GPU: a model stage with its weights, KV cache
and rope tables on the `meta` device runs prefill, decode and extend steps (and sampling's tensor
part) under a dispatch mode that fails any op whose tensors sit on two devices. A tensor built on
the CPU next to device weights (what would break `cluster.device: cuda`) fails this test.
Checked against the code before the device work: with its engine/batch.py the test fails (index_select
mixes cpu and meta: batch index tensors built on the CPU), with its CPU-built rope tables too."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY
from model_families import FAMILIES, family_shape
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from contracts.model_shape import ModelShape
from contracts.protocol import SeqChunk
from contracts.sampling_params import SamplingParams
from engine import attention
from engine.batch import build_batch
from engine.kv_cache import KVCache
from engine.model import LlamaStage
from engine.rope import rope_tables
from engine.sampling import choose

SHAPE = ModelShape(num_layers=2, hidden_size=TINY["hidden_size"], intermediate_size=TINY["intermediate_size"],
                   num_heads=TINY["num_attention_heads"], num_kv_heads=TINY["num_key_value_heads"],
                   head_dim=TINY["hidden_size"] // TINY["num_attention_heads"], vocab_size=TINY["vocab_size"],
                   rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256,
                   bos_token_id=1, eos_token_ids=(2,))
META = torch.device("meta")


# a host list becoming a tensor (torch.tensor's own ops), and its copy to the device: how the
# batch's indices get there (engine.batch.to_device)
HOST_TO_DEVICE = {torch.ops.aten.lift_fresh.default, torch.ops.aten.detach_.default, torch.ops.aten.to.dtype_layout,
                  torch.ops.aten._to_copy.default}


class OneDevice(TorchDispatchMode):
    """Fails an op whose tensor arguments live on more than one device (0-dim CPU scalars aside,
    which PyTorch moves implicitly); records the devices of every other op it saw."""

    def __init__(self):
        super().__init__()
        self.seen: set[torch.device] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device for t in tree_leaves((args, kwargs or {}))
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        if func not in HOST_TO_DEVICE:
            self.seen |= devices
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
@pytest.mark.parametrize("family", ["llama", *FAMILIES])
def test_a_stage_on_the_meta_device_never_mixes_devices(tp_group, megatron_on_cpu, monkeypatch, family, kernels):
    """Every family's forward (biases, q/k norms, learned positions, a sliding window of 4 here). With
    `cuda` the stage takes the CUDA attention paths (engine.attention: 4-D SDPA for prompts and
    continued prompts; the decode fallback, flash-attn being absent here)."""
    shape = SHAPE if family == "llama" else family_shape(family, num_hidden_layers=2, sliding_window=4)
    monkeypatch.setattr(attention, "on_cuda", lambda t: kernels == "cuda")
    stage = LlamaStage(shape, 0, 2, True, True, 1, tp_group, torch.float32).to(META).eval()
    stage.prepare_weights()
    cache = KVCache(2, 16, 4, shape.num_kv_heads, shape.head_dim, torch.float32, META)
    cos, sin = rope_tables(shape, 64, META)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    steps = [
        [SeqChunk(0, [5, 6, 7, 8, 9], 0, [0, 1], params, 0), SeqChunk(1, [3, 4], 0, [2], params, 0)],  # prefill
        [SeqChunk(0, [11], 5, [0, 1], params, 1), SeqChunk(1, [12], 2, [2], params, 1)],              # decode
        [SeqChunk(0, [13, 14, 15], 6, [0, 1, 3], params, 2), SeqChunk(1, [16], 3, [2], params, 2)],  # extend + decode
    ]
    with torch.inference_mode(), OneDevice() as mode:
        for chunks in steps:
            batch = build_batch(chunks, cache.block_size, cos, sin, shape.sliding_window)
            logits = stage(batch.token_ids, batch, cache.k, cache.v)
            assert logits.shape == (len(chunks), shape.vocab_size) and logits.device == META
            tokens = choose(logits, [params, SamplingParams()][:len(chunks)], [3, 4][:len(chunks)])
            assert tokens.shape == (len(chunks),) and tokens.device == META
    assert mode.seen == {META}, mode.seen
