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
