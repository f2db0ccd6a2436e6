"""Every supported family against transformers, and every unsupported field refused before launch.

- In this process (no job): one TP-1 stage of each family's tiny checkpoint runs a prompt in two
  chunks (prefill, then extend over the cached first part) and then decodes token by token; its
  logits equal transformers' forward over the same sequence (fp32). The sequence passes the scaled
  ropes' original_max_position_embeddings and Mistral's sliding window.
- Real jobs (`mpi`): greedy ids token-exact vs transformers' generate on 1P1D and on P TP2 -> D PP2,
  token-id prompts and chat messages.
- Refusals: one-line errors for what pdlaunch does not implement (rope types, unknown fields, extra
  tensors), RoPE tables equal to transformers' own rope functions, and the planner's shape of OPT-13B.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import ragged_prompts, read_results, run_pdlaunch, write_job
from model_families import CHAT_TEMPLATE, FAMILIES, ORIGINAL_MAX, build_family, family_shape, hf_model

MAX_TOKENS = 8


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """name -> directory of the tiny checkpoint, built once per session on first use."""
    built = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = build_family(name, str(tmp_path_factory.mktemp(name)))
        return built[name]

    return get


def one_stage(path: str, tp_group, dtype=torch.float32):
    """The whole model as one TP-1 stage in this process, its KV cache and rope tables (the calling
    test takes the megatron_on_cpu fixture)."""
    from engine.kv_cache import KVCache
    from engine.model import LlamaStage
    from engine.rope import rope_tables
    from engine.weights import load_stage
    from launcher.model_files import check_weights, read_shape

    shape = read_shape(path)
    check_weights(path, shape)
    stage = LlamaStage(shape, 0, shape.num_layers, True, True, 1, tp_group, dtype)
    load_stage(stage, path, shape, 0, 1)
    stage.to(dtype=dtype).eval()
    stage.prepare_weights()
    cache = KVCache(shape.num_layers, 32, BLOCK, shape.num_kv_heads, shape.head_dim, dtype, "cpu")
    return stage, cache, rope_tables(shape, 128, dtype=dtype), shape


def run_chunks(stage, cache, tables, shape, seq: list[int], chunks: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Runs seq[lo:hi] for each (lo, hi) in order as one sequence; the logits of each chunk's last token."""
    from contracts.protocol import SeqChunk
    from contracts.sampling_params import SamplingParams
    from engine.batch import build_batch

    table = tuple(range(len(seq) // BLOCK + 1))
    out = []
    with torch.inference_mode():
        for i, (lo, hi) in enumerate(chunks):
            batch = build_batch([SeqChunk(0, tuple(seq[lo:hi]), lo, table, SamplingParams(), i)], BLOCK, *tables,
                                shape.sliding_window)
            out.append(stage(batch.token_ids, batch, cache.k, cache.v)[0].float())
    return out


BLOCK = 4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_stage_of_each_family_gives_transformers_logits(family, family_dirs, tp_group, megatron_on_cpu):
    path = family_dirs(family)
    length, split = 2 * ORIGINAL_MAX + 6, ORIGINAL_MAX - 7
    seq = ragged_prompts(1, seed=7, low=length, high=length + 1)[0]
    chunks = [(0, split), (split, length - 6)] + [(p, p + 1) for p in range(length - 6, length)]
    got = run_chunks(*one_stage(path, tp_group), seq, chunks)
    with torch.no_grad():
        expected = hf_model(family, path)(torch.tensor([seq])).logits[0, [hi - 1 for _, hi in chunks]]
    diff = (torch.stack(got) - expected).abs().max().item()
    assert diff < 1e-4, f"{family}: max |logit diff| {diff}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_stage_of_each_family_in_bf16_agrees_with_transformers_in_bf16(family, family_dirs, tp_group,
                                                                       megatron_on_cpu):
    """bf16 by tests/test_bf16.py's criterion: teacher-forced top-1 agreement (transformers' fp32 token
    counting where its bf16 one differs: tiny random checkpoints have near-ties) and greedy prefixes."""
    from test_bf16 import PREFIX_SHARE, TOP1_MIN, agreement

    path = family_dirs(family)
    stage = one_stage(path, tp_group, torch.bfloat16)
    prompts = ragged_prompts(8, seed=9, low=5, high=ORIGINAL_MAX + 20)
    outputs = []
    for prompt in prompts:
        stage[1].kv.zero_()
        seq = list(prompt)
        for _ in range(24):  # greedy: the prompt, then one token per step
            chunk = [(0, len(seq))] if len(seq) == len(prompt) else [(len(seq) - 1, len(seq))]
            seq.append(int(run_chunks(*stage, seq, chunk)[0].argmax()))
        outputs.append(seq[len(prompt):])
    top1, prefixes = agreement(hf_model(family, path, torch.bfloat16), prompts, outputs, hf_model(family, path))
    assert top1 >= TOP1_MIN and prefixes >= PREFIX_SHARE, (family, top1, prefixes)


LAYOUTS = {
    "1p1d": {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
             "decode": {"instances": 1, "tp": 1, "pp": 1}},
    "p-tp2-d-pp2": {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 2, "pp": 1},
                    "decode": {"instances": 1, "tp": 1, "pp": 2}},
}
CHATS = [[{"role": "user", "content": "t17 t99 t200"}],
         [{"role": "user", "content": "t8 t9"}, {"role": "assistant", "content": "t300"},
          {"role": "user", "content": " ".join(f"t{10 + i}" for i in range(ORIGINAL_MAX))}]]


def hf_chat_ids(path: str, messages: list[dict]) -> list[int]:
    """The prompt ids transformers' tokenizer makes of a conversation with the checkpoint's template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"), chat_template=CHAT_TEMPLATE)
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


# Every family on the reshard layout (TP-sharded biases and heads, PP, KV moved between layouts) in
# `make test`, and on 1P1D in `make test-slow`: a 1P1D job runs nothing the same family's reshard job
# does not (the same requests, unsharded), and the in-process stage test covers every family's forward.
JOBS = [pytest.param(family, "p-tp2-d-pp2", id=f"{family}-p-tp2-d-pp2") for family in FAMILIES] + [
    pytest.param(family, "1p1d", id=f"{family}-1p1d", marks=pytest.mark.slow) for family in FAMILIES]


@pytest.mark.mpi
@pytest.mark.parametrize("family,layout", JOBS)
def test_family_greedy_ids_match_transformers(family, layout, tmp_path, family_dirs):
    """Token-id prompts (some past original_max_position_embeddings and the sliding window) and two
    chats, in one job per family and layout."""
    path = family_dirs(family)
    prompts = ragged_prompts(4, seed=5, low=3, high=20) + ragged_prompts(2, seed=6, low=ORIGINAL_MAX + 5,
                                                                          high=ORIGINAL_MAX + 30)
    config = write_job(tmp_path, path, LAYOUTS[layout], prompts, MAX_TOKENS)
    with open(tmp_path / "in.jsonl", "a") as f:
        for i, messages in enumerate(CHATS):
            f.write(json.dumps({"custom_id": f"chat{i}", "messages": messages, "max_tokens": MAX_TOKENS,
                                "ignore_eos": True}) + "\n")
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path / "out.jsonl")
    model = hf_model(family, path)
    requests = {f"r{i}": p for i, p in enumerate(prompts)} | {f"chat{i}": hf_chat_ids(path, m)
                                                               for i, m in enumerate(CHATS)}
    with torch.no_grad():
        for rid, ids in requests.items():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                 do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
            assert results[rid]["token_ids"] == ref, f"{family} {layout} {rid}: {results[rid]['token_ids']} != {ref}"


# --- refusals: every field and tensor either implemented or refused, one line each -----------------

def _shape_error(cfg: dict) -> str:
    from contracts.errors import UserError
    from launcher.model_support import shape_from_config

    with pytest.raises(UserError) as e:
        shape_from_config(cfg, "config.json")
    assert "\n" not in str(e.value)
    return str(e.value)


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
         "max_position_embeddings": 256, "rope_theta": 10000.0, "torch_dtype": "float32", "use_cache": True,
         "transformers_version": "4.45.0", "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": [2, 3]}
REFUSED = [
    ("longrope", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     "rope_scaling.rope_type = 'longrope' is not supported"),
    ("dynamic", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type = 'dynamic'"),
    ("unknown rope key", {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta": 3}},
     "rope_scaling.beta = 3"),
    ("partial rotary", {"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
    ("unknown field", {"logit_softcapping": 30.0}, "logit_softcapping = 30.0 is not supported"),
    ("quantized", {"quantization_config": {"quant_method": "awq"}}, "quantization_config = "),
    ("gelu", {"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
    ("other head", {"architectures": ["LlamaForSequenceClassification"]}, "architectures = "),
    ("gemma", {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type 'gemma'"),
    ("qwen2 window", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
     "use_sliding_window = True"),
    ("opt-350m", {"model_type": "opt", "architectures": ["OPTForCausalLM"], "ffn_dim": 128,
                  "word_embed_proj_dim": 32, "do_layer_norm_before": False}, "do_layer_norm_before = False"),
    ("bad kv heads", {"num_key_value_heads": 3}, "num_key_value_heads = 3"),
]


@pytest.mark.parametrize("case,change,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_what_pdlaunch_does_not_implement_is_refused(case, change, message):
    cfg = {k: v for k, v in LLAMA.items() if not (case == "opt-350m" and k in ("intermediate_size", "rope_theta"))}
    assert message in _shape_error(cfg | change)


def test_fields_that_do_not_change_the_math_are_accepted():
    from launcher.model_support import shape_from_config

    shape = shape_from_config(LLAMA | {"pad_token_id": 0, "attention_dropout": 0.0, "pretraining_tp": 1,
                                       "rope_scaling": None, "attention_bias": False}, "config.json")
    assert shape.eos_token_ids == (2, 3) and shape.rope_type == "default" and not shape.qkv_bias


def test_a_tensor_the_config_does_not_imply_is_refused(tmp_path, tiny_model_dir):
    """An extra q_proj.bias on a Llama without attention_bias would be silently dropped: refused."""
    from safetensors.torch import save_file

    from contracts.errors import UserError
    from launcher.model_files import check_weights, read_shape

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(model / "extra.safetensors"))
    with pytest.raises(UserError, match="hold 'model.layers.0.self_attn.q_proj.bias', which .* does not imply"):
        check_weights(str(model), read_shape(str(model)))
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}, str(model / "extra.safetensors"))
    check_weights(str(model), read_shape(str(model)))  # a cached buffer transformers ignores too


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16, "attention_factor": 1.3,
     "truncate": False},
], ids=["linear", "llama3", "yarn", "yarn-mscale", "yarn-no-truncate"])
def test_rope_tables_equal_transformers_rope_functions(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.rope import inv_freq_and_scale
    from launcher.model_support import shape_from_config

    hf = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256,
                     rope_scaling=dict(rope, rope_theta=50000.0))
    ref_inv_freq, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    shape = shape_from_config(LLAMA | {"hidden_size": 128, "rope_theta": 50000.0, "rope_scaling": rope}, "config.json")
    inv_freq, scale = inv_freq_and_scale(shape)
    assert torch.equal(inv_freq, ref_inv_freq) and scale == pytest.approx(ref_scale, rel=1e-12)


def test_opt13b_config_gives_the_shape_distserve_assumes(tmp_path):
    """`pdlaunch plan` on facebook/opt-13b's config.json: the numbers the DistServe profiles assume."""
    from launcher.model_support import shape_from_config
    from launcher.planner.latency import KNOWN_MODELS

    opt13b = {"_name_or_path": "facebook/opt-13b", "_remove_final_layer_norm": False, "activation_dropout": 0.0,
              "activation_function": "relu", "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0,
              "bos_token_id": 2, "do_layer_norm_before": True, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 20480,
              "hidden_size": 5120, "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048,
              "model_type": "opt", "num_attention_heads": 40, "num_hidden_layers": 40, "output_projection": True,
              "pad_token_id": 1, "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.21.0.dev0",
              "use_cache": True, "vocab_size": 50272, "word_embed_proj_dim": 5120}
    shape = shape_from_config(opt13b, "config.json")
    known = KNOWN_MODELS["facebook/opt-13b"]
    assert (shape.num_layers, shape.hidden_size, shape.num_kv_heads, shape.head_dim) == \
        (known.num_layers, known.hidden_size, known.num_kv_heads, known.head_dim)
    assert shape.param_count() == pytest.approx(known.params, rel=0.005)
    assert shape.tie_word_embeddings and shape.learned_positions


@pytest.mark.parametrize("family", list(FAMILIES))
def test_param_count_equals_transformers(family):
    """The planner's parameter count (weights in memory) is the model's own, for every family."""
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    assert family_shape(family).param_count() == sum(p.numel() for p in model.parameters())


# --- chat templates: rendered as transformers' apply_chat_template renders them ---------------------

CHATML = ("{%- if tools %}{{- '<|im_start|>system\\n' }}{{- tools | tojson }}{{- '<|im_end|>\\n' }}"
          "{%- elif messages[0]['role'] != 'system' %}"
          "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}\n{%- for message in messages %}\n"
          "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
          "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")
LLAMA3 = ("{{- bos_token }}\n{% for message in messages %}\n"
          "{% if message['role'] == 'system' and not loop.first %}{{ raise_exception('system first') }}{% endif %}\n"
          "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
          " + '<|eot_id|>' }}\n{% endfor %}\n"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
          "{%- set ns = namespace(n=0) %}{%- for m in messages %}{% if m.role == 'user' %}{% set ns.n = ns.n + 1 %}"
          "{% endif %}{% if loop.index > 9 %}{% break %}{% endif %}{% endfor %}{{- '' if ns.n else eos_token }}")
MESSAGES = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi  there\n"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Une question: ça va ?"}]


@pytest.mark.parametrize("where", ["tokenizer_config", "named", "jinja_file"])
@pytest.mark.parametrize("template", [CHATML, LLAMA3, CHAT_TEMPLATE], ids=["chatml", "llama3", "words"])
def test_chat_templates_render_as_transformers_renders_them(template, where, tmp_path):
    from conftest import write_word_tokenizer
    from transformers import PreTrainedTokenizerFast

    from engine.tokenizer import TextCodec

    write_word_tokenizer(str(tmp_path), 64)
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True}}
    if where == "tokenizer_config":
        cfg["chat_template"] = template
    elif where == "named":
        cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    else:
        (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=template,
                                 bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert TextCodec(str(tmp_path)).render_chat(MESSAGES) == expected


def test_a_model_without_chat_template_refuses_chat_requests_clearly(tmp_path):
    from conftest import write_word_tokenizer

    from engine.tokenizer import TextCodec

    write_word_tokenizer(str(tmp_path), 64)
    with pytest.raises(ValueError, match="this model has no chat template .*send 'prompt' instead of 'messages'"):
        TextCodec(str(tmp_path)).chat_ids(MESSAGES)


# --- GGUF: a plain Llama converts; anything else is refused in one line ------------------------------

@pytest.mark.parametrize("arch,keys,tensors,message", [
    ("qwen2", {}, [], "GGUF architecture 'qwen2' is not supported"),
    ("llama", {"llama.rope.scaling.type": "yarn"}, [], "GGUF key llama.rope.scaling.type = 'yarn' is not supported"),
    ("llama", {}, ["rope_freqs.weight"], "GGUF tensor 'rope_freqs.weight' is not part of a plain Llama"),
    ("llama", {}, ["blk.0.attn_q.bias"], "GGUF tensor 'blk.0.attn_q.bias' is not part of a plain Llama"),
], ids=["qwen2", "rope-scaling", "llama3.1-rope-freqs", "bias"])
def test_gguf_files_other_than_a_plain_llama_are_refused(arch, keys, tensors, message, tmp_path):
    import gguf
    import numpy as np

    from contracts.errors import UserError
    from launcher.model_files import check_gguf

    path = str(tmp_path / "m.gguf")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    for key, value in keys.items():
        writer.add_string(key, value)
    for name in ["token_embd.weight", "blk.0.attn_q.weight", *tensors]:
        writer.add_tensor(name, np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_gguf(gguf.GGUFReader(path), path)


# The config.json files of real checkpoints (as published on the Hugging Face hub): accepted as they
# are, with the parameter count the model card gives
REAL_CONFIGS = {
    "meta-llama/Llama-3.1-8B-Instruct": ({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256}, 8.03e9),
    "Qwen/Qwen2.5-7B-Instruct": ({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064},
        7.62e9),
    "Qwen/Qwen3-8B": ({
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
        "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
        8.19e9),
    "mistralai/Mistral-7B-v0.1": ({
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000},
        7.24e9),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_checkpoint_configs_are_accepted_with_their_size(name):
    from launcher.model_support import shape_from_config

    cfg, params = REAL_CONFIGS[name]
    shape = shape_from_config(cfg, name)
    assert shape.param_count() == pytest.approx(params, rel=0.005)
