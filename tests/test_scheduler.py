"""The leader's scheduler, without processes: budgets, backpressure, pull-on-room, finishing."""
from __future__ import annotations

from engine.scheduler import KVIncoming, KVPull, ReadyNotice, Request, Scheduler
from engine.step import SamplingParams


def sched(role, blocks=64, budget=32, max_batch=8, size=1):
    return Scheduler(role, blocks, 4, budget, max_batch, 128, (2,), lambda s: False, size)


def req(i, n, max_tokens=4):
    return Request(i, list(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0)


def announce(s, r, first_token=7):
    """What a prefill instance (id 0) tells a decode instance: its prefill started, then its first token."""
    s.add_incoming(KVIncoming(r, 0))
    s.add_ready(ReadyNotice(r, 0, first_token, {"first_token": 0.0}))


def test_prefill_batches_fcfs_under_token_budget():
    s = sched("prefill", budget=32)
    for i, n in enumerate([10, 15, 10, 40]):
        s.add_request(req(i, n))
    step, _ = s.schedule()
    assert [c.req_id for c in step.seqs] == [0, 1]           # 25 tokens; +10 would pass 32
    s.on_step([7, 7], None)
    step, _ = s.schedule()
    assert [c.req_id for c in step.seqs] == [2]              # 10 + 40 > 32: FCFS, no skipping ahead
    s.on_step([7], None)
    step, _ = s.schedule()
    assert [c.req_id for c in step.seqs] == [3]              # alone it may exceed the budget


def test_prefill_backpressure_when_hold_area_full():
    s = sched("prefill", blocks=6, budget=100)
    for i in range(3):
        s.add_request(req(i, 8))                             # 2 blocks each
    step, _ = s.schedule()
    assert len(step.seqs) == 3
    ready, _ = s.on_step([7, 7, 7], None)
    assert len(ready) == 3 and s.allocator.num_free == 0
    s.add_request(req(3, 8))
    step, _ = s.schedule()
    assert not step.seqs and not step.kv_sends               # held KV blocks everything new; nothing pulled yet
    for r in (2, 0, 1):
        s.add_pull(KVPull(r, 5))
    step, _ = s.schedule()
    assert [(k.req_id, k.num_tokens, k.peer_instance) for k in step.kv_sends] == [(2, 8, 5), (0, 8, 5), (1, 8, 5)]
    s.pulled(0)
    step, _ = s.schedule()
    assert [c.req_id for c in step.seqs] == [3] and step.kv_releases == [0]


def test_decode_pulls_only_when_it_has_room():
    s = sched("decode", blocks=6, max_batch=8, size=2)      # 8 prompt + 4 new = 3 blocks: room for 2
    for i in range(10):
        announce(s, req(i, 8))
    done, max_used = [], 0
    for _ in range(200):
        step, joined = s.schedule()
        max_used = max(max_used, s.allocator.num_used)
        assert len(s.running) + len(s.pulling) <= 2
        for r in (k.req_id for k in step.kv_recvs):
            s.rank_arrived(r)
            s.rank_arrived(r)                                # both ranks of the instance
        if step.seqs:
            _, finished = s.on_step([9] * len(step.seqs), None)
            done += [f.req_id for f in finished]
        if len(done) == 10:
            break
    assert sorted(done) == list(range(10)) and max_used <= 6


def test_join_waits_for_every_rank():
    s = sched("decode", size=2)
    announce(s, req(0, 8))
    step, _ = s.schedule()
    assert [(k.req_id, k.num_tokens, k.peer_instance) for k in step.kv_recvs] == [(0, 8, 0)]
    s.rank_arrived(0)
    step, joined = s.schedule()
    assert not joined and not step.seqs
    s.rank_arrived(0)
    step, joined = s.schedule()
    assert step.kv_joins == [0] and step.seqs[0].start_pos == 8


def test_prefill_announces_requests_that_may_decode_and_transfers_them_even_after_eos():
    s = Scheduler("prefill", 64, 4, 256, 8, 128, (2,), lambda q: False, 1)
    s.add_request(Request(0, [5, 6, 7], SamplingParams(max_tokens=4), 0.0))
    s.add_request(Request(1, [5, 6], SamplingParams(max_tokens=1), 0.0))     # done at its first token
    s.add_request(Request(2, [5] * 127, SamplingParams(max_tokens=4), 0.0))  # reaches max_model_len
    s.add_request(Request(3, [5, 6], SamplingParams(max_tokens=4), 0.0))
    step, _ = s.schedule()
    assert [q.req_id for q in s.take_announcements()] == [0, 3] and not s.take_announcements()
    ready, finished = s.on_step([9, 9, 9, 2], None)                        # request 3 samples EOS
    assert [q.req_id for q in ready] == [0, 3]                              # its receiver is waiting
    assert sorted((f.req_id, f.finish_reason) for f in finished) == [(1, "length"), (2, "length")]
    s.add_pull(KVPull(0, 1))
    s.add_pull(KVPull(3, 1))
    step, _ = s.schedule()
    assert [k.req_id for k in step.kv_sends] == [0, 3]


def test_decode_pulls_before_the_first_token_and_joins_after_it():
    s = Scheduler("decode", 64, 4, 64, 8, 128, (2,), lambda q: False, 1)
    r0, r1 = (Request(i, [5, 6, 7], SamplingParams(max_tokens=4), 0.0) for i in range(2))
    s.add_ready(ReadyNotice(r1, 0, 2, {"first_token": 1.0}))                 # overtook its announcement
    s.add_incoming(KVIncoming(r0, 0))
    s.add_incoming(KVIncoming(r1, 0))
    step, joined = s.schedule()
    assert [k.req_id for k in step.kv_recvs] == [0, 1] and not joined      # receives posted during prefill
    s.rank_arrived(0)
    s.rank_arrived(1)
    step, joined = s.schedule()
    assert [q.req_id for q in joined] == [1] and joined[0].finish_reason == "stop"  # EOS first: no step
    assert step.kv_joins == [1] and not step.seqs                           # request 0: no first token yet
    s.add_ready(ReadyNotice(r0, 0, 9, {"first_token": 1.0}))
    step, joined = s.schedule()
    assert [q.req_id for q in joined] == [0] and [(c.req_id, c.token_ids, c.start_pos) for c in step.seqs] == [(0, [9], 3)]
    assert joined[0].token_times == [1.0] and "pull_start" in joined[0].times


def test_colocated_prefers_prefill_and_finishes_on_length_and_eos():
    s = Scheduler("colocated", 64, 4, 64, 8, 128, (2,), lambda q: False, 1)
    s.add_request(Request(0, [5, 6, 7], SamplingParams(max_tokens=3), 0.0))
    step, _ = s.schedule()
    assert step.seqs[0].token_ids == [5, 6, 7]
    s.on_step([9], None)
    s.add_request(Request(1, [5, 6], SamplingParams(max_tokens=5), 0.0))
    step, _ = s.schedule()
    assert [c.req_id for c in step.seqs] == [1]              # the new prompt goes first
    _, finished = s.on_step([2], None)                       # request 1 hits EOS at once
    assert [(f.req_id, f.finish_reason) for f in finished] == [(1, "stop")]
    step, _ = s.schedule()
    assert [(c.req_id, c.start_pos) for c in step.seqs] == [(0, 3)]
    _, finished = s.on_step([9], None)
    assert not finished
    s.schedule()
    _, finished = s.on_step([9], None)                       # third token: max_tokens reached
    assert [(f.req_id, f.finish_reason, f.output) for f in finished] == [(0, "length", [9, 9, 9])]
    assert s.allocator.num_free == 64 and not s.busy()


def test_micro_batches_split_evenly_and_keep_order():
    from engine.runner import micro_batches
    from engine.step import SeqChunk

    seqs = [SeqChunk(i, [1] * n, 0, [], SamplingParams(), 0) for i, n in enumerate([10, 10, 10, 10, 1, 1])]
    chunks = micro_batches(seqs, 2)
    assert [[s.req_id for s in c] for c in chunks] == [[0, 1, 2], [3, 4, 5]]
    assert [[s.req_id for s in c] for c in micro_batches(seqs[:2], 4)] == [[0], [1]]
    for pp in (1, 2, 3, 4):
        chunks = micro_batches(seqs, pp)
        assert len(chunks) == pp and all(chunks) and [s for c in chunks for s in c] == seqs


def test_block_allocator_keeps_requests_consecutive_and_never_hands_out_a_block_twice():
    import random

    from engine.blocks import BlockAllocator

    rng = random.Random(0)
    a = BlockAllocator(100)
    assert a.allocate(10) == list(range(10)) and a.allocate(5) == list(range(10, 15))
    a.free(list(range(0, 10)))
    assert a.allocate(4) == [0, 1, 2, 3]                     # the smallest run that fits: 0-9, not 15-99
    a.free([0, 1, 2, 3] + list(range(10, 15)))
    assert a.num_free == 100 and a.allocate(100) == list(range(100))  # freed runs merged back into one
    a.free(list(range(100)))
    held: list[list[int]] = []
    for _ in range(2000):
        if held and (rng.random() < 0.45 or not a.can_allocate(8)):
            a.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 8)
            runs = _free_runs(a, held)
            got = a.allocate(n)
            assert len(got) == n and not set(got) & {b for h in held for b in h}
            if max(runs, default=0) >= n:                    # a run fits: the blocks are consecutive
                assert got == list(range(got[0], got[0] + n))
            held.append(got)
        assert a.num_free == 100 - sum(map(len, held))


def _free_runs(a, held) -> list[int]:
    used = {b for h in held for b in h}
    runs, length = [], 0
    for b in range(a.num_blocks + 1):
        if b < a.num_blocks and b not in used:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def test_sends_follow_each_decode_instances_pull_order():
    """NCCL pairs sends and receives by order: the prefill side posts a request's sends in the
    order its decode instance pulled (posted receives), never in prefill order, and a pull that
    comes before its prefill ended holds back that instance's later pulls."""
    s = sched("prefill", budget=100)
    for i in range(4):
        r = req(i, 8)
        r.decode_instance = 10 + i % 2
        s.add_request(r)
    step, _ = s.schedule()
    assert [c.req_id for c in step.seqs] == [0, 1, 2, 3]
    s.add_request(req(4, 8))
    s.add_pull(KVPull(3, 11))
    s.add_pull(KVPull(4, 11))                                # pulled before its prefill even started
    s.add_pull(KVPull(1, 11))
    s.add_pull(KVPull(2, 10))
    s.on_step([7, 7, 7, 7], None)                            # 0-3 hold their KV
    step, _ = s.schedule()                                   # 4 prefills now
    assert [(k.req_id, k.peer_instance) for k in step.kv_sends] == [(3, 11), (2, 10)]  # 1 waits behind 4
    s.on_step([7], None)
    s.add_pull(KVPull(0, 10))
    step, _ = s.schedule()
    assert [(k.req_id, k.peer_instance) for k in step.kv_sends] == [(4, 11), (1, 11), (0, 10)]
