"""The controller's watchdog names the right culprit (pure logic: no job)."""
import time

import pytest

from contracts.plan import InstancePlan, Plan
from engine.watchdog import Watchdog


def watchdog_of_one_decode_instance() -> tuple[Watchdog, int]:
    plan = Plan([InstancePlan(0, "prefill", 1, 1, 1, ["vm"]), InstancePlan(1, "decode", 2, 1, 2, ["vm", "vm"])])
    leader = plan.instances[1].ranks[0]
    return Watchdog(plan, ["vm"] * plan.world_size, limit_s=8), leader


def test_a_stopped_leader_is_named_as_a_rank_even_when_its_heartbeat_went_quiet_first():
    """SIGSTOP of a decode leader: its last heartbeat (after a step) may predate its beacon's last
    word, so the heartbeat limit passes first; the diagnosis still names the stopped rank."""
    watchdog, leader = watchdog_of_one_decode_instance()
    now = time.time()
    watchdog.seen[1] = (now - 8.5, 96)
    watchdog.rank_seen[leader] = now - 7.5  # silent, but not yet past the limit
    with pytest.raises(TimeoutError, match=rf"rank {leader} on vm \(decode instance 1.*stopped or dead"):
        watchdog.check({1: 3})


def test_an_instance_whose_ranks_all_speak_but_send_no_heartbeat_is_stuck():
    watchdog, _ = watchdog_of_one_decode_instance()
    watchdog.seen[1] = (time.time() - 8.5, 96)
    with pytest.raises(TimeoutError, match=r"decode instance 1 \(ranks 2-3 on vm\) sent no heartbeat .* is stuck"):
        watchdog.check({1: 3})
