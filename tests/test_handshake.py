"""The tunnel handshake (cyphonic.handshake) and its wire format (cyphonic.wire.handshake).

- A full Noise IK round trip; keys match crosswise.
- Every forgery we can think of is refused with our own error: wrong responder
  (mac1), tampered ciphertexts with a recomputed mac1 (mac1 is no secret: anyone
  who knows the responder's public key can compute it), low-order keys,
  replayed or misaddressed responses.
- Fuzz invariant (h11 style): the decoders either parse or raise ParseError;
  ``check_mac1`` / ``consume_initiation`` / ``consume_response`` raise only
  ``RemoteProtocolError`` subclasses.
- Known answers: ``tests/vectors/handshake.json`` (written by
  ``tests/vectors/make_handshake_vectors.py``) is recomputed byte for byte, and
  checked against an independent Noise IK written out below from the Noise
  specification with libsodium and hashlib only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic import constants as C
from cyphonic import crypto
from cyphonic import handshake as hsmod
from cyphonic.datachannel import ReceiveSession, SendStream
from cyphonic.errors import AuthenticationError, LocalProtocolError, ParseError, RemoteProtocolError
from cyphonic.handshake import (InitiatorHandshake, StaticIdentity, check_mac1, consume_initiation,
                                create_response, mac1_key)
from cyphonic.wire import handshake as wire

VECTORS = Path(__file__).parent / "vectors"

CERT_BLOB = b"\x01" + bytes(range(200))   # the handshake carries it opaquely
INITIATOR = StaticIdentity(b"\x11" * 32, crypto.x25519_public(b"\x11" * 32), CERT_BLOB)
RESPONDER = StaticIdentity(b"\x22" * 32, crypto.x25519_public(b"\x22" * 32))
I_INDEX, R_INDEX = 0x01020304, 0x0A0B0C0D
WALL_NOW = 1_760_000_000.5

LOW_ORDER = [bytes(32), b"\x01" + bytes(31),
             bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
             bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
             bytes.fromhex("ec" + "ff" * 30 + "7f"), bytes.fromhex("ed" + "ff" * 30 + "7f"),
             bytes.fromhex("ee" + "ff" * 30 + "7f")]


def handshake(initiator=INITIATOR, responder=RESPONDER, wall_now=WALL_NOW):
    hs = InitiatorHandshake(initiator, responder.public, I_INDEX)
    init = hs.create_initiation(wall_now)
    received = consume_initiation(responder, check_mac1(responder, init))
    resp, r_keys = create_response(responder, received, R_INDEX)
    return hs, init, received, resp, r_keys


def with_mac1(body: bytes, static_public: bytes, mac2: bytes = bytes(16)) -> bytes:
    """An attacker's message: any body, with the (public) mac1 recomputed."""
    return body + crypto.mac(mac1_key(static_public), body) + mac2


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


# Messages made once at import for the fuzz tests.
_HS, INIT, _RECEIVED, RESP, _R_KEYS = handshake()
INIT_BODY = INIT[:-32]
RESP_BODY = RESP[:60]


# --- Round trip ----------------------------------------------------------------------------

def test_full_round_trip_keys_match_crosswise():
    hs, init, received, resp, r_keys = handshake()
    assert received.peer_static == INITIATOR.public
    assert received.sender_index == I_INDEX
    assert received.certificate == CERT_BLOB
    assert received.timestamp == wire.encode_timestamp(WALL_NOW)[0]
    i_keys = hs.consume_response(resp)
    assert i_keys.send_key == r_keys.receive_key
    assert i_keys.receive_key == r_keys.send_key
    assert i_keys.send_key != i_keys.receive_key
    assert len(i_keys.send_key) == len(i_keys.receive_key) == 32
    assert (i_keys.local_index, i_keys.remote_index) == (I_INDEX, R_INDEX)
    assert (r_keys.local_index, r_keys.remote_index) == (R_INDEX, I_INDEX)
    assert i_keys.initiator and not r_keys.initiator
    assert i_keys.peer_static == RESPONDER.public and r_keys.peer_static == INITIATOR.public
    # The keys carry data both ways.
    assert ReceiveSession(r_keys.receive_key, R_INDEX).open(
        SendStream(i_keys.send_key, i_keys.remote_index).seal(b"ping"))[0] == b"ping"
    assert ReceiveSession(i_keys.receive_key, I_INDEX).open(
        SendStream(r_keys.send_key, r_keys.remote_index).seal(b"pong"))[0] == b"pong"


def test_sizes_and_layout():
    assert len(RESP) == wire.RESPONSE_BYTES
    assert len(INIT) == wire.INIT_FIXED + wire.INIT_MIN_PAYLOAD + len(CERT_BLOB) + 32
    assert INIT[0] == wire.MSG_INITIATION and INIT[1:4] == bytes(3)
    assert struct.unpack("!I", INIT[4:8])[0] == I_INDEX
    assert INIT[-16:] == bytes(16)                    # mac2 reserved, zero
    assert RESP[0] == wire.MSG_RESPONSE and RESP[1:4] == bytes(3)
    assert struct.unpack("!II", RESP[4:12]) == (R_INDEX, I_INDEX)
    assert RESP[-16:] == bytes(16)


def test_empty_certificate_and_largest_certificate():
    for cert in (b"", b"c" * C.MAX_CERT_BYTES):
        ident = INITIATOR.with_certificate(cert)
        hs, init, received, resp, r_keys = handshake(initiator=ident)
        assert received.certificate == cert
        assert len(init) in (wire.INIT_MIN_BYTES, wire.INIT_MAX_BYTES)
        assert hs.consume_response(resp).send_key == r_keys.receive_key


def test_fresh_ephemeral_every_attempt():
    a = handshake()
    b = handshake()
    assert a[1][8:40] != b[1][8:40]
    assert a[4].send_key != b[4].send_key


def test_generated_identities():
    i, r = StaticIdentity.generate(), StaticIdentity.generate()
    assert i.private != r.private and crypto.x25519_public(i.private) == i.public
    hs, _, _, resp, r_keys = handshake(i, r)
    assert hs.consume_response(resp).receive_key == r_keys.send_key


def test_create_initiation_twice_on_one_attempt():
    """One InitiatorHandshake is one attempt. A second create_initiation on it continues
    the first transcript, so neither message can ever complete: it must be refused
    (LocalProtocolError), or else produce an initiation that completes."""
    hs = InitiatorHandshake(INITIATOR, RESPONDER.public, I_INDEX)
    hs.create_initiation(WALL_NOW)
    try:
        second = hs.create_initiation(WALL_NOW + 1)
    except LocalProtocolError:
        return
    received = consume_initiation(RESPONDER, check_mac1(RESPONDER, second))
    resp, r_keys = create_response(RESPONDER, received, R_INDEX)
    assert hs.consume_response(resp).send_key == r_keys.receive_key


def _control():
    return hsmod.CONTROL


def test_control_purpose_round_trip():
    control = _control()
    hs = InitiatorHandshake(INITIATOR, RESPONDER.public, I_INDEX, control)
    init = hs.create_initiation(WALL_NOW)
    assert init[0] == control.initiation_type
    received = consume_initiation(RESPONDER, check_mac1(RESPONDER, init, control), control)
    resp, r_keys = create_response(RESPONDER, received, R_INDEX)
    assert resp[0] == control.response_type
    keys = hs.consume_response(resp)
    assert keys.send_key == r_keys.receive_key


def test_control_and_tunnel_never_mistaken():
    control = _control()
    hs = InitiatorHandshake(INITIATOR, RESPONDER.public, I_INDEX, control)
    c_init = hs.create_initiation(WALL_NOW)
    # By type: a control initiation is not a tunnel initiation and vice versa.
    with pytest.raises(ParseError):
        check_mac1(RESPONDER, c_init)
    with pytest.raises(ParseError):
        check_mac1(RESPONDER, INIT, control)
    with pytest.raises(ParseError):
        consume_initiation(RESPONDER, check_mac1(RESPONDER, INIT), control)
    # By transcript: the type byte rewritten (mac1 recomputed) still fails, the prologues differ.
    as_tunnel = with_mac1(bytes([wire.MSG_INITIATION]) + c_init[1:-32], RESPONDER.public)
    with pytest.raises(AuthenticationError):
        consume_initiation(RESPONDER, check_mac1(RESPONDER, as_tunnel))
    # A tunnel response does not complete a control handshake.
    received = consume_initiation(RESPONDER, check_mac1(RESPONDER, c_init, control), control)
    c_resp, _ = create_response(RESPONDER, received, R_INDEX)
    t_hs, t_resp, _ = fresh_initiator()
    with pytest.raises(ParseError):
        t_hs.consume_response(c_resp)
    with pytest.raises(ParseError):
        hs.consume_response(t_resp)
    as_control = with_mac1(bytes([control.response_type]) + t_resp[1:60], INITIATOR.public)
    with pytest.raises(RemoteProtocolError):
        hs.consume_response(as_control)
    hs.consume_response(c_resp)


# --- Initiation forgeries ---------------------------------------------------------------------

def test_initiation_for_another_responder_fails_mac1():
    other = StaticIdentity.generate()
    with pytest.raises(AuthenticationError) as info:
        check_mac1(other, INIT)
    assert info.value.reason == "mac1"


def test_initiation_tampered_without_mac1_fails_mac1():
    for pos in (4, 8, 40, 90, len(INIT_BODY) - 1, len(INIT_BODY)):
        with pytest.raises(AuthenticationError) as info:
            check_mac1(RESPONDER, flip(INIT, pos))
        assert info.value.reason == "mac1"


@pytest.mark.parametrize("pos", [40, 60, 87, 90, 95, 100, 120, 200, len(INIT_BODY) - 1],
                         ids=lambda p: f"byte{p}")
def test_tampered_static_or_payload_fails_aead(pos):
    forged = with_mac1(flip(INIT_BODY, pos), RESPONDER.public)
    msg = check_mac1(RESPONDER, forged)         # mac1 is fine: it is public
    with pytest.raises(AuthenticationError) as info:
        consume_initiation(RESPONDER, msg)
    assert info.value.reason == "auth"


def test_tampered_ephemeral_fails():
    for pos in (8, 20, 39):
        forged = with_mac1(flip(INIT_BODY, pos), RESPONDER.public)
        with pytest.raises(AuthenticationError):
            consume_initiation(RESPONDER, check_mac1(RESPONDER, forged))


@pytest.mark.parametrize("point", LOW_ORDER, ids=lambda p: p.hex()[:8])
def test_low_order_ephemeral_in_initiation(point):
    forged = with_mac1(INIT_BODY[:8] + point + INIT_BODY[40:], RESPONDER.public)
    msg = check_mac1(RESPONDER, forged)
    with pytest.raises(AuthenticationError) as info:
        consume_initiation(RESPONDER, msg)
    assert info.value.reason == "low_order_key"


@pytest.mark.parametrize("point", LOW_ORDER[:4], ids=lambda p: p.hex()[:8])
def test_low_order_static_in_initiation(point):
    """An initiator claiming a low-order static key: the responder's ss DH refuses it."""
    liar = StaticIdentity(b"\x33" * 32, point, CERT_BLOB)
    init = InitiatorHandshake(liar, RESPONDER.public, I_INDEX).create_initiation(WALL_NOW)
    with pytest.raises(AuthenticationError) as info:
        consume_initiation(RESPONDER, check_mac1(RESPONDER, init))
    assert info.value.reason == "low_order_key"


def test_initiator_refuses_low_order_responder_key():
    for point in LOW_ORDER:
        with pytest.raises(AuthenticationError):
            InitiatorHandshake(INITIATOR, point, I_INDEX).create_initiation(WALL_NOW)


def test_initiation_replay_is_not_refused_here():
    """Replayed initiations authenticate again: refusing them is the caller's job
    (per-initiator timestamps, cyphonic.device). The timestamp is what it compares."""
    a = consume_initiation(RESPONDER, check_mac1(RESPONDER, INIT))
    b = consume_initiation(RESPONDER, check_mac1(RESPONDER, INIT))
    assert a.timestamp == b.timestamp == wire.encode_timestamp(WALL_NOW)[0]
    later = InitiatorHandshake(INITIATOR, RESPONDER.public, I_INDEX).create_initiation(WALL_NOW + 0.001)
    c = consume_initiation(RESPONDER, check_mac1(RESPONDER, later))
    assert c.timestamp > a.timestamp


# --- Response forgeries -----------------------------------------------------------------------

def fresh_initiator():
    hs = InitiatorHandshake(INITIATOR, RESPONDER.public, I_INDEX)
    init = hs.create_initiation(WALL_NOW)
    received = consume_initiation(RESPONDER, check_mac1(RESPONDER, init))
    resp, r_keys = create_response(RESPONDER, received, R_INDEX)
    return hs, resp, r_keys


def test_response_replayed_is_parse_error():
    hs, resp, _ = fresh_initiator()
    hs.consume_response(resp)
    with pytest.raises(ParseError) as info:
        hs.consume_response(resp)
    assert info.value.reason == "unexpected"


def test_response_before_initiation_is_parse_error():
    hs = InitiatorHandshake(INITIATOR, RESPONDER.public, I_INDEX)
    with pytest.raises(ParseError):
        hs.consume_response(RESP)


def test_response_wrong_receiver_index_is_parse_error():
    hs, resp, _ = fresh_initiator()
    bad = resp[:8] + struct.pack("!I", I_INDEX + 1) + resp[12:]
    with pytest.raises(ParseError) as info:
        hs.consume_response(bad)
    assert info.value.reason == "index"
    # Even with a valid mac1 for the wrong index.
    bad = with_mac1(bad[:60], INITIATOR.public)
    with pytest.raises(ParseError):
        hs.consume_response(bad)
    hs.consume_response(resp)    # the genuine one still works: failures change nothing


def test_response_tampered():
    hs, resp, r_keys = fresh_initiator()
    for pos in (12, 30, 43, 44, 50, 59):
        with pytest.raises(AuthenticationError) as info:
            hs.consume_response(flip(resp, pos))
        assert info.value.reason == "mac1"
        with pytest.raises(AuthenticationError) as info:
            hs.consume_response(with_mac1(flip(resp, pos)[:60], INITIATOR.public))
    assert hs.consume_response(resp).send_key == r_keys.receive_key


def test_response_from_a_different_handshake_fails():
    hs1, _, _ = fresh_initiator()
    _, resp2, _ = fresh_initiator()          # same indexes, other ephemerals
    with pytest.raises(AuthenticationError):
        hs1.consume_response(resp2)


@pytest.mark.parametrize("point", LOW_ORDER, ids=lambda p: p.hex()[:8])
def test_low_order_ephemeral_in_response(point):
    hs, resp, _ = fresh_initiator()
    forged = with_mac1(resp[:12] + point + resp[44:60], INITIATOR.public)
    with pytest.raises(AuthenticationError) as info:
        hs.consume_response(forged)
    assert info.value.reason == "low_order_key"


# --- Wire decoders: bad input -----------------------------------------------------------------

def parse_error(fn, data) -> ParseError:
    with pytest.raises(ParseError) as info:
        fn(data)
    assert type(info.value) is ParseError
    return info.value


@pytest.mark.parametrize("fn", [wire.decode_initiation, wire.decode_response])
def test_decode_empty_one_byte_non_bytes(fn):
    for data in (b"", b"\x01", b"\x02", bytearray(), None, "x" * 92, 92, [0] * 92, memoryview(RESP)):
        parse_error(fn, data)


def test_decode_initiation_every_truncation_and_extension():
    for n in range(len(INIT)):
        parse_error(wire.decode_initiation, INIT[:n])
    parse_error(wire.decode_initiation, INIT + b"\x00")
    assert wire.decode_initiation(INIT).encode() == INIT
    assert wire.decode_initiation(bytearray(INIT)).encode() == INIT


def test_decode_initiation_oversize_type_reserved_length():
    e = parse_error(wire.decode_initiation, INIT + bytes(wire.INIT_MAX_BYTES))
    assert e.reason == "oversize"
    parse_error(wire.decode_initiation, bytes(wire.INIT_MAX_BYTES + 1))
    for t in (0, 2, 3, 4, 255):
        assert parse_error(wire.decode_initiation, bytes([t]) + INIT[1:]).reason == "type"
    for pos in (1, 2, 3):
        assert parse_error(wire.decode_initiation, flip(INIT, pos)).reason == "type"
    # Payload length field out of range or inconsistent with the datagram length.
    plen = struct.unpack("!H", INIT[88:90])[0]
    for bad in (0, wire.INIT_MIN_PAYLOAD - 1, wire.INIT_MAX_PAYLOAD + 1, 0xFFFF, plen - 1, plen + 1):
        parse_error(wire.decode_initiation, INIT[:88] + struct.pack("!H", bad) + INIT[90:])


def test_decode_response_every_truncation_and_extension():
    for n in range(len(RESP)):
        parse_error(wire.decode_response, RESP[:n])
    parse_error(wire.decode_response, RESP + b"\x00")
    parse_error(wire.decode_response, RESP + bytes(10_000))
    assert wire.decode_response(RESP).encode() == RESP
    for t in (0, 1, 3, 4, 255):
        assert parse_error(wire.decode_response, bytes([t]) + RESP[1:]).reason == "type"
    for pos in (1, 2, 3):
        assert parse_error(wire.decode_response, flip(RESP, pos)).reason == "type"


def test_decode_payload_bad():
    ts = wire.encode_timestamp(WALL_NOW)[0]
    assert wire.decode_payload(wire.encode_payload(ts, b"cert")) == (ts, b"cert")
    for bad in (b"", ts, ts + b"\x00", ts + b"\x00\x05abc", ts + b"\x00\x01ab"):
        with pytest.raises(ParseError):
            wire.decode_payload(bad)


def test_encode_timestamp():
    assert wire.encode_timestamp(1.5)[0] == struct.pack("!QI", 1, 500_000_000)
    assert wire.encode_timestamp(WALL_NOW)[0] < wire.encode_timestamp(WALL_NOW + 1e-6)[0]
    assert len(wire.encode_timestamp(0)[0]) == C.TIMESTAMP_BYTES


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=wire.INIT_MAX_BYTES + 10))
def test_decode_random_bytes_only_parse_error(data):
    for fn in (wire.decode_initiation, wire.decode_response):
        try:
            msg = fn(data)
        except ParseError:
            continue
        assert msg.encode() == data


@settings(max_examples=300, deadline=None)
@given(st.integers(wire.INIT_MIN_PAYLOAD, wire.INIT_MAX_PAYLOAD), st.binary(max_size=40), st.data())
def test_random_initiations_with_valid_framing_refused(plen, head, data):
    """Well-framed junk with a correct mac1 reaches the DH: refused with our errors only."""
    body = bytearray(struct.pack("!B3xI", 1, 7) + head.ljust(80, b"\x00")[:80]
                     + struct.pack("!H", plen) + bytes(plen))
    seed = data.draw(st.binary(min_size=1, max_size=16))
    for i in range(8, len(body)):
        if i < 88 or i >= 90:
            body[i] ^= seed[i % len(seed)]
    datagram = with_mac1(bytes(body), RESPONDER.public)
    with pytest.raises(RemoteProtocolError):
        consume_initiation(RESPONDER, check_mac1(RESPONDER, datagram))


@settings(max_examples=300, deadline=None)
@given(st.integers(8, len(INIT_BODY) - 1), st.binary(min_size=1, max_size=4))
def test_mutated_initiation_with_recomputed_mac1_never_accepted(pos, noise):
    """Any change to the authenticated part (everything but type, reserved and sender
    index) makes the handshake fail, even with a correct mac1."""
    body = INIT_BODY[:pos] + noise + INIT_BODY[pos + len(noise):]
    body = body[:len(INIT_BODY)]
    if body == INIT_BODY:
        return
    forged = with_mac1(body, RESPONDER.public)
    with pytest.raises(RemoteProtocolError) as info:
        consume_initiation(RESPONDER, check_mac1(RESPONDER, forged))
    assert isinstance(info.value, (ParseError, AuthenticationError))


_FUZZ_HS, _FUZZ_RESP, _ = fresh_initiator()   # failures never change an initiator's state


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_random_responses_refused(data, fix_mac1):
    if fix_mac1 and len(data) >= 60:
        data = with_mac1(data[:60], INITIATOR.public)
    with pytest.raises(RemoteProtocolError) as info:
        _FUZZ_HS.consume_response(data)
    assert isinstance(info.value, (ParseError, AuthenticationError))


@settings(max_examples=300, deadline=None)
@given(st.integers(12, 59), st.integers(1, 255))
def test_mutated_response_with_recomputed_mac1_never_accepted(pos, mask):
    forged = with_mac1(flip(_FUZZ_RESP, pos, mask)[:60], INITIATOR.public)
    with pytest.raises(AuthenticationError):
        _FUZZ_HS.consume_response(forged)


# --- An independent Noise IK (Noise specification, rev 34), for the known answers ---------------

def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=64).digest()


def _hkdf(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp = hmac.new(ck, ikm, hashlib.blake2b).digest()
    o1 = hmac.new(temp, b"\x01", hashlib.blake2b).digest()
    o2 = hmac.new(temp, o1 + b"\x02", hashlib.blake2b).digest()
    return o1, o2


def _enc(k: bytes, n: int, ad: bytes, p: bytes) -> bytes:
    return sodium.crypto_aead_chacha20poly1305_ietf_encrypt(p, ad, bytes(4) + struct.pack("<Q", n), k)


def _mac1(static_public: bytes, body: bytes) -> bytes:
    key = _h(b"mac1----" + static_public)[:32]
    return hashlib.blake2b(body, digest_size=16, key=key).digest()


def reference_noise_ik(s, rs_priv, e, re, wall_now, cert, i_index, r_index):
    """(initiation, response, initiator send key, initiator receive key). s, e, re: private keys."""
    dh = sodium.crypto_scalarmult
    pub = sodium.crypto_scalarmult_base
    s_pub, rs, e_pub, re_pub = pub(s), pub(rs_priv), pub(e), pub(re)
    h = ck = b"Noise_IK_25519_ChaChaPoly_BLAKE2b".ljust(64, b"\x00")
    h = _h(h + b"cyphonic tunnel v1")              # prologue
    h = _h(h + rs)                                 # <- s
    # -> e, es, s, ss
    h = _h(h + e_pub)
    ck, k = _hkdf(ck, dh(e, rs))
    c_s = _enc(k[:32], 0, h, s_pub)
    h = _h(h + c_s)
    ck, k = _hkdf(ck, dh(s, rs))
    secs = int(wall_now)
    payload = struct.pack("!QI", secs, round((wall_now - secs) * 1e9)) + struct.pack("!H", len(cert)) + cert
    c_p = _enc(k[:32], 0, h, payload)
    h = _h(h + c_p)
    body = struct.pack("!B3xI", 1, i_index) + e_pub + c_s + struct.pack("!H", len(c_p)) + c_p
    initiation = body + _mac1(rs, body) + bytes(16)
    # <- e, ee, se
    h = _h(h + re_pub)
    ck, k = _hkdf(ck, dh(re, e_pub))
    ck, k = _hkdf(ck, dh(re, s_pub))
    c_empty = _enc(k[:32], 0, h, b"")
    body = struct.pack("!B3xII", 2, r_index, i_index) + re_pub + c_empty
    response = body + _mac1(s_pub, body) + bytes(16)
    t1, t2 = _hkdf(ck, b"")
    return initiation, response, t1[:32], t2[:32]


def test_matches_reference_noise_ik():
    s, rs, e, re = b"\x05" * 32, b"\x06" * 32, b"\x07" * 32, b"\x08" * 32
    ini = StaticIdentity(s, crypto.x25519_public(s), CERT_BLOB)
    res = StaticIdentity(rs, crypto.x25519_public(rs))
    hs = InitiatorHandshake(ini, res.public, I_INDEX)
    init = hs.create_initiation(WALL_NOW, ephemeral=(e, crypto.x25519_public(e)))
    received = consume_initiation(res, check_mac1(res, init))
    resp, r_keys = create_response(res, received, R_INDEX, ephemeral=(re, crypto.x25519_public(re)))
    keys = hs.consume_response(resp)
    ref = reference_noise_ik(s, rs, e, re, WALL_NOW, CERT_BLOB, I_INDEX, R_INDEX)
    assert init == ref[0]
    assert resp == ref[1]
    assert (keys.send_key, keys.receive_key) == ref[2:]
    assert (r_keys.receive_key, r_keys.send_key) == ref[2:]


# --- Known-answer vectors -------------------------------------------------------------------

def test_handshake_vectors():
    vec = json.loads((VECTORS / "handshake.json").read_text())
    inp, out = vec["inputs"], vec["outputs"]
    key = lambda name: bytes.fromhex(inp[name])  # noqa: E731
    pair = lambda name: (key(name), crypto.x25519_public(key(name)))  # noqa: E731
    cert = bytes.fromhex(inp["certificate"])
    ini = StaticIdentity(*pair("initiator_static_private"), cert)
    res = StaticIdentity(*pair("responder_static_private"))
    assert ini.public.hex() == out["initiator_static_public"]
    assert res.public.hex() == out["responder_static_public"]

    hs = InitiatorHandshake(ini, res.public, inp["initiator_index"])
    init = hs.create_initiation(inp["wall_now"], ephemeral=pair("initiator_ephemeral_private"))
    assert init.hex() == out["initiation"]
    received = consume_initiation(res, check_mac1(res, bytes.fromhex(out["initiation"])))
    assert received.certificate == cert and received.sender_index == inp["initiator_index"]
    resp, r_keys = create_response(res, received, inp["responder_index"],
                                   ephemeral=pair("responder_ephemeral_private"))
    assert resp.hex() == out["response"]
    i_keys = hs.consume_response(bytes.fromhex(out["response"]))
    assert i_keys.send_key.hex() == out["initiator_send_key"]
    assert i_keys.receive_key.hex() == out["initiator_receive_key"]
    assert (r_keys.receive_key, r_keys.send_key) == (i_keys.send_key, i_keys.receive_key)

    # The independent implementation agrees with the stored bytes.
    ref = reference_noise_ik(key("initiator_static_private"), key("responder_static_private"),
                             key("initiator_ephemeral_private"), key("responder_ephemeral_private"),
                             inp["wall_now"], cert, inp["initiator_index"], inp["responder_index"])
    assert [x.hex() for x in ref] == [out["initiation"], out["response"],
                                      out["initiator_send_key"], out["initiator_receive_key"]]

    # Data packets: recomputed exactly, and the stored ones open at the responder.
    plaintext = key("data_plaintext")
    stream = SendStream(i_keys.send_key, i_keys.remote_index, stream_id=inp["data_stream_id"])
    assert [stream.seal(plaintext).hex() for _ in range(2)] == out["data_packets"]
    rx = ReceiveSession(r_keys.receive_key, inp["responder_index"])
    base = inp["data_stream_id"] << C.STREAM_COUNTER_BITS
    for i, packet in enumerate(out["data_packets"]):
        assert rx.open(bytes.fromhex(packet)) == (plaintext, base + i)
