"""KV arrival and buffer reuse follow completion (engine.p2p_ops.Completions), checked with
works whose completion comes later than their posting, as NCCL's do: a fake wire between two
KVTransfer objects in one process delivers a message into the receive buffer only when the test
completes it, and any wait() fails the test (on NCCL wait() only orders streams). The same logic
with real gloo works: tests/kv_transfer_ranks.py's late-sender case (test_reshard)."""
from __future__ import annotations

from collections import deque

import pytest
import torch
import torch.distributed as dist

from contracts.model_shape import ModelShape
from contracts.plan import InstancePlan, Plan
from engine.kv_cache import KVCache
from engine.kv_transfer import KVTransfer
from engine.p2p_ops import Completions, PostedOp

SHAPE = ModelShape(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8,
                   vocab_size=64, rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False,
                   max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,))


class LateWork:
    """Completes only when the wire says so; wait() is a bug (NCCL: not completion)."""

    def __init__(self):
        self.completed = False

    def is_completed(self) -> bool:
        return self.completed

    def wait(self):
        raise AssertionError("wait() called on a KV work: on NCCL it does not mean the data landed")


class Wire:
    """isend/irecv matched in posting order per (sender, receiver), as NCCL matches them; a pair's
    message completes (its data lands in the receive buffer) only at deliver(). `rank` is the rank
    posting now."""

    def __init__(self):
        self.rank, self.sends, self.recvs = 0, {}, {}

    def isend(self, tensor, dst, group=None, tag=0):
        work = LateWork()
        self.sends.setdefault((self.rank, dst), deque()).append((tensor.clone(), work))
        return work

    def irecv(self, tensor, src, group=None, tag=0):
        work = LateWork()
        self.recvs.setdefault((src, self.rank), deque()).append((tensor, work))
        return work

    def deliver(self, pair: tuple[int, int], n: int) -> None:
        for _ in range(n):
            (data, send_work), (buf, recv_work) = self.sends[pair].popleft(), self.recvs[pair].popleft()
            buf.copy_(data)
            send_work.completed = recv_work.completed = True


class Ctx:
    def __init__(self, rank: int, plan: Plan, instance: InstancePlan):
        self.rank, self.plan, self.instance = rank, plan, instance


@pytest.fixture(autouse=True)
def gloo_world(tp_group):
    """The one-rank gloo world of conftest's tp_group: real gloo works need a process group."""


def test_completions_run_callbacks_in_order_once_completed():
    works, seen = [LateWork() for _ in range(3)], []
    pending = Completions([PostedOp(w, lambda i=i: seen.append(i)) for i, w in enumerate(works)])
    assert not pending.advance() and seen == []
    works[1].completed = True  # out of order: nothing runs until the first completes
    assert not pending.advance() and seen == []
    works[0].completed = True
    assert not pending.advance() and seen == [0, 1]
    works[2].completed = True
    assert pending.advance() and seen == [0, 1, 2]
    assert pending.advance() and seen == [0, 1, 2]


def test_arrival_and_buffer_reuse_wait_for_completion(monkeypatch):
    """TP1 prefill -> TP2 decode (the prefill rank stages: gathers into a pooled buffer): the
    decode rank reports the request only once every receive completed, with its values in the
    blocks; the prefill rank's release returns at once and its buffer reaches the pool only when
    its last send completed."""
    wire = Wire()
    monkeypatch.setattr(dist, "isend", wire.isend)
    monkeypatch.setattr(dist, "irecv", wire.irecv)
    p, d = InstancePlan(0, "prefill", 1, 1, first_rank=0), InstancePlan(1, "decode", 2, 1, first_rank=1)
    plan = Plan([p, d])
    caches = {0: KVCache(2, 8, 4, 2, 8, torch.float32, torch.device("cpu"))}
    caches.update({r: KVCache(2, 8, 4, 1, 8, torch.float32, torch.device("cpu")) for r in (1, 2)})
    sender = KVTransfer(Ctx(0, plan, p), caches[0], SHAPE, 0, 0)
    receivers = {r: KVTransfer(Ctx(r, plan, d), caches[r], SHAPE, 0, r - 1) for r in (1, 2)}
    for kv in (sender, *receivers.values()):
        kv.driven = False  # NCCL's way: nothing waits
    caches[0].kv.copy_(torch.arange(caches[0].kv.numel(), dtype=torch.float32).view_as(caches[0].kv))
    for r, receiver in receivers.items():
        caches[r].kv.fill_(-1)
        wire.rank = r
        receiver.post_recvs(5, [3, 4], 6, p.id, (0, 1))
    wire.rank = 0
    sender.post_sends(5, [0, 1], 6, d.id, (3, 4))
    assert all(kv.newly_arrived() == [] for kv in receivers.values())
    wire.deliver((0, 2), len(wire.sends[(0, 2)]))
    messages = len(wire.sends[(0, 1)])
    assert messages >= 2
    wire.deliver((0, 1), messages - 1)  # all but rank 1's last message landed
    assert receivers[1].newly_arrived() == [] and receivers[2].newly_arrived() == [5]
    sender.release(5)
    assert sender.pool.free == [] and len(sender.pool.lent) == 2  # one per pair; a send to rank 1 is on the wire
    wire.deliver((0, 1), 1)
    assert receivers[1].newly_arrived() == [5]
    for r in (1, 2):  # K|V of this rank's head, both blocks
        assert torch.equal(caches[r].kv[3:5], caches[0].kv[0:2, :, :, :, r - 1:r])
        receivers[r].join(5)
    assert sender.newly_arrived() == [] and len(sender.pool.free) == 2 and not sender.pool.lent
