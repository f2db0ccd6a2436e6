"""Prefix caching without processes: block names, sharing, eviction, and what the scheduler runs."""
from __future__ import annotations

import json

import pytest

from contracts.protocol import CONTROLLER, FirstToken, KVPull, Request, Result, Timings
from contracts.sampling_params import SamplingParams
from engine.prefix_cache import PrefixCache, block_hashes
from engine.scheduler import Scheduler
from engine.sequence import InstanceLimits

BS = 4  # block size


def sched(role="prefill", blocks=64, budget=64, caching=True, policy="prefill_first"):
    return Scheduler(role, 0, 1, InstanceLimits(blocks, BS, budget, 8, 256, 1, policy, caching), (2,),
                     leaders=tuple(range(1, 9)))


def req(i, prompt, max_tokens=4, decode_instance=5):
    return Request(i, tuple(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0, decode_instance)


def chunks(step):
    return [(c.req_id, c.start_pos, len(c.token_ids)) for c in step.seqs]


SYSTEM = list(range(100, 112))  # three full blocks


def test_a_block_is_named_by_its_tokens_and_everything_before_it():
    a = block_hashes(SYSTEM + [1, 2, 3, 4, 5], BS)
    b = block_hashes(SYSTEM + [9, 9, 9, 9], BS)
    c = block_hashes([0] + SYSTEM[1:] + [1, 2, 3, 4], BS)
    assert len(a) == 4 and len(b) == 4                    # the partial fifth block of a has no name
    assert a[:3] == b[:3] and a[3] != b[3]
    assert all(x != y for x, y in zip(a, c))              # one earlier token renames every later block


def test_shared_blocks_are_counted_and_unreferenced_ones_stay_cached_until_evicted():
    cache = PrefixCache(6, BS)
    names = block_hashes(SYSTEM + [1], BS)
    first, hits = cache.admit(names, 13, 4)
    assert hits == 0
    cache.register(first, names)
    second, hits = cache.admit(names, 13, 4)
    assert hits == 3 and second[:3] == first[:3] and second[3] not in first
    assert cache.num_free == 1 and cache.counts() == {"prefix_query_tokens": 26, "prefix_hit_tokens": 12,
                                                    "kv_cached": 0}
    cache.free(first)
    assert cache.num_free == 2                             # its own last block only: the prefix is still read
    cache.free(second)
    assert cache.num_free == 6 and cache.cached_prefix(names, 13) == first[:3]  # free room, still cached
    assert cache.counts()["kv_cached"] == 3 and cache.num_used == 0
    fresh = cache.allocate(5)                              # needs two cached blocks: the prefix's last ones go first
    assert cache.cached_prefix(names, 13) == first[:1] and first[0] not in fresh


def test_a_hit_that_needs_cached_room_is_refused_whole():
    cache = PrefixCache(4, BS)
    names = block_hashes(SYSTEM + [1], BS)
    blocks, _ = cache.admit(names, 13, 4)
    cache.register(blocks, names)
    cache.free(blocks)
    assert cache.admit(block_hashes(SYSTEM + [1, 2, 3, 4, 5], BS), 17, 5) is None  # 3 shared + 2 fresh > 4
    assert cache.num_free == 4 and cache.cached_prefix(names, 13) == blocks[:3]     # nothing taken


def test_a_prefill_instance_runs_only_the_uncached_tail_and_shares_the_prefix_blocks():
    s = sched()
    s.add_request(req(0, SYSTEM + [1, 2, 3]))
    s.add_request(req(1, SYSTEM + [7, 8]))                 # the same three blocks, another tail
    s.add_request(req(2, SYSTEM[:6] + [5, 5, 5, 5]))       # shares one block and half of the next
    s.add_request(req(3, SYSTEM))                          # all of it: its last block still runs
    s.add_request(req(4, [50, 51, 52, 53, 54]))            # nothing
    step = s.schedule().step
    assert chunks(step) == [(0, 0, 15), (1, 12, 2), (2, 4, 6), (3, 8, 4), (4, 0, 5)]
    tables = {c.req_id: c.block_table for c in step.seqs}
    assert tables[1][:3] == tables[0][:3] and tables[2][:1] == tables[0][:1] and tables[3][:2] == tables[0][:2]
    assert tables[3][2] != tables[0][2]                    # the block its last token is written to is its own
    firsts = [o.msg for o in s.on_step([7] * 5) if isinstance(o.msg, FirstToken)]
    assert [f.cached_tokens for f in firsts] == [0, 12, 4, 8, 0]
    assert s.state().prefix_hit_tokens == 24 and s.state().prefix_query_tokens == 15 + 14 + 10 + 12 + 5


def test_off_runs_every_prompt_whole_as_before():
    s = sched(caching=False)
    s.add_request(req(0, SYSTEM + [1, 2, 3]))
    s.add_request(req(1, SYSTEM + [7, 8]))
    assert chunks(s.schedule().step) == [(0, 0, 15), (1, 0, 14)]
    assert s.state().prefix_query_tokens == 0


def test_a_full_hold_area_evicts_cached_prefixes_least_recently_used_first():
    s = sched(blocks=8)
    prompts = {i: [10 * i + j for j in range(13)] for i in range(4)}  # four prefixes of 3 blocks, 4 blocks each
    for i in range(2):
        s.add_request(req(i, prompts[i]))
    s.schedule()
    s.on_step([7, 7])
    for i in range(2):
        s.add_pull(KVPull(i, 5))
    s.schedule()
    for i in range(2):
        s.pulled(i)
    assert s.blocks.num_free == 8                       # all cached, all free room
    s.add_request(req(2, prompts[2]))                      # takes 4: evicts the cached blocks not used longest
    s.add_request(req(3, prompts[1]))                      # prompt 1 again: still cached
    step = s.schedule().step
    assert chunks(step) == [(2, 0, 13), (3, 12, 1)]
    s.on_step([7, 7])
    s.add_request(req(4, prompts[0]))                      # prompt 0's blocks were evicted: it runs whole
    s.add_pull(KVPull(2, 5))
    s.add_pull(KVPull(3, 5))
    s.schedule()
    s.pulled(2)
    s.pulled(3)
    assert chunks(s.schedule().step) == [(4, 0, 13)]


def test_an_aborted_request_frees_only_its_own_blocks_of_a_shared_prefix():
    s = sched("colocated", blocks=16, policy="chunked", budget=64)
    s.add_request(req(0, SYSTEM + [1], max_tokens=8, decode_instance=-1))
    s.add_request(req(1, SYSTEM + [2], max_tokens=8, decode_instance=-1))
    step = s.schedule().step
    assert chunks(step) == [(0, 0, 13), (1, 12, 1)]
    s.on_step([7, 7])
    used = s.blocks.num_used                            # 13 + 8 tokens: 3 shared blocks + 3 own each
    assert used == 3 + 3 + 3
    assert not s.abort(1)                                  # in the batch: it leaves at its next step
    out = s.schedule()
    assert [o.msg.finish_reason for o in out.messages if isinstance(o.msg, Result)] == ["abort"]
    assert s.blocks.num_used == used - 3                # its own blocks; the prefix stays with request 0
    assert [c.req_id for c in out.step.seqs] == [0]
    assert all(o.dest == CONTROLLER for o in out.messages)


def test_dispatch_weighs_a_cached_prefix_against_the_queue_in_prompt_tokens():
    from engine.dispatch import CacheAwareDispatch

    d = CacheAwareDispatch({0: 64, 1: 64}, BS)
    load = {0: 0, 1: 0}
    shared = SYSTEM * 4                                    # 48 tokens, 12 blocks
    assert d.pick(shared + [1], load) == (0, 49)           # cold: equal costs, the lower id
    assert d.pick(shared + [2], load) == (1, 49)           # 49 queued + 1 at instance 0 > 0 + 49 at instance 1
    d.prefilled(0, 49)
    d.prefilled(1, 49)
    assert d.pick([5] * 20, load) == (0, 20)
    assert d.pick(shared + [3], load) == (1, 1)            # the prefix is at both: the shorter queue
    assert d.pick(shared + [4], load) == (1, 1)            # 1 + 1 at instance 1 < 20 + 1 at instance 0
    assert d.pick([6] * 100, load) == (1, 100)
    assert d.pick(shared + [5], load) == (0, 1)            # 20 + 1 < 102 + 1
    assert d.queued == {0: 21, 1: 102}


def test_dispatch_forgets_the_prefixes_an_instance_cannot_hold():
    from engine.dispatch import CacheAwareDispatch

    d = CacheAwareDispatch({0: 3, 1: 64}, BS)
    assert d.pick(SYSTEM + [1], {0: 0, 1: 0}) == (0, 13)
    d.prefilled(0, 13)
    assert d.pick([9] * 13, {0: 0, 1: 0}) == (0, 13)       # evicts SYSTEM's blocks from instance 0's record
    d.prefilled(0, 13)
    assert d.pick(SYSTEM + [2], {0: 0, 1: 0}) == (0, 13)   # no hit left anywhere
    d.prefilled(0, 13)
    d.finished(1, SYSTEM + [2, 3, 4, 5])                   # a colocated instance keeps a finished turn's blocks
    assert d.pick(SYSTEM + [2, 3, 4, 5, 6], {0: 0, 1: 0}) == (1, 1)


# ---- the planner's simulator ---------------------------------------------------------------------
def _toy_latency():
    from launcher.planner.latency import Coefficients, LatencyModel

    coef = Coefficients((10.0, 1.0, 0.001), (5.0, 0.0, 1.0), (5.0, 0.0, 1.0), 10 ** 6, 0.0)
    return LatencyModel("toy", {1: coef})


def test_the_simulator_charges_a_prefill_for_its_uncached_tail_only():
    from launcher.planner.simulator import InstanceSpec, Policy, Simulation
    from launcher.planner.workload import SimRequest

    lat = _toy_latency()
    policy = Policy(token_budget=1000)

    def ttft(cached):
        (r,) = Simulation(lat, policy, [InstanceSpec(1, 1, 10 ** 6)], [InstanceSpec(1, 1, 10 ** 6)]).run(
            [SimRequest(0.0, 600, 2, cached_len=cached)])
        return r.ttft

    assert ttft(0) == pytest.approx(lat.prefill_ms([600], 1))
    assert ttft(512) == pytest.approx(lat.prefill_ms([88], 1, starts=[512]))  # 10 + 88 + 0.001 * (600² - 512²)
    assert ttft(512) < ttft(0) / 4


def test_a_cold_cache_makes_the_first_sharer_on_each_instance_compute_the_prefix():
    """A job starts with empty caches: in a bench's replay (cold_cache) the first request of the
    prefix on an instance prefills all of it, later ones only their tails; cache-aware dispatch
    counts a cold instance's cost as the whole prompt, so sharers go where the prefix is."""
    from launcher.planner.simulator import InstanceSpec, Policy, Simulation
    from launcher.planner.workload import SimRequest

    lat = _toy_latency()

    def run(prefills: int, cold: bool, cache_aware: bool = True, apart_ms: float = 1e4) -> list[SimRequest]:
        sim = Simulation(lat, Policy(token_budget=1000, cache_aware=cache_aware),
                         [InstanceSpec(1, 1, 10 ** 6)] * prefills, [InstanceSpec(1, 1, 10 ** 6)], cold_cache=cold)
        return sim.run([SimRequest(t * apart_ms, 600, 2, cached_len=512) for t in range(4)])

    cold = run(1, True)
    assert [r.cached_len for r in cold] == [0, 512, 512, 512]
    assert cold[0].ttft == pytest.approx(lat.prefill_ms([600], 1)) and cold[1].ttft < cold[0].ttft / 4
    assert [r.cached_len for r in run(1, False)] == [512] * 4  # a measured trace holds its own misses
    assert {r.prefill_instance for r in run(2, True)} == {0}  # the warm instance wins while queues are equal
    spread = run(2, True, cache_aware=False, apart_ms=0.0)  # least outstanding: each instance misses once
    assert [(r.prefill_instance, r.cached_len) for r in spread] == [(0, 0), (1, 0), (0, 512), (1, 512)]


def test_a_workloads_shared_prefix_reaches_the_probes_and_the_capacity_bound():
    from launcher.planner.goodput import Settings, prefill_capacity
    from launcher.planner.simulator import InstanceSpec
    from launcher.planner.workload import LengthDist, SharedPrefix, make_requests

    lengths = LengthDist("fixed", 600, 8)
    prefix = SharedPrefix(520, 0.5, 16)
    reqs = make_requests(400, 1.0, lengths, prefix=prefix)
    assert {r.cached_len for r in reqs} == {0, 512} and 0.4 < sum(bool(r.cached_len) for r in reqs) / 400 < 0.6
    assert all(r.cached_len == 0 for r in make_requests(400, 1.0, lengths))
    lat, inst = _toy_latency(), InstanceSpec(1, 1, 10 ** 6)
    cached = Settings(1000.0, 100.0, lengths=lengths, token_budget=1000, prefix=prefix)
    assert cached.mean_prefill_tokens() == 600 - 0.5 * 512
    assert prefill_capacity(lat, cached, inst) > 1.5 * prefill_capacity(lat, Settings(1000.0, 100.0, lengths=lengths,
                                                                                        token_budget=1000), inst)


def test_simulate_replays_the_measured_hits_of_a_results_file(tmp_path):
    from contracts.errors import UserError
    from launcher.planner.replay import trace_requests

    path = tmp_path / "results.jsonl"
    lines = [{"usage": {"prompt_tokens": 600, "completion_tokens": 3}, "metrics": {"arrival": 5.0, "cached_tokens": 0}},
             {"usage": {"prompt_tokens": 600, "completion_tokens": 3}, "metrics": {"arrival": 5.1, "cached_tokens": 512}},
             {"usage": {"prompt_tokens": 20, "completion_tokens": 3}, "metrics": {"arrival": 5.2}}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [r.cached_len for r in trace_requests(str(path))] == [0, 512, 0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"start_time": 0, "prompt_len": 16, "output_len": 2, "cached_len": 16}]))
    with pytest.raises(UserError, match="cached_len 16 of prompt_len 16"):
        trace_requests(str(bad))


def test_a_decode_instance_that_holds_a_prefix_pulls_only_the_rest():
    from contracts.protocol import FirstToken, KVIncoming

    decode = sched("decode", blocks=32)                   # decode_prefix_reuse: its scheduler caches prefixes
    prefill = sched("prefill", blocks=32)
    first, second = req(0, SYSTEM + [1, 2], decode_instance=1), req(1, SYSTEM + [3], decode_instance=1)
    decode.add_incoming(KVIncoming(first, 0, (0, 1, 2, 3)))
    decode.add_first_token(FirstToken(0, 0, 7, Timings(first_token=0.0)))
    recv = decode.schedule().step.kv_recvs[0]
    assert (recv.num_tokens, recv.peer_blocks) == (14, (0, 1, 2, 3))
    decode.rank_arrived(0)
    assert decode.schedule().step.kv_joins == (0,)         # its prompt blocks are named once they landed
    decode.add_incoming(KVIncoming(second, 0, (0, 1, 2, 4)))
    out = decode.schedule()
    (recv,) = out.step.kv_recvs
    (pull,) = [o.msg for o in out.messages if isinstance(o.msg, KVPull)]
    assert (recv.block_table, recv.num_tokens, recv.peer_blocks) == (pull.blocks[3:], 1, (4,)) and pull.held_blocks == 3
    prefill.add_request(second)                            # the prefill side sends the blocks past those held
    prefill.schedule()
    prefill.on_step([7])
    prefill.add_pull(pull)
    (send,) = prefill.schedule().step.kv_sends
    assert (send.block_table, send.num_tokens, send.peer_blocks) == (tuple(prefill.sender.seqs[1].blocks[3:]), 1, pull.blocks[3:])


def test_the_simulator_dispatches_by_queued_uncached_tokens_as_the_controller_does():
    from launcher.planner.simulator import InstanceSpec, Policy, Simulation
    from launcher.planner.workload import SimRequest

    def instances(cache_aware):
        reqs = [SimRequest(0.0, 1000, 2), SimRequest(0.0, 10, 2), SimRequest(0.0, 600, 2, cached_len=592)]
        Simulation(_toy_latency(), Policy(token_budget=2000, cache_aware=cache_aware),
                   [InstanceSpec(1, 1, 10 ** 6)] * 2, [InstanceSpec(1, 1, 10 ** 6)]).run(reqs)
        return [r.prefill_instance for r in reqs]

    assert instances(False) == [0, 1, 0]                  # fewest outstanding requests, then the lower index
    assert instances(True) == [0, 1, 1]                   # 10 + 8 queued tokens at instance 1 < 1000 + 8 at 0


def test_hit_rates_reach_the_report_and_the_metrics():
    from types import SimpleNamespace

    from contracts.protocol import Heartbeat, SchedulerState
    from engine.progress import summarize
    from engine.serve_metrics import ServeMetrics

    slo = SimpleNamespace(ttft_ms=1000.0, tpot_ms=100.0, attainment=0.9)
    records = [{"token_ids": [1, 2], "usage": {"prompt_tokens": n, "completion_tokens": 2},
                "metrics": {"ttft_ms": 10.0, "tpot_ms": 5.0, "cached_tokens": c}} for n, c in ((100, 0), (100, 96))]
    instances = [{"instance": 0, "role": "prefill", "prefix_query_tokens": 200, "prefix_hit_tokens": 96},
                 {"instance": 1, "role": "decode"}]
    report = summarize(records, 1.0, slo, instances)
    assert report["cached_tokens"] == 96 and report["prefix_hit_rate"] == 0.48
    assert [i["prefix_hit_rate"] for i in report["instances"]] == [0.48, 0.0]
    metrics = ServeMetrics(slo, BS)
    metrics.instance(Heartbeat(0, 5, SchedulerState(prefix_query_tokens=200, prefix_hit_tokens=96, kv_cached=7)), "prefill")
    text = metrics.render().decode()
    assert 'pdlaunch_instance_prefix_cache_hit_rate{instance="0",role="prefill"} 0.48' in text
    assert 'pdlaunch_instance_kv_blocks_cached{instance="0",role="prefill"} 7.0' in text


def test_a_later_turn_finds_the_answer_of_the_earlier_one_cached_on_a_colocated_instance():
    s = sched("colocated", blocks=32, policy="chunked")
    s.add_request(req(0, SYSTEM + [1], max_tokens=6, decode_instance=-1))
    s.schedule()
    s.on_step([21])
    for token in (22, 23, 24, 25, 26):                     # the last one ends it (max_tokens): its KV is never written
        s.schedule()
        s.on_step([token])
    assert not s.running and s.blocks.num_used == 0
    answer = [21, 22, 23, 24, 25, 26]
    s.add_request(req(1, SYSTEM + [1] + answer + [9, 9], max_tokens=2, decode_instance=-1))
    (chunk,) = s.schedule().step.seqs
    assert chunk.start_pos == 16                          # 18 tokens had KV: 4 full blocks
