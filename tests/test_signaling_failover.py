"""Issue 13, the node side: several cloud instances (each a CloudCore on its own address, all on
one store and one set of keys), and a node that moves to the next one when its instance goes
silent. In memory, event by event with a virtual clock (each timer at its own deadline,
datagrams delivered at once), as tests/test_signaling_recovery.py drives one cloud.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from cyphonic import constants as C
from cyphonic import signaling as sg
from cyphonic.cloud import authentication
from cyphonic.cloud.core import CloudCore
from cyphonic.cloud.store import MemoryStore
from cyphonic.control import ControlClient, ControlServer, Incoming, Reply, RequestTimedOut
from cyphonic.handshake import StaticIdentity
from cyphonic.wire import signaling as sig

from cloudfixtures import DOMAIN, T0, make_keys

INSTANCES = [("198.51.100.1", 47101), ("198.51.100.2", 47101), ("198.51.100.3", 47101)]
TARGET_S = 5.0


class Cluster:
    """Cloud instances sharing a store and keys; nodes on their own addresses. A killed instance
    takes nothing in, sends nothing and runs no timers (kill -9)."""

    def __init__(self, n: int = 3) -> None:
        self.now = T0
        self.store = MemoryStore()
        self.keys = make_keys()
        self.clouds = {a: self._core(i) for i, a in enumerate(INSTANCES[:n])}
        self.dead: set = set()
        self.nodes: dict[str, sg.SignalingClient] = {}
        self.addrs: dict[str, tuple] = {}
        self.got: dict[tuple, int] = {a: 0 for a in self.clouds}     # datagrams each instance took in
        self.events: dict[str, list] = {}

    def _core(self, i: int) -> CloudCore:
        return CloudCore(store=self.store, keys=self.keys, domain=DOMAIN, prefix="100.64.0.0/24",
                         rng=random.Random(11 + i))

    def node(self, name: str, port: int, instances=None) -> sg.SignalingClient:
        addr = ("192.0.2.50", port)
        token = authentication.create_token(self.store, name, self.now).encode()
        c = sg.SignalingClient(StaticIdentity.generate(), self.keys.signaling.public,
                               list(self.clouds) if instances is None else instances, token=token,
                               name_hint=name, local_endpoints=(sig.Endpoint(*addr),),
                               rng=random.Random(len(self.nodes)), spread=False)
        self.nodes[name], self.addrs[name], self.events[name] = c, addr, []
        return c

    def live(self) -> list:
        return [c for a, c in self.clouds.items() if a not in self.dead]

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for name, c in self.nodes.items():
                for data, dst in c.datagrams_to_send():
                    moved = True
                    if dst in self.clouds and dst not in self.dead:
                        self.got[dst] += 1
                        self.clouds[dst].receive_datagram(data, self.addrs[name], self.now)
            for src, cloud in self.clouds.items():
                out = cloud.datagrams_to_send()
                if src in self.dead:
                    continue
                for data, dst in out:
                    moved = True
                    for name, addr in self.addrs.items():
                        if addr == dst:
                            self.nodes[name].receive_datagram(data, src, self.now)
            for name, c in self.nodes.items():
                while (e := c.next_event()) is not None:
                    self.events[name].append((self.now, e))
                    if isinstance(e, sg.DirectionPushed):      # the responder accepts at once
                        c.answer_direction(e, True, self.now)
                        moved = True

    def run(self, until: float, stop=None) -> None:
        while stop is None or not stop():
            parts = list(self.nodes.values()) + self.live()
            due = [t for p in parts if (t := p.get_timer()) is not None]
            t = min(due, default=None)
            if t is None or t > until:
                self.now = until
                return
            self.now = max(t, self.now + 1e-6)
            for p in parts:
                t = p.get_timer()
                if t is not None and t <= self.now:
                    p.handle_timer(self.now)
            self.pump()

    def start(self) -> None:
        for c in self.nodes.values():
            c.start(self.now)
        self.pump()
        self.run(self.now + 1)
        assert all(c.state == sg.State.READY for c in self.nodes.values())

    def of(self, name: str, kind) -> list:
        return [(t, e) for t, e in self.events[name] if isinstance(e, kind)]


def test_a_request_times_out_after_the_given_timeout():
    """ControlClient.request(timeout_s=...): unanswered, it times out then (after one resend at
    1 s), not after the 31 s of the retries; answered, it is a reply as ever."""
    keys = make_keys()
    server = ControlServer(keys.signaling, rng=random.Random(1))
    client = ControlClient(StaticIdentity.generate(), keys.signaling.public, INSTANCES[0], rng=random.Random(2))
    now = T0
    answer = True

    def pump() -> None:
        while out := client.datagrams_to_send():
            for data, _ in out:
                server.receive_datagram(data, ("192.0.2.9", 4000), now)
                while (e := server.next_event()) is not None:
                    if isinstance(e, Incoming) and e.msg.request_id and answer:
                        server.reply(e, sig.KeepaliveAck(observed=sig.Endpoint("192.0.2.9", 4000)), now)
                for data2, _ in server.datagrams_to_send():
                    client.receive_datagram(data2, INSTANCES[0], now)

    first = client.request(sig.Keepalive(), now, timeout_s=C.FAILOVER_SILENT_S)
    pump()
    events = []
    while (e := client.next_event()) is not None:
        events.append(e)
    assert any(isinstance(e, Reply) and e.request.request_id == first.request_id for e in events)

    answer = False
    sent_at = now
    late = client.request(sig.Keepalive(), now, timeout_s=C.FAILOVER_SILENT_S)
    plain = client.request(sig.Keepalive(), now)            # no timeout: the old schedule
    timed_out = {}
    while now < sent_at + 40:
        now = client.get_timer()
        client.handle_timer(now)
        pump()
        while (e := client.next_event()) is not None:
            if isinstance(e, RequestTimedOut):
                timed_out[e.request.request_id] = now - sent_at
    assert abs(timed_out[late.request_id] - C.FAILOVER_SILENT_S) < 1e-6, timed_out
    assert abs(timed_out[plain.request_id] - 31.0) < 1e-6, timed_out
    assert client.counters["requests_retransmitted"] >= 1


def test_the_node_moves_to_the_next_instance_within_five_seconds_and_logs_in_by_key():
    net = Cluster(3)
    a = net.node("a", 40001)
    net.start()
    assert a.status()["instance"] == "198.51.100.1:47101"
    assert a.status()["instances"] == [f"{h}:{p}" for h, p in INSTANCES]
    assert a._keepalive_s == C.FAILOVER_PROBE_S                  # probed every 2 s, not 25
    tokens = []
    second = net.clouds[INSTANCES[1]]
    login = second.auth.login
    second.auth.login = lambda msg, static, now: (tokens.append(msg.token), login(msg, static, now))[1]
    logins_before = len(net.of("a", sg.LoggedIn))

    net.run(net.now + 0.7)                                       # somewhere between two probes
    killed = net.now
    net.dead.add(INSTANCES[0])
    net.run(killed + 30, stop=lambda: a.state == sg.State.READY and a.as_addr == INSTANCES[1])
    assert a.state == sg.State.READY and net.now - killed <= TARGET_S, (net.now - killed, a.status())
    assert net.now - killed <= C.FAILOVER_PROBE_S + C.FAILOVER_SILENT_S + 0.1
    assert tokens == [b""]                                       # by key: the token is never sent again
    logged = net.of("a", sg.LoggedIn)[logins_before:]
    assert len(logged) == 1 and not logged[0][1].enrolled and logged[0][1].fqdn == a.login_info.fqdn
    st = a.status()
    assert st["instance"] == "198.51.100.2:47101" and st["state"] == "ready" and st["last_error"] == ""
    moved = net.of("a", sg.InstanceMoved)
    assert [str(e) for _, e in moved] == ["cloud instance 198.51.100.1:47101 silent; moving to 198.51.100.2:47101"]
    assert not moved[0][1].round_failed and net.of("a", sg.CloudLost) == []
    assert net.clouds[INSTANCES[1]].nms.registrations                 # registered there
    assert net.got[INSTANCES[2]] == 0                                 # the third one never heard of us


def test_a_route_request_outstanding_at_the_silent_instance_fails_at_once_and_routes_work_again():
    net = Cluster(2)
    a, b = net.node("a", 40001), net.node("b", 40002)
    net.start()
    net.run(net.now + 0.3)
    killed = net.now
    net.dead.add(INSTANCES[0])
    a.request_route(b.login_info.fqdn, net.now)
    net.run(killed + 30, stop=lambda: bool(net.of("a", sg.RouteFailed)))
    (t, failed), = net.of("a", sg.RouteFailed)
    assert failed.code == sig.ErrorCode.PEER_UNREACHABLE and "198.51.100.1:47101" in failed.text
    assert t - killed <= C.FAILOVER_PROBE_S + C.FAILOVER_SILENT_S + 0.01      # not 31 s
    net.run(killed + 30, stop=lambda: all(c.state == sg.State.READY and c.as_addr == INSTANCES[1]
                                          for c in (a, b)))
    a.request_route(b.login_info.fqdn, net.now)
    net.pump()
    (t, ready), = net.of("a", sg.RouteReady)
    assert ready.direction.peer_fqdn == b.login_info.fqdn and t - killed <= TARGET_S, t - killed
    assert not a._route_requests


def test_moves_are_immediate_for_a_round_then_back_off_and_the_cloud_lost_is_said_once():
    net = Cluster(3)
    a = net.node("a", 40001)
    net.start()
    killed = net.now
    net.dead |= {INSTANCES[0], INSTANCES[1]}
    net.run(killed + 30, stop=lambda: a.state == sg.State.READY and a.as_addr != INSTANCES[0])
    assert a.as_addr == INSTANCES[2]
    assert net.now - killed <= C.FAILOVER_PROBE_S + 2 * C.FAILOVER_SILENT_S + 0.1   # no wait between moves
    net.dead.add(INSTANCES[2])                                        # now every instance is silent
    t0 = net.now
    net.run(t0 + 60)
    moves = [(t, e) for t, e in net.of("a", sg.InstanceMoved) if t > t0]
    assert moves and moves[2][1].round_failed and not moves[0][1].round_failed
    gaps = [t2 - t1 for (t1, _), (t2, _) in zip(moves[2:], moves[3:])]
    assert gaps and min(gaps) >= C.FAILOVER_SILENT_S + C.RECONNECT_MIN_S * (1 - C.RECONNECT_JITTER) - 0.01
    assert len(moves) <= 60 / (C.FAILOVER_SILENT_S + C.RECONNECT_MIN_S * (1 - C.RECONNECT_JITTER)) + 3
    assert len(net.of("a", sg.CloudLost)) == 1
    assert a.link_health()[0] == "cloud-unreachable"
    net.clouds[INSTANCES[1]] = net._core(5)                           # one comes back, empty
    net.dead.discard(INSTANCES[1])
    back = net.now
    net.run(back + 30, stop=lambda: a.state == sg.State.READY)
    assert a.as_addr == INSTANCES[1]
    assert net.now - back <= len(INSTANCES) * (C.FAILOVER_SILENT_S + C.RECONNECT_MAX_S) + 0.1


def test_a_refusal_does_not_make_the_node_move():
    """An instance that answers is alive: a refused registration and login back off there."""
    net = Cluster(2)
    a = net.node("a", 40001)
    net.start()
    first = net.clouds[INSTANCES[0]]
    refusals = []

    def refuse(*args, **kw):
        refusals.append(net.now)
        return SimpleNamespace(log="refused", identity=None,
                               reply=sig.Error(code=sig.ErrorCode.RATE_LIMITED, text="busy"))
    first.auth.login = refuse
    first.nms._register = lambda inc, identity, now: sig.Error(code=sig.ErrorCode.RATE_LIMITED, text="busy")
    first.nms.registrations.clear()                     # the keepalive is answered NOT_REGISTERED
    got = net.got[INSTANCES[1]]
    net.run(net.now + 60)
    assert a.state != sg.State.READY and refusals
    assert a.as_addr == INSTANCES[0] and net.of("a", sg.InstanceMoved) == []
    assert net.got[INSTANCES[1]] == got == 0


def test_with_one_instance_nothing_changes():
    """A list of one is a single cloud: the cloud's keepalive interval, the 31 s request timeout,
    no moves (the timers of tests/test_signaling_recovery.py)."""
    net = Cluster(1)
    a = net.node("a", 40001, instances=[INSTANCES[0]])
    net.start()
    assert not a.several and a._keepalive_s == 25.0
    assert a.status()["instances"] == ["198.51.100.1:47101"]
    killed = net.now
    net.dead.add(INSTANCES[0])
    net.run(killed + 25)
    assert a.state == sg.State.READY                     # nobody probes faster
    net.run(killed + 60, stop=lambda: a.state != sg.State.READY)
    assert 25 < net.now - killed <= 33, net.now - killed   # keepalive at 25 s, its retries 7 s
    assert net.of("a", sg.InstanceMoved) == [] and len(net.of("a", sg.CloudLost)) == 1
    ch = a.channels[INSTANCES[0]]
    assert all(p.deadline is None for p in ch.peer.pending.values())


def test_the_old_constructor_and_a_separate_nms_still_work():
    keys = make_keys()
    ident = StaticIdentity.generate()
    c = sg.SignalingClient(ident, keys.signaling.public, INSTANCES[0], ("198.51.100.9", 47103))
    assert c.instances == (INSTANCES[0],) and c.nms_addr == ("198.51.100.9", 47103) and not c.several
    try:
        sg.SignalingClient(ident, keys.signaling.public, INSTANCES[:2], ("198.51.100.9", 47103))
    except Exception as exc:            # noqa: BLE001
        assert "single cloud address" in str(exc)
    else:
        raise AssertionError("a separate NMS with several instances was taken")


def test_tunnels_survive_a_move():
    """The engine keeps its device (and so every tunnel) when the signaling client moves."""
    from cyphonic.node.engine import NodeEngine
    net = Cluster(2)
    a = net.node("a", 40001)
    net.start()
    renewed = []
    device = SimpleNamespace(set_identity=renewed.append)
    eng = NodeEngine.__new__(NodeEngine)           # only the signaling-event half is exercised
    eng.signaling, eng.device, eng.routes, eng._events = a, device, {}, __import__("collections").deque()
    eng.drops = __import__("collections").Counter()
    seen = len(net.events["a"])
    net.dead.add(INSTANCES[0])
    net.run(net.now + 10, stop=lambda: a.state == sg.State.READY and a.as_addr == INSTANCES[1])
    after = [e for _, e in net.events["a"][seen:]]
    assert any(isinstance(e, sg.InstanceMoved) for e in after) and any(isinstance(e, sg.LoggedIn) for e in after)
    for e in after:
        eng._on_signaling(e, net.now)
    assert eng.device is device and renewed == [a.identity]     # same device: the new certificate only


def test_nodes_given_the_same_list_spread_over_the_instances_by_their_key():
    keys = make_keys()
    starts = {sg.SignalingClient(StaticIdentity.generate(), keys.signaling.public, list(INSTANCES)).as_addr
              for _ in range(60)}
    assert starts == set(INSTANCES)                 # 60 keys over 3 instances: each gets some
    ident = StaticIdentity.generate()
    again = {sg.SignalingClient(ident, keys.signaling.public, list(INSTANCES)).as_addr for _ in range(5)}
    assert len(again) == 1                          # the same key starts at the same one every time
    listed = sg.SignalingClient(ident, keys.signaling.public, list(INSTANCES), spread=False)
    assert listed.as_addr == INSTANCES[0]
