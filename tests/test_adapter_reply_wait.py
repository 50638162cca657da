"""The adapter controller's busy polling for the answer to a lone packet a worker sent
(appliance.packet_handling.ReplyWait), and its setting; the heads-up itself travels in the
adapter lab tests (every ping there is a lone packet)."""

from __future__ import annotations

import pytest

from appliance import config as adapter_config
from appliance.packet_handling import ReplyWait

CLOUD_KEY = "cyk1:" + "11" * 32 + ":" + "22" * 32


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(idle=2.0):
    clock = Clock()
    calls = []
    w = ReplyWait(0.0005, lambda s: calls.append(("spin", s)), lambda: calls.append(("stop",)), clock=clock)
    w.idle_cpus = idle
    return w, clock, calls


def test_a_heads_up_starts_a_busy_poll_that_the_answer_stops():
    w, clock, calls = make()
    w.heads_up()
    assert calls == [("spin", 0.0005)] and w.busy_polls == 1 and w.heads_ups == 1 and w.lone_at == clock.t
    clock.t += 0.0003
    w.delivered(clock.t)
    assert calls[-1] == ("stop",) and w.quick and w.sent_at == 0.0


def test_no_busy_poll_when_the_cpus_are_busy_or_the_answer_came_first():
    w, clock, calls = make(idle=0.5)
    w.heads_up()
    assert calls == [] and w.busy_polls == 0
    w, clock, calls = make()
    w.delivered(clock.t)          # the answer was delivered before the heads-up was read
    clock.t += 0.0001
    w.heads_up()
    assert calls == []


def test_answers_that_do_not_come_quickly_end_busy_polling_until_one_does():
    w, clock, calls = make()
    w.heads_up()
    clock.t += 0.1                # no answer within 2 x busy_s ...
    w.heads_up()                  # ... so the next lone packet is not waited for
    assert calls == [("spin", 0.0005)] and not w.quick
    clock.t += 0.0002
    w.delivered(clock.t)          # a quick answer again
    assert w.quick
    clock.t += 0.1
    w.heads_up()
    assert calls[-1] == ("spin", 0.0005) and w.busy_polls == 2


def test_busy_poll_us_setting():
    base = {"cloud": "192.0.2.1:47101", "cloud_key": CLOUD_KEY}
    assert adapter_config.parse_config(base).busy_poll_us == 500
    assert adapter_config.parse_config({**base, "busy_poll_us": 0}).busy_poll_us == 0
    for bad in (-1, 5001):
        with pytest.raises(adapter_config.AdapterConfigError, match="busy_poll_us"):
            adapter_config.parse_config({**base, "busy_poll_us": bad})
    with pytest.raises(adapter_config.AdapterConfigError, match="busy_poll_us: must be int"):
        adapter_config.parse_config({**base, "busy_poll_us": "500"})
