"""Certificates: issue and verify (cyphonic.certs) and the wire format (cyphonic.wire.cert).

- Every ``CertReason`` is reachable and reported exactly.
- Fuzz invariant (h11 style): ``wire.cert.decode`` either returns a Certificate
  or raises ``ParseError``, never anything else; ``TrustStore.verify`` on
  anything that does not parse raises ``CertificateError(MALFORMED)`` only.
- Any single bit flip of a valid certificate makes ``verify`` fail.
- ``tests/vectors/cert.json``: exact bytes from a fixed CA seed and fixed fields.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic import constants as C
from cyphonic import crypto
from cyphonic.certs import Certificate, CertificateAuthority, TrustStore, key_id
from cyphonic.errors import CertificateError, CertReason, ParseError, RemoteProtocolError
from cyphonic.wire import cert as wire_cert

VECTORS = Path(__file__).parent / "vectors"

NOW = 1_750_000_000
NOT_BEFORE = NOW - 86_400
NOT_AFTER = NOW + 86_400
CA = CertificateAuthority.generate(bytes(range(32)))
OTHER_CA = CertificateAuthority.generate(bytes(range(1, 33)))
STATIC = crypto.x25519_public(b"\x42" * 32)


def issue(ca: CertificateAuthority = CA, **kw) -> Certificate:
    args = dict(serial=7, fqdn="node1.example.cyphonic", vip4="10.0.0.7", static_public=STATIC,
                not_before=NOT_BEFORE, not_after=NOT_AFTER, groups=("admins", "web"))
    args.update(kw)
    return ca.issue(**args)


CERT = issue()
ENCODED = CERT.encode()
ENCODED_V6 = issue(vip6="fd00::7").encode()
SIG_OFFSET = len(ENCODED) - 64


def reason_of(store: TrustStore, data, now=NOW, **kw) -> CertReason:
    with pytest.raises(CertificateError) as info:
        store.verify(data, now, **kw)
    exc = info.value
    assert isinstance(exc, RemoteProtocolError)
    assert exc.reason == "cert_" + exc.cert_reason.name.lower()
    return exc.cert_reason


# --- Issue and verify ------------------------------------------------------------------

def test_issue_verify_round_trip():
    store = TrustStore.of(CA.public)
    got = store.verify(ENCODED, NOW)
    assert got == CERT
    assert got.fqdn == "node1.example.cyphonic"
    assert got.vip4 == ipaddress.IPv4Address("10.0.0.7")
    assert got.vip6 is None
    assert got.static_public == STATIC
    assert got.serial == 7
    assert got.groups == ("admins", "web")
    assert got.issuer_id == CA.key_id == key_id(CA.public)
    # A parsed Certificate object verifies as well, and expectations that hold pass.
    assert store.verify(CERT, NOW, expected_fqdn="node1.example.cyphonic", expected_static=STATIC) == CERT
    assert wire_cert.decode(ENCODED).encode() == ENCODED


def test_vip6_round_trip():
    cert = wire_cert.decode(ENCODED_V6)
    assert cert.vip6 == ipaddress.IPv6Address("fd00::7")
    assert ENCODED_V6[1] == wire_cert.FLAG_VIP6
    assert len(ENCODED_V6) == len(ENCODED) + 16
    assert TrustStore.of(CA.public).verify(ENCODED_V6, NOW).vip6 == ipaddress.IPv6Address("fd00::7")
    assert cert.encode() == ENCODED_V6


@pytest.mark.parametrize("groups", [(), ("a",), tuple(f"g{i}" for i in range(C.MAX_GROUPS)),
                                    ("x" * C.MAX_GROUP_BYTES, "ünïcode")])
def test_groups_round_trip(groups):
    enc = issue(groups=groups).encode()
    assert TrustStore.of(CA.public).verify(enc, NOW).groups == groups


def test_issue_refuses_too_many_or_too_long_groups():
    with pytest.raises(ValueError):
        issue(groups=tuple(f"g{i}" for i in range(C.MAX_GROUPS + 1)))
    with pytest.raises(ValueError):
        issue(groups=("x" * (C.MAX_GROUP_BYTES + 1),))


def test_store_with_several_cas():
    store = TrustStore.of(OTHER_CA.public, CA.public)
    assert store.verify(ENCODED, NOW) == CERT
    assert store.verify(issue(OTHER_CA).encode(), NOW).issuer_id == OTHER_CA.key_id


# --- Every CertReason -------------------------------------------------------------------

def test_expired():
    store = TrustStore.of(CA.public)
    skew = C.MAX_CLOCK_SKEW_S
    assert store.verify(ENCODED, NOT_AFTER + skew) == CERT  # edge: still accepted
    assert reason_of(store, ENCODED, now=NOT_AFTER + skew + 1) is CertReason.EXPIRED
    assert reason_of(store, ENCODED, now=NOT_AFTER + 1, skew_s=0) is CertReason.EXPIRED


def test_not_yet_valid():
    store = TrustStore.of(CA.public)
    skew = C.MAX_CLOCK_SKEW_S
    assert store.verify(ENCODED, NOT_BEFORE - skew) == CERT  # edge: still accepted
    assert reason_of(store, ENCODED, now=NOT_BEFORE - skew - 1) is CertReason.NOT_YET_VALID
    assert reason_of(store, ENCODED, now=NOT_BEFORE - 1, skew_s=0) is CertReason.NOT_YET_VALID


def test_unknown_signer():
    assert reason_of(TrustStore.of(OTHER_CA.public), ENCODED) is CertReason.UNKNOWN_SIGNER
    assert reason_of(TrustStore(), ENCODED) is CertReason.UNKNOWN_SIGNER
    # Another CA that copies our CA's key id into its certificate still fails (signature).
    forged = replace(CERT, signature=crypto.ed25519_sign(
        OTHER_CA.secret, wire_cert.SIGNING_CONTEXT + CERT.tbs()))
    assert reason_of(TrustStore.of(CA.public), forged.encode()) is CertReason.BAD_SIGNATURE


@pytest.mark.parametrize("offset", [SIG_OFFSET, SIG_OFFSET + 31, SIG_OFFSET + 32, len(ENCODED) - 1])
def test_bad_signature_flip_in_signature(offset):
    bad = bytearray(ENCODED)
    bad[offset] ^= 0x01
    assert reason_of(TrustStore.of(CA.public), bytes(bad)) is CertReason.BAD_SIGNATURE


def test_bad_signature_change_in_signed_part():
    store = TrustStore.of(CA.public)
    # serial (offset 2..10), validity, static key, vip4 changed: still parses, signature fails.
    for offset in (9, 17, 25, 40, 69):
        bad = bytearray(ENCODED)
        bad[offset] ^= 0x01
        assert reason_of(store, bytes(bad)) is CertReason.BAD_SIGNATURE, offset
    # A field changed through the dataclass, signature kept.
    for change in (dict(serial=8), dict(fqdn="node2.example.cyphonic"), dict(groups=("admins",)),
                   dict(vip4=ipaddress.IPv4Address("10.0.0.8")), dict(static_public=b"\x00" * 32),
                   dict(vip6=ipaddress.IPv6Address("fd00::1"))):
        assert reason_of(store, replace(CERT, **change).encode()) is CertReason.BAD_SIGNATURE, change
    # Signed without the signing context: refused.
    no_ctx = replace(CERT, signature=crypto.ed25519_sign(CA.secret, CERT.tbs()))
    assert reason_of(store, no_ctx.encode()) is CertReason.BAD_SIGNATURE


def test_name_mismatch():
    store = TrustStore.of(CA.public)
    assert reason_of(store, ENCODED, expected_fqdn="node2.example.cyphonic") is CertReason.NAME_MISMATCH
    assert reason_of(store, ENCODED, expected_fqdn="NODE1.example.cyphonic") is CertReason.NAME_MISMATCH


def test_revoked():
    store = TrustStore.of(CA.public, revoked=[7])
    assert reason_of(store, ENCODED) is CertReason.REVOKED
    assert TrustStore.of(CA.public, revoked=[8]).verify(ENCODED, NOW) == CERT


def test_key_mismatch():
    store = TrustStore.of(CA.public)
    other = crypto.x25519_public(b"\x43" * 32)
    assert reason_of(store, ENCODED, expected_static=other) is CertReason.KEY_MISMATCH
    assert reason_of(store, ENCODED, expected_static=STATIC[:31]) is CertReason.KEY_MISMATCH


@pytest.mark.parametrize("garbage", [b"", b"\x01", b"\x00" * 200, b"\xff" * 700, ENCODED[:-1],
                                     ENCODED + b"\x00", "not bytes", None, 12345, [1, 2, 3]])
def test_malformed(garbage):
    assert reason_of(TrustStore.of(CA.public), garbage) is CertReason.MALFORMED


# --- Wire format: bad input -----------------------------------------------------------------

def parse_error(data) -> ParseError:
    with pytest.raises(ParseError) as info:
        wire_cert.decode(data)
    assert type(info.value) is ParseError
    return info.value


def test_decode_empty_and_one_byte():
    parse_error(b"")
    parse_error(b"\x01")
    parse_error(bytearray())


@pytest.mark.parametrize("encoded", [ENCODED, ENCODED_V6], ids=["v4", "v6"])
def test_decode_truncated_at_every_offset(encoded):
    for n in range(len(encoded)):
        parse_error(encoded[:n])
    assert wire_cert.decode(encoded).encode() == encoded


def test_decode_trailing_byte():
    parse_error(ENCODED + b"\x00")
    parse_error(ENCODED_V6 + b"\xff")


def test_decode_oversize():
    e = parse_error(ENCODED + b"\x00" * (C.MAX_CERT_BYTES + 1 - len(ENCODED)))
    assert e.reason == "oversize"
    parse_error(b"\x00" * 100_000)


def test_decode_wrong_version():
    for v in (0, 2, 255):
        e = parse_error(bytes([v]) + ENCODED[1:])
        assert e.reason == "version"


def test_decode_unknown_flags():
    for flags in (0x02, 0x80, 0xFE, 0x03):
        parse_error(ENCODED[:1] + bytes([flags]) + ENCODED[2:])
    # Flag bit 0 without the 16 bytes of vip6 misreads the rest: still only ParseError or a parse.
    try:
        wire_cert.decode(ENCODED[:1] + b"\x01" + ENCODED[2:])
    except ParseError:
        pass


def test_decode_bad_fields():
    fqdn_at = 70  # no vip6
    assert ENCODED[fqdn_at] == len("node1.example.cyphonic")
    # FQDN: upper case, bad label, non-UTF-8, empty.
    for name in (b"Node1.example.cyphonic", b"-node.example.cyphoni", b"node1..example.cyph",
                 b"\xff\xfeode1.example.cyphonic"[:22]):
        name = name.ljust(22, b"x")[:22]
        parse_error(ENCODED[:fqdn_at + 1] + name + ENCODED[fqdn_at + 23:])
    parse_error(ENCODED[:fqdn_at] + b"\x00" + ENCODED[fqdn_at + 23:])
    # Group count above MAX_GROUPS.
    groups_at = fqdn_at + 23
    assert ENCODED[groups_at] == 2
    parse_error(ENCODED[:groups_at] + bytes([C.MAX_GROUPS + 1]) + ENCODED[groups_at + 1:])
    # Group of 64 bytes (over MAX_GROUP_BYTES).
    body = ENCODED[:groups_at] + b"\x01\x40" + b"g" * 64 + ENCODED[SIG_OFFSET:]
    parse_error(body)
    # not_after before not_before.
    swapped = ENCODED[:10] + struct.pack("!QQ", NOT_AFTER, NOT_BEFORE) + ENCODED[26:]
    parse_error(swapped)


@pytest.mark.parametrize("value", ["text", None, 1, 1.5, [1], {"a": 1}, object()])
def test_decode_non_bytes(value):
    parse_error(value)


def test_decode_accepts_bytearray_and_memoryview():
    assert wire_cert.decode(bytearray(ENCODED)) == CERT
    assert wire_cert.decode(memoryview(ENCODED)) == CERT


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_decode_random_bytes_only_parse_error(data):
    try:
        cert = wire_cert.decode(data)
    except ParseError:
        return
    assert cert.encode() == data


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([ENCODED, ENCODED_V6]), st.binary(min_size=1, max_size=2), st.data())
def test_decode_random_prefix_mutations_only_parse_error(base, noise, data):
    """Structured fuzz: overwrite a few bytes anywhere in a valid certificate."""
    at = data.draw(st.integers(0, len(base) - 1))
    mutated = base[:at] + noise + base[at + len(noise):]
    try:
        cert = wire_cert.decode(mutated)
    except ParseError:
        return
    assert cert.encode() == mutated


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([ENCODED, ENCODED_V6]), st.data())
def test_any_single_bit_flip_fails_verify(base, data):
    bit = data.draw(st.integers(0, len(base) * 8 - 1))
    bad = bytearray(base)
    bad[bit // 8] ^= 1 << (bit % 8)
    bad = bytes(bad)
    # The parser alone: a parse or ParseError, nothing else; a parse re-encodes exactly.
    try:
        cert = wire_cert.decode(bad)
    except ParseError:
        pass
    else:
        assert cert.encode() == bad
    # The trust store: never accepts.
    with pytest.raises(CertificateError) as info:
        TrustStore.of(CA.public).verify(bad, NOW)
    assert info.value.cert_reason in (CertReason.MALFORMED, CertReason.BAD_SIGNATURE,
                                      CertReason.UNKNOWN_SIGNER)


def test_every_single_bit_flip_fails_verify_exhaustive():
    store = TrustStore.of(CA.public)
    for bit in range(len(ENCODED) * 8):
        bad = bytearray(ENCODED)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CertificateError):
            store.verify(bytes(bad), NOW)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=700) | st.none() | st.text(max_size=20) | st.integers())
def test_verify_garbage_only_malformed(data):
    with pytest.raises(CertificateError) as info:
        TrustStore.of(CA.public).verify(data, NOW)
    assert info.value.cert_reason in (CertReason.MALFORMED, CertReason.UNKNOWN_SIGNER)
    if not isinstance(data, (bytes, bytearray)) or len(data) < 34:
        assert info.value.cert_reason is CertReason.MALFORMED


# --- Known-answer vector ------------------------------------------------------------------

def test_cert_vector():
    vec = json.loads((VECTORS / "cert.json").read_text())
    inp, out = vec["inputs"], vec["outputs"]
    ca = CertificateAuthority.generate(bytes.fromhex(inp["ca_seed"]))
    static_public = crypto.x25519_public(bytes.fromhex(inp["static_private"]))
    assert ca.public.hex() == out["ca_public"]
    assert ca.key_id.hex() == out["ca_key_id"]
    assert static_public.hex() == out["static_public"]
    cert = ca.issue(serial=inp["serial"], fqdn=inp["fqdn"], vip4=inp["vip4"], vip6=inp["vip6"],
                    static_public=static_public, not_before=inp["not_before"],
                    not_after=inp["not_after"], groups=inp["groups"])
    assert cert.encode().hex() == out["encoded"]
    # The stored bytes parse and verify to the same fields.
    got = TrustStore.of(bytes.fromhex(out["ca_public"])).verify(
        bytes.fromhex(out["encoded"]), inp["not_before"] + 1,
        expected_fqdn=inp["fqdn"], expected_static=static_public)
    assert got == cert
    assert str(got.vip4) == inp["vip4"] and got.vip6 == ipaddress.IPv6Address(inp["vip6"])
    assert list(got.groups) == inp["groups"]
    # The layout of docs/protocol.md "Certificates", field by field.
    raw = bytes.fromhex(out["encoded"])
    assert raw[0] == wire_cert.CERT_VERSION and raw[1] == wire_cert.FLAG_VIP6
    assert struct.unpack("!QQQ", raw[2:26]) == (inp["serial"], inp["not_before"], inp["not_after"])
    assert raw[26:34] == ca.key_id and raw[34:66] == static_public
    assert raw[66:70] == ipaddress.IPv4Address(inp["vip4"]).packed
    assert raw[70:86] == ipaddress.IPv6Address(inp["vip6"]).packed
    assert crypto.ed25519_verify(ca.public, wire_cert.SIGNING_CONTEXT + raw[:-64], raw[-64:])
