"""The control channel (node <-> cloud signaling), in memory with a fake clock."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyphonic import constants as C
from cyphonic import control as ctl
from cyphonic.handshake import StaticIdentity
from cyphonic.wire import signaling as sig

T0 = 1_800_000_000.0
CLOUD = ("198.51.100.1", 4500)
NODE = ("203.0.113.10", 40001)


class Net:
    def __init__(self):
        self.now = T0
        self.cloud_id = StaticIdentity.generate()
        self.server = ctl.ControlServer(self.cloud_id, rng=random.Random(1))
        self.node_id = StaticIdentity.generate()
        self.client = ctl.ControlClient(self.node_id, self.cloud_id.public, CLOUD, rng=random.Random(2))
        self.drop = None
        self.sent = []
        self.node_addr = NODE

    def pump(self):
        moved = True
        while moved:
            moved = False
            for data, addr in self.client.datagrams_to_send():
                self.sent.append(("c", data))
                moved = True
                if not (self.drop and self.drop("c", data)):
                    self.server.receive_datagram(data, self.node_addr, self.now)
            for data, addr in self.server.datagrams_to_send():
                self.sent.append(("s", data))
                moved = True
                if not (self.drop and self.drop("s", data)):
                    self.client.receive_datagram(data, CLOUD, self.now)

    def advance(self, seconds, step=0.25):
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for side in (self.client, self.server):
                t = side.get_timer()
                if t is not None and t <= self.now:
                    side.handle_timer(self.now)
            self.pump()

    def events(self, side):
        out = []
        while (e := side.next_event()) is not None:
            out.append(e)
        return out


def answer_all(net, respond):
    for e in net.events(net.server):
        if isinstance(e, ctl.Incoming) and e.msg.request_id:
            net.server.reply(e, respond(e), net.now)
    net.pump()


def test_login_request_and_reply_through_the_encrypted_channel():
    net = Net()
    req = net.client.request(sig.LoginRequest(token=b"tok", name_hint="cam1",
                                              static_public=net.node_id.public, software="t"), net.now)
    net.pump()
    evs = net.events(net.server)
    inc = [e for e in evs if isinstance(e, ctl.Incoming) and isinstance(e.msg, sig.LoginRequest)]
    assert len(inc) == 1 and inc[0].peer_static == net.node_id.public and inc[0].addr == NODE
    assert inc[0].certificate == b""  # first login: no certificate yet
    net.server.reply(inc[0], sig.Error(code=sig.ErrorCode.TOKEN_UNKNOWN, text="no such token"), net.now)
    net.pump()
    replies = [e for e in net.events(net.client) if isinstance(e, ctl.Reply)]
    assert len(replies) == 1 and replies[0].request == req
    assert replies[0].msg.code == sig.ErrorCode.TOKEN_UNKNOWN
    # nothing travelled in clear: the token never appears on the wire
    assert all(b"tok" not in d for _, d in net.sent)


def test_a_restarted_node_is_never_answered_from_its_previous_runs_cache():
    """Found by the image test: a node restarted (a reboot, a crash) while the cloud kept its
    session and answer cache. Its new run counted request ids from the start again, and the
    cloud answered its RouteRequest with the KeepaliveAck cached under that id: the route
    never completed. Ids now start at random per run, and an id reused for another request
    is a new request."""
    net = Net()
    net.client.request(sig.Keepalive(), net.now)
    net.pump()
    answer_all(net, lambda e: sig.KeepaliveAck(observed=sig.Endpoint(host=NODE[0], port=NODE[1])))
    assert [type(e.msg) for e in net.events(net.client) if isinstance(e, ctl.Reply)] == [sig.KeepaliveAck]
    used = net.client.peer.next_id
    # the next run: same identity, a new process; force the worst case, its ids meeting the old
    net.now += 5.0
    net.client = ctl.ControlClient(net.node_id, net.cloud_id.public, CLOUD, rng=random.Random(3))
    net.client.peer.next_id = used - 1
    req = net.client.request(sig.RouteRequest(peer_fqdn="b.example"), net.now)
    net.pump()
    incoming = [e for e in net.events(net.server) if isinstance(e, ctl.Incoming)]
    assert [type(e.msg) for e in incoming] == [sig.RouteRequest]          # delivered, not served stale
    assert net.server.counters["request_id_reused"] == 1
    net.server.reply(incoming[0], sig.Error(code=sig.ErrorCode.UNKNOWN_PEER, text="x"), net.now)
    net.pump()
    replies = [e for e in net.events(net.client) if isinstance(e, ctl.Reply)]
    assert len(replies) == 1 and replies[0].request == req and isinstance(replies[0].msg, sig.Error)
    # ... and a real retransmission of that request is still answered from the cache
    lost_answer = net.server.counters["duplicate_requests"]
    net.client.peer.pending[req.request_id] = ctl._Pending(req, sig.encode(req), net.now, 1.0, 0, 1)
    net.client._on_retry(net.client.peer, net.client.peer.pending[req.request_id], net.now)
    net.pump()
    assert net.server.counters["duplicate_requests"] == lost_answer + 1
    assert [e for e in net.events(net.server) if isinstance(e, ctl.Incoming)] == []


def test_request_ids_start_at_random_per_counterpart():
    ids = set()
    for seed in range(20):
        c = ctl.ControlClient(StaticIdentity.generate(), b"\x01" * 32, CLOUD, rng=random.Random(seed))
        ids.add(c.request(sig.Keepalive(), T0).request_id)
    assert len(ids) == 20 and all(0 < i < C.SERVER_REQUEST_ID_BASE for i in ids)


def test_lost_reply_is_answered_from_the_cache_not_processed_twice():
    net = Net()
    net.client.request(sig.RouteRequest(peer_fqdn="b.example"), net.now)
    net.pump()
    lost = []
    net.drop = lambda side, d: side == "s" and d[0] == 8 and len(lost) < 1 and not lost.append(d)
    answer_all(net, lambda e: sig.Error(code=sig.ErrorCode.UNKNOWN_PEER, text="x"))
    assert lost
    net.advance(C.CONTROL_RETRY_S + 0.5)
    server_events = [e for e in net.events(net.server) if isinstance(e, ctl.Incoming)]
    assert server_events == []  # the retransmission was not delivered again
    assert net.server.counters["duplicate_requests"] == 1
    assert [type(e) for e in net.events(net.client) if isinstance(e, ctl.Reply)] == [ctl.Reply]


def test_requests_time_out_when_the_cloud_is_silent():
    net = Net()
    net.drop = lambda side, d: True
    net.client.request(sig.RouteRequest(peer_fqdn="b.example"), net.now)
    net.advance(C.REKEY_ATTEMPT_S + 10, step=1.0)
    evs = net.events(net.client)
    assert any(isinstance(e, ctl.RequestTimedOut) for e in evs)
    assert any(isinstance(e, ctl.Unreachable) for e in evs)


def test_cloud_initiated_request_and_node_reply():
    net = Net()
    net.client.notify(sig.Keepalive(), net.now)
    net.pump()
    net.events(net.server)
    msg = net.server.request(net.node_id.public, sig.TunnelRequest(
        route_id=5, initiator_fqdn="a.example", initiator_vip4=ipaddress.IPv4Address("100.64.0.1"), initiator_certificate=b"c",
        initiator_endpoints=(), route_type=sig.RouteType.DIRECT), net.now)
    assert msg.request_id >= C.SERVER_REQUEST_ID_BASE
    net.pump()
    inc = [e for e in net.events(net.client) if isinstance(e, ctl.Incoming)]
    assert isinstance(inc[0].msg, sig.TunnelRequest)
    net.client.reply(inc[0], sig.TunnelResponse(route_id=5, accepted=True, code=None), net.now)
    net.pump()
    rep = [e for e in net.events(net.server) if isinstance(e, ctl.Reply)]
    assert rep and rep[0].msg.accepted


def test_rekey_keeps_the_channel_and_node_roaming_is_seen():
    net = Net()
    for i in range(8):
        net.client.request(sig.RouteRequest(peer_fqdn="b.example"), net.now)
        net.pump()
        answer_all(net, lambda e: sig.Error(code=sig.ErrorCode.UNKNOWN_PEER, text=""))
        net.advance(30, step=1.0)
    assert net.client.counters["initiations_sent"] >= 2
    net.node_addr = ("192.0.2.99", 5555)
    net.client.request(sig.RouteRequest(peer_fqdn="b.example"), net.now)
    net.pump()
    inc = [e for e in net.events(net.server) if isinstance(e, ctl.Incoming)]
    assert inc[-1].addr == ("192.0.2.99", 5555)
    assert net.server.peer(net.node_id.public).addr == ("192.0.2.99", 5555)


def test_replayed_control_packets_are_refused():
    net = Net()
    net.client.request(sig.RouteRequest(peer_fqdn="b.example"), net.now)
    net.pump()
    net.events(net.server)
    for side, d in list(net.sent):
        if side == "c":
            net.server.receive_datagram(d, ("203.0.113.66", 1), net.now + 1)
    assert net.server.drops["replay"] >= 1
    assert net.server.drops["replay_initiation"] == 1
    assert net.events(net.server) == []


def test_tunnel_messages_are_not_control_messages():
    from corefixtures import World, ping
    w = World()
    a = w.device("alice", "100.64.0.1")
    b = w.device("bob", "100.64.0.2")
    a.add_peer(b.identity.certificate, w.now, endpoint=w.addr["bob"])
    a.send_packet(ping(a, b, 0), w.now)
    w.collect()
    net = Net()
    for data, _, _ in w.wire:
        net.server.receive_datagram(data, NODE, net.now)
    assert net.server.drops["unknown_type"] >= 1 and not net.server.peers


def _handshake_only(net, i, host="192.0.2.1"):
    c = ctl.ControlClient(StaticIdentity.generate(), net.cloud_id.public, CLOUD, rng=random.Random(i))
    c.notify(sig.Keepalive(), net.now)
    for d, _ in c.datagrams_to_send():
        net.server.receive_datagram(d, (host, 1000 + i), net.now)
    return c


def _confirmed(net, i):
    c = _handshake_only(net, i)
    for d, _ in net.server.datagrams_to_send():
        c.receive_datagram(d, CLOUD, net.now)
    for d, _ in c.datagrams_to_send():
        net.server.receive_datagram(d, ("192.0.2.1", 1000 + i), net.now)
    return c


def test_idle_nodes_are_forgotten_and_the_table_is_bounded():
    net = Net()
    net.server.max_peers = 3
    for i in range(5):
        _confirmed(net, i)
    assert len(net.server.peers) == 3 and net.server.drops["peer_evicted"] == 2
    net.advance(C.CONTROL_PEER_IDLE_S + C.CONTROL_SWEEP_S + 1, step=5.0)
    assert len(net.server.peers) == 0


def test_an_initiation_flood_cannot_evict_confirmed_nodes(monkeypatch):
    net = Net()
    monkeypatch.setattr(C, "MAX_CONTROL_UNCONFIRMED", 8)
    real = [_confirmed(net, i) for i in range(3)]
    for i in range(100):  # fresh keys, never confirmed (spoofed sources cannot answer)
        _handshake_only(net, 100 + i, host=f"198.18.0.{i + 1}")
    assert len(net.server.peers) == 3
    assert len(net.server._unconfirmed) == 8 and net.server.drops["unconfirmed_evicted"] == 92
    assert all(net.server.peer(c.identity.public) is not None for c in real)


def test_control_data_under_expired_keys_is_refused():
    net = Net()
    net.client.notify(sig.Keepalive(), net.now)
    net.pump()
    old = [d for side, d in net.sent if side == "c" and d[0] == 8][-1]
    bumped = bytearray(old)
    net.server.receive_datagram(bytes(bumped), NODE, net.now + C.REJECT_AFTER_S + 1)
    assert net.server.drops["expired"] == 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1500), st.sampled_from([b"", b"\x06", b"\x07", b"\x08"]))
def test_garbage_is_counted_never_raised(blob, prefix):
    net = Net()
    net.client.notify(sig.Keepalive(), net.now)
    net.pump()
    before = sum(net.server.drops.values()), sum(net.client.drops.values())
    net.server.receive_datagram(prefix + blob, NODE, net.now)
    net.client.receive_datagram(prefix + blob, CLOUD, net.now)
    after = sum(net.server.drops.values()), sum(net.client.drops.values())
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1
    assert not any(k.startswith("internal_") for k in list(net.server.drops) + list(net.client.drops))


def _timed_channel(rtt=0.01):
    """A channel whose first request was answered after ``rtt``: its round trip is timed."""
    net = Net()
    net.client.request(sig.RouteRequest(peer_fqdn="a.example"), net.now)
    net.pump()
    net.now += rtt
    answer_all(net, lambda e: sig.Error(code=sig.ErrorCode.UNKNOWN_PEER, text="x"))
    assert [type(e) for e in net.events(net.client)].count(ctl.Reply) == 1
    assert net.client.peer.srtt is not None
    return net


def test_once_round_trips_are_timed_a_lost_request_is_resent_early():
    net = _timed_channel()
    srtt = net.client.peer.srtt
    lost = []
    net.drop = lambda side, d: side == "c" and len(lost) < 1 and not lost.append(d)
    net.client.request(sig.RouteRequest(peer_fqdn="b.example"), net.now)
    net.pump()
    assert lost and not net.events(net.server)
    t0 = net.now
    got = incoming = None
    while got is None and net.now - t0 < C.CONTROL_RETRY_S:
        net.advance(0.05, step=0.05)
        incoming = [e for e in net.events(net.server) if isinstance(e, ctl.Incoming)]
        if incoming:
            got = net.now - t0
    # the RTO of a 10 ms LAN round trip is below the floor: resent at 0.2 s, not 1 s
    assert got is not None and C.CONTROL_FAST_RETRY_MIN_S <= got < C.CONTROL_FAST_RETRY_MIN_S + 0.1
    assert net.client.counters["requests_resent_early"] == 1
    net.server.reply(incoming[0], sig.Error(code=sig.ErrorCode.UNKNOWN_PEER, text="x"), net.now)
    net.pump()
    assert [type(e) for e in net.events(net.client)].count(ctl.Reply) == 1
    assert net.client.peer.srtt == srtt  # Karn: the answer to a resent request is no sample
    net.advance(C.CONTROL_RETRY_S * 2)   # nothing more is resent once answered
    assert net.client.counters["requests_retransmitted"] == 0


def test_the_early_resend_is_extra_the_schedule_and_timeout_stay():
    net = _timed_channel()
    net.drop = lambda side, d: True
    net.client.request(sig.RouteRequest(peer_fqdn="b.example"), net.now)
    t0 = net.now
    timed_out = None
    while timed_out is None and net.now - t0 < 40:
        net.advance(0.25)
        if any(isinstance(e, ctl.RequestTimedOut) for e in net.events(net.client)):
            timed_out = net.now - t0
    assert timed_out is not None and abs(timed_out - 31) <= 0.25
    assert net.client.counters["requests_resent_early"] == 1
    assert net.client.counters["requests_retransmitted"] == C.CONTROL_RETRIES


def test_no_early_resend_before_a_round_trip_was_timed_or_when_the_rto_is_long():
    net = Net()
    net.drop = lambda side, d: side == "c" and d[0] == 8
    net.client.request(sig.RouteRequest(peer_fqdn="b.example"), net.now)
    net.advance(C.CONTROL_RETRY_S - 0.1, step=0.05)
    assert net.client.counters["requests_resent_early"] == 0
    slow = _timed_channel(rtt=0.3)  # RTO = 0.3 + 4 x 0.15 = 0.9 s: too close to the regular 1 s
    assert slow.client.peer.early_resend_at(slow.now) is None
    fast = _timed_channel(rtt=0.05)  # RTO = 0.05 + 4 x 0.025 = 0.15 s -> the 0.2 s floor
    assert fast.client.peer.early_resend_at(fast.now) == fast.now + C.CONTROL_FAST_RETRY_MIN_S


def test_a_request_that_timed_out_waiting_for_a_session_is_not_sent_later():
    """A request queued for a session that did not come (the cloud away) and then timed out is
    dropped from the queue too: when the session comes it is not sent (a signaling client that
    logs in again through a long outage would otherwise reach the cloud with every old login)."""
    net = Net()
    net.drop = lambda side, d: True
    net.client.request(sig.RouteRequest(peer_fqdn="old.example"), net.now)
    net.advance(32, step=1.0)                         # 1 + 2 + 4 + 8 + 8 + 8: timed out
    assert any(isinstance(e, ctl.RequestTimedOut) for e in net.events(net.client))
    assert len(net.client.queue) == 0
    net.drop = None
    net.client.request(sig.RouteRequest(peer_fqdn="new.example"), net.now)
    net.client.set_cloud_address(CLOUD, net.now)      # a fresh handshake: the cloud answers it
    net.pump()
    asked = [e.msg.peer_fqdn for e in net.events(net.server) if isinstance(e, ctl.Incoming)
             and isinstance(e.msg, sig.RouteRequest)]
    assert asked == ["new.example"]


def test_an_answer_that_comes_twice_is_not_taken_for_a_request_both_ways():
    """A request resent early is answered twice; the second answer finds nothing pending. Taken
    for a new request it would be answered with an Error, which the other side would answer from
    its cache, and so on for ever (a core's worth of CPU per pair). Both sides drop it, counted."""
    net = Net()
    msg = net.client.request(sig.Keepalive(), net.now)
    net.pump()
    inc = [e for e in net.events(net.server) if isinstance(e, ctl.Incoming)][0]
    # the node resends the same request before the answer arrives: the cloud sees it twice
    net.server.reply(inc, sig.KeepaliveAck(observed=sig.Endpoint(*NODE)), net.now)
    net.server.reply(inc, sig.KeepaliveAck(observed=sig.Endpoint(*NODE)), net.now)   # a second answer
    net.pump()
    assert [type(e) for e in net.events(net.client) if not isinstance(e, ctl.Connected)] == [ctl.Reply]
    assert net.client.counters["late_answers"] == 1
    before = len(net.sent)
    net.advance(5.0)
    assert len(net.sent) - before <= 2, net.sent[before:]      # no ping-pong (keepalive-free: nothing)
    # the same from the cloud's side: a node answering a cloud request twice
    req = net.server.request(net.node_id.public, sig.TunnelRequest(
        route_id=5, initiator_fqdn="a.example", initiator_vip4=ipaddress.IPv4Address("100.64.0.1"),
        initiator_certificate=b"c", initiator_endpoints=(), route_type=sig.RouteType.DIRECT), net.now)
    net.pump()
    inc = [e for e in net.events(net.client) if isinstance(e, ctl.Incoming)][0]
    for _ in range(2):
        net.client.reply(inc, sig.TunnelResponse(route_id=5, accepted=True, code=None), net.now)
    net.pump()
    assert [type(e) for e in net.events(net.server)] == [ctl.Reply]
    assert net.server.counters["late_answers"] == 1 and req.request_id >= C.SERVER_REQUEST_ID_BASE
    assert msg.request_id < C.SERVER_REQUEST_ID_BASE
