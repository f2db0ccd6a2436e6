"""The KV reshard plan covers every (layer, KV head) exactly once, for every layout pair up to TP4 x PP4."""
from __future__ import annotations

import itertools

import pytest

from contracts.errors import UserError
from contracts.model_shape import ModelShape
from contracts.plan import InstancePlan, Plan, check_layouts
from engine.reshard import owned_rect, transfer_plan

LAYERS, KV_HEADS = 12, 12  # divisible by every degree 1..4
DEGREES = [1, 2, 3, 4]


def layouts():
    return list(itertools.product(DEGREES, DEGREES))


@pytest.mark.parametrize("src", layouts(), ids=lambda l: f"P-tp{l[0]}pp{l[1]}")
def test_plan_covers_every_cell_once(src):
    p = InstancePlan(0, "prefill", src[0], src[1], first_rank=1)
    for dst in layouts():
        d = InstancePlan(1, "decode", dst[0], dst[1], first_rank=1 + p.size)
        plan = transfer_plan(p, d, LAYERS, KV_HEADS)
        seen = {}
        for t in plan:
            s_rect, d_rect = owned_rect(p, t.src_rank, LAYERS, KV_HEADS), owned_rect(d, t.dst_rank, LAYERS, KV_HEADS)
            assert s_rect.intersect(t.rect) == t.rect and d_rect.intersect(t.rect) == t.rect
            for cell in itertools.product(range(*t.rect.layers), range(*t.rect.heads)):
                assert cell not in seen, f"{src}->{dst}: {cell} sent twice"
                seen[cell] = t
        assert len(seen) == LAYERS * KV_HEADS, f"{src}->{dst}: {LAYERS * KV_HEADS - len(seen)} cells missing"
        assert plan == sorted(plan, key=lambda t: (t.src_rank, t.dst_rank)), "both sides need one order"
        if src == dst:  # same layout: the stage-aligned 1:1 pairs
            assert [(t.src_rank - p.first_rank, t.dst_rank - d.first_rank) for t in plan] == \
                [(i, i) for i in range(p.size)]


def test_tp_beyond_kv_heads_is_a_config_error():
    shape = ModelShape(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2,
                       head_dim=8, vocab_size=512, rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       max_position_embeddings=128, bos_token_id=1, eos_token_ids=(2,))
    plan = Plan([InstancePlan(0, "colocated", 4, 1, 1, ["localhost"] * 4)])
    with pytest.raises(UserError, match="'placement.colocated.tp' = 4 does not divide the model's 2 KV heads"):
        check_layouts(plan, shape)


@pytest.mark.mpi
def test_kv_transfer_moves_every_value_between_layouts_with_and_without_copies():
    """Real gloo send/recv under mpirun: block tables consecutive, partly consecutive or scattered
    on either side, for same-layout, TP-split, TP-merge and PP-split pairs. As the engine posts them
    (each side knows the other's table) only a rank that holds more than the pair's rectangle
    stages a copy, however scattered the blocks.
    And arrival is reported only once every receive completed (a sender that posts late).
    Ranks 0-3: up to a TP2 -> PP2 pair."""
    import os
    import subprocess
    import sys

    from launcher.rank_launch import _mpirun

    script = os.path.join(os.path.dirname(__file__), "kv_transfer_ranks.py")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    proc = subprocess.run([_mpirun(), "-n", "4", "--oversubscribe", "--bind-to", "none", *root, sys.executable, script],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") == 16 and proc.stdout.count(": refused") == 1, proc.stdout
    staged = dict(line.rsplit(": ok; staged on ranks ", 1) for line in proc.stdout.splitlines() if "staged" in line)
    for pair in ("tp1 scattered -> D tp1 scattered", "tp1 partly consecutive -> D tp1 scattered"):
        assert staged[f"P {pair}"] == "[]"
    # a PP split or merge: the side holding every layer stages its share, the stage side never
    assert staged["P tp1 scattered -> D pp2 partly consecutive"] == "[0]"
    assert staged["P pp2 scattered -> D tp1 scattered"] == "[2]"
    # a rank holding more KV heads than the pair moves stages its share
    assert staged["P tp1 consecutive -> D tp2 scattered"] == "[0]"
