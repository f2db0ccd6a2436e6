"""What pdlaunch runs of a Hugging Face checkpoint's config.json: every field is either
implemented or refused before launch, never ignored.

One reader per family (`FAMILIES`) says which config fields it reads (and which values of them the
engine implements) and turns them into a `ModelShape` (contracts/model_shape.py); `NO_MATH_FIELDS`
lists the fields that do not change a forward pass (dtypes, ids, dropout, bookkeeping). Any other
field is refused with a one-line error naming field and value: a checkpoint whose math pdlaunch
does not know must not run silently wrong. The tensors a checkpoint must hold:
contracts/model_tensors.py. No torch here: this runs in the launcher.
"""
from __future__ import annotations

from contracts.errors import UserError
from contracts.model_shape import ModelShape

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
