"""Getting back to the cloud after an outage (issue 12's recovery target), in memory with a fake
clock: every node, and every general node of an adapter (17 links from one address), is logged
in and registered again within RECONNECT_MAX_S of the cloud's return, however long the outage
was; the links reach the returning cloud spread out, not at one instant; during the outage each
link sends about one initiation every 1.25 to 2.5 s and no more; the cloud gets one login per
link when it is back, not one per try.

The network is driven event by event (each timer at its own deadline, datagrams delivered at
once), so the times measured are the protocol's own, not a step size's.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from cyphonic import constants as C
from cyphonic import handshake as hs
from cyphonic import signaling as sg
from cyphonic.cloud.core import CloudCore
from cyphonic.wire import data as wire_data
from cyphonic.wire import signaling as sig

from cloudfixtures import DOMAIN, CloudNet

ADAPTER = "192.0.2.7"
LINKS = 17                      # an adapter's own link and 16 general nodes, one WAN address
TARGET_S = 5.0                  # the target


class Outage:
    """A CloudNet whose cloud can be stopped and started again on its store, and a record of the
    initiations that reach it."""

    def __init__(self, links: int = LINKS, **node_kw) -> None:
        self.net = CloudNet()
        self.arrivals: list[tuple[float, tuple]] = []   # (time, source) of initiations the cloud got
        self.dropped: dict[str, int] = {}               # datagrams sent to the stopped cloud, per node
        for i in range(links):
            self.net.node(f"l{i}", (ADAPTER, 47200 + i), **node_kw)
        self._watch(self.net.cloud)

    def _watch(self, cloud) -> None:
        receive = cloud.receive_datagram
        init = hs.CONTROL.initiation_type

        def recorded(data, addr, now):
            if wire_data.message_type(data) == init:
                self.arrivals.append((now, addr))
            receive(data, addr, now)
        cloud.receive_datagram = recorded

    @property
    def nodes(self) -> dict[str, sg.SignalingClient]:
        return self.net.nodes

    def pump(self) -> None:
        net = self.net
        if not net.drop_to_cloud:
            net.pump()
            return
        for name, c in net.nodes.items():         # the cloud is down: count what is sent to it
            self.dropped[name] = self.dropped.get(name, 0) + len(c.datagrams_to_send())

    def run(self, until: float, stop=None) -> None:
        """Every timer at its deadline until ``until`` (or until ``stop()`` holds)."""
        net = self.net
        parts = lambda: list(net.nodes.values()) + ([] if net.drop_to_cloud else [net.cloud])
        while stop is None or not stop():
            due = [t for p in parts() if (t := p.get_timer()) is not None]
            t = min(due, default=None)
            if t is None or t > until:
                net.now = until
                return
            net.now = max(t, net.now + 1e-6)
            for p in parts():
                t = p.get_timer()
                if t is not None and t <= net.now:
                    p.handle_timer(net.now)
            self.pump()

    def stop_cloud(self) -> None:
        self.net.drop_to_cloud = True

    def start_cloud(self) -> float:
        """The cloud starts again on its store: no sessions, no registrations."""
        net = self.net
        net.cloud = CloudCore(store=net.store, keys=net.keys, domain=DOMAIN, prefix="100.64.0.0/24",
                              rng=random.Random(7))
        self._watch(net.cloud)
        net.drop_to_cloud = False
        return net.now

    def all_ready(self) -> bool:
        return all(n.state == sg.State.READY for n in self.nodes.values())

    def back_after(self, outage_s: float, limit_s: float = 60.0) -> dict[str, float]:
        """Stop the cloud for ``outage_s``, start it again: how long each link took to be ready."""
        self.stop_cloud()
        self.run(self.net.now + outage_s)
        assert not any(n.state == sg.State.READY for n in self.nodes.values()), "nobody noticed the outage"
        back = self.start_cloud()
        self.arrivals.clear()
        ready: dict[str, float] = {}

        def watch():
            for name, n in self.nodes.items():
                if n.state == sg.State.READY and name not in ready:
                    ready[name] = self.net.now - back
            return len(ready) == len(self.nodes)
        self.run(back + limit_s, stop=watch)
        return ready


def started(links: int = LINKS, **kw) -> Outage:
    o = Outage(links, **kw)
    o.net.start_all()
    o.run(o.net.now + 1)
    assert o.all_ready()
    return o


@pytest.mark.parametrize("outage_s", [33.0, 44.5, 63.9, 97.3, 200.0, 1000.0])
def test_every_link_is_back_within_the_cap_of_the_clouds_return(outage_s):
    """Whatever the outage's length (the loss is noticed after 31 s here: keepalive 25 s, then
    7 s; a login times out 31 s later; long after the old back-off's 30 s cap), each of an
    adapter's 17 links is ready again within RECONNECT_MAX_S: the old back-off took up to 45 s."""
    o = started()
    ready = o.back_after(outage_s)
    assert len(ready) == LINKS, {n: o.nodes[n].status() for n in o.nodes if n not in ready}
    worst = max(ready.values())
    assert worst <= C.RECONNECT_MAX_S + 0.01 and worst <= TARGET_S, sorted(ready.values())
    assert all(n.link_health() is None and n.last_error == "" for n in o.nodes.values())


def test_the_links_reach_the_returning_cloud_spread_out_but_within_the_cap():
    """17 links that lost the cloud at the same instant (they registered together, so their
    keepalives are in step) do not all try again at one instant: their first initiations to
    the returned cloud are spread, and all within RECONNECT_MAX_S."""
    o = started()
    o.back_after(200.0)
    first: dict[tuple, float] = {}
    back = min(t for t, _ in o.arrivals)
    for t, src in o.arrivals:
        first.setdefault(src, t)
    assert len(first) == LINKS
    times = sorted(first.values())
    assert times[-1] - back <= C.RECONNECT_MAX_S
    assert times[-1] - times[0] >= 0.5, times                  # spread, not a stampede
    assert max(sum(1 for u in times if t <= u < t + 0.1) for t in times) <= LINKS // 2, times


def test_during_a_long_outage_each_link_tries_at_a_bounded_rate_and_logs_in_once_after():
    o = started()
    o.back_after(600.0)
    for name, n in o.dropped.items():
        # one initiation a try, every 1.25 .. 2.5 s once the wait reached its cap
        assert 600 / C.RECONNECT_MAX_S - 5 <= n <= 600 / (C.RECONNECT_MAX_S * (1 - C.RECONNECT_JITTER)) + 5, (name, n)
    # the login retried through the outage is sent once when the cloud is back, not once per try
    assert o.net.cloud.counters["logins_ok"] == LINKS, o.net.cloud.counters
    assert all(len(ch.queue) == 0 for n in o.nodes.values() for ch in n.channels.values())


def test_the_login_goes_out_as_soon_as_the_cloud_answers_a_handshake():
    """No waiting for the next try once the cloud answers: with datagrams delivered at once,
    each link is ready at the very instant its first initiation reached the returned cloud."""
    o = started(links=4)
    o.back_after(120.0)
    first: dict[tuple, float] = {}
    for t, src in o.arrivals:
        first.setdefault(src, t)
    for i, name in enumerate(o.nodes):
        ready_at = first[(ADAPTER, 47200 + i)]
        assert o.nodes[name].state == sg.State.READY
        later = [t for t, src in o.arrivals if src == (ADAPTER, 47200 + i) and t > ready_at + 1e-6]
        assert len(later) <= 1, later       # the one handshake after login (the NMS sees the certificate)


def test_a_login_that_timed_out_just_before_the_return_is_sent_again_at_once():
    """The cloud comes back while the link has no login out (its last one timed out): the
    handshake the cloud answers brings a new login at once."""
    o = started(links=1)
    node = o.nodes["l0"]
    o.stop_cloud()
    o.run(o.net.now + 60, stop=lambda: node.state == sg.State.LOGGING_IN and "login" in node._requests.values())
    o.run(o.net.now + 60, stop=lambda: "login" not in node._requests.values())   # it timed out
    assert node.state != sg.State.READY and node._reconnect_at is not None
    back = o.start_cloud()
    ch = node.channels[node.as_addr]
    ch.set_cloud_address(ch.peer.addr, o.net.now)      # a handshake under way, as the channel's own resend
    o.pump()
    assert node.state == sg.State.READY and o.net.now == back


def test_a_node_that_never_logged_in_backs_off_further():
    """Enrolling with a token against a cloud that does not answer (a wrong address, say): the
    wait grows to ENROLL_RETRY_MAX_S, so such a node sends far fewer initiations than one that
    was logged in before."""
    fresh = Outage(links=1)
    fresh.stop_cloud()
    fresh.net.start_all()
    fresh.run(fresh.net.now + C.ENROLL_FAST_S)
    # its first half-minute it tries every ENROLL_FAST_RETRY_S at least (an operator waits)
    assert fresh.dropped["l0"] >= C.ENROLL_FAST_S / C.ENROLL_FAST_RETRY_S * 0.9, fresh.dropped
    fresh.dropped["l0"] = 0
    fresh.run(fresh.net.now + 600)
    known = started(links=1)
    known.stop_cloud()
    known.run(known.net.now + 600)
    assert fresh.nodes["l0"].state != sg.State.READY
    assert fresh.dropped["l0"] * 2 < known.dropped["l0"], (fresh.dropped, known.dropped)
    assert fresh.nodes["l0"].link_health()[0] == "cloud-unreachable"


def test_a_refused_login_stops_the_tries():
    o = Outage(links=1, token="00112233aabb." + "00" * 16)
    o.net.start_all()
    o.run(o.net.now + 120)
    node = o.nodes["l0"]
    assert node.state == sg.State.FAILED and node.link_health()[0] == "login-failed"
    o.arrivals.clear()
    o.run(o.net.now + 600)
    assert o.arrivals == [] and node.state == sg.State.FAILED      # the operator must act


def test_a_cloud_that_answers_with_a_refusal_is_not_hurried():
    """A cloud that answers (rate limited, say) is there: the tries back off as far as for a
    first enrollment, over the session it answered on, and no fresh handshake each time."""
    o = started(links=1)
    node = o.nodes["l0"]
    o.stop_cloud()
    o.run(o.net.now + 60)
    o.start_cloud()
    logins = []

    def refuse(msg, static, now):
        logins.append(now)
        return SimpleNamespace(log="refused", identity=None, reply=sig.Error(code=sig.ErrorCode.RATE_LIMITED,
                                                                              text="busy"))
    o.net.cloud.auth.login = refuse
    o.arrivals.clear()
    o.run(o.net.now + 300)
    assert node.state != sg.State.READY and node.link_health()[0] == "cloud-unreachable"
    assert 5 <= len(logins) <= 300 / (C.ENROLL_RETRY_MAX_S * (1 - C.RECONNECT_JITTER)) + 8, len(logins)
    assert len(o.arrivals) <= 300 / C.REKEY_AFTER_S + 2, o.arrivals   # the session is kept: its rekeys only
