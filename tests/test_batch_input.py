"""Batch input lines: each mistake is an error for that line only; whole-file mistakes stop the job."""
from __future__ import annotations

import pytest

from contracts.batch_io import parse_line, parse_requests, read_checked, read_requests, write_checked
from contracts.errors import UserError

OK_CHAT = '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}'

LINE_CASES = [
    ("not json", "{oops", "is not valid JSON"),
    ("not an object", "[1, 2]", "must be a JSON object"),
    ("missing prompt", '{"max_tokens": 4}', "missing 'prompt'"),
    ("empty prompt", '{"prompt": ""}', "missing 'prompt'"),
    ("negative token id", '{"prompt": [1, -2]}', "'prompt' token ids must be integers >= 0, got -2"),
    ("n > 1", '{"prompt": "x", "n": 2}', "n=2 is not supported"),
    ("unknown sampling field", '{"prompt": "x", "beam_width": 4}', "unknown field 'beam_width'"),
    ("negative temperature", '{"prompt": "x", "temperature": -1}', "'temperature' must be >= 0"),
    ("top_p above 1", '{"prompt": "x", "top_p": 2}', "'top_p' must be in (0, 1]"),
    ("zero max_tokens", '{"prompt": "x", "max_tokens": 0}', "'max_tokens' must be >= 1"),
    ("string max_tokens", '{"prompt": "x", "max_tokens": "5"}', "'max_tokens' must be an integer"),
    ("stop not strings", '{"prompt": "x", "stop": [1]}', "'stop' must be"),
    ("bad url", '{"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}', "url '/v1/embeddings' is not supported"),
    ("bad method", '{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}', "method 'GET'"),
    ("body not object", '{"custom_id": "a", "url": "/v1/completions", "body": "x"}', "'body' must be an object"),
    ("malformed messages", '{"messages": [{"role": "user"}]}', "a message's 'content' must be a string or a list"),
    ("negative arrival", '{"prompt": "x", "arrival_s": -1}', "'arrival_s' must be a number of seconds in [0, 86400]"),
    ("two different limits", '{"prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}', "differ; send one"),
    ("zero max_completion_tokens", '{"prompt": "x", "max_completion_tokens": 0}', "'max_tokens' must be >= 1"),
]


def test_max_completion_tokens_is_the_output_limit_and_max_tokens_its_alias():
    line = OK_CHAT.replace('"max_tokens": 5', '"max_completion_tokens": 7')
    assert parse_line(0, line).sampling == {"max_tokens": 7}
    assert parse_line(0, '{"prompt": "x", "max_tokens": 7, "max_completion_tokens": 7}').sampling == {"max_tokens": 7}
    assert parse_line(0, '{"prompt": "x", "max_tokens": null}').sampling == {}


@pytest.mark.parametrize("case,line,expected", LINE_CASES, ids=[c[0] for c in LINE_CASES])
def test_bad_line_is_an_error_record(case, line, expected):
    spec = parse_line(6, line)
    assert spec.error and expected in spec.error and spec.error.startswith("line 7"), spec.error


def test_good_lines():
    chat = parse_line(0, OK_CHAT)
    assert chat.error is None and chat.openai and chat.kind == "chat" and chat.sampling == {"max_tokens": 5}
    plain = parse_line(1, '{"prompt": [5, 6], "seed": 3, "stop": "END", "model": "ignored"}')
    assert plain.error is None and plain.prompt == [5, 6] and plain.sampling == {"seed": 3, "stop": ("END",)}


FILE_CASES = [
    ("empty file", "\n\n", "has no requests"),
    ("duplicate custom_id", '{"custom_id": "a", "prompt": "x"}\n{"custom_id": "a", "prompt": "y"}\n',
     "custom_id 'a' appears on lines 1, 2; ids must be unique"),
]


@pytest.mark.parametrize("case,text,expected", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_input_file(case, text, expected, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=expected):
        read_requests(str(path))


def test_unreadable_input_files(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        read_requests(str(tmp_path))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="is not UTF-8"):
        read_requests(str(binary))


def test_rank_0_reads_the_requests_exactly_as_the_launcher_checked_them(tmp_path):
    """The launcher parses the input once and writes the specs; rank 0 reads them back unchanged
    (errors, token-id prompts, chats, sampling, a non-UTF-8 byte kept escaped) and parses nothing."""
    text = "\n".join([OK_CHAT, '{"prompt": [5, 6, 7], "max_tokens": 3, "arrival_s": 0.5}', '{"prompt": "x", "top_p": 7}',
                      '{"custom_id": "bytes", "prompt": "caf\udce9"}', '{"prompt": "plain", "temperature": 0.5, "seed": 3}',
                      '{"prompt": "s", "stop": ["a", "bc"]}'])
    specs = parse_requests(text, "in.jsonl")
    assert read_checked(write_checked(specs, str(tmp_path / "requests.jsonl"))) == specs
    assert [s.error is not None for s in specs] == [False, False, True, True, False, False]
    assert specs[-1].sampling["stop"] == ("a", "bc")
