"""Which checkpoint tensors make each engine parameter (`TensorSource`), per stage and per layer: the
engine's loader (engine/weights.py) reads these tables, and the launcher checks a checkpoint against
them before launch, so a tensor the engine would not load (an extra `q_proj.bias`) is refused.
No torch here."""
from __future__ import annotations

from dataclasses import dataclass

from contracts.model_shape import OPT_POSITION_OFFSET, ModelShape


@dataclass(frozen=True)
class TensorSource:
    """One engine parameter and the checkpoint tensors it is made of (concatenated along dim 0 after
    each is cut to this TP rank's chunk along `tp_dim`; None: every rank holds it whole)."""

    param: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    tp_dim: int | None


def layer_prefix(shape: ModelShape, layer: int) -> str:
    return f"model.decoder.layers.{layer}." if shape.family == "opt" else f"model.layers.{layer}."


def layer_sources(shape: ModelShape) -> list[TensorSource]:
    """The tensors of one decoder layer, named relative to `layer_prefix`."""
    h, i, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    opt = shape.family == "opt"
    attn_norm, mlp_norm = ("self_attn_layer_norm", "final_layer_norm") if opt else \
        ("input_layernorm", "post_attention_layernorm")
    o_name = "self_attn.out_proj" if opt else "self_attn.o_proj"
    qkv = tuple(f"self_attn.{p}_proj" for p in "qkv")
    out = [TensorSource("self_attn.qkv.weight", tuple(n + ".weight" for n in qkv), ((q, h), (kv, h), (kv, h)), 0),
           TensorSource("self_attn.o_proj.weight", (o_name + ".weight",), ((h, q),), 1)]
    if shape.qkv_bias:
        out.append(TensorSource("self_attn.qkv.bias", tuple(n + ".bias" for n in qkv), ((q,), (kv,), (kv,)), 0))
    if shape.o_bias:
        out.append(TensorSource("self_attn.o_proj.bias", (o_name + ".bias",), ((h,),), None))
    if shape.qk_norm:
        out += [TensorSource(f"self_attn.{n}.weight", (f"self_attn.{n}.weight",), ((hd,),), None)
                for n in ("q_norm", "k_norm")]
    norms = ("weight", "bias") if shape.layer_norm else ("weight",)
    out += [TensorSource(f"{ours}.{p}", (f"{theirs}.{p}",), ((h,),), None)
            for ours, theirs in (("input_layernorm", attn_norm), ("post_attention_layernorm", mlp_norm))
            for p in norms]
    up = ("mlp.gate_proj", "mlp.up_proj") if shape.gated_mlp else ("fc1",)
    down = "mlp.down_proj" if shape.gated_mlp else "fc2"
    up_param = "mlp.up"  # [gate | up] fused when gated
    out += [TensorSource(up_param + ".weight", tuple(n + ".weight" for n in up), ((i, h),) * len(up), 0),
            TensorSource("mlp.down.weight", (down + ".weight",), ((h, i),), 1)]
    if shape.mlp_bias:
        out += [TensorSource(up_param + ".bias", tuple(n + ".bias" for n in up), ((i,),) * len(up), 0),
                TensorSource("mlp.down.bias", (down + ".bias",), ((h,),), None)]
    return out


def global_sources(shape: ModelShape) -> dict[str, list[TensorSource]]:
    """The tensors outside the layers, by the stage that holds them: 'first' (embeddings) and 'last'
    (final norm, LM head; a tied head reads the embedding)."""
    h, base = shape.hidden_size, "model.decoder." if shape.family == "opt" else "model."
    embed = f"{base}embed_tokens.weight"
    first = [TensorSource("embed_tokens.weight", (embed,), ((shape.vocab_size, h),), 0)]
    if shape.learned_positions:
        rows = shape.max_position_embeddings + OPT_POSITION_OFFSET
        first.append(TensorSource("embed_positions.weight", (f"{base}embed_positions.weight",), ((rows, h),), None))
    norm = f"{base}final_layer_norm" if shape.family == "opt" else f"{base}norm"
    last = [TensorSource(f"norm.{p}", (f"{norm}.{p}",), ((h,),), None)
            for p in (("weight", "bias") if shape.layer_norm else ("weight",))]
    head = embed if shape.tie_word_embeddings else "lm_head.weight"
    last.append(TensorSource("lm_head.weight", (head,), ((shape.vocab_size, h),), 0))
    return {"first": first, "last": last}


def expected_tensors(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the engine loads, with the shape config.json implies."""
    sources = [(s, "") for g in global_sources(shape).values() for s in g]
    sources += [(s, layer_prefix(shape, layer)) for layer in range(shape.num_layers) for s in layer_sources(shape)]
    return {prefix + name: want for s, prefix in sources for name, want in zip(s.names, s.shapes)}


def ignorable_tensor(shape: ModelShape, name: str) -> bool:
    """Tensors a checkpoint may hold that transformers ignores too: RoPE's cached inverse
    frequencies (older Llama checkpoints), and the stored copy of a tied LM head."""
    return name.endswith("rotary_emb.inv_freq") or (shape.tie_word_embeddings and name == "lm_head.weight")


def canonical_name(name: str) -> str:
    """OPT checkpoints saved from OPTModel (the facebook/opt-* ones) lack the 'model.' prefix."""
    return "model." + name if name.startswith("decoder.") else name
