"""A decoder stage (Llama, Mistral, Qwen2, Qwen3, OPT) on megatron-core tensor-parallel layers,
attention over a paged KV cache. What differs between the families is read from `ModelShape`
(contracts/model_shape.py): biases, per-head q/k norms, LayerNorm or RMSNorm, a gated or plain MLP,
RoPE (engine/rope.py) or learned positions, a sliding window.

One `LlamaStage` holds the layers [l0, l1) of a PP stage for one TP rank: the embedding on the
first stage, the final norm and LM head on the last. Projections are megatron-core's
`ColumnParallelLinear` / `RowParallelLinear` / `VocabParallelEmbedding` with this instance's TP
group; norms, RoPE and attention are ours (attention kernels: engine/attention.py on CUDA,
engine/gathered_attention.py on the CPU). Fused weights are laid out per TP rank as
[q | k | v] and [gate | up], each part split evenly across TP ranks (partition_dim 0).

The decoder layers run the projections as megatron's forward does in inference (a matmul on this
rank's shard, no output gather for column-parallel since every TP rank holds the whole input, an
all-reduce over the TP group for row-parallel: `row_parallel`), without the autograd functions
megatron wraps around every matmul for training, which cost a few percent of a decode step at these
sizes. The matmuls run on the weights `LlamaStage.prepare_weights` lays out for the device once they
are loaded (`engine/matmul.py`); a fused weight runs as one matmul whose output is split.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from contracts.model_shape import OPT_POSITION_OFFSET, ModelShape
from engine import attention
from engine import gathered_attention as gathered
from engine.batch import BatchMeta
from engine.matmul import linear, nbytes, prepare
from engine.megatron_import import import_megatron
from engine.rope import apply_rope


def parallel_config(tp: int, dtype: torch.dtype):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype)


def _no_init(_weight):
    """Weights come from the checkpoint; skip megatron's random initialisation."""


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def norm_layer(shape: ModelShape, size: int) -> nn.Module:
    return nn.LayerNorm(size, eps=shape.rms_norm_eps) if shape.layer_norm else RMSNorm(size, shape.rms_norm_eps)


def with_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def row_parallel(weight: torch.Tensor, x: torch.Tensor, tp_group, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A RowParallelLinear on a TP-split input: partial products summed over the TP group, then
    the (whole, replicated) bias added once."""
    y = linear(x, weight)
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(y, group=tp_group)
    return with_bias(y, bias)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape, tp: int, tp_group, config):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.heads = shape.num_heads // tp
        self.kv_heads = shape.num_kv_heads // tp
        self.head_dim = shape.head_dim
        self.scale = shape.head_dim ** -0.5
        self.window = shape.sliding_window
        self.rotary = not shape.learned_positions
        self.tp_group = tp_group
        qkv_out = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
        self.qkv = ColumnParallelLinear(shape.hidden_size, qkv_out, config=config, init_method=_no_init,
                                        bias=shape.qkv_bias, gather_output=False, tp_group=tp_group)
        self.o_proj = RowParallelLinear(shape.num_heads * shape.head_dim, shape.hidden_size, config=config,
                                        init_method=_no_init, bias=shape.o_bias, input_is_parallel=True,
                                        skip_bias_add=False, tp_group=tp_group)
        # Qwen3: an RMSNorm over each query and key head, before RoPE
        self.q_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.k_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.qkv_weight = self.o_weight = None

    def prepare_weights(self) -> tuple[torch.Tensor, ...]:
        self.qkv_weight, self.o_weight = prepare(self.qkv.weight), prepare(self.o_proj.weight)
        return self.qkv_weight, self.o_weight

    def forward(self, x: torch.Tensor, batch: BatchMeta, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """k_cache, v_cache: this layer's [num_blocks, block_size, kv_heads, head_dim] cache views."""
        T = x.shape[0]
        qk, v = with_bias(linear(x, self.qkv_weight), self.qkv.bias).split(
            [(self.heads + self.kv_heads) * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        qk = qk.view(T, self.heads + self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :self.heads]), self.k_norm(qk[:, self.heads:])), dim=1)
        if self.rotary:
            qk = apply_rope(qk, batch.cos, batch.sin)
        q, k = qk.split([self.heads, self.kv_heads], dim=1)
        v = v.view(T, self.kv_heads, self.head_dim)
        slot = (batch.slot_blocks, batch.slot_offsets)
        k_cache.index_put_(slot, k)
        v_cache.index_put_(slot, v)
        if batch.all_decode:
            out = self._decode(q, batch, k_cache, v_cache)
        else:
            out = torch.empty_like(q)
            if batch.decode_rows is not None:
                out.index_copy_(0, batch.decode_rows, self._decode(q.index_select(0, batch.decode_rows), batch,
                                                                   k_cache, v_cache))
            for rows, start in batch.extend_segments:
                self._extend(q, k, v, out, rows, start, batch, k_cache, v_cache)
        return row_parallel(self.o_weight, out.view(T, -1), self.tp_group, self.o_proj.bias)

    def _decode(self, q, batch: BatchMeta, k_cache, v_cache) -> torch.Tensor:
        """All one-token sequences at once (q: their rows): on CUDA a paged kernel where one is
        installed (engine.attention), else gather their blocks (padded) and mask what lies past
        each context. Returns [B, heads, head_dim]."""
        if attention.on_cuda(q):
            out = attention.paged_decode_attention(q, k_cache, v_cache, batch.decode_blocks, batch.decode_lengths,
                                                   self.scale, self.window)
            if out is not None:
                return out
        B, n = batch.decode_blocks.shape
        blocks, bs = batch.decode_blocks.view(-1), batch.block_size
        keys, vals = (cache.index_select(0, blocks).view(B, n * bs, self.kv_heads, self.head_dim)
                      for cache in (k_cache, v_cache))
        return gathered.decode_attention(q, keys, vals, batch.decode_mask, self.scale)

    def _extend(self, q, k, v, out, rows: slice, start: int, batch, k_cache, v_cache):
        """One sequence with several new tokens: fresh K/V for a whole prompt, else the cache."""
        if start == 0:
            keys, vals = k[rows], v[rows]
        else:
            blocks, offsets = batch.extend_context_slots[rows.start]
            keys, vals = k_cache[blocks, offsets], v_cache[blocks, offsets]
        kernels = attention if attention.on_cuda(q) else gathered
        out[rows] = kernels.prompt_attention(q[rows], keys, vals, start, self.scale, self.window)


ACTIVATIONS = {"silu": F.silu, "relu": F.relu}


class MLP(nn.Module):
    """SwiGLU (down(silu(gate) * up), the gate and up projections fused in `up` as [gate | up]) or,
    for OPT, down(relu(up))."""

    def __init__(self, shape: ModelShape, tp_group, config):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.tp_group = tp_group
        self.gated = shape.gated_mlp
        self.act = ACTIVATIONS[shape.activation]
        self.up = ColumnParallelLinear(shape.hidden_size, (2 if self.gated else 1) * shape.intermediate_size,
                                       config=config, init_method=_no_init, bias=shape.mlp_bias, gather_output=False,
                                       stride=2 if self.gated else 1, tp_group=tp_group)
        self.down = RowParallelLinear(shape.intermediate_size, shape.hidden_size, config=config,
                                      init_method=_no_init, bias=shape.mlp_bias, input_is_parallel=True,
                                      skip_bias_add=False, tp_group=tp_group)
        self.up_weight = self.down_weight = None

    def prepare_weights(self) -> tuple[torch.Tensor, ...]:
        self.up_weight, self.down_weight = prepare(self.up.weight), prepare(self.down.weight)
        return self.up_weight, self.down_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = with_bias(linear(x, self.up_weight), self.up.bias)
        if self.gated:
            gate, up = up.chunk(2, dim=-1)
            up = self.act(gate) * up
        else:
            up = self.act(up)
        return row_parallel(self.down_weight, up, self.tp_group, self.down.bias)


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, tp: int, tp_group, config):
        super().__init__()
        self.input_layernorm = norm_layer(shape, shape.hidden_size)
        self.self_attn = Attention(shape, tp, tp_group, config)
        self.post_attention_layernorm = norm_layer(shape, shape.hidden_size)
        self.mlp = MLP(shape, tp_group, config)

    def forward(self, x, batch, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), batch, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStage(nn.Module):
    """The layers [first_layer, last_layer) of one PP stage, for one TP rank. Load the weights, move
    the stage to its device and dtype, then call `prepare_weights` once before the first forward."""

    def __init__(self, shape: ModelShape, first_layer: int, last_layer: int, is_first: bool, is_last: bool,
                 tp: int, tp_group, dtype: torch.dtype):
        import_megatron()  # before any of megatron: without its TorchDynamo start-up
        from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

        super().__init__()
        config = parallel_config(tp, dtype)
        self.first_layer, self.last_layer = first_layer, last_layer
        self.tp_group = tp_group
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, init_method=_no_init,
                                                   config=config, tp_group=tp_group) if is_first else None
        # OPT's learned positions (replicated on every TP rank), read at position + OPT_POSITION_OFFSET
        self.embed_positions = nn.Embedding(shape.max_position_embeddings + OPT_POSITION_OFFSET,
                                            shape.hidden_size) if is_first and shape.learned_positions else None
        self.layers = nn.ModuleList(DecoderLayer(shape, tp, tp_group, config)
                                    for _ in range(first_layer, last_layer))
        if is_last:
            self.norm = norm_layer(shape, shape.hidden_size)
            self.lm_head = ColumnParallelLinear(shape.hidden_size, shape.vocab_size, config=config,
                                                init_method=_no_init, bias=False, gather_output=True,
                                                tp_group=tp_group)
        else:
            self.norm = self.lm_head = None
        self.lm_head_weight = None
        self.matmul_weights: list[torch.Tensor] | None = None  # every prepared projection, once prepared

    def prepare_weights(self) -> None:
        """Lays the projections out for this device's matmuls (`engine.matmul.prepare`)."""
        if self.matmul_weights is not None:
            return
        weights = [w for layer in self.layers
                   for w in (*layer.self_attn.prepare_weights(), *layer.mlp.prepare_weights())]
        if self.lm_head is not None:
            self.lm_head_weight = prepare(self.lm_head.weight)
            weights.append(self.lm_head_weight)
        self.matmul_weights = weights

    def weight_bytes(self) -> int:
        """Bytes of weights this rank holds: parameters, and the packed copies that replaced some."""
        return sum(nbytes(p) for p in self.parameters()) + sum(nbytes(w) for w in self.matmul_weights or ()
                                                               if w.is_mkldnn)

    def forward(self, x: torch.Tensor, batch: BatchMeta, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """x: token ids [T] on the first stage, else hidden [T, hidden]. Returns hidden states, or on
        the last stage the logits of each sequence's last token [B, vocab]."""
        if self.matmul_weights is None:
            raise RuntimeError("LlamaStage.prepare_weights() must run once the weights are loaded")
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        if self.embed_positions is not None:
            x = x + self.embed_positions(batch.positions + OPT_POSITION_OFFSET)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, k_cache[:, i], v_cache[:, i])
        if self.lm_head is None:
            return x
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = linear(self.norm(x.index_select(0, batch.logits_rows)), self.lm_head_weight)
        if dist.get_world_size(self.tp_group) > 1:
            logits = gather_from_tensor_model_parallel_region(logits, self.tp_group)
        return logits
