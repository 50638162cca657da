"""Tunnel Relay Service: relay tokens, the relay wire format, the sans-IO
``RelayService`` on a fake clock, and the asyncio edge over real IPv4 and IPv6
loopback sockets (an IPv4 node and an IPv6 node talking through the relay)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.cloud import constants as CC
from cyphonic.cloud.relay_token import (mint_token, new_relay_key, new_session_id, token_expires,
                                        verify_token)
from cyphonic.cloud.trs import RelayService
from cyphonic.cloud.trs_server import serve_relay
from cyphonic.errors import AuthenticationError, ParseError, ReplayError
from cyphonic.wire import relay as wire
from cyphonic.wire.relay import (OP_BIND, OP_BOUND, OP_DATA, OP_ERROR, RelayErrorCode, decode,
                                 encode_bind, encode_bound, encode_data, encode_error, unwrap, wrap)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000.0
EXP = int(NOW) + 3600
SID = 0x0123456789ABCDEF
SID2 = 0xFEDCBA9876543210
A = ("198.51.100.1", 4000)                 # side 0, an IPv4 node
B = ("2001:db8::2", 5000, 0, 0)            # side 1, an IPv6 node
C = ("203.0.113.9", 6000)                  # a third party


def tok(sid=SID, side=0, expires=EXP, key=KEY):
    return mint_token(key, sid, side, expires)


def bind(svc, addr, sid=SID, side=0, now=NOW, **kw):
    svc.receive_datagram(encode_bind(sid, tok(sid, side, **kw)), addr, now)
    return svc.datagrams_to_send()


def pair(svc=None, **kw):
    svc = svc or RelayService(KEY, **kw)
    bind(svc, A, side=0)
    bind(svc, B, side=1)
    return svc


# --- relay tokens -------------------------------------------------------------------


def test_token_mint_and_verify_both_sides():
    for side in (0, 1):
        t = tok(side=side)
        assert len(t) == wire.TOKEN_BYTES == 29
        assert t[0] == side and token_expires(t) == EXP
        assert verify_token(KEY, SID, t, NOW) == side
    assert tok(side=0) != tok(side=1)


@pytest.mark.parametrize("case", ["key", "session", "side", "expires", "mac", "short", "long"])
def test_token_tamper_is_bad_token(case):
    t = bytearray(tok())
    key, sid = KEY, SID
    if case == "key":
        key = OTHER_KEY
    elif case == "session":
        sid = SID ^ 1
    elif case == "side":
        t[0] ^= 1
    elif case == "expires":
        t[4] ^= 1          # expiry moved one second later: the MAC no longer matches
    elif case == "mac":
        t[-1] ^= 0x80
    elif case == "short":
        t = t[:-1]
    elif case == "long":
        t += b"\x00"
    with pytest.raises(AuthenticationError) as info:
        verify_token(key, sid, bytes(t), NOW)
    assert info.value.reason == "relay_token"


def test_token_every_bit_flip_refused():
    t = tok()
    for i in range(len(t)):
        for bit in range(8):
            bad = bytearray(t)
            bad[i] ^= 1 << bit
            with pytest.raises(AuthenticationError):
                verify_token(KEY, SID, bytes(bad), NOW)


def test_token_expiry():
    t = tok(expires=int(NOW) + 10)
    assert verify_token(KEY, SID, t, NOW + 9.999) == 0
    for now in (NOW + 10, NOW + 11, NOW + 1e6):
        with pytest.raises(ReplayError) as info:
            verify_token(KEY, SID, t, now)
        assert info.value.reason == "relay_expired"
    # an expired token whose MAC is also wrong is reported as a bad token, not as expired
    forged = bytearray(t)
    forged[-1] ^= 1
    with pytest.raises(AuthenticationError):
        verify_token(KEY, SID, bytes(forged), NOW + 100)


def test_token_argument_checks():
    with pytest.raises(ValueError):
        mint_token(KEY, SID, 2, EXP)
    with pytest.raises(ValueError):
        mint_token(KEY[:31], SID, 0, EXP)
    with pytest.raises(ValueError):
        mint_token(KEY, 1 << 64, 0, EXP)
    with pytest.raises(ValueError):
        mint_token(KEY, SID, 0, 1 << 32)
    with pytest.raises(AuthenticationError):
        verify_token(KEY, SID, "not bytes", NOW)  # type: ignore[arg-type]
    assert len(new_relay_key()) == 32 and 0 < new_session_id() < 1 << 64


# --- wire format -----------------------------------------------------------------------


def test_wire_round_trips():
    t = tok()
    b = encode_bind(SID, t)
    assert len(b) == wire.BIND_BYTES == 41 and b[:4] == b"\x05\x01\x00\x00"
    assert b[4:12] == SID.to_bytes(8, "big")
    assert decode(b) == wire.RelayPacket(OP_BIND, SID, token=t)
    for side in (0, 1):
        for peer in (False, True):
            p = decode(encode_bound(SID, side, peer, EXP))
            assert (p.op, p.session_id, p.side, p.peer_bound, p.expires) == (OP_BOUND, SID, side, peer, EXP)
    assert len(encode_bound(SID, 0, True, EXP)) == wire.BOUND_BYTES == 18
    for code in RelayErrorCode:
        p = decode(encode_error(SID, code))
        assert (p.op, p.session_id, p.code) == (OP_ERROR, SID, code)
    for inner in (b"\x04", b"x" * 1400, bytes(wire.MAX_RELAY_PAYLOAD)):
        d = wrap(SID, inner)
        assert d == encode_data(SID, inner) and len(d) == 12 + len(inner)
        assert unwrap(d) == (SID, inner)
        assert decode(bytearray(d)).inner == inner and unwrap(memoryview(d)) == (SID, inner)
    assert wire.MAX_RELAY_PAYLOAD == 65507 - 12
    assert unwrap(wrap(0, b"a")) == (0, b"a") and unwrap(wrap((1 << 64) - 1, b"a"))[0] == (1 << 64) - 1


def test_wire_encoders_refuse_bad_arguments():
    for bad in (lambda: encode_data(SID, b""), lambda: encode_data(SID, bytes(wire.MAX_RELAY_PAYLOAD + 1)),
                lambda: encode_bind(SID, b"x" * 28), lambda: encode_bound(SID, 2, False, 0),
                lambda: encode_bound(SID, 0, False, 1 << 32), lambda: encode_error(SID, 0),
                lambda: encode_data(1 << 64, b"x"), lambda: encode_data(-1, b"x")):
        with pytest.raises(ValueError):
            bad()


def _valid_messages():
    return [encode_bind(SID, tok()), encode_bound(SID, 1, True, EXP), encode_error(SID, 3),
            encode_data(SID, b"payload")]


def _parse_error(data):
    with pytest.raises(ParseError):
        decode(data)


def test_wire_bad_input_raises_parse_error_only():
    for data in (b"", b"\x05", None, "text", 5, [5, 1, 0, 0], object()):
        _parse_error(data)
    for msg in _valid_messages():
        fixed = msg[1] != OP_DATA
        for n in range(len(msg) if fixed else wire.HEADER_BYTES + 1):
            _parse_error(msg[:n])                           # every truncation
        if fixed:
            _parse_error(msg + b"\x00")                     # one byte too many
        for t in range(256):
            if t != wire.MSG_RELAY:
                _parse_error(bytes([t]) + msg[1:])          # wrong type
        for bit in range(16):
            bad = bytearray(msg)
            bad[2 + bit // 8] |= 1 << (bit % 8)
            _parse_error(bytes(bad))                        # reserved bits
    for op in [0] + list(range(5, 256)):
        _parse_error(bytes([5, op, 0, 0]) + bytes(8) + b"x" * 29)
    _parse_error(encode_data(SID, b"x")[:12] + bytes(wire.MAX_RELAY_PAYLOAD + 1))   # oversize
    _parse_error(encode_bound(SID, 0, False, EXP)[:12] + b"\x02\x00" + bytes(4))     # side 2
    _parse_error(encode_bound(SID, 0, False, EXP)[:12] + b"\x00\x02" + bytes(4))     # peer_bound 2
    _parse_error(encode_error(SID, 1)[:12] + b"\x00")                                # code 0
    with pytest.raises(ParseError):
        unwrap(encode_bind(SID, tok()))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=64),
                 st.builds(lambda op, rest: bytes([5, op, 0, 0]) + rest,
                           st.integers(0, 6), st.binary(max_size=48))))
def test_wire_decode_fuzz(data):
    try:
        p = decode(data)
    except ParseError:
        return
    assert p.op in wire.OPS
    # what decodes re-encodes to the same bytes
    again = {OP_BIND: lambda: encode_bind(p.session_id, p.token),
             OP_BOUND: lambda: encode_bound(p.session_id, p.side, p.peer_bound, p.expires),
             OP_DATA: lambda: encode_data(p.session_id, p.inner),
             OP_ERROR: lambda: encode_error(p.session_id, p.code)}[p.op]()
    assert again == data


# --- RelayService in memory -------------------------------------------------------------


def test_two_sides_bind_and_data_flows_both_ways_unchanged():
    svc = RelayService(KEY)
    assert svc.get_timer() is None
    out = bind(svc, A, side=0)
    assert len(out) == 1 and out[0][1] == A
    p = decode(out[0][0])
    assert (p.op, p.session_id, p.side, p.peer_bound, p.expires) == (OP_BOUND, SID, 0, False, EXP)
    assert svc.get_timer() == NOW + CC.RELAY_SWEEP_S

    out = bind(svc, B, side=1)
    got = {addr[0]: decode(d) for d, addr in out}
    assert set(got) == {A[0], B[0]}       # B's answer, and A is told its peer arrived
    assert (got[B[0]].side, got[B[0]].peer_bound) == (1, True)
    assert (got[A[0]].side, got[A[0]].peer_bound) == (0, True)

    for i in range(5):
        d = wrap(SID, b"to-b %d" % i)
        svc.receive_datagram(d, A, NOW + i)
        assert svc.datagrams_to_send() == [(d, B)]
        e = wrap(SID, b"to-a %d" % i + bytes(100))
        svc.receive_datagram(e, B, NOW + i)
        assert svc.datagrams_to_send() == [(e, A)]
    sess = svc.sessions[SID]
    assert sess.packets_relayed == [5, 5]
    assert svc.counters["relayed_packets"] == 10 and not svc.drops
    assert svc.stats()["bound_sides"] == 2 and svc.stats()["sessions"] == 1
    # BIND again (keepalive): BOUND with peer_bound, no extra notification
    out = bind(svc, A, side=0, now=NOW + 6)
    assert len(out) == 1 and decode(out[0][0]).peer_bound is True


def test_peer_not_bound_yet():
    svc = RelayService(KEY)
    bind(svc, A, side=0)
    svc.receive_datagram(wrap(SID, b"early"), A, NOW)
    assert svc.datagrams_to_send() == []
    assert svc.drops["peer_not_bound"] == 1


def test_unbound_source_and_unknown_session_refused():
    svc = pair()
    svc.receive_datagram(wrap(SID, b"inject"), C, NOW)
    out = svc.datagrams_to_send()
    assert [(decode(d).code, a) for d, a in out] == [(RelayErrorCode.UNKNOWN_SESSION, C)]
    assert svc.drops["not_bound"] == 1
    # right host, wrong port is another address
    svc.receive_datagram(wrap(SID, b"inject"), (A[0], A[1] + 1), NOW + 2)
    assert all(a != B for _, a in svc.datagrams_to_send())
    svc.receive_datagram(wrap(SID2, b"x"), A, NOW + 3)
    out = svc.datagrams_to_send()
    assert [(decode(d).code, a) for d, a in out] == [(RelayErrorCode.UNKNOWN_SESSION, A)]
    assert svc.drops["unknown_session"] == 1 and svc.drops["not_bound"] == 2
    assert svc.counters["relayed_packets"] == 0


def test_third_party_with_a_valid_token_for_another_session_cannot_inject():
    svc = pair()
    out = bind(svc, C, sid=SID2, side=0)          # C is legitimately bound to its own session
    assert decode(out[0][0]).op == OP_BOUND
    svc.receive_datagram(wrap(SID, b"inject"), C, NOW + 1)
    assert all(a == C for _, a in svc.datagrams_to_send())
    # its token does not open the other session either, for either side
    for side in (0, 1):
        svc.receive_datagram(encode_bind(SID, tok(sid=SID2, side=side)), C, NOW + 2 + side)
    assert svc.drops["relay_token"] == 2 and svc.drops["not_bound"] == 1
    assert svc.sessions[SID].keys == [A[:2], B[:2]]
    assert svc.counters["relayed_packets"] == 0


def test_bad_and_expired_tokens_refused_with_error_codes():
    svc = RelayService(KEY)
    bad = bytearray(tok())
    bad[7] ^= 1
    svc.receive_datagram(encode_bind(SID, bytes(bad)), A, NOW)
    out = svc.datagrams_to_send()
    assert [(decode(d).op, decode(d).code, a) for d, a in out] == [(OP_ERROR, 1, A)]
    svc.receive_datagram(encode_bind(SID, tok(key=OTHER_KEY)), A, NOW + 1)
    assert decode(svc.datagrams_to_send()[0][0]).code == RelayErrorCode.BAD_TOKEN
    svc.receive_datagram(encode_bind(SID, tok(expires=int(NOW) - 1)), A, NOW + 2)
    assert decode(svc.datagrams_to_send()[0][0]).code == RelayErrorCode.EXPIRED
    assert svc.drops == {"relay_token": 2, "relay_expired": 1}
    assert not svc.sessions and svc.get_timer() is None
    # errors are answered at most once a second per source
    for _ in range(10):
        svc.receive_datagram(encode_bind(SID, bytes(bad)), A, NOW + 3.5)
    assert len(svc.datagrams_to_send()) == 1
    assert svc.counters["errors_suppressed"] == 9


def test_to_trs_only_ops_and_runts_are_dropped_silently():
    svc = pair()
    for d in (encode_bound(SID, 0, True, EXP), encode_error(SID, 3), wrap(SID, b"x")[:12], b"\x04" * 40,
              b"", b"\x05"):
        svc.receive_datagram(d, A, NOW)
    assert svc.datagrams_to_send() == []
    assert svc.drops == {"unexpected_op": 2, "malformed": 4}


def test_roaming_rebind_moves_the_side():
    svc = pair()
    A2 = ("192.0.2.77", 41000)
    out = bind(svc, A2, side=0, now=NOW + 1)
    assert [(decode(d).op, a) for d, a in out] == [(OP_BOUND, A2)]
    assert svc.counters["roamed"] == 1
    d = wrap(SID, b"to the new place")
    svc.receive_datagram(d, B, NOW + 2)
    assert svc.datagrams_to_send() == [(d, A2)]
    svc.receive_datagram(wrap(SID, b"from the old place"), A, NOW + 3)
    assert all(a == A for _, a in svc.datagrams_to_send())   # only an ERROR back, nothing to B
    assert svc.drops["not_bound"] == 1
    svc.receive_datagram(d, A2, NOW + 4)
    assert svc.datagrams_to_send() == [(d, B)]


def test_ipv6_addresses_compare_by_host_and_port_only():
    svc = pair()
    d = wrap(SID, b"flow label changed")
    svc.receive_datagram(d, (B[0], B[1], 12345, 0), NOW + 1)
    assert svc.datagrams_to_send() == [(d, A)]
    svc.receive_datagram(d, A, NOW + 2)
    assert svc.datagrams_to_send() == [(d, B)]    # sent to the full tuple the socket gave


def test_a_bind_takes_an_address_from_the_other_side():
    svc = pair()
    bind(svc, A, side=1, now=NOW + 1)             # A's address now belongs to side 1
    sess = svc.sessions[SID]
    assert sess.keys == [None, A[:2]] and svc.counters["bind_took_address"] == 1
    svc.receive_datagram(wrap(SID, b"x"), A, NOW + 2)
    assert svc.datagrams_to_send() == [] and svc.drops["peer_not_bound"] == 1


def test_idle_sessions_are_swept():
    svc = pair(idle_s=120, sweep_s=5)
    assert svc.get_timer() == NOW + 5
    svc.handle_timer(NOW + 1)                     # early: nothing happens
    assert svc.get_timer() == NOW + 5
    t = NOW
    while t < NOW + 300:                          # traffic every 60 s keeps it alive
        t += 60
        svc.receive_datagram(wrap(SID, b"k"), A, t)
        svc.handle_timer(t)
        assert SID in svc.sessions
    svc.datagrams_to_send()
    svc.handle_timer(t + 119)
    assert SID in svc.sessions
    svc.handle_timer(t + 125)
    assert not svc.sessions and svc.get_timer() is None
    assert svc.counters["sessions_expired_idle"] == 1
    svc.receive_datagram(wrap(SID, b"late"), A, t + 126)
    assert svc.drops["unknown_session"] == 1
    assert all(a == A for _, a in svc.datagrams_to_send())


def test_sessions_end_at_token_expiry():
    svc = RelayService(KEY)
    bind(svc, A, side=0, expires=int(NOW) + 30)
    bind(svc, B, side=1, expires=int(NOW) + 3600)
    assert svc.sessions[SID].expires == int(NOW) + 30
    svc.receive_datagram(wrap(SID, b"x"), A, NOW + 29)
    assert len(svc.datagrams_to_send()) == 1
    svc.receive_datagram(wrap(SID, b"x"), B, NOW + 30)        # before the sweep sees it
    out = svc.datagrams_to_send()
    assert [(decode(d).code, a) for d, a in out] == [(RelayErrorCode.EXPIRED, B)]
    assert SID not in svc.sessions and svc.drops["relay_expired"] == 1
    # a fresh token extends a side; the sweep removes a session past expiry
    bind(svc, A, side=0, now=NOW + 40, expires=int(NOW) + 50)
    bind(svc, A, side=0, now=NOW + 41, expires=int(NOW) + 100)
    assert svc.sessions[SID].expires == int(NOW) + 100
    svc.handle_timer(NOW + 101)
    assert not svc.sessions and svc.counters["sessions_expired_token"] == 2


def test_session_table_is_bounded():
    svc = RelayService(KEY, max_sessions=3, idle_s=120)
    for sid in (1, 2, 3):
        bind(svc, A, sid=sid, side=0)
    out = bind(svc, A, sid=4, side=0, now=NOW + 1)
    assert [decode(d).code for d, _ in out] == [RelayErrorCode.TABLE_FULL]
    assert svc.drops["table_full"] == 1 and list(svc.sessions) == [1, 2, 3]
    bind(svc, B, sid=1, side=1, now=NOW + 100)               # session 1 active again
    out = bind(svc, A, sid=4, side=0, now=NOW + 130)          # 2 and 3 idle: evict the older, 2
    assert decode(out[0][0]).op == OP_BOUND
    assert list(svc.sessions) == [3, 1, 4] and svc.counters["sessions_evicted"] == 1
    assert len(svc.sessions) == 3


def test_rate_limit_per_source_ip():
    svc = pair(rate_per_s=10, burst=20)   # A's and B's binds used one token each
    for i in range(100):
        svc.receive_datagram(wrap(SID, b"%d" % i), A, NOW)
    out = svc.datagrams_to_send()
    forwarded = [d for d, a in out if a == B]
    errors = [decode(d) for d, a in out if a == A]
    assert len(forwarded) == 19 and svc.drops["ratelimited"] == 81
    assert [e.code for e in errors] == [RelayErrorCode.RATE_LIMITED]   # answered once, not 81 times
    svc.receive_datagram(wrap(SID, b"b"), B, NOW)            # another source is not affected
    assert svc.datagrams_to_send()[0][1] == A
    for i in range(20):
        svc.receive_datagram(wrap(SID, b"%d" % i), A, NOW + 1)
    assert sum(1 for _, a in svc.datagrams_to_send() if a == B) == 10
    # another port on the same IP shares the bucket
    svc.receive_datagram(wrap(SID, b"x"), (A[0], 9), NOW + 1)
    assert svc.drops["ratelimited"] == 92


def test_output_queue_is_bounded_and_odd_addresses_do_not_raise():
    svc = pair(max_queued=4)
    for i in range(10):
        svc.receive_datagram(wrap(SID, b"%d" % i), A, NOW)
    assert len(svc.datagrams_to_send()) == 4 and svc.drops["out_queue_full"] >= 6
    for addr in (None, (), ("x",), (1, 2), "host", (b"h", 1)):
        svc.receive_datagram(wrap(SID, b"x"), addr, NOW)
    assert svc.datagrams_to_send() == []
    assert sum(v for k, v in svc.drops.items() if k.startswith("internal_")) == 6


_POOL = [A, B, C, ("203.0.113.10", 1), ("2001:db8::66", 7, 0, 0)]


_FUZZ_DT = st.one_of(st.just(0.0), st.floats(0, 5), st.floats(0, 200))


def _fuzz_datagram():
    sids = st.sampled_from([SID, SID2, 0, 1])
    return st.one_of(
        st.binary(max_size=60),
        st.builds(lambda s, b: wrap(s, b), sids, st.binary(min_size=1, max_size=40)),
        st.builds(lambda s, t: encode_bind(s, t), sids, st.binary(min_size=29, max_size=29)),
        st.builds(lambda s, side: encode_bind(s, tok(sid=s, side=side)), sids, st.integers(0, 1)),
        st.builds(lambda s, side: encode_bind(s, tok(sid=SID, side=side)), sids, st.integers(0, 1)),
        st.builds(lambda s, c: encode_error(s, c), sids, st.integers(1, 255)),
        st.builds(lambda d, i, x: d[:i] + bytes([x]) + d[i + 1:],
                  st.sampled_from(_valid_messages()), st.integers(0, 40), st.integers(0, 255)),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_fuzz_datagram(), st.sampled_from(_POOL), _FUZZ_DT), max_size=40))
def test_garbage_never_raises_and_never_reflects(steps):
    svc = RelayService(KEY, max_sessions=2, idle_s=50, sweep_s=5)
    pair(svc)
    svc.datagrams_to_send()
    bound_ok = {A[:2], B[:2]}   # addresses that presented a token that verifies
    inputs = set()
    t = NOW
    for data, src, dt in steps:
        t += dt
        try:
            p = decode(data)
            if p.op == OP_BIND and verify_token(KEY, p.session_id, p.token, t) is not None:
                bound_ok.add(src[:2])
        except (ParseError, AuthenticationError, ReplayError):
            pass
        inputs.add(data)
        svc.receive_datagram(data, src, t)
        svc.handle_timer(t)
        for out, dst in svc.datagrams_to_send():
            op = decode(out).op
            if op == OP_DATA:
                # forwarded unchanged, and only to an address that bound with a valid token
                assert out in inputs and dst[:2] in bound_ok and dst[:2] != src[:2]
            elif dst[:2] != src[:2]:
                assert op == OP_BOUND and dst[:2] in bound_ok   # "your peer arrived"
            else:
                assert op in (OP_BOUND, OP_ERROR) and len(out) <= len(data)   # no amplification
    assert len(svc.sessions) <= 2
    assert len(svc.datagrams_to_send()) == 0


# --- real sockets -----------------------------------------------------------------------------


class _Client(asyncio.DatagramProtocol):
    def __init__(self):
        self.got: list = []
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.got.append((data, addr))


async def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def test_ipv4_node_and_ipv6_node_through_real_relay_sockets():
    n = 100

    async def scenario():
        svc = RelayService(KEY)
        try:
            server = await serve_relay(svc, "127.0.0.1", "::1", port=0)
        except OSError as exc:
            pytest.fail(f"cannot open the TRS on 127.0.0.1 and ::1 (is IPv6 loopback available?): {exc}")
        loop = asyncio.get_running_loop()
        try:
            port = server.port
            assert [a[1] for a in server.addresses] == [port, port]
            s6 = server._transports[socket.AF_INET6].get_extra_info("socket")
            assert s6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            t4, c4 = await loop.create_datagram_endpoint(_Client, local_addr=("127.0.0.1", 0))
            t6, c6 = await loop.create_datagram_endpoint(_Client, local_addr=("::1", 0))
            now = time.time()
            sid = new_session_id()
            exp = int(now) + CC.RELAY_TOKEN_LIFETIME_S
            t4.sendto(encode_bind(sid, mint_token(KEY, sid, 0, exp)), ("127.0.0.1", port))
            assert await _wait(lambda: len(c4.got) == 1)
            t6.sendto(encode_bind(sid, mint_token(KEY, sid, 1, exp)), ("::1", port))
            assert await _wait(lambda: len(c4.got) == 2 and len(c6.got) == 1)
            b6 = decode(c6.got[0][0])
            assert (b6.op, b6.side, b6.peer_bound, b6.expires) == (OP_BOUND, 1, True, exp)
            assert decode(c4.got[1][0]).peer_bound is True
            c4.got.clear()
            c6.got.clear()
            to6 = [b"v4->v6 %03d " % i + bytes(i * 10) for i in range(n)]
            to4 = [b"v6->v4 %03d " % i + bytes(i * 7) for i in range(n)]
            for i in range(n):
                t4.sendto(wrap(sid, to6[i]), ("127.0.0.1", port))
                t6.sendto(wrap(sid, to4[i]), ("::1", port))
                if i % 10 == 9:
                    await asyncio.sleep(0.001)
            ok = await _wait(lambda: len(c4.got) == n and len(c6.got) == n)
            assert ok, f"relayed v4->v6 {len(c6.got)}/{n}, v6->v4 {len(c4.got)}/{n}; drops {dict(svc.drops)}"
            assert sorted(unwrap(d)[1] for d, _ in c6.got) == sorted(to6)
            assert sorted(unwrap(d)[1] for d, _ in c4.got) == sorted(to4)
            assert {a[:2] for _, a in c6.got} == {("::1", port)}
            assert {a[:2] for _, a in c4.got} == {("127.0.0.1", port)}
            sess = svc.sessions[sid]
            assert sess.packets_relayed == [n, n]
            assert sess.bytes_relayed == [sum(12 + len(x) for x in to6), sum(12 + len(x) for x in to4)]
            assert svc.counters["relayed_packets"] == 2 * n
            assert svc.counters["binds"] == 2 and svc.counters["bound_sent"] == 3
            assert not svc.drops and not server.errors
            t4.close()
            t6.close()
        finally:
            server.close()

    asyncio.run(scenario())


def test_real_edge_timer_sweeps_idle_sessions():
    async def scenario():
        svc = RelayService(KEY, idle_s=0.1, sweep_s=0.05)
        server = await serve_relay(svc, "127.0.0.1", None, port=0)
        loop = asyncio.get_running_loop()
        try:
            t4, c4 = await loop.create_datagram_endpoint(_Client, local_addr=("127.0.0.1", 0))
            sid = new_session_id()
            t4.sendto(encode_bind(sid, mint_token(KEY, sid, 0, int(time.time()) + 60)),
                      ("127.0.0.1", server.port))
            assert await _wait(lambda: c4.got)
            assert sid in svc.sessions
            assert await _wait(lambda: not svc.sessions, timeout=2.0)
            assert svc.counters["sessions_expired_idle"] == 1 and svc.get_timer() is None
            # an IPv6 destination with no IPv6 socket is counted, not fatal
            svc._push(b"x", ("::1", 9, 0, 0))
            server.flush()
            assert server.errors["no_socket_for_family"] == 1
            t4.close()
        finally:
            server.close()

    asyncio.run(scenario())
    with pytest.raises(ValueError):
        asyncio.run(serve_relay(RelayService(KEY), None, None, 0))


def test_errors_to_spoofed_sources_are_bounded_in_all():
    """A spoofing sender gets each claimed source its own one ERROR a second; the total
    is what bounds the answers unverified sources get (the cookie issue's TRS bound)."""
    svc = RelayService(KEY, ratelimit_sources=100_000)
    for i in range(5000):
        svc.receive_datagram(wire.encode_data(SID, b"x" * 40),
                             ("10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 4000), NOW)
    assert svc.counters["errors_sent"] == CC.RELAY_ERRORS_TOTAL_PER_S
    assert svc.counters["errors_suppressed"] == 5000 - CC.RELAY_ERRORS_TOTAL_PER_S
    svc.datagrams_to_send()
    svc.receive_datagram(wire.encode_data(SID, b"x" * 40), ("192.0.2.200", 4000), NOW + 1.0)
    assert len(svc.datagrams_to_send()) == 1, "a second later the budget is back"
