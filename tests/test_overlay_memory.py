"""The whole overlay in memory: cloud (AS+NMS), relay (TRS) and node engines on a
simulated network with NAT filtering, a fake clock, and every route type end to end."""

from __future__ import annotations

import random

import pytest

from cyphonic import events as ev
from cyphonic.cloud.trs import RelayService
from cyphonic.handshake import StaticIdentity
from cyphonic.ipv4 import icmp_echo
from cyphonic.node.engine import NodeEngine, TunnelFailed, TunnelUp
from cyphonic.wire import cert as wire_cert
from cyphonic.wire import signaling as sig

from cloudfixtures import CLOUD, CloudNet

TRS4 = ("198.51.100.1", 47102)
TRS6 = ("2001:db8::1", 47102)


class Host:
    def __init__(self, name, engine, public, local, mode):
        self.name, self.engine, self.public, self.local, self.mode = name, engine, public, local, mode
        self.skew = 0.0             # this host's clock minus the true time (a Pi without RTC and NTP: < 0)
        self.sent_to: set = set()   # remote (host, port) this host has sent to (NAT filter state)


class Sim:
    def __init__(self):
        self.net = CloudNet()
        self.trs = RelayService(self.net.keys.relay_key)
        self.hosts: dict[str, Host] = {}
        self.now = self.net.now
        self.log = []
        self.cloud_down = False

    def add(self, name, public, local=None, mode="open", groups=("default",)):
        tok = self.net.token(name, groups=groups).encode()
        local = local or public
        eng = NodeEngine(StaticIdentity.generate(), self.net.keys.ca.public, self.net.keys.signaling.public,
                         CLOUD, token=tok, name_hint=name, local_endpoints=[sig.Endpoint(*local)],
                         rng=random.Random(len(self.hosts) + 100))
        self.hosts[name] = Host(name, eng, public, local, mode)
        return eng

    def _deliver(self, data, src, dst):
        if dst == CLOUD:
            if self.cloud_down:
                self.log.append(("cloud down", src))
                return
            self.net.cloud.receive_datagram(data, src, self.now)
            return
        if dst in (TRS4, TRS6):
            self.trs.receive_datagram(data, src, self.now)
            return
        for h in self.hosts.values():
            if dst in (h.public, h.local):
                if dst == h.local and h.local != h.public and src[0].split(".")[:2] != h.local[0].split(".")[:2]:
                    continue  # private address not reachable from outside its LAN
                if h.mode == "nat" and dst == h.public and src not in h.sent_to and src not in (CLOUD, TRS4, TRS6):
                    self.log.append(("filtered", h.name, src))
                    return
                if h.mode == "blocked" and src not in (CLOUD, TRS4, TRS6):
                    self.log.append(("blocked", h.name, src))
                    return
                h.engine.receive_datagram(data, src, self.now + h.skew)
                return
        self.log.append(("nowhere", dst))

    def pump(self, limit=20000):
        n = 0
        moved = True
        while moved and n < limit:
            moved = False
            for h in self.hosts.values():
                for data, dst in h.engine.datagrams_to_send():
                    moved = True
                    n += 1
                    dst = tuple(dst)[:2]
                    h.sent_to.add(dst)
                    same_lan = any(dst == o.local and o.local != o.public and
                                   o.local[0].split(".")[:2] == h.local[0].split(".")[:2]
                                   for o in self.hosts.values() if o is not h)
                    self._deliver(data, h.local if same_lan else h.public, dst)
            for data, dst in self.net.cloud.datagrams_to_send() + self.trs.datagrams_to_send():
                moved = True
                n += 1
                src = CLOUD if data[0] in (6, 7, 8) else (TRS6 if ":" in dst[0] else TRS4)
                self._deliver(data, src, tuple(dst)[:2])

    def advance(self, seconds, step=0.1):
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            self.net.now = self.now
            parts = [(h.engine, h.skew) for h in self.hosts.values()] + [(self.net.cloud, 0.0), (self.trs, 0.0)]
            for p, skew in parts:
                t = p.get_timer()
                if t is not None and t <= self.now + skew:
                    p.handle_timer(self.now + skew)
            self.pump()

    def start(self):
        for h in self.hosts.values():
            h.engine.start(self.now + h.skew)
        self.pump()
        self.advance(1)
        for h in self.hosts.values():
            assert h.engine.ready, (h.name, h.engine.status(self.now))

    def events(self, name, cls=None):
        out = []
        while (e := self.hosts[name].engine.next_event()) is not None:
            if cls is None or isinstance(e, cls):
                out.append(e)
        return out

    def vip(self, name):
        return str(self.hosts[name].engine.device.cert.vip4)

    def ping_ok(self, a, b, seq=1):
        pa = icmp_echo(self.vip(a), self.vip(b), 9, seq, b"hello")
        self.hosts[a].engine.send_packet(pa, self.now + self.hosts[a].skew)
        self.pump()
        self.advance(0.5)
        got = [e.packet for e in self.events(b, ev.PacketReceived)]
        return pa in got


def bring_up(sim, a, b):
    sim.events(a)
    sim.events(b)
    sim.hosts[a].engine.resolve(f"{b}.ov.example", sim.now + sim.hosts[a].skew)
    sim.pump()
    sim.advance(30)
    evs = sim.events(a)
    ups = [e for e in evs if isinstance(e, TunnelUp)]
    fails = [e for e in evs if isinstance(e, TunnelFailed)]
    return ups, fails


@pytest.mark.parametrize("case,a,b,expect", [
    ("direct", dict(public=("192.0.2.1", 1000)), dict(public=("192.0.2.2", 2000)), "direct"),
    ("reversed", dict(public=("192.0.2.1", 1000)),
     dict(public=("203.0.113.2", 40000), local=("10.2.0.2", 2000), mode="nat"), "reversed"),
    ("punched", dict(public=("203.0.113.1", 30000), local=("10.1.0.2", 1000), mode="nat"),
     dict(public=("203.0.113.2", 40000), local=("10.2.0.2", 2000), mode="nat"), "punched"),
    ("local", dict(public=("203.0.113.1", 30000), local=("10.1.0.2", 1000), mode="nat"),
     dict(public=("203.0.113.1", 30001), local=("10.1.0.3", 2000), mode="nat"), "local"),
    ("punch fails: relay", dict(public=("203.0.113.1", 30000), local=("10.1.0.2", 1000), mode="blocked"),
     dict(public=("203.0.113.2", 40000), local=("10.2.0.2", 2000), mode="blocked"), "relay"),
    ("ipv4 meets ipv6: relay", dict(public=("192.0.2.1", 1000)), dict(public=("2001:db8::2", 2000)), "relay"),
])
def test_route_types_end_to_end(case, a, b, expect):
    sim = Sim()
    sim.add("a", **a)
    sim.add("b", **b)
    sim.start()
    ups, fails = bring_up(sim, "a", "b")
    assert not fails, fails
    assert ups and ups[-1].path == expect, (ups, sim.log[-5:])
    assert sim.ping_ok("a", "b", 1)
    assert sim.ping_ok("b", "a", 2)
    if expect == "relay":
        assert sum(s["packets_relayed"][0] + s["packets_relayed"][1]
                   for s in sim.trs.session_status(sim.now)) > 0


def test_a_route_whose_answer_goes_astray_fails_and_the_next_resolve_asks_again():
    """A route request whose answer never maps to it (once: a restarted node got a cached
    answer of another kind) must not swallow every later resolve of the name: the route
    fails ("no answer from the cloud") after ROUTE_ANSWER_S, and the next resolve works."""
    from cyphonic import constants as C
    sim = Sim()
    sim.add("a", public=("192.0.2.1", 1000))
    sim.add("b", public=("192.0.2.2", 2000))
    sim.start()
    a = sim.hosts["a"].engine
    sim.cloud_down = True                         # the request goes nowhere ...
    assert a.resolve("b.ov.example", sim.now) is None
    a.signaling._route_requests.clear()           # ... and no answer or timeout will map to it
    a.signaling.channels[a.signaling.nms_addr].peer.pending.clear()
    sim.advance(C.ROUTE_ANSWER_S / 2)
    assert a.resolve("b.ov.example", sim.now) is None   # still pending: no second request
    sim.cloud_down = False
    sim.advance(C.ROUTE_ANSWER_S / 2 + 1)
    fails = sim.events("a", TunnelFailed)
    assert [f.text for f in fails if f.fqdn == "b.ov.example"][-1:] == ["no answer from the cloud"], fails
    assert a.counters["routes_unanswered"] == 1
    ups, fails = bring_up(sim, "a", "b")
    assert ups and not fails, (ups, fails)


def test_a_route_answered_with_the_wrong_kind_of_message_fails_at_once():
    from cyphonic import control as ctl
    from cyphonic import signaling as sgm
    sim = Sim()
    sim.add("a", public=("192.0.2.1", 1000))
    sim.add("b", public=("192.0.2.2", 2000))
    sim.start()
    s = sim.hosts["a"].engine.signaling
    rid = s.request_route("b.ov.example", sim.now)
    req = sig.RouteRequest(request_id=rid, peer_fqdn="b.ov.example")
    s._on_reply(ctl.Reply(sig.KeepaliveAck(request_id=rid, observed=sig.Endpoint("192.0.2.1", 1000)), req, b""),
                sim.now)
    failed = [e for e in s._events if isinstance(e, sgm.RouteFailed)]
    assert failed and failed[0].peer_fqdn == "b.ov.example" and "KeepaliveAck" in failed[0].text, failed
    assert s.drops["unexpected_answer"] == 1


def test_policy_refusal_reaches_the_node():
    sim = Sim()
    sim.add("a", public=("192.0.2.1", 1000), groups=("cams",))
    sim.add("b", public=("192.0.2.2", 2000), groups=("servers",))
    sim.start()
    ups, fails = bring_up(sim, "a", "b")
    assert not ups and fails[0].code == sig.ErrorCode.POLICY_DENIED


def test_zero_trust_a_node_refuses_initiations_the_cloud_did_not_announce():
    sim = Sim()
    sim.add("a", public=("192.0.2.1", 1000))
    sim.add("b", public=("192.0.2.2", 2000))
    sim.add("c", public=("192.0.2.3", 3000))
    sim.start()
    ups, _ = bring_up(sim, "a", "b")
    assert ups
    # c learns b's certificate somehow and tries to handshake without asking the NMS
    dev_c = sim.hosts["c"].engine.device
    b_cert = sim.hosts["b"].engine.device.identity.certificate
    dev_c.add_peer(b_cert, sim.now, endpoint=("192.0.2.2", 2000))
    dev_c.connect("b.ov.example", sim.now)
    sim.pump()
    assert sim.hosts["b"].engine.device.drops["unknown_peer"] >= 1


def test_a_peer_asked_for_by_virtual_ip_comes_up():
    from cyphonic.node.engine import Resolved
    sim = Sim()
    sim.add("a", public=("192.0.2.1", 1000))
    sim.add("b", public=("192.0.2.2", 2000))
    sim.start()
    vip_b = sim.vip("b")
    ptr = ".".join(reversed(vip_b.split("."))) + ".in-addr.arpa"
    sim.hosts["a"].engine.resolve(ptr, sim.now)
    sim.pump()
    sim.advance(5)
    evs = sim.events("a")
    assert any(isinstance(e, Resolved) and e.fqdn == "b.ov.example" and e.vip4 == vip_b for e in evs)
    assert any(isinstance(e, TunnelUp) and e.fqdn == "b.ov.example" for e in evs)
    assert sim.ping_ok("a", "b")


def test_a_tunnel_outlives_72_hours_without_the_cloud_on_one_day_certificates():
    """The cloud is gone for three days; certificates last one (the AS's default). The tunnel
    that existed rekeys every time it is used, on expired certificates after the first day
    (docs/protocol.md 11.6), and carries every ping; the nodes log in again when the cloud
    is back and the grace ends."""
    sim = Sim()
    sim.add("a", public=("192.0.2.1", 1000))
    sim.add("b", public=("192.0.2.2", 2000))
    sim.start()
    ups, fails = bring_up(sim, "a", "b")
    assert ups and not fails
    not_after = sim.hosts["a"].engine.device.cert.not_after
    assert not_after - sim.now <= 86400 + 60
    sim.cloud_down = True
    lost = 0
    for i in range(72 * 6):
        lost += not sim.ping_ok("a" if i % 2 else "b", "b" if i % 2 else "a", i % 60000)
        sim.advance(600, step=30)
    assert sim.now > not_after + 2 * 86400
    assert lost == 0
    a_dev = sim.hosts["a"].engine.device
    assert a_dev.expired_grace_s > 0
    assert a_dev.counters["expired_certificate_in_outage"] + \
        sim.hosts["b"].engine.device.counters["expired_certificate_in_outage"] > 0
    sim.cloud_down = False
    sim.advance(120, step=1)
    assert all(h.engine.ready for h in sim.hosts.values())
    assert a_dev.expired_grace_s == 0.0, "once the cloud answers, no grace: it renews and revokes again"


def _restart(sim, name, records):
    """The node's process restarts: a new engine with the identity (and certificate) it had
    on disk, and the peer records it wrote."""
    old = sim.hosts[name].engine
    eng = NodeEngine(old.signaling.identity, sim.net.keys.ca.public, sim.net.keys.signaling.public,
                     CLOUD, name_hint=name, local_endpoints=old.signaling.local_endpoints,
                     rng=random.Random(999))
    sim.hosts[name].engine = eng
    restored = eng.restore(records, sim.now)
    eng.start(sim.now)
    sim.pump()
    return eng, restored


def test_a_restart_without_the_cloud_reaches_the_peers_it_had_from_its_records():
    """The cloud is down and node b restarts: from its cached records (certificates the CA
    signed, and endpoints) it reaches a again, answering for a's name at once; a, which kept
    its old session, notices b's silence and handshakes again (15 s), so traffic both ways
    resumes; a name b never had fails at once. When the cloud is back b logs in as usual."""
    sim = Sim()
    sim.add("a", public=("192.0.2.1", 1000))
    sim.add("b", public=("192.0.2.2", 2000))
    sim.add("c", public=("192.0.2.3", 3000))
    sim.start()
    ups, fails = bring_up(sim, "b", "a")
    assert ups and not fails and sim.ping_ok("a", "b", 1)
    records = sim.hosts["b"].engine.peer_records()
    assert [r["endpoint"] for r in records] == [["192.0.2.1", 1000]]
    sim.cloud_down = True
    sim.advance(5)
    b, restored = _restart(sim, "b", records)
    assert restored == 1 and b.device is not None and not b.ready
    assert b.resolve("a.ov.example", sim.now) == sim.vip("a")       # from the record, at once
    b.resolve("c.ov.example", sim.now)
    assert any(isinstance(e, TunnelFailed) and e.fqdn == "c.ov.example" for e in sim.events("b"))
    sim.pump()
    sim.advance(1)
    assert sim.ping_ok("b", "a", 2) and sim.ping_ok("a", "b", 3)
    sim.cloud_down = False
    sim.advance(30, step=0.5)
    assert b.ready and sim.ping_ok("a", "b", 4)


def test_a_peer_that_lost_its_keys_is_handshaken_again_after_15_seconds_of_silence():
    """a restarted (its session keys are gone); b still sends on its old session and
    hears nothing back, not even a keepalive: after KEEPALIVE_S + REKEY_TIMEOUT_S it
    handshakes again instead of waiting for the session's end (180 s)."""
    sim = Sim()
    sim.add("a", public=("192.0.2.1", 1000))
    sim.add("b", public=("192.0.2.2", 2000))
    sim.start()
    ups, _ = bring_up(sim, "a", "b")      # a initiated: b rekeys only near REJECT_AFTER_S
    assert ups and sim.ping_ok("b", "a", 1)
    sim.cloud_down = True                 # no route selection: only the rule can bring it back
    # a knows b again (its record) but has no session, and sends nothing itself
    a, restored = _restart(sim, "a", sim.hosts["a"].engine.peer_records())
    assert restored == 1
    ok = []
    for i in range(25):
        ok.append(sim.ping_ok("b", "a", 10 + i))
        sim.advance(0.5)
    assert not ok[0], "the old session is gone on a's side"
    first = ok.index(True)
    assert all(ok[first:]) and first * 1.0 <= 17, ok
    assert sim.hosts["b"].engine.device.counters["rekey_unanswered"] == 1


@pytest.mark.parametrize("offset", [True, False], ids=["cloud_time", "own_clock"])
def test_a_node_whose_clock_is_two_days_behind_checks_certificates_on_the_clouds_time(offset, monkeypatch):
    """A Pi without a real-time clock and without NTP starts where its clock was saved: behind
    by every hour it was off. The certificates the cloud issued since are not yet valid on that
    clock (and a certificate's renewal would be timed days too late). The LoginResponse carries
    the cloud's time; certificates are checked and renewed on it, and the status says so."""
    import dataclasses

    from cyphonic import signaling as sg_mod
    from cyphonic.node.engine_host import EngineHost
    if not offset:   # a login answer without the cloud's time (0): the node keeps to its own clock
        real = sg_mod.SignalingClient._on_login
        monkeypatch.setattr(sg_mod.SignalingClient, "_on_login", lambda self, msg, now: real(
            self, dataclasses.replace(msg, cloud_time=0) if isinstance(msg, sig.LoginResponse) else msg, now))
    sim = Sim()
    sim.add("a", ("192.0.2.1", 1000))
    sim.add("b", ("192.0.2.2", 2000))
    sim.add("c", ("192.0.2.3", 3000))
    days = 2 * 86400.0
    sim.hosts["a"].skew = -days
    sim.start()
    ups, fails = bring_up(sim, "a", "b")
    if not offset:
        assert not ups and fails and "not yet valid" in str(fails), (ups, fails)   # b's certificate, for a
        return
    assert ups and not fails, fails
    assert sim.ping_ok("a", "b") and sim.ping_ok("b", "a", seq=2)
    a = sim.hosts["a"].engine
    assert abs(a.signaling.clock_offset_s - days) < 2 and abs(a.device.clock_offset_s - days) < 2
    # a peer with the right clock initiates to it: its certificate is checked on the cloud's time too
    ups, fails = bring_up(sim, "c", "a")
    assert ups and not fails, fails
    assert sim.ping_ok("c", "a", seq=3)
    # renewed at two thirds of the certificate's life on the cloud's clock, not days later (nor sooner)
    cert = wire_cert.decode(a.signaling.identity.certificate)
    life = cert.not_after - cert.not_before
    relogin_cloud = a.signaling._relogin_at + a.signaling.clock_offset_s
    assert cert.not_before + life * 2 / 3 - 120 <= relogin_cloud <= cert.not_after - life / 3 + 120
    host = EngineHost(a, {}, deliver=lambda p: None, on_event=lambda e: None, log=lambda l: None,
                      health=None, clock=lambda: sim.now - days)
    warnings = host.conditions(sim.now - days)
    assert [w.code for w in warnings] == ["clock-off"], warnings
    assert "2 days behind the cloud's" in warnings[0].text
    # half an hour before its certificate expires on the cloud's clock (two days and a half hour on its own)
    near = cert.not_after - 1800 - a.signaling.clock_offset_s
    assert sorted(w.code for w in host.conditions(near)) == ["certificate-expiring", "clock-off"]
    host.clock_warning = False                 # (the adapter: only its own link says it)
    assert [w.code for w in host.conditions(sim.now - days)] == []
    # the clock is the status's and the metric's
    assert abs(a.signaling.status()["clock_offset_s"] - days) < 2


@pytest.mark.parametrize("cloud_time", [1, 2 ** 63], ids=["far_past", "far_future"])
def test_a_cloud_time_outside_the_certificate_it_came_with_is_not_believed(cloud_time, monkeypatch):
    """A broken clock at the cloud: the certificate it issued in the same answer is the better
    witness (its validity brackets the cloud's time); the node keeps the offset it had (0 at
    first), counts it, and renews within the certificate's life."""
    import dataclasses

    from cyphonic import signaling as sg_mod
    real = sg_mod.SignalingClient._on_login
    monkeypatch.setattr(sg_mod.SignalingClient, "_on_login", lambda self, msg, now: real(
        self, dataclasses.replace(msg, cloud_time=cloud_time) if isinstance(msg, sig.LoginResponse) else msg, now))
    sim = Sim()
    sim.add("a", ("192.0.2.1", 1000))
    sim.add("b", ("192.0.2.2", 2000))
    sim.start()
    a = sim.hosts["a"].engine
    assert a.signaling.clock_offset_s == 0 and a.device.clock_offset_s == 0
    assert a.signaling.drops["cloud_time_implausible"] >= 1
    cert = wire_cert.decode(a.signaling.identity.certificate)
    assert sim.now < a.signaling._relogin_at <= cert.not_after
    ups, fails = bring_up(sim, "a", "b")
    assert ups and not fails, fails


def test_before_any_login_the_clock_is_no_earlier_than_the_certificates_it_holds():
    """A restart without the cloud, with the clock two days behind (no RTC, no NTP): the
    latest not_before of the certificates the CA signed that it holds (its own, its records')
    is a time the cloud had reached, so certificates are checked no earlier than that and the
    peers it had come back. A record whose signature does not verify moves nothing."""
    from corefixtures import T0, World

    w = World()
    w.now = T0 + 2 * 86400                               # the last run: two days after T0
    me = w.identity("n", "100.64.0.9")
    peer = w.identity("p", "100.64.0.10")
    rogue = World(seed=9)                                # another CA: its times are not believed
    rogue.now = T0 + 30 * 86400
    forged = rogue.identity("q", "100.64.0.11")
    records = [{"certificate": peer.certificate.hex(), "endpoint": ["192.0.2.7", 4000]},
               {"certificate": forged.certificate.hex(), "endpoint": ["192.0.2.8", 4000]}]
    e = NodeEngine(StaticIdentity.generate(), w.ca.public, StaticIdentity.generate().public,
                   ("198.51.100.1", 47101), rng=random.Random(1))
    e.signaling.identity = me
    n = e.restore(records, T0)                           # restarted with the clock two days behind
    assert n == 1 and e.drops["restore_refused"] == 1, e.drops
    assert abs(e.device.clock_offset_s - (w.now - 60 - T0)) < 1
    # with the clock right (or ahead), nothing moves
    e2 = NodeEngine(StaticIdentity.generate(), w.ca.public, StaticIdentity.generate().public,
                    ("198.51.100.1", 47101), rng=random.Random(1))
    e2.signaling.identity = me
    assert e2.restore(records[:1], w.now + 3600) == 1 and e2.device.clock_offset_s == 0
