"""KV reshard plan between two instance layouts: a pure function both sides compute alike.

Each rank owns a rectangle of the global KV cache: the layers of its PP stage x the KV heads of
its TP rank. A transfer is the non-empty intersection of a source rectangle with a destination
rectangle; the list is ordered by (source rank, destination rank), so both sides post their
sends and receives in the same order. Same layouts give the stage-aligned 1:1 pairs.
No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass

from contracts.plan import InstancePlan


@dataclass(frozen=True)
class Rect:
    layers: tuple[int, int]  # [l0, l1)
    heads: tuple[int, int]   # [h0, h1) KV heads

    def intersect(self, other: "Rect") -> "Rect | None":
        l0, l1 = max(self.layers[0], other.layers[0]), min(self.layers[1], other.layers[1])
        h0, h1 = max(self.heads[0], other.heads[0]), min(self.heads[1], other.heads[1])
        return Rect((l0, l1), (h0, h1)) if l0 < l1 and h0 < h1 else None


@dataclass(frozen=True)
class Transfer:
    src_rank: int
    dst_rank: int
    rect: Rect


def stage_layers(num_layers: int, pp: int, stage: int) -> tuple[int, int]:
    per = num_layers // pp
    return stage * per, (stage + 1) * per


def owned_rect(inst: InstancePlan, rank: int, num_layers: int, num_kv_heads: int) -> Rect:
    tp_rank, stage = inst.coords(rank)
    per = num_kv_heads // inst.tp
    return Rect(stage_layers(num_layers, inst.pp, stage), (tp_rank * per, (tp_rank + 1) * per))


def transfer_plan(src: InstancePlan, dst: InstancePlan, num_layers: int, num_kv_heads: int) -> list[Transfer]:
    out = []
    for s in src.ranks:
        s_rect = owned_rect(src, s, num_layers, num_kv_heads)
        for d in dst.ranks:
            common = s_rect.intersect(owned_rect(dst, d, num_layers, num_kv_heads))
            if common is not None:
                out.append(Transfer(s, d, common))
    return out


def kv_rank_pairs(instances: list[InstancePlan], num_layers: int, num_kv_heads: int) -> list[tuple[int, int]]:
    """Every (lower rank, higher rank) pair that moves KV between some prefill and decode instance,
    in one global order (sorted). Ranks that meet each pair in this order, each doing only its own,
    never wait in a cycle: the first pair not yet met has both ranks at it."""
    pairs = {tuple(sorted((t.src_rank, t.dst_rank)))
             for src in instances if src.role == "prefill" for dst in instances if dst.role == "decode"
             for t in transfer_plan(src, dst, num_layers, num_kv_heads)}
    return sorted(pairs)
