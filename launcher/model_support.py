"""What pdlaunch runs of a Hugging Face checkpoint: every config.json field and every tensor is
either implemented here or refused before launch, never ignored.

One table per family says which config fields it reads (and which values of them the engine
implements); `NO_MATH_FIELDS` lists the fields that do not change a forward pass (dtypes, ids,
dropout, bookkeeping). Any other field is refused with a one-line error naming field and value: a
checkpoint whose math pdlaunch does not know must not run silently wrong. The same module says
which tensors the checkpoint must hold (`tensor_sources`: the engine's loader reads this table too),
so a tensor the engine would not load (an extra `q_proj.bias`) is refused as well.
No torch here: this runs in the launcher.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.errors import UserError

# Fields that do not change the math of a forward pass: identity and bookkeeping, token ids,
# dropout (inactive at inference), and transformers' generation defaults (pdlaunch takes sampling
# from each request).
NO_MATH_FIELDS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "init_std", "_name_or_path", "name_or_path", "id2label", "label2id", "problem_type",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "torchscript",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "chunk_size_feed_forward", "tie_encoder_decoder", "pruned_heads", "finetuning_task", "tokenizer_class",
    "prefix", "task_specific_params", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "attention_dropout", "dropout", "activation_dropout", "hidden_dropout",
    "layerdrop", "pretraining_tp", "output_projection",
    # generation defaults
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "tf_legacy_loss", "use_bfloat16",
})
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ROPE_KEYS = {  # keys each rope type reads; others in rope_scaling are refused
    "default": set(), "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
}
OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (fairseq's padding rows)


@dataclass(frozen=True)
class ModelShape:
    """The numbers and the math of a supported decoder that placement, validation and the engine
    need. The defaults are Llama's; `rms_norm_eps` is the epsilon of every norm (RMSNorm or LayerNorm)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    family: str = "llama"               # llama | mistral | qwen2 | qwen3 | opt
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False               # Qwen3: RMSNorm over each q and k head before RoPE
    layer_norm: bool = False            # LayerNorm with bias (OPT) instead of RMSNorm
    gated_mlp: bool = True              # SwiGLU (down(silu(gate) * up)) or down(act(up)) (OPT)
    activation: str = "silu"
    learned_positions: bool = False     # OPT: a learned position table (offset 2) instead of RoPE
    rope_type: str = "default"
    rope_params: tuple[tuple[str, float], ...] = ()  # the rope type's parameters, sorted
    sliding_window: int | None = None   # Mistral: a token sees the last `sliding_window` positions

    def rope(self) -> dict[str, float]:
        return dict(self.rope_params)

    def param_count(self) -> int:
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        attn = h * (2 * q + 2 * kv) + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        mlp = (3 if self.gated_mlp else 2) * h * i + ((2 * i if self.gated_mlp else i) + h if self.mlp_bias else 0)
        norm = 2 * h if self.layer_norm else h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        positions = (self.max_position_embeddings + OPT_POSITION_OFFSET) * h if self.learned_positions else 0
        return self.num_layers * (attn + mlp + 2 * norm) + embed + positions + norm


@dataclass(frozen=True)
class TensorSource:
    """One engine parameter and the checkpoint tensors it is made of (concatenated along dim 0 after
    each is cut to this TP rank's chunk along `tp_dim`; None: every rank holds it whole)."""

    param: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    tp_dim: int | None


def _fail(path: str, field: str, value, why: str) -> UserError:
    return UserError(f"model: {path}: {field} = {value!r} is not supported ({why}); "
                     "see the README's table of supported models")


def _int(r: "_Reader", key: str) -> int:
    value = r.get(key)
    if value is None:
        raise KeyError(key)
    return int(value)


class _Reader:
    """Reads config fields and remembers which ones were read (or may be ignored)."""

    def __init__(self, cfg: dict, path: str):
        self.cfg, self.path, self.seen = cfg, path, set(NO_MATH_FIELDS)

    def get(self, key: str, default=None):
        self.seen.add(key)
        return self.cfg.get(key, default)

    def require(self, key: str, allowed, default=None):
        """The field's value, refused unless it is one of `allowed` (absent counts as `default`)."""
        value = self.get(key, default)
        if value not in allowed:
            raise _fail(self.path, key, value, f"pdlaunch implements {', '.join(map(repr, allowed))}")
        return value

    def refuse_unread(self) -> None:
        unread = sorted(set(self.cfg) - self.seen)
        if unread:
            key = unread[0]
            raise _fail(self.path, key, self.cfg[key], "a field pdlaunch does not implement may change the "
                        "model's math")


def _rope(r: _Reader) -> tuple[float, str, tuple]:
    """(rope_theta, rope type, its parameters) from `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5), checked against what engine/rope.py implements."""
    theta = r.get("rope_theta")
    params = dict(r.get("rope_parameters") or {})
    scaling = r.get("rope_scaling")
    if scaling:
        params.update(scaling)
    theta = params.pop("rope_theta", theta)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    field = "rope_scaling.rope_type" if scaling else "rope_parameters.rope_type"
    if kind == "dynamic":
        raise _fail(r.path, field, kind, "transformers rescales dynamic NTK RoPE with the length of each call, "
                    "a state that depends on earlier requests, so no batched engine can match it token for token")
    if kind not in ROPE_TYPES:
        raise _fail(r.path, field, kind, f"pdlaunch implements {', '.join(ROPE_TYPES)}")
    partial = params.pop("partial_rotary_factor", r.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _fail(r.path, "partial_rotary_factor", partial, "pdlaunch rotates the whole head")
    extra = sorted(set(params) - ROPE_KEYS[kind])
    if extra:
        raise _fail(r.path, f"{field.split('.')[0]}.{extra[0]}", params[extra[0]], f"RoPE {kind!r} does not use it")
    if kind in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", r.get("max_position_embeddings"))
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = r.get("max_position_embeddings") / params["original_max_position_embeddings"]
    for key in ROPE_KEYS[kind] - {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                  "truncate"}:
        if not isinstance(params.get(key), (int, float)) or isinstance(params.get(key), bool):
            raise _fail(r.path, f"{field.split('.')[0]}.{key}", params.get(key), f"RoPE {kind!r} needs a number")
    clean = tuple(sorted((k, v) for k, v in params.items() if v is not None))
    return float(10000.0 if theta is None else theta), kind, clean


def _common(r: _Reader, heads: int, hidden: int) -> dict:
    eos = r.get("eos_token_id")
    return dict(
        num_layers=_int(r, "num_hidden_layers"), hidden_size=hidden, num_heads=heads,
        vocab_size=_int(r, "vocab_size"), tie_word_embeddings=bool(r.get("tie_word_embeddings", False)),
        max_position_embeddings=int(r.get("max_position_embeddings") or 2048), bos_token_id=r.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]))


def _llama_like(r: _Reader, family: str) -> dict:
    heads, hidden = _int(r, "num_attention_heads"), _int(r, "hidden_size")
    r.require("hidden_act", ("silu", "swish"), "silu")  # the same function in transformers
    theta, rope_type, rope_params = _rope(r)
    out = _common(r, heads, hidden) | dict(
        family=family, intermediate_size=_int(r, "intermediate_size"),
        num_kv_heads=int(r.get("num_key_value_heads") or heads), head_dim=int(r.get("head_dim") or hidden // heads),
        rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_type=rope_type,
        rope_params=rope_params)
    if family in ("llama", "qwen3"):
        bias = bool(r.get("attention_bias", False))
        out |= dict(qkv_bias=bias, o_bias=bias)
    if family == "llama":
        out["mlp_bias"] = bool(r.get("mlp_bias", False))
    if family == "qwen2":
        out["qkv_bias"] = True
    if family == "qwen3":
        out["qk_norm"] = True
    if family == "mistral":
        window = r.get("sliding_window")
        out["sliding_window"] = None if window is None else int(window)
    if family in ("qwen2", "qwen3"):  # the window applies only where use_sliding_window turns it on
        r.require("use_sliding_window", (False,), False)
        r.get("sliding_window"), r.get("max_window_layers")
        kinds = set(r.get("layer_types") or ["full_attention"])
        if kinds != {"full_attention"}:
            raise _fail(r.path, "layer_types", sorted(kinds), "pdlaunch runs full attention in every layer")
    return out


def _opt(r: _Reader) -> dict:
    heads, hidden = _int(r, "num_attention_heads"), _int(r, "hidden_size")
    r.require("activation_function", ("relu",), "relu")
    r.require("do_layer_norm_before", (True,), True)  # OPT-350m's post-norm variant
    r.require("_remove_final_layer_norm", (False,), False)
    r.require("enable_bias", (True,), True)
    r.require("layer_norm_elementwise_affine", (True,), True)
    proj = r.get("word_embed_proj_dim", hidden)
    if proj != hidden:
        raise _fail(r.path, "word_embed_proj_dim", proj, "OPT-350m's project_in/project_out are not implemented")
    return _common(r, heads, hidden) | dict(
        family="opt", intermediate_size=_int(r, "ffn_dim"), num_kv_heads=heads, head_dim=hidden // heads,
        rms_norm_eps=1e-5, rope_theta=0.0, tie_word_embeddings=bool(r.get("tie_word_embeddings", True)),
        qkv_bias=True, o_bias=True, mlp_bias=True, layer_norm=True, gated_mlp=False, activation="relu",
        learned_positions=True)


FAMILIES = {  # model_type -> (architecture, reader)
    "llama": ("LlamaForCausalLM", lambda r: _llama_like(r, "llama")),
    "mistral": ("MistralForCausalLM", lambda r: _llama_like(r, "mistral")),
    "qwen2": ("Qwen2ForCausalLM", lambda r: _llama_like(r, "qwen2")),
    "qwen3": ("Qwen3ForCausalLM", lambda r: _llama_like(r, "qwen3")),
    "opt": ("OPTForCausalLM", _opt),
}


def shape_from_config(cfg: dict, path: str) -> ModelShape:
    """The ModelShape of a config.json's contents, or a UserError naming the first field (and value)
    pdlaunch does not implement."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in FAMILIES:
        what = f"architecture {archs[0]!r} (model_type {model_type!r})" if archs else f"model_type {model_type!r}"
        raise UserError(f"model: {path}: {what} is not supported; pdlaunch runs the model types "
                        f"{', '.join(FAMILIES)} (see the README's table of supported models)")
    arch, read = FAMILIES[model_type]
    if archs and archs != [arch]:
        raise UserError(f"model: {path}: architectures = {archs!r} is not supported for model_type "
                        f"{model_type!r}; pdlaunch runs {arch} (a causal LM head)")
    r = _Reader(cfg, path)
    try:
        fields = read(r)
    except KeyError as e:
        raise UserError(f"model: {path} lacks the key {e.args[0]!r}; it is not a complete {arch} config") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"model: {path} has a malformed value ({e})") from None
    r.refuse_unread()
    shape = ModelShape(**fields)
    if shape.num_heads % shape.num_kv_heads:
        raise _fail(path, "num_key_value_heads", shape.num_kv_heads,
                    f"it must divide num_attention_heads = {shape.num_heads}")
    return shape


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

