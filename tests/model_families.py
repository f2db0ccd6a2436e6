"""Tiny random checkpoints of every supported family, made by transformers (fixed seed): the models
the family tests run pdlaunch and transformers on. Each exercises what its family adds to Llama:
a rope scaling whose original_max_position_embeddings (32) the longer test prompts pass, biases,
per-head q/k norms with an explicit head_dim, a sliding window the prompts exceed, OPT's learned
positions, LayerNorms, ReLU and tied head."""
from __future__ import annotations

import os

from conftest import TINY, write_word_tokenizer

ORIGINAL_MAX = 32  # original_max_position_embeddings of the scaled ropes: the test prompts go past it
BASE = dict(vocab_size=TINY["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    # Llama 3.x: llama3 rope (head_dim 16 puts a frequency in the smoothed band), biases everywhere
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        BASE, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": ORIGINAL_MAX, "rope_theta": 10000.0})),
    # Qwen2.5: q/k/v biases, GQA, tied embeddings, YaRN
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        BASE, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL_MAX,
                      "rope_theta": 10000.0})),
    # Qwen3: q/k RMSNorm per head, head_dim (24) unrelated to hidden / heads, linear rope scaling
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
        rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0})),
    # Mistral: a sliding window of 16 positions, shorter than most test prompts
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        BASE, num_attention_heads=8, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, sliding_window=16)),
    # OPT (the DistServe paper's family): learned positions, LayerNorm, ReLU, biases, tied head
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=TINY["vocab_size"], hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=8,
        max_position_embeddings=256, init_std=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        word_embed_proj_dim=64)),
}
# A chat template in the checkpoint's tokenizer_config.json: every family's real template is Jinja
# rendered the same way; this one speaks the word-level tokenizer's words
CHAT_TEMPLATE = ("{% for m in messages %}{{ 't3 ' if m['role'] == 'user' else 't4 ' }}{{ m['content'] }} t5 "
                 "{% endfor %}{% if add_generation_prompt %}t6{% endif %}")


def build_family(name: str, path: str) -> str:
    """Writes the tiny `name` checkpoint (sharded safetensors, word tokenizer, chat template) into path."""
    import json

    import torch
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    model.save_pretrained(path, max_shard_size="200KB")
    write_word_tokenizer(path, TINY["vocab_size"])
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return path


def family_shape(name: str, **changes):
    """The ModelShape pdlaunch reads from the family's config.json (with `changes` where the family
    has such a field), without building the model."""
    import transformers

    from launcher.model_support import shape_from_config

    config_cls, _, kwargs = FAMILIES[name]
    config = getattr(transformers, config_cls)(**kwargs)
    for key, value in changes.items():
        if hasattr(config, key) and (key != "sliding_window" or config.sliding_window is not None):
            setattr(config, key, value)
    return shape_from_config(config.to_dict(), f"<{name} config>")


def hf_model(name: str, path: str, dtype=None):
    import torch
    import transformers

    return getattr(transformers, FAMILIES[name][1]).from_pretrained(path, dtype=dtype or torch.float32).eval()
