"""Prefix caching in real jobs, token-exact in fp32: requests that share whole blocks of a prefix,
part of a block, a prompt that is all prefix, a prompt longer than L_m behind a cached prefix, a
later turn of a conversation, and prompts that share nothing give the tokens of the same job
without caching, on 1P1D, a TP2 prefill and a PP2 prefill. The 1P1D job runs with a hold area
smaller than its prefixes' blocks (so admissions evict cached blocks), arrivals spread out (so
later requests hit blocks nobody holds any more) and scheduler.decode_prefix_reuse (its decode
instance pulls only the blocks past the prefix it holds); the others take every request at once,
where the hits per request are known exactly."""
from __future__ import annotations

import json
import os

import pytest

from conftest import ragged_prompts, read_results, run_pdlaunch, write_job

pytestmark = pytest.mark.mpi

BLOCK = 4  # write_job's block size; its L_m is 64
SYSTEM = ragged_prompts(1, seed=31, low=30, high=31)[0]        # 7 full blocks and 2 tokens
TAILS = ragged_prompts(6, seed=33, low=1, high=9)
OTHERS = ragged_prompts(5, seed=32, low=34, high=35)            # 8 full blocks each, shared with nothing
FIRST_TURN = SYSTEM + TAILS[0]
PROMPTS = ([SYSTEM + t for t in TAILS] + [SYSTEM[:10] + t for t in TAILS[:2]] + [SYSTEM[:28]] * 2
           + [SYSTEM * 3, FIRST_TURN + [5, 6, 7] + TAILS[1]] + OTHERS)
# what each request finds cached when all arrive at once (FCFS): the full blocks of the longest
# prefix an earlier prompt registered, up to the block before its last token
EXPECTED_CACHED = ([0] + [28] * 5 + [8, 8] + [24, 24] + [28, len(FIRST_TURN) // BLOCK * BLOCK] + [0] * len(OTHERS))
MAX_TOKENS = 6
HOLD_BLOCKS = 28  # the longest prompt (90 tokens) needs 23; the prompts' distinct full blocks are over 80


def disaggregated(tp: int, pp: int) -> dict:
    return {"mode": "disaggregated", "prefill": {"instances": 1, "tp": tp, "pp": pp},
            "decode": {"instances": 1, "tp": 1, "pp": 1}}


def run(tmp_path, model_dir, name: str, placement: dict, scheduler: dict, gap_s: float = 0.0):
    """(records by custom_id, report) of one job; its requests arrive `gap_s` apart (0: all at once)."""
    path = tmp_path / name
    path.mkdir()
    config = write_job(path, model_dir, placement, PROMPTS, MAX_TOKENS, scheduler=scheduler)
    lines = [json.loads(line) | {"arrival_s": i * gap_s} for i, line in enumerate(open(path / "in.jsonl"))]
    (path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = run_pdlaunch("generate", config, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(path / "out.jsonl"), json.loads((path / "run" / "report.json").read_text())


def tokens(records: dict) -> dict:
    return {k: r["token_ids"] for k, r in records.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    records, report = run(tmp_path_factory.mktemp("ref"), tiny_model_dir, "off", disaggregated(1, 1),
                          {"prefix_caching": False})
    assert len(records) == len(PROMPTS) and all(len(t) == MAX_TOKENS for t in tokens(records).values())
    assert report["cached_tokens"] == 0 and all(r["metrics"]["cached_tokens"] == 0 for r in records.values())
    return tokens(records)


def test_prompts_cover_the_cases():
    assert len(SYSTEM) == 30 and len(SYSTEM * 3) > 64 and len(PROMPTS) == len(EXPECTED_CACHED)
    assert sum(len(p) // BLOCK for p in [SYSTEM * 3, *OTHERS]) > 2 * HOLD_BLOCKS


def test_1p1d_with_evictions_spread_arrivals_and_partial_pulls_matches_no_caching(tmp_path, tiny_model_dir,
                                                                                    reference):
    records, report = run(tmp_path, tiny_model_dir, "1p1d", disaggregated(1, 1),
                          {"prefill_kv_blocks": HOLD_BLOCKS, "decode_prefix_reuse": True}, gap_s=0.25)
    assert tokens(records) == reference
    prefill, decode = (next(i for i in report["instances"] if i["role"] == role) for role in ("prefill", "decode"))
    assert prefill["prefix_hit_tokens"] > 0
    assert report["cached_tokens"] == prefill["prefix_hit_tokens"] and 0 < report["prefix_hit_rate"] < 1
    assert decode["prefix_hit_tokens"] > 0                 # blocks it did not pull


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_a_tp_or_pp_prefill_instance_matches_no_caching(tmp_path, tiny_model_dir, reference, tp, pp):
    records, report = run(tmp_path, tiny_model_dir, f"tp{tp}pp{pp}", disaggregated(tp, pp), {})
    assert tokens(records) == reference
    assert [records[f"r{i}"]["metrics"]["cached_tokens"] for i in range(len(PROMPTS))] == EXPECTED_CACHED
    prefill = next(i for i in report["instances"] if i["role"] == "prefill")
    assert prefill["prefix_hit_tokens"] == sum(EXPECTED_CACHED)
    assert prefill["prefix_hit_rate"] == pytest.approx(sum(EXPECTED_CACHED) / sum(map(len, PROMPTS)))




def test_a_request_aborted_while_it_shares_prefix_blocks_frees_only_its_own(tmp_path, tiny_model_dir, reference):
    """Serve mode, one prefill instance and two decode instances, both stopped (SIGSTOP) so every
    request's KV stays held on the prefill side. A's client goes away once the controller has A's
    first token (so it sends A's abort to A's decode instance); B, sent after that abort, shares
    A's prefix blocks. Decode 1 (A's) resumes and ends A without a pull: the prefill instance must
    then hold exactly B's blocks, A's own cached or free. Decode 2 resumes: B's tokens are those of
    no caching, and D, sent last, finds the prefix cached and gets the tokens of no caching too.
    Every wait is for a state the job reaches whatever the machine's speed."""
    import signal
    import threading
    import time

    from conftest import ServerProcess, rank_pid
    from engine.blocks import blocks_for
    from engine.prefix_cache import block_hashes
    from engine.tokenizer import TextCodec
    from test_serve import metric, request, stream_lines

    placement = {"mode": "disaggregated", "prefill": {"instances": 1, "tp": 1, "pp": 1},
                 "decode": {"instances": 2, "tp": 1, "pp": 1}}
    config = write_job(tmp_path, tiny_model_dir, placement, [[5, 6]], scheduler={"watchdog_s": 300})
    server = ServerProcess(config, str(tmp_path / "run"))
    a, b, d = PROMPTS[:3]
    names_a, names_b = set(block_hashes(a, BLOCK)), set(block_hashes(b, BLOCK))
    shared = len(names_a & names_b)
    assert shared == 7
    codec = TextCodec(tiny_model_dir)
    model = request(server.url + "/v1/models")[2]["data"][0]["id"]

    def body(prompt):
        return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}

    def until(condition, what: str) -> None:
        deadline = time.time() + 120
        while not condition():
            assert time.time() < deadline, f"waited 120 s for {what}:\n{server.stderr[-3000:]}"
            time.sleep(0.1)

    def prefill_kv(kind: str = "used") -> float:
        return metric(server.url, f"pdlaunch_instance_kv_blocks_{kind}", instance="0", role="prefill")

    decodes = [rank_pid(server.run_dir, rank) for rank in (2, 3)]  # controller 0, prefill 1, decodes 2 and 3
    for pid in decodes:
        os.kill(pid, signal.SIGSTOP)
    try:
        stream_a = stream_lines(server.url, body(a))
        next(stream_a)
        until(lambda: metric(server.url, "pdlaunch_requests_waiting_first_token") == 0,
              "the controller to take A's first token")
        stream_a.close()  # A's client goes away
        until(lambda: metric(server.url, "pdlaunch_requests_total", outcome="aborted") == 1, "A's abort")
        stream_b = stream_lines(server.url, body(b))  # dispatched with or after A's abort
        pieces_b = [json.loads(next(stream_b))["choices"][0]["text"]]
        both = blocks_for(len(a), BLOCK) + blocks_for(len(b), BLOCK) - shared
        until(lambda: prefill_kv() == both, f"the prefill instance to hold A's and B's {both} blocks")
        assert prefill_kv("cached") == 0
        os.kill(decodes[0], signal.SIGCONT)
        until(lambda: prefill_kv() == blocks_for(len(b), BLOCK), "A's own blocks to be released")
        assert prefill_kv("cached") == len(names_a - names_b)  # A's own full blocks, kept; the shared ones B holds
        reader = threading.Thread(target=lambda: pieces_b.extend(
            json.loads(line)["choices"][0]["text"] for line in stream_b if line != "[DONE]"))
        reader.start()
    finally:
        for pid in decodes:
            os.kill(pid, signal.SIGCONT)
    reader.join(timeout=120)
    assert "".join(pieces_b) == codec.decode(reference["r1"])
    status, _, answer = request(server.url + "/v1/completions", body(d))
    assert status == 200 and answer["choices"][0]["text"] == codec.decode(reference["r2"])
    until(lambda: prefill_kv() == 0, "every block the prefill instance held to be released")
    assert server.stop() == 0, server.stderr[-3000:]
    with open(os.path.join(server.run_dir, "requests.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [r["outcome"] for r in logged] == ["aborted", "finished", "finished"]  # A, B, D
