"""Odd inputs get what a user expects: a BOM is not part of the first request, a bad line keeps
its custom_id, and every refusal is one line saying what is wrong and where."""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_job

from contracts.batch_io import parse_line, parse_requests, read_requests
from launcher.cli import main

DISAGG = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
          "decode": {"instances": 1, "tp": 1, "pp": 1}}


def test_a_byte_order_mark_is_not_part_of_the_first_request(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"custom_id": "first", "prompt": "hi"}\n{"custom_id": "second", "prompt": "yo"}\n')
    specs = read_requests(str(path))
    assert [(s.custom_id, s.error) for s in specs] == [("first", None), ("second", None)]


@pytest.mark.parametrize("line", [b'{"custom_id": "caf\xc3\xa9-7", "prompt": "caf\xe9"}',
                                  b'{"custom_id": "caf\xc3\xa9-7", "prompt": "unclosed}'])
def test_a_bad_line_keeps_its_custom_id(line):
    spec = parse_line(2, line.decode("utf-8", "surrogateescape"))
    assert spec.error and spec.error.startswith("line 3") and spec.custom_id == "caf\u00e9-7"


def test_a_duplicate_custom_id_names_its_lines(tmp_path):
    from contracts.errors import UserError

    text = "\n".join(json.dumps({"custom_id": cid, "prompt": "x"}) for cid in ("a", "b", "a", "c", "a"))
    with pytest.raises(UserError, match="custom_id 'a' appears on lines 1, 3, 5"):
        parse_requests(text, "in.jsonl")


def test_a_run_dir_that_is_a_file_is_named(tmp_path, tiny_model_dir, capsys):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5, 6, 7]])
    (tmp_path / "run").write_text("not a directory")
    for extra in ([], ["--dry-run"]):
        assert main(["generate", config, *extra]) == 2
        err = capsys.readouterr().err
        assert "is a file, not a directory; pass another --run-dir" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "run").read_text() == "not a directory"


def test_infinite_bench_rates_are_called_so(tmp_path, tiny_model_dir, capsys):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5, 6, 7]])
    assert main(["bench", config, "--rates", "1,inf"]) == 2
    assert "--rates must be finite request rates" in capsys.readouterr().err


def test_a_missing_profile_points_at_pdlaunch_profile(tmp_path, tiny_model_dir, capsys):
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [[5, 6, 7]], extra={"planner": {"profile": "mine.json"}})
    cfg = yaml.safe_load(open(config))
    cfg["scheduler"].pop("prefill_token_budget")  # auto: read from the profile
    open(config, "w").write(yaml.safe_dump(cfg))
    assert main(["generate", config, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"`pdlaunch profile CONFIG -o {tmp_path}/mine.json`" in err, err


@pytest.mark.parametrize("records,message", [
    ([{"start_time": float("nan"), "prompt_len": 10, "output_len": 4}], "start_time nan; it must be a finite number"),
    ([{"start_time": -1, "prompt_len": 10, "output_len": 4}], "start_time -1"),
    ([{"start_time": 0, "prompt_len": 10, "output_len": 100_000_000}], "than model.max_model_len holds (2048)"),
    ([{"start_time": 0, "prompt_len": 3000, "output_len": 4}], "prompt_len 3000 + output_len 4"),
])
def test_simulate_checks_a_trace_like_generate_checks_its_input(tmp_path, capsys, records, message):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps(records))
    assert main(["simulate", "configs/paper-opt13b-high.yaml", "--trace", str(trace), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_simulate_replays_an_unsorted_trace_in_arrival_order(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([{"start_time": t, "prompt_len": 100, "output_len": 8} for t in (2.0, 0.0, 1.0)]))
    out = tmp_path / "sim.json"
    assert main(["simulate", "configs/paper-opt13b-high.yaml", "--trace", str(trace), "-o", str(out), "--quiet"]) == 0
    assert [r["arrival_ms"] for r in json.loads(out.read_text())["requests"]] == [0.0, 1000.0, 2000.0]
