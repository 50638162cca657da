"""The one busy-poll policy (cyphonic.busy_poll), used by the node daemon's PacketPath and the
adapter's ReplyWait: spin after a lone packet while answers come quickly and CPUs are idle."""

from __future__ import annotations

from cyphonic.busy_poll import ANSWER_GAP_S, BUSY_POLL_MIN_IDLE_CPUS, LONE_GAP_S, QUICK_FACTOR, BusyPoll, in_burst

BUDGET = 0.0005


def idle_poll(**kw) -> BusyPoll:
    p = BusyPoll(BUDGET, **kw)
    p.idle_cpus = 2.0
    return p


def test_a_lone_packet_spins_for_the_budget_and_its_answer_stops_it():
    p = idle_poll()
    assert p.lone_sent(10.0) == BUDGET and p.busy_polls == 1 and p.lone_at == 10.0
    assert p.delivered(10.0003) is True            # the awaited answer: stop
    assert p.quick and p.sent_at == 0.0
    assert p.delivered(10.0004) is False           # nothing awaited any more


def test_no_spin_while_too_few_cpus_stand_idle():
    p = BusyPoll(BUDGET)
    p.idle_cpus = BUSY_POLL_MIN_IDLE_CPUS - 0.01
    assert p.lone_sent(1.0) == 0.0 and p.busy_polls == 0
    p.idle_cpus = BUSY_POLL_MIN_IDLE_CPUS
    p.delivered(1.0001)
    assert p.lone_sent(2.0) == BUDGET


def test_a_packet_that_answers_a_delivery_is_not_waited_for():
    p = idle_poll()
    p.delivered(5.0)
    assert p.lone_sent(5.0 + ANSWER_GAP_S / 2) == 0.0 and p.sent_at == 0.0
    assert p.lone_sent(5.0 + ANSWER_GAP_S * 2) == BUDGET


def test_the_adapter_reads_heads_ups_late_so_its_answer_gap_is_twice_the_budget():
    p = idle_poll(answer_gap_s=2 * BUDGET)
    p.delivered(5.0)
    assert p.lone_sent(5.0 + 1.5 * BUDGET) == 0.0
    assert p.lone_sent(5.0 + 2.5 * BUDGET) == BUDGET


def test_slow_answers_end_busy_polling_until_a_quick_one_comes():
    p = idle_poll()
    assert p.lone_sent(1.0) == BUDGET
    assert p.lone_sent(2.0) == 0.0 and not p.quick            # the one before got no answer
    assert p.delivered(2.0 + QUICK_FACTOR * BUDGET * 2) is True and not p.quick   # a slow answer
    assert p.lone_sent(3.0) == 0.0
    assert p.delivered(3.0 + BUDGET) and p.quick               # a quick one again
    assert p.lone_sent(4.0) == BUDGET and p.busy_polls == 2


def test_the_node_and_the_adapter_use_this_policy():
    from appliance.packet_handling import ReplyWait
    from cyphonic.node.packet_handling import PacketPath
    w = ReplyWait(BUDGET, lambda s: None, lambda: None)
    assert isinstance(w.policy, BusyPoll) and w.policy.answer_gap_s == 2 * BUDGET
    path = PacketPath(lambda *a: None, lambda *a: None, slow_datagram=None, slow_packet=None, flush=None,
                      busy_poll_s=BUDGET, spin=lambda s: None, stop_spin=lambda: None)
    assert isinstance(path.busy, BusyPoll) and path.busy.answer_gap_s == ANSWER_GAP_S
    path.idle_cpus = 1.5
    assert path.busy.idle_cpus == 1.5


def test_one_rule_tells_a_burst_from_a_lone_packet():
    assert in_burst(5.0 + LONE_GAP_S / 2, 5.0)           # soon after the one before: a burst
    assert not in_burst(5.0 + LONE_GAP_S, 5.0)           # after a pause: lone
    assert not in_burst(5.0, 0.0)                        # the first packet ever: lone
