"""The leader's scheduler, without processes: budgets, backpressure, pull-on-room, finishing."""
from __future__ import annotations

from contracts.protocol import (CONTROLLER, FirstToken, KVIncoming, KVPull, PrefillDone, Pulled, Request, Result,
                                Timings, TokensOut)
from contracts.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import InstanceLimits

LEADERS = tuple(100 + i for i in range(16))  # instance i's leader is rank 100 + i


def sched(role, blocks=64, budget=32, max_batch=8, size=1, decode=None, policy="prefill_first", depth=1):
    return Scheduler(role, 0, size, InstanceLimits(blocks, 4, budget, max_batch, 128, depth, policy), (2,), decode,
                     leaders=LEADERS)


def req(i, n, max_tokens=4, decode_instance=-1, **sampling):
    return Request(i, tuple(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling), 0.0,
                   decode_instance)


def announce(s, r, first_token=7):
    """What a prefill instance (id 0) tells a decode instance: its prefill started, then its first token."""
    s.add_incoming(KVIncoming(r, 0))
    s.add_first_token(FirstToken(r.req_id, 0, first_token, Timings(first_token=0.0)))


def sent(messages, kind, to=None):
    """The messages of one kind (to one rank: CONTROLLER, or LEADERS[instance]) among a
    scheduler's outgoing messages."""
    return [o.msg for o in messages if isinstance(o.msg, kind) and (to is None or o.dest == to)]


def finished(messages):
    return sent(messages, Result, CONTROLLER)


def test_prefill_batches_fcfs_under_token_budget():
    s = sched("prefill", budget=32)
    for i, n in enumerate([10, 15, 10, 40]):
        s.add_request(req(i, n))
    step = s.schedule().step
    assert [c.req_id for c in step.seqs] == [0, 1]           # 25 tokens; +10 would pass 32
    s.on_step([7, 7])
    step = s.schedule().step                                 # 40 > L_m: it runs in chunks, the first fills the step
    assert [(c.req_id, c.start_pos, len(c.token_ids)) for c in step.seqs] == [(2, 0, 10), (3, 0, 22)]
    assert not sent(s.on_step([7, 8]), PrefillDone, CONTROLLER)[1:]  # only 2's: 3's token is dropped
    step = s.schedule().step
    assert [(c.req_id, c.start_pos, len(c.token_ids)) for c in step.seqs] == [(3, 22, 18)]
    assert [d.req_id for d in sent(s.on_step([9]), PrefillDone, CONTROLLER)] == [3]


def test_prefill_instance_chunks_a_prompt_longer_than_its_budget_at_the_budget():
    s = sched("prefill", budget=16, blocks=64)
    s.add_request(req(0, 40, decode_instance=5))
    s.add_request(req(1, 12, decode_instance=5))
    first = s.schedule()
    assert [(c.req_id, c.start_pos, len(c.token_ids)) for c in first.step.seqs] == [(0, 0, 16)]
    assert [m.request.req_id for m in sent(first.messages, KVIncoming, LEADERS[5])] == [0]  # announced at its first chunk
    assert not s.on_step([1])                                # no first token yet
    lens = []
    for _ in range(3):
        step = s.schedule().step
        lens.append([(c.req_id, c.start_pos, len(c.token_ids)) for c in step.seqs])
        assert sum(len(c.token_ids) for c in step.seqs) <= 16
        s.on_step([7] * len(step.seqs))
    # 12 does not fit beside the last 8 tokens of 0: prompts under L_m stay whole
    assert lens == [[(0, 16, 16)], [(0, 32, 8)], [(1, 0, 12)]]
    assert s.sender.held == {0, 1} and s.sender.seqs[0].output == [7]


def test_prefill_backpressure_when_hold_area_full():
    s = sched("prefill", blocks=6, budget=100)
    for i in range(3):
        s.add_request(req(i, 8))                             # 2 blocks each
    step = s.schedule().step
    assert len(step.seqs) == 3
    ready = sent(s.on_step([7, 7, 7]), FirstToken)
    assert len(ready) == 3 and s.blocks.num_free == 0
    s.add_request(req(3, 8))
    step = s.schedule().step
    assert not step.seqs and not step.kv_sends               # held KV blocks everything new; nothing pulled yet
    for r in (2, 0, 1):
        s.add_pull(KVPull(r, 5))
    step = s.schedule().step
    assert [(k.req_id, k.num_tokens, k.peer_instance) for k in step.kv_sends] == [(2, 8, 5), (0, 8, 5), (1, 8, 5)]
    s.pulled(0)
    step = s.schedule().step
    assert [c.req_id for c in step.seqs] == [3] and step.kv_releases == (0,)


def test_decode_pulls_only_when_it_has_room():
    s = sched("decode", blocks=6, max_batch=8, size=2)      # 8 prompt + 4 new = 3 blocks: room for 2
    for i in range(10):
        announce(s, req(i, 8))
    done, max_used = [], 0
    for _ in range(200):
        step = s.schedule().step
        max_used = max(max_used, s.blocks.num_used)
        assert len(s.running) + len(s.receiver.pulling) <= 2
        for r in (k.req_id for k in step.kv_recvs):
            s.rank_arrived(r)
            s.rank_arrived(r)                                # both ranks of the instance
        if step.seqs:
            done += [f.req_id for f in finished(s.on_step([9] * len(step.seqs)))]
        if len(done) == 10:
            break
    assert sorted(done) == list(range(10)) and max_used <= 6


def test_join_waits_for_every_rank():
    s = sched("decode", size=2)
    announce(s, req(0, 8))
    step = s.schedule().step
    assert [(k.req_id, k.num_tokens, k.peer_instance) for k in step.kv_recvs] == [(0, 8, 0)]
    s.rank_arrived(0)
    step = s.schedule().step
    assert not step.kv_joins and not step.seqs
    s.rank_arrived(0)
    out = s.schedule()
    assert out.step.kv_joins == (0,) and out.step.seqs[0].start_pos == 8
    assert sent(out.messages, Pulled, LEADERS[0])[0].req_id == 0  # the prefill instance frees its copy


def test_prefill_announces_requests_that_may_decode_and_transfers_them_even_after_eos():
    s = sched("prefill", budget=256)
    s.add_request(Request(0, (5, 6, 7), SamplingParams(max_tokens=4), 0.0, 1))
    s.add_request(Request(1, (5, 6), SamplingParams(max_tokens=1), 0.0, 1))     # done at its first token
    s.add_request(Request(2, (5,) * 127, SamplingParams(max_tokens=4), 0.0, 1))  # reaches max_model_len
    s.add_request(Request(3, (5, 6), SamplingParams(max_tokens=4), 0.0, 1))
    out = s.schedule()
    assert [m.request.req_id for m in sent(out.messages, KVIncoming, LEADERS[1])] == [0, 3]
    messages = s.on_step([9, 9, 9, 2])                                      # request 3 samples EOS
    assert [m.req_id for m in sent(messages, FirstToken, LEADERS[1])] == [0, 3]  # its receiver is waiting
    assert [m.req_id for m in sent(messages, PrefillDone, CONTROLLER)] == [0, 3]
    assert sorted((f.req_id, f.finish_reason) for f in finished(messages)) == [(1, "length"), (2, "length")]
    s.add_pull(KVPull(0, 1))
    s.add_pull(KVPull(3, 1))
    step = s.schedule().step
    assert [k.req_id for k in step.kv_sends] == [0, 3]


def test_decode_pulls_before_the_first_token_and_joins_after_it():
    s = sched("decode", budget=64)
    r0, r1 = (Request(i, (5, 6, 7), SamplingParams(max_tokens=4), 0.0, 0) for i in range(2))
    s.add_first_token(FirstToken(1, 0, 2, Timings(first_token=1.0)))           # overtook its announcement
    s.add_incoming(KVIncoming(r0, 0))
    s.add_incoming(KVIncoming(r1, 0))
    out = s.schedule()
    assert [k.req_id for k in out.step.kv_recvs] == [0, 1] and not out.step.kv_joins  # posted during prefill
    assert [m.req_id for m in sent(out.messages, KVPull, LEADERS[0])] == [0, 1]  # the sends follow this order
    s.rank_arrived(0)
    s.rank_arrived(1)
    out = s.schedule()
    assert [(f.req_id, f.finish_reason) for f in finished(out.messages)] == [(1, "stop")]  # EOS first: no step
    assert out.step.kv_joins == (1,) and not out.step.seqs                  # request 0: no first token yet
    s.add_first_token(FirstToken(0, 0, 9, Timings(first_token=1.0)))
    out = s.schedule()
    assert out.step.kv_joins == (0,) and [(c.req_id, c.token_ids, c.start_pos) for c in out.step.seqs] == [(0, (9,), 3)]
    for _ in range(2):                                                      # second and third token
        s.on_step([9])
        s.schedule()
    result = finished(s.on_step([9]))[0]                                    # fourth token: max_tokens
    assert result.token_times[0] == 1.0 and result.times.pull_start is not None and result.output == (9, 9, 9, 9)


def test_colocated_prefers_prefill_and_finishes_on_length_and_eos():
    s = sched("colocated", budget=64)
    s.add_request(Request(0, (5, 6, 7), SamplingParams(max_tokens=3), 0.0))
    step = s.schedule().step
    assert step.seqs[0].token_ids == (5, 6, 7)
    s.on_step([9])
    s.add_request(Request(1, (5, 6), SamplingParams(max_tokens=5), 0.0))
    step = s.schedule().step
    assert [c.req_id for c in step.seqs] == [1]              # the new prompt goes first
    done = finished(s.on_step([2]))                          # request 1 hits EOS at once
    assert [(f.req_id, f.finish_reason) for f in done] == [(1, "stop")]
    step = s.schedule().step
    assert [(c.req_id, c.start_pos) for c in step.seqs] == [(0, 3)]
    assert not s.on_step([9])
    s.schedule()
    done = finished(s.on_step([9]))                          # third token: max_tokens reached
    assert [(f.req_id, f.finish_reason, f.output) for f in done] == [(0, "length", (9, 9, 9))]
    assert s.blocks.num_free == 64 and not s.busy()


def shape(step):
    return [(c.req_id, c.start_pos, len(c.token_ids)) for c in step.seqs]


def test_chunked_colocated_steps_carry_decodes_first_then_prompt_chunks_under_the_budget():
    s = sched("colocated", budget=16, policy="chunked")
    s.add_request(req(0, 6, max_tokens=3))
    s.add_request(req(1, 30, max_tokens=2))
    s.add_request(req(2, 4, max_tokens=2))
    assert shape(s.schedule().step) == [(0, 0, 6), (1, 0, 10)]          # FCFS; 1 split at the budget
    out = s.on_step([7, 8])
    assert [d.req_id for d in sent(out, PrefillDone)] == [0]       # 1's chunk token is dropped
    assert shape(s.schedule().step) == [(0, 6, 1), (1, 10, 15)]         # decode first, it counts against 16
    s.on_step([7, 8])
    assert shape(s.schedule().step) == [(0, 7, 1), (1, 25, 5), (2, 0, 4)]
    out = s.on_step([7, 9, 9])
    assert [r.req_id for r in finished(out)] == [0] and finished(out)[0].output == (7, 7, 7)
    assert {d.req_id for d in sent(out, PrefillDone)} == {1, 2}
    assert shape(s.schedule().step) == [(1, 30, 1), (2, 4, 1)]
    assert sorted(r.req_id for r in finished(s.on_step([5, 5]))) == [1, 2]
    assert not s.busy() and s.blocks.num_used == 0


def test_chunked_colocated_admits_by_batch_room_and_pipelines_a_prompts_chunks():
    s = sched("colocated", budget=8, max_batch=2, policy="chunked", depth=2)
    for i in range(3):
        s.add_request(req(i, 12, max_tokens=2))
    assert shape(s.schedule().step) == [(0, 0, 8)]
    assert shape(s.schedule().step) == [(0, 8, 4), (1, 0, 4)]          # its next chunk while the first is in flight
    assert shape(s.schedule().step) == [(1, 4, 8)]                     # 2 waits: 0 and 1 fill the batch
    assert not s.on_step([5])
    assert [d.req_id for d in sent(s.on_step([7, 5]), PrefillDone)] == [0]
    assert [d.req_id for d in sent(s.on_step([7]), PrefillDone)] == [1]
    assert shape(s.schedule().step) == [(0, 12, 1)]                    # decode groups take turns (depth 2)
    assert shape(s.schedule().step) == [(1, 12, 1)]
    assert [r.req_id for r in finished(s.on_step([7]))] == [0]
    assert shape(s.schedule().step) == [(2, 0, 8)]                     # room again; 1 is still in flight


def test_micro_batches_split_evenly_and_keep_order():
    from contracts.protocol import SeqChunk
    from engine.runner import micro_batches

    seqs = [SeqChunk(i, (1,) * n, 0, (), SamplingParams(), 0) for i, n in enumerate([10, 10, 10, 10, 1, 1])]
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
    s = sched("prefill", budget=32)
    for i in range(4):
        s.add_request(req(i, 8, decode_instance=10 + i % 2))
    step = s.schedule().step
    assert [c.req_id for c in step.seqs] == [0, 1, 2, 3]
    s.add_request(req(4, 8, decode_instance=11))
    s.add_pull(KVPull(3, 11))                                # pulled before its prefill ended
    s.on_step([7, 7, 7, 7])                                  # 0-3 hold their KV
    step = s.schedule().step                                 # 4 prefills now (and is announced)
    assert [c.req_id for c in step.seqs] == [4] and [(k.req_id, k.peer_instance) for k in step.kv_sends] == [(3, 11)]
    s.add_pull(KVPull(4, 11))                                # pulled before its prefill ended
    s.add_pull(KVPull(1, 11))
    s.add_pull(KVPull(2, 10))
    step = s.schedule().step
    assert [(k.req_id, k.peer_instance) for k in step.kv_sends] == [(2, 10)]  # 1 waits behind 4
    s.on_step([7])
    s.add_pull(KVPull(0, 10))
    step = s.schedule().step
    assert [(k.req_id, k.peer_instance) for k in step.kv_sends] == [(4, 11), (1, 11), (0, 10)]


def byte_decode(ids):
    """A byte-level tokenizer: one token per UTF-8 byte, so a character may take several tokens."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_stop_strings_are_decided_on_the_leader_and_cut_the_text_once():
    s = sched("colocated", budget=64, decode=byte_decode)
    text = "héllo wörld. more"
    s.add_request(req(0, 3, max_tokens=40, stop=("ld.", "zzz")))
    s.schedule()
    messages = []
    for b in text.encode():
        messages = s.on_step([b])
        if finished(messages):
            break
        s.schedule()
    (result,) = finished(messages)
    assert result.finish_reason == "stop" and result.text == "héllo wör"  # the stop string spans three tokens
    assert bytes(result.output).decode() == "héllo wörld."              # the tokens stay as sampled
    assert s.blocks.num_free == 64 and not s.busy()


def test_incremental_text_matches_a_full_decode_with_split_characters():
    from engine.stops import TextState, advance, stop_cut

    state, output = TextState(), []
    for b in "añb€c日本".encode():
        output.append(b)
        advance(state, output, byte_decode)
        assert "\ufffd" not in state.text
    assert state.text == byte_decode(output)
    state, output = TextState(), []
    cuts = []
    for b in "ab€STOPcd".encode():
        output.append(b)
        cuts.append(stop_cut(state, output, ("€ST", "cd"), byte_decode))
    assert [c for c in cuts if c is not None][0] == "ab"               # the earliest stop string wins


def test_abort_frees_a_colocated_request_wherever_it_is():
    s = sched("colocated", blocks=64, budget=64)
    for i in range(3):
        s.add_request(req(i, 8, max_tokens=10))
    s.schedule()                                             # 0-2 in one prefill step
    s.add_request(req(3, 8, max_tokens=10))
    (result,) = finished(s.abort(3))                         # still queued: gone at once
    assert result.finish_reason == "abort" and result.output == ()
    assert not finished(s.abort(0))                          # its step is in flight: ends when it returns
    messages = s.on_step([7, 7, 7])
    assert [(r.req_id, r.finish_reason) for r in finished(messages)] == [(0, "abort")]
    s.abort(1)                                               # decoding, no step in flight: leaves before the next
    out = s.schedule()
    assert [(r.req_id, r.finish_reason) for r in finished(out.messages)] == [(1, "abort")]
    assert [c.req_id for c in out.step.seqs] == [2]
    s.on_step([7])
    assert s.blocks.num_used == s.running[0].reserved_blocks(s.max_model_len, s.block_size) and not s.aborted


def test_abort_on_the_prefill_side_only_ends_requests_not_started():
    s = sched("prefill", budget=8)
    s.add_request(req(0, 8, max_tokens=4, decode_instance=1))
    s.add_request(req(1, 8, max_tokens=4, decode_instance=1))
    s.schedule()                                             # 0 prefills (announced to decode instance 1)
    assert not s.abort(0)                                    # started: its decode instance ends it
    (result,) = finished(s.abort(1))
    assert result.req_id == 1 and result.finish_reason == "abort"
    messages = s.on_step([7])
    assert sent(messages, FirstToken, LEADERS[1]) and not finished(messages)  # its KV is held for the pull
    s.pulled(0)                                              # the decode side dropped it: the hold area frees
    assert s.blocks.num_used == 0 and s.schedule().step.kv_releases == (0,)


def test_abort_on_the_decode_side_drops_or_finishes_without_a_step():
    s = sched("decode", blocks=4, budget=64)
    r0, r1, r2 = (req(i, 8, max_tokens=8, decode_instance=0) for i in range(3))
    announce(s, r0)
    s.schedule()                                             # 0 pulls (3 of 4 blocks)
    announce(s, r1)                                          # waits for room
    messages = s.abort(1)
    assert sent(messages, Pulled, LEADERS[0])[0].req_id == 1      # the prefill side frees its copy, no transfer
    assert [(r.req_id, r.finish_reason) for r in finished(messages)] == [(1, "abort")]
    assert not s.receiver.waiting and 1 not in s.receiver.firsts
    assert not s.abort(2)                                    # not announced yet: remembered
    messages = s.add_incoming(KVIncoming(r2, 0))
    assert [r.req_id for r in finished(messages)] == [2] and sent(messages, Pulled, LEADERS[0])
    s.add_first_token(FirstToken(2, 0, 7, Timings(first_token=0.0)))  # its first token still comes: ignored
    assert not s.receiver.firsts and set(s.receiver.stages) == {0}  # 2 is forgotten
    s.abort(0)                                               # receives posted: the transfer completes, then it ends
    s.rank_arrived(0)
    out = s.schedule()
    assert [(r.req_id, r.finish_reason) for r in finished(out.messages)] == [(0, "abort")]
    assert out.step.kv_joins == (0,) and not out.step.seqs and s.blocks.num_used == 0 and not s.busy()


def test_streamed_requests_report_each_token_with_its_index():
    s = sched("colocated", budget=64)
    s.add_request(Request(0, (5, 6), SamplingParams(max_tokens=3, ignore_eos=True), 0.0, stream=True))
    s.add_request(req(1, 2, max_tokens=3))
    s.schedule()
    messages = s.on_step([7, 8])
    (out,) = sent(messages, TokensOut, CONTROLLER)
    assert out.tokens == ((0, 0, 7),)                        # only the streamed request
    assert [m.req_id for m in sent(messages, PrefillDone, CONTROLLER)] == [0, 1]
    s.schedule()
    (out,) = sent(s.on_step([9, 9]), TokensOut)
    assert out.tokens == ((0, 1, 9),)


def test_each_side_of_a_transfer_gets_the_other_sides_block_table():
    """The prefill side's blocks ride on the announcement, the decode side's on the pull, so both
    sides' KV posts carry the peer's table (engine.kv_transfer cuts its messages at either's breaks)."""
    p, d = sched("prefill", blocks=16), Scheduler("decode", 5, 1, InstanceLimits(16, 4, 32, 8, 128), (2,),
                                                 leaders=LEADERS)
    p.add_request(req(0, 8, decode_instance=5))
    out = p.schedule()
    incoming = sent(out.messages, KVIncoming, LEADERS[5])[0]
    assert incoming.blocks == out.step.seqs[0].block_table
    [first] = sent(p.on_step([7]), FirstToken, LEADERS[5])
    d.add_incoming(incoming)
    d.add_first_token(first)
    out = d.schedule()
    [recv] = out.step.kv_recvs
    [pull] = sent(out.messages, KVPull, LEADERS[0])
    assert recv.peer_blocks == incoming.blocks and pull.blocks == recv.block_table
    p.add_pull(pull)
    [send] = p.schedule().step.kv_sends
    assert send.peer_blocks == recv.block_table and recv.peer_blocks == send.block_table


def test_the_simulator_takes_prompt_chunks_as_the_engines_scheduler_does():
    """Prefill instance (L_m 24) and chunked colocated (step budget 24, decodes disregarded here):
    the same prompts give the same (request, start, tokens) steps in engine and simulator."""
    import random

    from launcher.planner.sim_steps import prompt_queue
    from launcher.planner.workload import SimRequest

    rng = random.Random(7)
    lens = [rng.randrange(1, 80) for _ in range(30)]
    for role, policy in (("prefill", "prefill_first"), ("colocated", "chunked")):
        s = sched(role, blocks=10 ** 4, budget=24, max_batch=100, policy=policy)
        prompts, reqs = prompt_queue(), [SimRequest(0.0, n, 2) for n in lens]
        for i, n in enumerate(lens):
            s.add_request(req(i, n))
            prompts.add(reqs[i])
        splits = (lambda n: n > 24) if role == "prefill" else (lambda n: True)
        index = {id(r): i for i, r in enumerate(reqs)}  # by identity: equal lengths make equal requests
        engine, simulated = [], []
        while s.prompts:
            step = s.schedule().step
            engine.append(shape(step))
            s.in_flight.clear()
            simulated.append([(index[id(r)], start, n) for r, start, n in prompts.take(24, splits, lambda r, k: True)])
        assert engine == simulated and not prompts
