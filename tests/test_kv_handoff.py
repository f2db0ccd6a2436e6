"""The KV hand-off's state machine (engine/kv_handoff.py), through the schedulers of a prefill and
a decode instance that pass each other their messages: the legal path, an abort in each state,
and the messages the protocol does not allow."""
from __future__ import annotations

import pytest

from contracts.protocol import FirstToken, KVIncoming, KVPull, Pulled, Request, Result
from contracts.sampling_params import SamplingParams
from engine.kv_handoff import HandoffError, KVReceiver, KVSender, KVStage
from engine.scheduler import Scheduler
from engine.sequence import InstanceLimits, Sequence

PREFILL, DECODE = 0, 1


def pair(decode_ranks: int = 2) -> tuple[Scheduler, Scheduler]:
    limits = InstanceLimits(16, 4, 32, 8, 128)
    leaders = (10, 11)  # the instances' leaders' ranks
    return (Scheduler("prefill", PREFILL, 1, limits, leaders=leaders),
            Scheduler("decode", DECODE, decode_ranks, limits, leaders=leaders))


def of(messages, kind) -> list:
    return [o.msg for o in messages if isinstance(o.msg, kind)]


def started(p: Scheduler, d: Scheduler) -> FirstToken:
    """Request 0 prefilled (8 tokens, 4 more to decode) and announced: returns its first token."""
    p.add_request(Request(0, tuple(range(3, 11)), SamplingParams(max_tokens=4, ignore_eos=True), 0.0, DECODE))
    (incoming,) = of(p.schedule().messages, KVIncoming)
    d.add_incoming(incoming)
    (first,) = of(p.on_step([7]), FirstToken)
    return first


def pull(p: Scheduler, d: Scheduler) -> None:
    """The decode side posts its receives; the prefill side posts its sends."""
    (kv_pull,) = of(d.schedule().messages, KVPull)
    p.add_pull(kv_pull)
    assert [s.req_id for s in p.schedule().step.kv_sends] == [0]


def test_a_transfer_goes_announced_pulled_sent_joined_on_both_sides():
    p, d = pair()
    first = started(p, d)
    assert p.sender.stage(0) is d.receiver.stage(0) is KVStage.ANNOUNCED
    (kv_pull,) = of(d.schedule().messages, KVPull)
    assert d.receiver.stage(0) is KVStage.PULLED
    p.add_pull(kv_pull)
    assert p.sender.stage(0) is KVStage.PULLED
    p.schedule()
    assert p.sender.stage(0) is KVStage.SENT
    d.rank_arrived(0)
    assert d.receiver.stage(0) is KVStage.PULLED      # one of its two ranks
    d.rank_arrived(0)
    assert d.receiver.stage(0) is KVStage.SENT
    assert not d.schedule().step.kv_joins             # its first token is not there yet
    d.add_first_token(first)
    out = d.schedule()
    assert out.step.kv_joins == (0,) and d.receiver.stage(0) is None and [s.req_id for s in d.running] == [0]
    (pulled,) = of(out.messages, Pulled)
    p.pulled(pulled.req_id)
    assert p.sender.stage(0) is None and p.blocks.num_used == 0 and p.schedule().step.kv_releases == (0,)
    assert not p.busy()


@pytest.mark.parametrize("stage", [KVStage.ANNOUNCED, KVStage.PULLED, KVStage.SENT])
def test_an_abort_on_the_decode_side_frees_each_sides_blocks_once(stage):
    """Announced: dropped at once, no transfer. Pulled or sent: the transfer completes, the request
    ends at its join without a step. Either way both sides end with every block free."""
    p, d = pair()
    first = started(p, d)
    held = p.blocks.num_used
    if stage is not KVStage.ANNOUNCED:
        pull(p, d)
    if stage is KVStage.SENT:
        d.rank_arrived(0)
        d.rank_arrived(0)
    assert d.receiver.stage(0) is stage
    reserved = d.blocks.num_used
    messages = d.abort(0)
    if stage is KVStage.ANNOUNCED:
        assert d.receiver.stage(0) is KVStage.DROPPED and reserved == 0
        d.add_first_token(first)                       # still due: swallowed
        assert d.receiver.stage(0) is None and not d.busy()
    else:
        assert not messages and d.blocks.num_used == reserved > 0  # the posted receives still land here
        if stage is KVStage.PULLED:
            d.rank_arrived(0)
            d.rank_arrived(0)
        d.add_first_token(first)
        out = d.schedule()
        messages = out.messages
        assert out.step.kv_joins == (0,) and not out.step.seqs and d.blocks.num_used == 0
    assert [r.finish_reason for r in of(messages, Result)] == ["abort"]
    (pulled,) = of(messages, Pulled)
    assert p.blocks.num_used == held
    p.pulled(pulled.req_id)
    assert p.blocks.num_used == 0 and p.sender.stage(0) is None and not d.busy()


def test_messages_the_protocol_does_not_allow_are_named():
    sender, receiver = KVSender(4), KVReceiver(1, 4)
    seq = Sequence(Request(3, (5, 6), SamplingParams(), 0.0, DECODE), blocks=[0])
    with pytest.raises(HandoffError, match="prefill side .* request 9 cannot become pulled from unknown"):
        sender.pull(KVPull(9, DECODE))
    sender.announce(seq)
    with pytest.raises(HandoffError, match="request 3 announced twice"):
        sender.announce(seq)
    with pytest.raises(HandoffError, match="request 3 cannot become joined from announced before its KV completed"):
        sender.pulled(3)
    receiver.announce(KVIncoming(seq.request, PREFILL, (0,)))
    with pytest.raises(HandoffError, match="decode side .* a rank's receives completed for request 3, which is "
                                           "announced .expected pulled"):
        receiver.rank_arrived(3)
    receiver.drop(3)
    with pytest.raises(HandoffError, match="request 3 cannot become pulled from dropped"):
        receiver.pull(seq, 0, DECODE)
