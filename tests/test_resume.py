"""--resume keys results by content: an edited, inserted, removed or duplicated line never gets
another prompt's answer, and nothing the output held is deleted."""
from __future__ import annotations

import json

import pytest
from conftest import read_results, run_pdlaunch, write_job

from contracts.batch_io import parse_line, parse_requests
from launcher.resume import reconcile, stale_path

DISAGG = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
          "decode": {"instances": 1, "tp": 1, "pp": 1}}


def _line(**fields) -> str:
    return json.dumps(fields)


def test_ids_of_lines_without_custom_id_follow_content_not_position():
    a, b = _line(prompt="alpha"), _line(prompt="beta")
    first = parse_requests(f"{a}\n{b}\n", "in")
    inserted = parse_requests(f"{_line(prompt='new')}\n{a}\n{b}\n", "in")
    assert [s.custom_id for s in first] == [s.custom_id for s in inserted[1:]]
    assert parse_line(0, _line(prompt="alpha", max_tokens=3)).digest != parse_line(0, a).digest
    assert parse_line(0, '{"max_tokens": 3, "prompt": "alpha"}').digest == parse_line(5, _line(prompt="alpha",
                                                                                                 max_tokens=3)).digest
    twins = parse_requests(f"{a}\n{a}\n{a}\n", "in")
    assert len({s.custom_id for s in twins}) == 3 and twins[1].custom_id == twins[0].custom_id + "-2"


def test_invalid_utf8_fails_its_line_only(tmp_path):
    from contracts.batch_io import read_requests

    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "fine"}\n')
    specs = read_requests(str(path))
    assert [s.error is None for s in specs] == [True, False, True]
    assert specs[1].error == "line 2 is not UTF-8 text (column 16); save the file as UTF-8"


def _record(spec, **extra) -> str:
    return json.dumps({"custom_id": spec.custom_id, "request_hash": spec.digest, "text": "x", **extra})


def test_reconcile_reuses_only_unchanged_requests_and_keeps_the_rest_aside(tmp_path):
    old = parse_requests("\n".join([_line(custom_id="a", prompt="one"), _line(custom_id="b", prompt="two"),
                                    _line(custom_id="gone", prompt="three"), _line(custom_id="err", prompt="four"),
                                    _line(prompt="no id")]), "in")
    out = tmp_path / "out.jsonl"
    lines = [_record(s) for s in old[:3]] + [_record(old[3], error={"code": "engine_error", "message": "x"}),
                                             _record(old[4]), json.dumps({"custom_id": "legacy", "text": "y"}),
                                             '{"custom_id": "torn", "te']
    out.write_text("\n".join(lines))
    new = parse_requests("\n".join([_line(custom_id="a", prompt="one"), _line(custom_id="b", prompt="TWO"),
                                    _line(custom_id="err", prompt="four"), _line(custom_id="legacy", prompt="p"),
                                    _line(prompt="inserted"), _line(prompt="no id")]), "in")
    before = out.read_text()
    dry = reconcile(str(out), new, apply=False)
    assert out.read_text() == before and not (tmp_path / "out.jsonl.stale.jsonl").exists()
    state = reconcile(str(out), new, apply=True)
    assert dry == state
    assert state.reused == {"a", "legacy", old[4].custom_id}
    assert (state.changed, state.vanished, state.retried, state.unverified, state.torn) == (1, 1, 1, 1, 1)
    assert set(read_results(out)) == state.reused
    assert set(read_results(stale_path(str(out)))) == {"b", "gone"}
    message = state.message(str(out), 3)
    assert "reused 3 result(s)" in message and "1 whose request changed" in message and "3 request(s) to run" in message


@pytest.mark.mpi
def test_resume_after_editing_the_input_answers_every_prompt_exactly_once(tmp_path, tiny_model_dir):
    """A real run, then the input edited (a line inserted, a prompt changed, a line removed, id-less
    lines moved): the resumed output matches a fresh run of the new input, request for request."""
    config = write_job(tmp_path, tiny_model_dir, DISAGG, [])
    plain = [_line(prompt=[5 + i, 9, 11 + i], max_tokens=4, ignore_eos=True) for i in range(3)]
    named = [_line(custom_id=f"n{i}", prompt=[40 + i, 7], max_tokens=4, ignore_eos=True) for i in range(3)]
    (tmp_path / "in.jsonl").write_text("\n".join(plain + named) + "\n")
    assert run_pdlaunch("generate", config, "--quiet").returncode == 0
    edited = [_line(prompt=[77, 78], max_tokens=4, ignore_eos=True)] + plain[::-1] + \
        [named[0], _line(custom_id="n1", prompt=[99, 98, 97], max_tokens=4, ignore_eos=True)]
    (tmp_path / "in.jsonl").write_text("\n".join(edited) + "\n")
    resumed = run_pdlaunch("generate", config, "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "reused 4 result(s)" in resumed.stderr and "1 whose request changed" in resumed.stderr
    assert "1 whose request is no longer in the input" in resumed.stderr and "2 request(s) to run" in resumed.stderr
    got = read_results(tmp_path / "out.jsonl")
    fresh = run_pdlaunch("generate", config, "--quiet", "--output", str(tmp_path / "fresh.jsonl"))
    assert fresh.returncode == 0
    want = read_results(tmp_path / "fresh.jsonl")
    assert sum(1 for _ in open(tmp_path / "out.jsonl")) == len(edited) == len(got)
    assert {k: r["token_ids"] for k, r in got.items()} == {k: r["token_ids"] for k, r in want.items()}
    assert set(read_results(tmp_path / "out.jsonl.stale.jsonl")) == {"n1", "n2"}
