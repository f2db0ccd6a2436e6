"""Input read once (files, '-', FIFOs), the output never deleted under a run, the input never
overwritten, and requests that could never run answered with error records instead of hanging."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, read_results, write_job

from contracts.batch_io import parse_line, read_checked
from launcher.cli import main

DISAGG = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
          "decode": {"instances": 1, "tp": 1, "pp": 1}}


@pytest.mark.parametrize("fields,message", [
    ({"temperature": 1e-30}, "too small to sample with"),
    ({"temperature": float("nan")}, "finite number"),
    ({"top_p": float("inf")}, "finite number"),
    ({"seed": "7"}, "'seed' must be an integer"),
    ({"max_tokens": 2.5}, "'max_tokens' must be an integer"),
    ({"ignore_eos": "false"}, "'ignore_eos' must be true or false"),
    ({"arrival_s": 1e9}, "'arrival_s' must be a number of seconds in [0, 86400]"),
    ({"arrival_s": float("nan")}, "'arrival_s' must be a number of seconds"),
])
def test_bad_request_fields_become_error_records(fields, message):
    spec = parse_line(4, json.dumps({"prompt": "hi", **fields}))
    assert spec.error and spec.error.startswith("line 5:") and message in spec.error


def test_good_request_fields_pass():
    spec = parse_line(0, json.dumps({"prompt": "hi", "temperature": 1e-5, "seed": 3, "ignore_eos": True,
                                     "arrival_s": 86400}))
    assert spec.error is None


def test_output_equal_to_input_is_refused_and_the_input_kept(tmp_path, tiny_model_dir, capsys):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5, 6, 7]])
    before = (tmp_path / "in.jsonl").read_text()
    for extra in ([], ["--resume"]):
        rc = main(["generate", config, "--output", str(tmp_path / "in.jsonl"), "--dry-run", *extra])
        assert rc == 2 and "is the input file" in capsys.readouterr().err
    assert (tmp_path / "in.jsonl").read_text() == before


def test_dry_run_keeps_an_existing_output_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5, 6, 7]])
    (tmp_path / "out.jsonl").write_text('{"custom_id": "old"}\n')
    before = sorted(os.listdir(tmp_path))
    assert main(["generate", config, "--dry-run", "--overwrite"]) == 0
    assert "mpirun" in capsys.readouterr().out
    assert main(["generate", config, "--dry-run", "--resume"]) == 0
    assert "dry run, nothing changed" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before  # no run directory, no backup, no stale file
    assert (tmp_path / "out.jsonl").read_text() == '{"custom_id": "old"}\n'


def test_a_second_writer_of_the_same_output_is_refused(tmp_path, tiny_model_dir, capsys):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5, 6, 7]])
    (tmp_path / "out.jsonl").write_text('{"custom_id": "r0"}\n')
    with open(tmp_path / "out.jsonl", "a") as held:  # a first run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["generate", config]) == 2
    assert "another pdlaunch run is writing" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl").read_text() == '{"custom_id": "r0"}\n'


@pytest.mark.parametrize("output,message", [("dir", "is a directory"), ("/proc/pdlaunch/out.jsonl", "cannot create")])
def test_unusable_outputs_are_one_line_errors(tmp_path, tiny_model_dir, capsys, output, message):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5, 6, 7]])
    (tmp_path / "dir").mkdir()
    path = str(tmp_path / output) if output == "dir" else output
    assert main(["generate", config, "--output", path]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_resume_with_nothing_left_exits_at_once(tmp_path, tiny_model_dir, capsys):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5, 6, 7], [8, 9]])
    (tmp_path / "out.jsonl").write_text('{"custom_id": "r0"}\n{"custom_id": "r1"}\n')
    assert main(["generate", config, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.mark.mpi
@pytest.mark.parametrize("via", ["-", pytest.param("/dev/stdin", marks=pytest.mark.slow), "fifo",
                                 pytest.param("process substitution", marks=pytest.mark.slow)])
def test_input_from_a_stream_is_read_once_and_bad_requests_do_not_hang(tmp_path, tiny_model_dir, via):
    """Standard input, /dev/stdin and a FIFO: the launcher reads the stream once into the run
    directory. Requests that could never run (a prompt larger than the prefill hold area, an
    answer larger than the decode cache), a far-future arrival and an unusable temperature are
    error records; the rest of the batch completes. `make test-slow` runs /dev/stdin (standard
    input by another name, as `-` here) and process substitution (a pipe behind a path, as the FIFO):
    each is one more whole job."""
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5]],
                       scheduler={"prefill_kv_blocks": 8, "decode_kv_blocks": 16})  # 32 and 64 tokens
    lines = [{"custom_id": "ok", "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True},
             {"custom_id": "long-prompt", "prompt": [9] * 40, "max_tokens": 2},
             {"custom_id": "long-answer", "prompt": [9] * 20, "max_tokens": 60},
             {"custom_id": "far", "prompt": [5], "arrival_s": 1e9},
             {"custom_id": "cold", "prompt": [5], "temperature": 1e-40},
             {"custom_id": "ok2", "prompt": [8, 9], "max_tokens": 3, "ignore_eos": True}]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    source = via
    if via == "fifo":
        source = str(tmp_path / "fifo")
        os.mkfifo(source)
    cmd = [sys.executable, "-m", "launcher.cli", "generate", config, "--input", source, "--quiet"]
    if via == "process substitution":  # --input <(...): a /dev/fd path only the launcher's process has
        (tmp_path / "src.jsonl").write_text(text)
        cmd = ["bash", "-c", " ".join(cmd[:-2]) + f" <(cat {tmp_path / 'src.jsonl'}) --quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if via == "fifo":
        with open(source, "w") as f:
            f.write(text)
        out, err = proc.communicate(timeout=240)
    else:
        out, err = proc.communicate(text, timeout=240)
    assert proc.returncode == 0, err[-3000:]
    results = read_results(tmp_path / "out.jsonl")
    assert set(results) == {x["custom_id"] for x in lines}
    assert len(results["ok"]["token_ids"]) == 4 and len(results["ok2"]["token_ids"]) == 3
    errors = {k: r["error"]["message"] for k, r in results.items() if "error" in r}
    assert set(errors) == {"long-prompt", "long-answer", "far", "cold"}
    assert "scheduler.prefill_kv_blocks is 8" in errors["long-prompt"]
    assert "scheduler.decode_kv_blocks is 16" in errors["long-answer"]
    checked = read_checked(str(tmp_path / "run" / "checked_requests.jsonl"))  # what rank 0 ran: the launcher's parse
    assert [s.custom_id for s in checked] == [x["custom_id"] for x in lines]


@pytest.mark.parametrize("body,message", [
    ({"prompt": [5, -1]}, "token ids must be integers >= 0, got -1"),
    ({"prompt": "hi", "logprobs": True}, "'logprobs' is not supported"),
    ({"prompt": "hi", "tools": [{"type": "function"}]}, "'tools' is not supported"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role 'wizard' is unknown"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "are not supported"),
    ({"messages": [{"role": "user", "content": 7}]}, "must be a string or a list"),
])
def test_requests_are_refused_with_the_reason_not_dropped(body, message):
    spec = parse_line(0, json.dumps(body))
    assert spec.error and message in spec.error


def test_openai_text_content_parts_are_accepted():
    spec = parse_line(0, json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                                                               {"type": "text", "text": "world"}]}],
                                     "logprobs": False}))
    assert spec.error is None and spec.messages[1] == {"role": "user", "content": "Hello, world"}
