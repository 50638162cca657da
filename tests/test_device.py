"""The two-endpoint scenario in memory with a fake clock: handshake, data, loss,
retransmission, rekey, expiry, keepalives, roaming, and bad input of every kind."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyphonic import constants as C
from cyphonic import events as ev
from cyphonic.ipv4 import icmp_echo

from corefixtures import World, ping


def pair(**kw):
    w = World()
    a = w.device("alice", "100.64.0.1")
    b = w.device("bob", "100.64.0.2", **kw)
    a.add_peer(b.identity.certificate, w.now, endpoint=w.addr["bob"])
    return w, a, b


def received(w, name):
    return [e.packet for e in w.events(name) if isinstance(e, ev.PacketReceived)]


def test_handshake_and_data_both_ways():
    w, a, b = pair()
    a.send_packet(ping(a, b, 1), w.now)
    w.pump()
    ea, eb = w.events("alice"), w.events("bob")
    assert any(isinstance(e, ev.HandshakeCompleted) and e.initiator for e in ea)
    assert any(isinstance(e, ev.PeerAdded) and e.fqdn.startswith("alice") for e in eb)
    assert [e.packet for e in eb if isinstance(e, ev.PacketReceived)] == [ping(a, b, 1)]
    b.send_packet(ping(b, a, 2), w.now)
    w.pump()
    assert received(w, "alice") == [ping(b, a, 2)]
    st_a = a.status(w.now)["peers"][0]
    assert st_a["tx_packets"] == 1 and st_a["rx_packets"] == 1 and st_a["session"]
    assert not a.drops and not b.drops


def test_packets_staged_during_handshake_are_delivered_in_order():
    w, a, b = pair()
    for i in range(5):
        a.send_packet(ping(a, b, i), w.now)
    w.pump()
    assert received(w, "bob") == [ping(a, b, i) for i in range(5)]


def test_lost_initiation_is_retransmitted_with_a_fresh_ephemeral():
    w, a, b = pair()
    lost = []
    w.drop_filter = lambda d, s, t: d[0] == 1 and len(lost) < 2 and not lost.append(d)
    a.send_packet(ping(a, b, 1), w.now)
    w.pump()
    assert received(w, "bob") == []
    w.advance(2 * (C.REKEY_TIMEOUT_S + C.REKEY_TIMEOUT_JITTER_S) + 0.1)
    assert received(w, "bob") == [ping(a, b, 1)]
    assert lost[0][8:40] != lost[1][8:40]  # different ephemeral keys
    assert a.counters["initiations_retransmitted"] >= 2


def test_handshake_gives_up_after_rekey_attempt_time_and_counts_staged_packets():
    w, a, b = pair()
    w.drop_filter = lambda d, s, t: True
    for i in range(3):
        a.send_packet(ping(a, b, i), w.now)
    w.advance(C.REKEY_ATTEMPT_S + C.REKEY_TIMEOUT_S + 1)
    failed = [e for e in w.events("alice") if isinstance(e, ev.HandshakeFailed)]
    assert len(failed) == 1 and failed[0].packets_dropped == 3
    assert a.drops["tx_handshake_timeout"] == 3
    assert a.peer(b.cert.fqdn).handshake is None


def test_rekey_keeps_traffic_flowing_without_loss():
    w, a, b = pair()
    sent = 0
    for second in range(0, 400):
        a.send_packet(ping(a, b, sent), w.now)
        sent += 1
        w.pump()
        w.advance(1.0)
    got = received(w, "bob")
    assert len(got) == sent
    assert a.peer(b.cert.fqdn).handshakes >= 3  # rekeyed every REKEY_AFTER_S
    assert not b.drops


def test_in_flight_packets_of_the_previous_key_are_accepted_after_rekey():
    w, a, b = pair()
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    w.events("bob")
    held = []
    w.drop_filter = lambda d, s, t: d[0] == 4 and s == w.addr["alice"] and len(held) < 1 and not held.append(d)
    w.advance(C.REKEY_AFTER_S + 1)
    a.send_packet(ping(a, b, 1), w.now)  # old key, triggers rekey; this packet is "delayed"
    w.pump()
    w.drop_filter = None
    assert held
    b.receive_datagram(held[0], w.addr["alice"], w.now)  # arrives after the new handshake
    assert ping(a, b, 1) in received(w, "bob")


def test_session_is_rejected_after_reject_after_time():
    w, a, b = pair()
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    old = [d for d, s, t in w.captured if d[0] == 4 and s == w.addr["alice"]][-1]
    w.advance(C.REJECT_AFTER_S + 1)
    assert a.peer(b.cert.fqdn).current is None
    assert any(isinstance(e, ev.SessionExpired) for e in w.events("alice"))
    b.receive_datagram(old, w.addr["alice"], w.now)
    assert b.drops["unknown_index"] + b.drops["expired"] == 1
    a.send_packet(ping(a, b, 1), w.now)  # a new handshake starts by itself
    w.pump()
    assert ping(a, b, 1) in received(w, "bob")


def test_passive_keepalive_after_receiving_data():
    w, a, b = pair()
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    before = a.counters["keepalives_received"]
    w.advance(C.KEEPALIVE_S + 1)
    assert a.counters["keepalives_received"] == before + 1


def test_persistent_keepalive_for_nat():
    w, a, b = pair()
    a.add_peer(b.identity.certificate, w.now, endpoint=w.addr["bob"], persistent_keepalive_s=C.NAT_KEEPALIVE_S)
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    n0 = b.counters["keepalives_received"]
    w.advance(3 * C.NAT_KEEPALIVE_S + 1)
    assert b.counters["keepalives_received"] - n0 >= 3


def test_crypto_routing_drops_spoofed_inner_source():
    w, a, b = pair()
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    w.events("alice")
    kp = b.peer(a.cert.fqdn).current
    spoofed = icmp_echo("100.64.0.99", str(a.cert.vip4), 1, 1)
    a.receive_datagram(kp.sender.seal(spoofed), w.addr["bob"], w.now)
    wrong_dst = icmp_echo(str(b.cert.vip4), "100.64.0.77", 1, 1)
    a.receive_datagram(kp.sender.seal(wrong_dst), w.addr["bob"], w.now)
    assert a.drops["crypto_route"] == 2
    assert received(w, "alice") == []
    # outbound: a packet whose source is not ours, or to no peer, is not sealed
    a.send_packet(icmp_echo("100.64.0.50", str(b.cert.vip4), 1, 1), w.now)
    a.send_packet(icmp_echo(str(a.cert.vip4), "100.64.9.9", 1, 1), w.now)
    assert a.drops["tx_bad_source"] == 1 and a.drops["tx_no_peer"] == 1


def test_replays_are_refused_and_do_not_move_the_endpoint():
    w, a, b = pair()
    for i in range(3):
        a.send_packet(ping(a, b, i), w.now)
    w.pump()
    w.events("bob")
    attacker = ("203.0.113.66", 6666)
    for data, src, dst in list(w.captured):
        if src == w.addr["alice"]:
            b.receive_datagram(data, attacker, w.now + 1)
    assert b.drops["replay"] >= 3
    assert b.drops["replay_initiation"] + b.drops["ratelimited_peer"] == 1
    assert b.peer(a.cert.fqdn).endpoint == w.addr["alice"]
    assert received(w, "bob") == []


def test_roaming_moves_the_endpoint_on_an_authenticated_packet():
    w, a, b = pair()
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    w.events("bob")
    w.addr["alice"] = ("198.51.100.7", 51000)  # alice's address changed
    a.send_packet(ping(a, b, 1), w.now)
    w.pump()
    evs = w.events("bob")
    assert any(isinstance(e, ev.EndpointChanged) and e.new == ("198.51.100.7", 51000) for e in evs)
    b.send_packet(ping(b, a, 2), w.now)
    w.pump()
    assert received(w, "alice") == [ping(b, a, 2)]


def test_unknown_peer_refused_when_not_accepting():
    w, a, b = pair(accept_unknown_peers=False)
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    assert b.drops["unknown_peer"] == 1 and not b.peers_by_fqdn


def test_revoked_and_expired_certificates_are_refused():
    w, a, b = pair()
    b.trust.revoked.add(a.cert.serial)
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    assert b.drops["cert_revoked"] == 1
    w2 = World(seed=2)
    x = w2.device("x", "100.64.0.1")
    y = w2.device("y", "100.64.0.2")
    # x's own certificate expires tomorrow; y judges it the day after
    x.identity = w2.identity("x", "100.64.0.1", not_after=w2.now + 86400)
    x.add_peer(y.identity.certificate, w2.now, endpoint=w2.addr["y"])
    w2.now += 2 * 86400
    x.send_packet(ping(x, y, 0), w2.now)
    w2.pump()
    assert y.drops["cert_expired"] == 1


def test_initiation_flood_from_one_source_is_rate_limited():
    w, a, b = pair()
    a.send_packet(ping(a, b, 0), w.now)
    w.collect()
    init = [d for d, s, t in w.wire if d[0] == 1][0]
    for _ in range(C.HANDSHAKE_BURST_PER_SOURCE + 20):
        b.receive_datagram(init, ("203.0.113.9", 9), w.now)
    assert b.drops["ratelimited"] >= 20


def test_initiation_for_another_node_costs_no_dh():
    w, a, b = pair()
    c = w.device("carol", "100.64.0.3")
    a.send_packet(ping(a, b, 0), w.now)
    w.collect()
    init = [d for d, s, t in w.wire if d[0] == 1][0]
    c.receive_datagram(init, w.addr["alice"], w.now)
    assert c.drops["mac1"] == 1 and not c.peers_by_fqdn


def test_staged_queue_is_bounded():
    w, a, b = pair()
    w.drop_filter = lambda d, s, t: True
    for i in range(C.STAGED_PACKETS_PER_PEER + 10):
        a.send_packet(ping(a, b, i), w.now)
    assert len(a.peer(b.cert.fqdn).staged) == C.STAGED_PACKETS_PER_PEER
    assert a.drops["tx_staged_overflow"] == 10


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_mangled_datagram_is_a_counted_drop_and_changes_nothing(data):
    w, a, b = pair()
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    w.events("bob")
    sample = [d for d, s, t in w.captured]
    base = data.draw(st.sampled_from(sample + [b""]))
    kind = data.draw(st.sampled_from(["truncate", "flip", "random", "extend"]))
    if kind == "truncate" and base:
        mangled = base[: data.draw(st.integers(0, len(base) - 1))]
    elif kind == "flip" and base:
        i = data.draw(st.integers(0, len(base) * 8 - 1))
        mangled = bytearray(base)
        mangled[i // 8] ^= 1 << (i % 8)
        mangled = bytes(mangled)
    elif kind == "extend":
        mangled = base + data.draw(st.binary(min_size=1, max_size=64))
    else:
        mangled = data.draw(st.binary(max_size=1600))
    peer = b.peer(a.cert.fqdn)
    before = (peer.endpoint, peer.current.local_index, peer.rx_packets)
    dropped_before = sum(b.drops.values())
    b.receive_datagram(mangled, ("203.0.113.5", 5), w.now + 1)
    assert sum(b.drops.values()) == dropped_before + 1
    assert received(w, "bob") == []
    assert (peer.endpoint, peer.current.local_index, peer.rx_packets) == before
    assert not any(k.startswith("internal_") for k in b.drops)


def test_fast_path_matches_the_slow_path_and_falls_back_when_it_must():
    w, a, b = pair()
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    w.events("bob")
    # the common case: sealed by fast_send, opened by fast_receive
    out = a.fast_send(ping(a, b, 1), w.now)
    assert out is not None and out[1] == w.addr["bob"]
    assert b.fast_receive(out[0], w.addr["alice"], w.now) == ping(a, b, 1)
    # a replay is consumed and counted, never delivered twice
    assert b.fast_receive(out[0], w.addr["alice"], w.now) == b"" and b.drops["replay"] == 1
    # from another address: the slow path decides (it moves the endpoint on an authenticated packet)
    out = a.fast_send(ping(a, b, 2), w.now)
    assert b.fast_receive(out[0], ("198.51.100.9", 1), w.now) is None
    # a keepalive is consumed; a spoofed inner source is a counted drop
    kp = a.peer(b.cert.fqdn).current
    assert b.fast_receive(kp.sender.seal(b""), w.addr["alice"], w.now) == b""
    spoof = icmp_echo("100.64.0.99", str(b.cert.vip4), 1, 1)
    assert b.fast_receive(kp.sender.seal(spoof), w.addr["alice"], w.now) == b"" and b.drops["crypto_route"] == 1
    # no session, wrong source, rekey due: the slow path
    assert a.fast_send(icmp_echo(str(a.cert.vip4), "100.64.9.9", 1, 1), w.now) is None
    assert a.fast_send(icmp_echo("100.64.0.50", str(b.cert.vip4), 1, 1), w.now) is None
    assert a.fast_send(ping(a, b, 3), w.now + C.REKEY_AFTER_S + 1) is None
    assert b.fast_receive(b"\x04" + bytes(40), w.addr["alice"], w.now) is None


def test_an_unanswered_initiation_is_retransmitted_after_1_2_4_8_s_then_every_5_s():
    """A lost first initiation must cost about a second, not five: a DNS query waits
    (the resolver holds it 5 s) for the tunnel. A silent peer still gets one per 5 s."""
    w, a, b = pair()
    sent = []
    w.drop_filter = lambda d, s, t: d[0] == 1 and not sent.append(w.now)
    start = w.now
    a.send_packet(ping(a, b, 1), w.now)
    w.pump()
    w.advance(30.0)
    after = [t - start for t in sent]
    gaps = [y - x for x, y in zip(sent, sent[1:])]
    jitter = C.REKEY_TIMEOUT_JITTER_S + 0.01
    assert after[0] == 0
    assert 1.0 <= after[1] <= 1.0 + jitter, after             # the first retransmission: 1 s
    for x, y in zip(after[1:3], after[2:4]):                   # then the wait doubles: ~2, ~4
        assert 2 * x <= y <= 2 * x + jitter, after
    assert all(C.REKEY_TIMEOUT_S <= g <= C.REKEY_TIMEOUT_S + jitter for g in gaps[3:]), after   # ~8 (capped), then 5 s
    assert len(gaps[3:]) >= 4, after
