"""Cookie replies under load (docs/protocol.md 4.10): the wire format, known answers, the
responder's load rule and secret rotation, and both handshakes (tunnel and control)
completing through a cookie while a spoofed-source flood is refused without any
Diffie-Hellman work."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic import constants as C
from cyphonic import control as ctl
from cyphonic import crypto
from cyphonic import events as ev
from cyphonic import handshake as hs
from cyphonic.cookie import CookieJar, CookieResponder, address_bytes
from cyphonic.errors import AuthenticationError, ParseError
from cyphonic.handshake import StaticIdentity
from cyphonic.wire import cookie as wire
from cyphonic.wire import handshake as wire_hs

from corefixtures import World, ping

VECTORS = json.loads((Path(__file__).parent / "vectors" / "cookie.json").read_text())
T0 = 1_800_000_000.0


def _spoofed_initiation(responder_public: bytes, rng: random.Random, mtype: int = wire_hs.MSG_INITIATION,
                        purpose_mac_key: bytes | None = None) -> bytes:
    """What a flooder sends: random fields of the right layout and a valid mac1."""
    body = wire_hs.Initiation(rng.getrandbits(32), rng.randbytes(32), rng.randbytes(48),
                              rng.randbytes(wire_hs.INIT_MIN_PAYLOAD), mtype=mtype)
    mac1 = crypto.mac(purpose_mac_key or hs.mac1_key(responder_public), body.body())
    return wire_hs.Initiation(body.sender_index, body.ephemeral, body.encrypted_static,
                              body.encrypted_payload, mac1, mtype=mtype).encode()


# --- wire ----------------------------------------------------------------------------------

def test_reply_round_trips_and_refuses_every_other_length_and_type():
    msg = wire.CookieReply(7, b"n" * 24, b"c" * 32)
    data = msg.encode()
    assert len(data) == wire.REPLY_BYTES and wire.decode(data) == msg
    with pytest.raises(ParseError) as e:
        wire.decode(data[:-1])
    assert e.value.reason == "short"
    with pytest.raises(ParseError) as e:
        wire.decode(data + b"\x00")
    assert e.value.reason == "oversize"
    with pytest.raises(ParseError) as e:
        wire.decode(data, wire.MSG_CONTROL_COOKIE)
    assert e.value.reason == "type"
    with pytest.raises(ParseError) as e:
        wire.decode(data[:2] + b"\x01" + data[3:])
    assert e.value.reason == "type"
    with pytest.raises(ValueError):
        wire.CookieReply(7, b"n" * 23, b"c" * 32).encode()
    with pytest.raises(ValueError):
        wire.CookieReply(7, b"n" * 24, b"c" * 32, mtype=4).encode()


# --- known answers -------------------------------------------------------------------------

def test_known_answers_through_the_module():
    from vectors.make_cookie_vectors import compute
    assert compute(VECTORS["inputs"]) == VECTORS["outputs"]


def test_known_answers_from_the_formulas_of_the_specification():
    """docs/protocol.md 4.10, written out with hashlib and libsodium only."""
    i, o = VECTORS["inputs"], VECTORS["outputs"]
    static = bytes.fromhex(i["responder_static_public"])
    secret, nonce = bytes.fromhex(i["secret"]), bytes.fromhex(i["nonce"])
    initiation = bytes.fromhex(o["initiation"])
    source = f"{i['source'][0]}|{i['source'][1]}".encode()
    cookie = hashlib.blake2b(source, key=secret, digest_size=16).digest()
    key = hashlib.blake2b(b"cookie--" + static, digest_size=64).digest()[:32]
    mac1 = initiation[-32:-16]
    sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(cookie, mac1, nonce, key)
    reply = bytes([3, 0, 0, 0]) + i["sender_index"].to_bytes(4, "big") + nonce + sealed
    assert reply.hex() == o["cookie_reply"]
    mac2 = hashlib.blake2b(initiation[:-16], key=cookie, digest_size=16).digest()
    assert (initiation[:-16] + mac2).hex() == o["stamped_initiation"]


# --- the responder's rule ------------------------------------------------------------------

def _responder(load=4.0):
    ident = StaticIdentity.generate()
    return ident, CookieResponder(ident.public, load_per_s=load)


def test_not_under_load_everything_passes_and_under_load_only_proven_sources():
    ident, r = _responder(load=4)
    rng = random.Random(1)
    src = ("192.0.2.9", 5000)
    results = [r.admit(_spoofed_initiation(ident.public, rng), src, T0) for _ in range(6)]
    assert results == [True] * 4 + [False] * 2 and r.under_load(T0)
    first = _spoofed_initiation(ident.public, rng)
    jar = CookieJar(ident.public)
    jar.consume(r.reply(first, 77, src, T0), first, T0)
    again = jar.stamp(_spoofed_initiation(ident.public, rng), T0)
    assert r.admit(again, src, T0)
    assert not r.admit(again, ("192.0.2.9", 5001), T0), "a cookie is bound to the address and port"
    assert not r.admit(again, ("192.0.2.10", 5000), T0)
    # The flood stops: a second later the bucket has refilled and the hold has passed.
    assert r.admit(_spoofed_initiation(ident.public, rng), src, T0 + C.UNDER_LOAD_HOLD_S + 0.01)
    assert not r.under_load(T0 + C.UNDER_LOAD_HOLD_S + 0.01)


def test_a_sustained_flood_keeps_the_responder_under_load():
    ident, r = _responder(load=10)
    rng = random.Random(2)
    msgs = [_spoofed_initiation(ident.public, rng) for _ in range(4)]
    now = T0
    admitted = 0
    for step in range(400):  # 40 s at 200 initiations a second, twenty times the budget
        now = T0 + step * 0.1
        for m in msgs * 5:
            admitted += r.admit(m, ("198.18.%d.%d" % (step % 250, 1 + step % 200), 1000 + step), now)
        assert r.under_load(now)
    assert admitted <= 10 + 1, "nothing unproven passes once under load, however long the flood"
    quiet = now + C.UNDER_LOAD_HOLD_S + 0.01
    assert not r.under_load(quiet) and r.admit(msgs[0], ("192.0.2.1", 1), quiet)


def test_a_cookie_survives_one_secret_change_not_two():
    ident, r = _responder(load=1)
    rng = random.Random(3)
    src = ("2001:db8::7", 4500)
    r.admit(_spoofed_initiation(ident.public, rng), src, T0)
    r.mark_loaded(T0)
    init = _spoofed_initiation(ident.public, rng)
    jar = CookieJar(ident.public)
    jar.consume(r.reply(init, 1, src, T0), init, T0)
    later = T0 + C.COOKIE_SECRET_LIFETIME_S + 1
    r.mark_loaded(later)
    assert r.proven(jar.stamp(init, T0 + 100), src, later), "one change: the previous secret still counts"
    much_later = later + C.COOKIE_SECRET_LIFETIME_S + 1
    r.mark_loaded(much_later)
    r.proven(init, src, much_later)  # rotates again
    assert not r.proven(jar.stamp(init, T0 + 100), src, much_later)


def test_the_initiator_drops_a_stale_cookie():
    ident, r = _responder(load=1)
    init = _spoofed_initiation(ident.public, random.Random(4))
    jar = CookieJar(ident.public)
    jar.consume(r.reply(init, 1, ("192.0.2.1", 1), T0), init, T0)
    assert jar.stamp(init, T0 + 1)[-16:] != b"\x00" * 16
    assert jar.stamp(init, T0 + C.COOKIE_USABLE_S + 1) == init
    assert jar.stamp(init, T0 + 1) == init, "once stale it is forgotten"


def test_a_reply_must_answer_our_initiation_and_come_from_the_responder():
    ident, r = _responder(load=1)
    rng = random.Random(5)
    ours, other = _spoofed_initiation(ident.public, rng), _spoofed_initiation(ident.public, rng)
    reply = r.reply(other, 1, ("192.0.2.1", 1), T0)
    jar = CookieJar(ident.public)
    with pytest.raises(AuthenticationError) as e:
        jar.consume(reply, ours, T0)
    assert e.value.reason == "cookie_auth"
    stranger = CookieJar(StaticIdentity.generate().public)
    with pytest.raises(AuthenticationError):
        stranger.consume(r.reply(ours, 1, ("192.0.2.1", 1), T0), ours, T0)
    assert not jar.valid(T0) and not stranger.valid(T0)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_bytes_as_a_reply_raise_only_protocol_errors(blob):
    jar = CookieJar(b"k" * 32)
    with pytest.raises((ParseError, AuthenticationError)):
        jar.consume(blob, b"i" * 200, T0)


def test_address_bytes():
    assert address_bytes(("192.0.2.1", 258)) == b"192.0.2.1|258"
    assert address_bytes(("2001:db8::1", 1, 0, 0)) == b"2001:db8::1|1"
    assert address_bytes(("192.0.2.1", 1)) != address_bytes(("192.0.2.11", 1))
    assert address_bytes((("192.0.2.1", 1), 5)) != address_bytes((("192.0.2.1", 1), 6))


# --- the tunnel handshake under a flood -----------------------------------------------------

def test_a_spoofed_flood_gets_cookies_not_dh_and_a_real_peer_still_connects(monkeypatch):
    w = World()
    a = w.device("alice", "100.64.0.1")
    b = w.device("bob", "100.64.0.2", handshake_load_per_s=5)
    a.add_peer(b.identity.certificate, w.now, endpoint=w.addr["bob"])
    rng = random.Random(6)
    dh_calls = []
    real_x25519 = crypto.x25519
    monkeypatch.setattr(crypto, "x25519", lambda *args: dh_calls.append(1) or real_x25519(*args))
    for i in range(500):  # a flood from spoofed sources, all in one instant
        b.receive_datagram(_spoofed_initiation(b.identity.public, rng),
                           ("198.18.%d.%d" % (i // 250, 1 + i % 250), 1024 + i), w.now)
    out = b.datagrams_to_send()
    assert len(dh_calls) <= 2 * 5, "only the bucket's worth of initiations reached Diffie-Hellman"
    assert b.counters["cookie_replies_sent"] >= 490 and b.drops["under_load"] >= 490
    assert all(len(d) == wire.REPLY_BYTES and d[0] == wire.MSG_COOKIE for d, _ in out)
    assert b.cookies.under_load(w.now)
    a.send_packet(ping(a, b, 1), w.now)
    w.pump()
    assert a.counters["cookies_received"] == 1
    assert [e.packet for e in w.events("bob") if isinstance(e, ev.PacketReceived)] == [ping(a, b, 1)]
    assert b.status(w.now)["peers"][0]["session"] or a.status(w.now)["peers"][0]["session"]


def test_a_forged_or_unsolicited_cookie_reply_changes_nothing():
    w = World()
    a = w.device("alice", "100.64.0.1")
    b = w.device("bob", "100.64.0.2")
    a.add_peer(b.identity.certificate, w.now, endpoint=w.addr["bob"])
    a.receive_datagram(wire.CookieReply(5, os.urandom(24), os.urandom(32)).encode(), w.addr["bob"], w.now)
    assert a.drops["unknown_index"] == 1
    w.drop_filter = lambda data, src, dst: data[0] == wire_hs.MSG_INITIATION  # keep the attempt outstanding
    a.send_packet(ping(a, b, 1), w.now)
    w.pump()
    index = next(iter(a._index))
    a.receive_datagram(wire.CookieReply(index, os.urandom(24), os.urandom(32)).encode(), w.addr["bob"], w.now)
    assert a.drops["cookie_auth"] == 1 and a.peer(b.cert.fqdn).cookie is None
    sent = a.counters["initiations_sent"]
    assert a.datagrams_to_send() == [] and a.counters["initiations_sent"] == sent


def test_cookie_replies_make_the_initiator_resend_at_most_once_per_round():
    w = World()
    a = w.device("alice", "100.64.0.1")
    b = w.device("bob", "100.64.0.2", handshake_load_per_s=1)
    a.add_peer(b.identity.certificate, w.now, endpoint=w.addr["bob"])
    b.cookies.mark_loaded(w.now)
    # An attacker on the path answers every initiation with a fresh cookie reply made under
    # a secret the responder no longer has: the initiator must not loop.
    evil = CookieResponder(b.identity.public, load_per_s=1)
    a.send_packet(ping(a, b, 1), w.now)
    for _ in range(5):
        for data, dst in a.datagrams_to_send():
            if data[0] == wire_hs.MSG_INITIATION:
                a.receive_datagram(evil.reply(data, int.from_bytes(data[4:8], "big"), w.addr["alice"], w.now),
                                   w.addr["bob"], w.now)
    assert a.counters["cookies_received"] == 2 and a.counters["initiations_sent"] == 2


# --- the control channel under a flood -------------------------------------------------------

def test_the_cloud_under_a_flood_still_logs_a_node_in_through_a_cookie():
    cloud = StaticIdentity.generate()
    server = ctl.ControlServer(cloud, rng=random.Random(1), handshake_load_per_s=3)
    rng = random.Random(7)
    key = hs.mac1_key(cloud.public)
    for i in range(300):
        server.receive_datagram(_spoofed_initiation(cloud.public, rng, wire_hs.MSG_CONTROL_INITIATION, key),
                                ("198.18.1.%d" % (1 + i % 250), 2000 + i), T0)
    assert server.counters["cookie_replies_sent"] >= 290
    assert all(d[0] == wire.MSG_CONTROL_COOKIE for d, _ in server.datagrams_to_send())
    node = StaticIdentity.generate()
    client = ctl.ControlClient(node, cloud.public, ("198.51.100.1", 4500), rng=random.Random(2))
    node_addr = ("203.0.113.10", 40001)
    client.notify(__import__("cyphonic.wire.signaling", fromlist=["Keepalive"]).Keepalive(request_id=0), T0)
    for _ in range(10):
        for data, _ in client.datagrams_to_send():
            server.receive_datagram(data, node_addr, T0)
        for data, _ in server.datagrams_to_send():
            client.receive_datagram(data, ("198.51.100.1", 4500), T0)
    assert client.counters["cookies_received"] == 1
    assert client.connected and server.peer(node.public) is not None


def test_copies_resent_during_a_path_attempt_carry_the_mac2():
    """A path attempt re-sends its initiation (NodeEngine, every PATH_RESEND_S): once the
    peer sent a cookie, those copies must carry the mac2 too, or a responder under load
    answers each with another cookie and never does the handshake."""
    w = World()
    a = w.device("alice", "100.64.0.1")
    b = w.device("bob", "100.64.0.2", handshake_load_per_s=1)
    a.add_peer(b.identity.certificate, w.now, endpoint=w.addr["bob"])
    b.cookies.mark_loaded(w.now)
    w.drop_filter = lambda data, src, dst: src == w.addr["alice"] and data[0] == wire_hs.MSG_INITIATION \
        and data[-16:] != b"\x00" * 16   # the first stamped initiation is lost in b's full queue
    a.send_packet(ping(a, b, 1), w.now)
    w.pump()
    assert a.counters["cookies_received"] == 1
    peer = a.peer(b.cert.fqdn)
    assert peer.handshake.message[-16:] != b"\x00" * 16, "the attempt keeps the stamped copy"
    w.drop_filter = None
    b.cookies.mark_loaded(w.now)
    a._push(peer.handshake.message, w.addr["bob"])   # what NodeEngine._resend_initiation sends
    w.pump()
    assert [e.packet for e in w.events("bob") if isinstance(e, ev.PacketReceived)] == [ping(a, b, 1)]
