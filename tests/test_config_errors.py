"""Every user mistake in config, hostfile, plan, model files or CLI: one line naming the key, exit 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from contracts.errors import UserError
from contracts.hostfile import expand_nodelist, hosts_from_slurm, parse_hostfile
from launcher.cli import main


def base_config(tmp_path, model_dir) -> dict:
    (tmp_path / "hosts").write_text("localhost slots=4  # comment\n")
    (tmp_path / "in.jsonl").write_text('{"prompt": [5, 6, 7]}\n')
    return {"model": {"path": model_dir, "max_model_len": 128}, "cluster": {"hostfile": "hosts"},
            "workload": {"input": "in.jsonl", "output": "out.jsonl"}, "run_dir": "run"}


def set_key(cfg: dict, dotted: str, value) -> dict:
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


# (case, dotted key to set, value, text the one-line error must contain)
CONFIG_CASES = [
    ("unknown top key", "modle", {}, "'modle'; did you mean 'model'"),
    ("unknown nested key", "placement.prefil", {}, "'placement.prefil'"),
    ("string for int", "scheduler.block_size", "16", "'scheduler.block_size' must be an integer"),
    ("bool for int", "model.max_model_len", True, "'model.max_model_len'"),
    ("bad choice", "placement.mode", "split", "'placement.mode' must be one of"),
    ("bad colocated policy", "scheduler.colocated_policy", "sarathi", "'scheduler.colocated_policy' must be one of"),
    ("step budget under the decode batch", "scheduler.step_token_budget", 32,
     "'scheduler.step_token_budget' (32) must exceed 'scheduler.max_decode_batch' (32)"),
    ("zero tp", "placement.decode.tp", 0, "'placement.decode.tp' must be >= 1"),
    ("attainment > 1", "slo.attainment", 1.5, "'slo.attainment'"),
    ("top_p zero", "sampling.top_p", 0, "'sampling.top_p'"),
    ("negative temperature", "sampling.temperature", -1, "'sampling.temperature'"),
    ("bad dtype", "model.dtype", "int8", "'model.dtype'"),
    ("stop not strings", "sampling.stop", [1, 2], "'sampling.stop'"),
    ("bad arrival", "workload.arrival", "burst", "'workload.arrival'"),
    ("bad device", "cluster.device", "tpu", "'cluster.device'"),
    ("unknown interface", "cluster.interface", "nosuch0", "'cluster.interface' = 'nosuch0' is not a network interface"),
    ("mapping expected", "placement.prefill", 3, "'placement.prefill' must be a mapping"),
    ("tp not dividing kv heads", "placement.prefill.tp", 3, "'placement.prefill.tp' = 3 does not divide"),
    ("pp not dividing layers", "placement.decode.pp", 3, "'placement.decode.pp' = 3 does not divide"),
    ("more ranks than slots", "placement.decode.instances", 4, "hostfile has 4 slots"),
    ("missing model", "model.path", "/nonexistent/model", "model: '/nonexistent/model' does not exist"),
    ("missing hostfile", "cluster.hostfile", "nohosts", "hostfile '"),
    ("missing input", "workload.input", "missing.jsonl", "input file '"),
    ("context over model", "model.max_model_len", 100000, "'model.max_model_len'"),
    ("no decode instances", "placement.decode.instances", 0, "'placement.decode.instances'"),
    ("negative rate", "workload.rate", -2, "'workload.rate'"),
    ("missing plan file", "placement.plan", "nope.yaml", "plan file '"),
    ("output not writable", "workload.output", "/proc/pdlaunch/out.jsonl", "output: cannot create directory"),
    ("unknown planner key", "planner.afinity", "low", "did you mean 'affinity'"),
    ("bad affinity", "planner.affinity", "medium", "'planner.affinity' must be one of"),
    ("empty api key", "serve.api_key", ["key", " "], "'serve.api_key' has an empty key"),
    ("api key not a string", "serve.api_key", [123], "'serve.api_key' must be a list of strings"),
    ("zero body limit", "serve.max_body_bytes", 0, "'serve.max_body_bytes' must be >= 1"),
    ("negative port", "serve.port", -1, "'serve.port' must be >= 0"),
    ("port over 65535", "serve.port", 70000, "'serve.port' must be in [0, 65535] (0: any free port)"),
    ("prefix caching not a bool", "scheduler.prefix_caching", "yes", "'scheduler.prefix_caching' must be true or false"),
    ("shared prefix share over 1", "planner.shared_prefix_share", 1.5, "'planner.shared_prefix_share' in [0, 1]"),
]


def run_cli(args, capsys) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("case,key,value,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_mistake(case, key, value, expected, tmp_path, tiny_model_dir, capsys):
    cfg = set_key(base_config(tmp_path, tiny_model_dir), key, value)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    dry = [] if case == "output not writable" else ["--dry-run"]  # a dry run writes nothing, so cannot try it
    rc, err = run_cli(["generate", str(path), *dry], capsys)
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert expected in err, err


def test_bench_rates_must_be_numbers(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, tiny_model_dir)))
    rc, err = run_cli(["bench", str(path), "--rates", "1,fast"], capsys)
    assert rc == 2 and "--rates must be numbers" in err, err


FILE_CASES = [
    ("malformed yaml", "model: [unclosed\n", "is not valid YAML at line"),
    ("top-level list", "- a\n- b\n", "'the top level' must be a mapping"),
]


@pytest.mark.parametrize("case,text,expected", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_config_file_mistake(case, text, expected, tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    rc, err = run_cli(["generate", str(path), "--dry-run"], capsys)
    assert rc == 2 and expected in err, err


def test_missing_config_and_bad_flag(capsys):
    rc, err = run_cli(["generate", "/no/such.yaml"], capsys)
    assert rc == 2 and "config: file '/no/such.yaml' not found" in err
    rc, err = run_cli(["generate", "x.yaml", "--frobnicate"], capsys)
    assert rc == 2 and "unrecognized arguments: --frobnicate" in err
    rc, err = run_cli(["frobnicate"], capsys)
    assert rc == 2 and "invalid choice: 'frobnicate'" in err


HOSTFILE_CASES = [
    ("no slots", "node-a\n", "line 1: expected 'HOST slots=N'"),
    ("zero slots", "node-a slots=0\n", "line 1: slots must be a positive integer"),
    ("text slots", "# head\nnode-a slots=four\n", "line 2: slots must be a positive integer"),
    ("duplicate host", "node-a slots=2\nnode-a slots=2\n", "line 2: host 'node-a' is listed twice"),
    ("empty", "# nothing here\n\n", "no hosts"),
    ("garbage", "node-a slots=2 extra=1\n", "line 1: expected"),
]


@pytest.mark.parametrize("case,text,expected", HOSTFILE_CASES, ids=[c[0] for c in HOSTFILE_CASES])
def test_hostfile_mistake(case, text, expected):
    with pytest.raises(UserError, match=expected):
        parse_hostfile(text)


def test_hostfile_and_slurm_parsing():
    hosts = parse_hostfile("# cluster\nnode-a slots=8\nnode-b slots = 4 # tail\n")
    assert [(h.name, h.slots) for h in hosts] == [("node-a", 8), ("node-b", 4)]
    assert expand_nodelist("n[1-3,07],gpu9") == ["n1", "n2", "n3", "n07", "gpu9"]
    env = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1"}
    assert [(h.name, h.slots) for h in hosts_from_slurm(env)] == [("n1", 2), ("n2", 2), ("n3", 1)]


PLAN_CASES = [
    ("gap in ranks", {"instances": [{"role": "prefill", "tp": 1, "pp": 1, "ranks": [2]},
                                    {"role": "decode", "tp": 1, "pp": 1}]}, "must be the 1 consecutive ranks"),
    ("unknown role", {"instances": [{"role": "encode", "tp": 1, "pp": 1}]}, "role must be one of"),
    ("prefill only", {"instances": [{"role": "prefill", "tp": 1, "pp": 1}]}, "needs at least one prefill and one decode"),
    ("host not in hostfile", {"instances": [{"role": "colocated", "tp": 1, "pp": 1, "hosts": ["node-z"]}]},
     "host 'node-z' of instance 0 is not in the hostfile"),
    ("empty", {"instances": []}, "non-empty 'instances'"),
    ("bad tp", {"instances": [{"role": "colocated", "tp": "2", "pp": 1}]}, "tp must be a positive integer"),
]


@pytest.mark.parametrize("case,plan,expected", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_mistake(case, plan, expected, tmp_path, tiny_model_dir, capsys):
    cfg = base_config(tmp_path, tiny_model_dir)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    cfg["placement"] = {"plan": "plan.yaml"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, err = run_cli(["generate", str(path), "--dry-run"], capsys)
    assert rc == 2 and expected in err, err


MODEL_CASES = [
    ("no config.json", lambda d: os.remove(os.path.join(d, "config.json")), "has no config.json"),
    ("truncated weights", lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(b"\x10\x00"),
     "is truncated or not a safetensors file"),
    ("pickle only", lambda d: os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin")),
     "no *.safetensors"),
    ("not llama", lambda d: open(os.path.join(d, "config.json"), "w").write('{"architectures": ["GPT2LMHeadModel"]}'),
     "architecture 'GPT2LMHeadModel'"),
    ("bad json", lambda d: open(os.path.join(d, "config.json"), "w").write("{oops"), "is not valid JSON"),
    ("weights of another size", lambda d: _edit_config(d, intermediate_size=96),
     "'model.layers.0.mlp.gate_proj.weight' has shape [128, 64] in the weights but"),
    ("fewer layers in config", lambda d: _edit_config(d, num_hidden_layers=2),
     "hold 'model.layers.2."),
    ("more layers in config", lambda d: _edit_config(d, num_hidden_layers=6), "lack 'model.layers.4."),
    ("other kv heads", lambda d: _edit_config(d, num_key_value_heads=8),
     "'model.layers.0.self_attn.k_proj.weight' has shape [32, 64]"),
    ("longrope", lambda d: _edit_config(d, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                                         "long_factor": [2.0] * 4}),
     "rope_scaling.rope_type = 'longrope' is not supported"),
    ("unknown field", lambda d: _edit_config(d, attn_logit_softcapping=50.0),
     "attn_logit_softcapping = 50.0 is not supported"),
    ("extra bias tensor", lambda d: _add_tensor(d, "model.layers.1.self_attn.q_proj.bias", (64,)),
     "hold 'model.layers.1.self_attn.q_proj.bias'"),
]


def _add_tensor(model_dir: str, name: str, shape: tuple[int, ...]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape)}, os.path.join(model_dir, "extra.safetensors"))


def _edit_config(model_dir: str, **changes) -> None:
    import json

    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump(cfg | changes, f)


@pytest.mark.parametrize("case,damage,expected", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_file_mistake(case, damage, expected, tmp_path, tiny_model_dir, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(str(model))
    cfg = base_config(tmp_path, str(model))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, err = run_cli(["generate", str(path), "--dry-run"], capsys)
    assert rc == 2 and expected in err, err


def test_gguf_of_other_architecture(tmp_path, capsys):
    import gguf
    import numpy as np

    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(tmp_path, path)))
    rc, err = run_cli(["generate", str(cfg_path), "--dry-run"], capsys)
    assert rc == 2 and "GGUF architecture 'gpt2' is not supported" in err, err


def test_cli_error_has_no_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("scheduler: {block_size: big}\n")
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "generate", str(path)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pdlaunch: error: config: 'scheduler.block_size' must be an integer, got 'big'; fix its value"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("nodelist,names", [
    ("n1", ["n1"]),
    ("n[1-3,5],gpu7", ["n1", "n2", "n3", "n5", "gpu7"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("a,b[1,3],c", ["a", "b1", "b3", "c"]),
    ("gpu[001-002,010]", ["gpu001", "gpu002", "gpu010"]),
    ("node-a.cluster,node-b.cluster", ["node-a.cluster", "node-b.cluster"]),
])
def test_slurm_nodelists_expand_like_scontrol(nodelist, names):
    assert expand_nodelist(nodelist) == names


@pytest.mark.parametrize("nodelist,message", [
    ("n[3-1]", "is not a list of numbers and ranges"),
    ("n[1-2", "unclosed"),
    ("n[a-b]", "is not a list of numbers and ranges"),
    ("n[[1]]", "nested"),
    ("a,,b", "empty name"),
])
def test_bad_slurm_nodelists_are_one_line_errors(nodelist, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        expand_nodelist(nodelist)


def test_an_unknown_host_is_named_before_launch(tmp_path, tiny_model_dir, capsys):
    """Outside Slurm every planned host must resolve before mpirun starts; a dry run only prints."""
    cfg = base_config(tmp_path, tiny_model_dir)
    (tmp_path / "hosts").write_text("localhost slots=2\nno-such-host.invalid slots=2\n")
    cfg["placement"] = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 2, "pp": 1},
                        "decode": {"instances": 1, "tp": 2, "pp": 1}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, out = main(["generate", str(path), "--dry-run"]), capsys.readouterr().out
    assert rc == 0 and "--host localhost:3,no-such-host.invalid:2" in out
    rc, err = run_cli(["generate", str(path)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "host 'no-such-host.invalid' does not resolve" in err and "hostfile hosts" in err, err
