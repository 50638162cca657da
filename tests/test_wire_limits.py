"""Length limits of every wire format (issue 11).

Every variable-length field with a declared maximum must round-trip at exactly
that maximum, and a datagram carrying maximum + 1 must be refused by the
decoder with ``ParseError`` (the codec's promise: what decodes re-encodes to
the same bytes, and the encoder refuses over-length values with
``ValueError``). Fixed-size fields: a wrong length is refused.

The over-length datagrams are built here byte by byte, since the encoders
refuse them. The at-maximum datagrams are built by the same hand-written
builders, and must decode to the expected message and re-encode to the same
bytes: that proves the builders produce the real layout, so an over-length
datagram is refused for its length and for nothing else.

Signaling declares its fields as data, so its cases are generated from
``FIELDS``: a new message or field is covered without touching this file, and
a new field *type* fails ``test_signaling_field_types_are_classified`` until it
gets a builder here. The other formats are hand-written layouts; their cases
are listed, one per field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest

from cyphonic import constants as C
from cyphonic.errors import ParseError
from cyphonic.wire import cert as wire_cert
from cyphonic.wire import data as wire_data
from cyphonic.wire import handshake as wire_hs
from cyphonic.wire import relay as wire_relay
from cyphonic.wire import signaling as sig
from cyphonic.wire.common import Writer, validate_fqdn


def fqdn_of_length(n: int) -> str:
    """A lower-case LDH name of exactly ``n`` bytes, every label 1..63 bytes long.

    For n = 254 it is valid in every respect but its length.
    """
    labels, left, i = [], n, 0
    while left > 0:
        size = min(63, left)
        if left - size == 1:  # a dot with no label after it: leave room for one
            size -= 1
        labels.append(chr(ord("a") + i % 26) * size)
        left -= size + 1
        i += 1
    name = ".".join(labels)
    assert len(name) == n and all(1 <= len(label) <= 63 for label in labels)
    return name


def text_of_bytes(n: int) -> str:
    """``n`` bytes of UTF-8, mostly two-byte characters: the limits count bytes."""
    return "\u00e9" * (n // 2) + "x" * (n % 2)


# --- signaling: cases generated from FIELDS ----------------------------------------------

# Field types whose wire length varies, each with its declared maximum. Fqdn is a Text.
SIG_VARIABLE = {
    sig.VarBytes: lambda ft: ft.max_len,
    sig.Text: lambda ft: ft.max_len,
    sig.EndpointList: lambda ft: ft.max_items,
    sig.OptIPv6: lambda ft: 16,   # a length byte of 0 or 16
}
# Field types of one size (or a size fixed by a tag, for EndpointField).
SIG_FIXED = (sig.UInt, sig.Bool, sig.Bytes, sig.IPv4, sig.EnumField, sig.EndpointField)

# Counted by reading FIELDS: 11 messages hold 22 variable fields (7 Fqdn, 5 Text,
# 3 u16-length certificates, 3 u8-length tokens, 3 endpoint lists, 1 optional IPv6)
# and 1 fixed-size bytes field (LoginRequest.static_public).
SIG_VARIABLE_FIELDS_COUNTED = 22
SIG_FIXED_BYTES_FIELDS_COUNTED = 1


def _sig_kind(ft: sig.FieldType):
    for cls in SIG_VARIABLE:
        if isinstance(ft, cls):
            return cls
    return None


def sig_declared_max(ft: sig.FieldType) -> int:
    return SIG_VARIABLE[_sig_kind(ft)](ft)


def sig_min_value(ft: sig.FieldType):
    """The smallest value of a field, so a message's other fields stay small."""
    if isinstance(ft, sig.UInt):
        return 0
    if isinstance(ft, sig.Bool):
        return False
    if isinstance(ft, sig.Bytes):
        return bytes(ft.n)
    if isinstance(ft, sig.VarBytes):
        return b""
    if isinstance(ft, sig.Fqdn):
        return "" if ft.optional else "a"
    if isinstance(ft, sig.Text):
        return ""
    if isinstance(ft, sig.IPv4):
        return ipaddress.IPv4Address("0.0.0.0")
    if isinstance(ft, sig.OptIPv6):
        return None
    if isinstance(ft, sig.EndpointField):
        return None if ft.optional else sig.Endpoint("0.0.0.0", 0)
    if isinstance(ft, sig.EndpointList):
        return ()
    if isinstance(ft, sig.EnumField):
        return None if ft.optional else min(ft.enum_cls)
    raise AssertionError(f"no minimum for {ft!r}")


def sig_field_wire(ft: sig.FieldType, n: int):
    """(bytes, value) of a variable field carrying ``n`` bytes or items, built by hand.

    ``value`` is what those bytes mean (None where no Python value can be that long).
    """
    if isinstance(ft, sig.VarBytes):
        content = bytes((7 * i + 1) % 256 for i in range(n))
        return n.to_bytes(ft.len_bytes, "big") + content, content
    if isinstance(ft, sig.Fqdn):
        name = fqdn_of_length(n)
        return bytes([n]) + name.encode("ascii"), name
    if isinstance(ft, sig.Text):
        text = text_of_bytes(n)
        return bytes([n]) + text.encode("utf-8"), text
    if isinstance(ft, sig.EndpointList):
        raw, items = bytearray([n]), []
        for i in range(n):
            ep = sig.Endpoint(f"192.0.2.{i + 1}" if i % 2 else f"2001:db8::{i + 1:x}", 1000 + i)
            raw += bytes([ep.family]) + ep.ip.packed + struct.pack("!H", ep.port)
            items.append(ep)
        return bytes(raw), tuple(items)
    if isinstance(ft, sig.OptIPv6):
        if n == 16:
            ip = ipaddress.IPv6Address("2001:db8::1")
            return bytes([16]) + ip.packed, ip
        return bytes([n]) + bytes(range(n)), None
    raise AssertionError(f"no builder for {ft!r}")


def sig_message(cls, field: str, raw_field: bytes, value, rid: int = 0x01020304):
    """(datagram, message): ``field`` carries ``raw_field`` / ``value``, the others their minimum."""
    parts = [struct.pack("!BBHI", C.PROTOCOL_VERSION, cls.TYPE, 0, rid)]
    values = {}
    for name, ft in cls.FIELDS:
        if name == field:
            parts.append(raw_field)
            values[name] = value
        else:
            values[name] = sig_min_value(ft)
            w = Writer()
            ft.encode(w, values[name], name)
            parts.append(w.getvalue())
    msg = cls(request_id=rid, **values) if value is not None else None
    return b"".join(parts), msg


def _sig_fields(select):
    return [pytest.param(cls, name, ft, id=f"{cls.__name__}.{name}")
            for cls in sorted(sig.MESSAGE_TYPES.values(), key=lambda c: c.TYPE)
            for name, ft in cls.FIELDS if select(ft)]


SIG_VARIABLE_FIELDS = _sig_fields(lambda ft: _sig_kind(ft) is not None)
SIG_FIXED_BYTES_FIELDS = _sig_fields(lambda ft: isinstance(ft, sig.Bytes))


def test_signaling_parametrization_is_not_empty():
    # An empty or shrunken parametrization would pass silently: pin what was counted.
    assert len(SIG_VARIABLE_FIELDS) >= SIG_VARIABLE_FIELDS_COUNTED
    assert len(SIG_FIXED_BYTES_FIELDS) >= SIG_FIXED_BYTES_FIELDS_COUNTED


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_signaling_field_types_are_classified():
    """Every field type is either variable (with a builder above) or fixed-size."""
    for ft_cls in _subclasses(sig.FieldType):
        variable = any(issubclass(ft_cls, v) for v in SIG_VARIABLE)
        fixed = issubclass(ft_cls, SIG_FIXED)
        assert variable != fixed, f"{ft_cls.__name__}: classify it in SIG_VARIABLE or SIG_FIXED"


@pytest.mark.parametrize("cls,name,ft", SIG_VARIABLE_FIELDS)
def test_signaling_field_at_maximum_round_trips(cls, name, ft):
    raw, value = sig_field_wire(ft, sig_declared_max(ft))
    data, msg = sig_message(cls, name, raw, value)
    assert sig.decode(data) == msg
    assert sig.encode(msg) == data
    assert sig.encode(sig.decode(data)) == data


@pytest.mark.parametrize("cls,name,ft", SIG_VARIABLE_FIELDS)
def test_signaling_field_over_maximum_refused_by_decode(cls, name, ft):
    raw, _ = sig_field_wire(ft, sig_declared_max(ft) + 1)
    data, _ = sig_message(cls, name, raw, None)
    assert len(data) <= C.MAX_SIGNALING_BYTES  # refused for the field, not for the message size
    with pytest.raises(ParseError) as info:
        sig.decode(data)
    assert f"{cls.__name__}.{name}" in str(info.value)


@pytest.mark.parametrize("cls,name,ft", [p for p in SIG_VARIABLE_FIELDS
                                         if not isinstance(p.values[2], sig.OptIPv6)])
def test_signaling_field_over_maximum_refused_by_encode(cls, name, ft):
    # (An IPv6Address cannot be 17 bytes long: OptIPv6 has no over-length value to encode.)
    raw, value = sig_field_wire(ft, sig_declared_max(ft))
    _, msg = sig_message(cls, name, raw, value)
    _, over = sig_field_wire(ft, sig_declared_max(ft) + 1)
    with pytest.raises(ValueError):
        sig.encode(dataclasses.replace(msg, **{name: over}))


@pytest.mark.parametrize("cls,name,ft", SIG_FIXED_BYTES_FIELDS)
@pytest.mark.parametrize("delta", [-1, 1])
def test_signaling_fixed_bytes_wrong_length_refused(cls, name, ft, delta):
    good, msg = sig_message(cls, name, bytes(range(ft.n)), bytes(range(ft.n)))
    assert sig.decode(good) == msg and sig.encode(msg) == good
    wrong = bytes(range(ft.n + delta))
    data, _ = sig_message(cls, name, wrong, None)
    with pytest.raises(ParseError):
        sig.decode(data)
    with pytest.raises(ValueError):
        sig.encode(dataclasses.replace(msg, **{name: wrong}))


@pytest.mark.parametrize("make", [
    lambda: sig.VarBytes(255), lambda: sig.VarBytes(65535, len_bytes=2), lambda: sig.Text(255),
    lambda: sig.EndpointList(255), lambda: sig.VarBytes(10, len_bytes=3), lambda: sig.Text(-1),
])
def test_signaling_declared_maximum_must_leave_room_for_one_more(make):
    with pytest.raises(ValueError):
        make()


def test_signaling_largest_declarable_maximum_is_accepted():
    for ft in (sig.VarBytes(254), sig.VarBytes(65534, len_bytes=2), sig.Text(254), sig.EndpointList(254)):
        assert sig_declared_max(ft) in (254, 65534)


# --- certificates -------------------------------------------------------------------------

SERIAL, NOT_BEFORE, NOT_AFTER = 42, 1_700_000_000, 1_800_000_000
ISSUER = bytes(range(8))
STATIC = bytes(range(32, 64))
VIP4 = ipaddress.IPv4Address("100.64.0.7")
VIP6 = ipaddress.IPv6Address("fd00::7")
SIGNATURE = bytes(range(64, 128))


def cert_bytes(fqdn: bytes, groups: list[bytes], *, vip6=True, issuer=ISSUER, static=STATIC,
               signature=SIGNATURE) -> bytes:
    """A certificate laid out by hand (docs/protocol.md, "Certificates")."""
    out = struct.pack("!BBQQQ", wire_cert.CERT_VERSION, wire_cert.FLAG_VIP6 if vip6 else 0,
                      SERIAL, NOT_BEFORE, NOT_AFTER)
    out += issuer + static + VIP4.packed + (VIP6.packed if vip6 else b"")
    out += bytes([len(fqdn)]) + fqdn + bytes([len(groups)])
    out += b"".join(bytes([len(g)]) + g for g in groups)
    return out + signature


def cert_value(fqdn: str, groups: tuple[str, ...], vip6=True) -> wire_cert.Certificate:
    return wire_cert.Certificate(SERIAL, NOT_BEFORE, NOT_AFTER, ISSUER, STATIC, VIP4, fqdn,
                                 groups, VIP6 if vip6 else None, SIGNATURE)


def groups_filling(total: int) -> tuple[str, ...]:
    """Groups that make a certificate with the longest name exactly ``total`` bytes long."""
    left = total - len(cert_bytes(fqdn_of_length(C.MAX_FQDN_BYTES).encode(), []))
    groups = []
    while left > 0:
        size = min(C.MAX_GROUP_BYTES, left - 1)
        groups.append(chr(ord("a") + len(groups)) * size)
        left -= size + 1
    assert left == 0 and len(groups) <= C.MAX_GROUPS
    return tuple(groups)


def cert_case(field: str, n: int):
    """(bytes, Certificate) with ``field`` at ``n`` bytes or items, the rest ordinary."""
    fqdn, groups = "node.example", ()
    if field == "fqdn":
        fqdn = fqdn_of_length(n)
    elif field == "groups":
        groups = tuple(f"g{i}" for i in range(n))
    elif field == "group":
        groups = (text_of_bytes(n),)
    elif field == "certificate":
        fqdn, groups = fqdn_of_length(C.MAX_FQDN_BYTES), groups_filling(n)
    else:
        raise AssertionError(field)
    data = cert_bytes(fqdn.encode(), [g.encode() for g in groups])
    if field == "certificate":
        assert len(data) == n
    return data, cert_value(fqdn, groups)


CERT_LIMITS = {
    "fqdn": C.MAX_FQDN_BYTES,        # bytes of the name
    "groups": C.MAX_GROUPS,          # how many groups
    "group": C.MAX_GROUP_BYTES,      # bytes of one group
    "certificate": C.MAX_CERT_BYTES,  # bytes of the whole certificate
}


@pytest.mark.parametrize("field", CERT_LIMITS)
def test_cert_field_at_maximum_round_trips(field):
    data, cert = cert_case(field, CERT_LIMITS[field])
    assert wire_cert.decode(data) == cert
    assert cert.encode() == data
    assert wire_cert.decode(data).encode() == data


@pytest.mark.parametrize("field", CERT_LIMITS)
def test_cert_field_over_maximum_refused(field):
    data, cert = cert_case(field, CERT_LIMITS[field] + 1)
    with pytest.raises(ParseError):
        wire_cert.decode(data)
    with pytest.raises(ValueError):
        cert.encode()


CERT_FIXED = {"issuer_id": 8, "static_public": 32, "signature": 64}


@pytest.mark.parametrize("field", CERT_FIXED)
@pytest.mark.parametrize("delta", [-1, 1])
def test_cert_fixed_field_wrong_length_refused(field, delta):
    good = dict(issuer=ISSUER, static=STATIC, signature=SIGNATURE)
    key = {"issuer_id": "issuer", "static_public": "static", "signature": "signature"}[field]
    wrong = bytes(range(CERT_FIXED[field] + delta))
    with pytest.raises(ParseError):
        wire_cert.decode(cert_bytes(b"node.example", [b"ops"], **{**good, key: wrong}))
    with pytest.raises(ValueError):
        dataclasses.replace(cert_value("node.example", ("ops",)), **{field: wrong}).encode()


# --- handshake ----------------------------------------------------------------------------

MAC1, MAC2 = bytes(range(100, 116)), bytes(16)
EPHEMERAL = bytes(range(1, 33))
ENC_STATIC = bytes(range(48))


def initiation_bytes(payload: bytes, *, mac2=MAC2) -> bytes:
    """An initiation laid out by hand, with ``payload`` as its encrypted payload."""
    return (struct.pack("!B3xI32s48sH", wire_hs.MSG_INITIATION, 77, EPHEMERAL, ENC_STATIC, len(payload))
            + payload + MAC1 + mac2)


def initiation_value(payload: bytes) -> wire_hs.Initiation:
    return wire_hs.Initiation(77, EPHEMERAL, ENC_STATIC, payload, MAC1, MAC2)


@pytest.mark.parametrize("n", [wire_hs.INIT_MIN_PAYLOAD, wire_hs.INIT_MAX_PAYLOAD])
def test_initiation_payload_at_bounds_round_trips(n):
    payload = bytes(i % 253 for i in range(n))
    data = initiation_bytes(payload)
    assert wire_hs.decode_initiation(data) == initiation_value(payload)
    assert initiation_value(payload).encode() == data
    assert wire_hs.decode_initiation(data).encode() == data


@pytest.mark.parametrize("n", [wire_hs.INIT_MIN_PAYLOAD - 1, wire_hs.INIT_MAX_PAYLOAD + 1])
def test_initiation_payload_out_of_bounds_refused(n):
    payload = bytes(n)
    with pytest.raises(ParseError):
        wire_hs.decode_initiation(initiation_bytes(payload))
    with pytest.raises(ValueError):
        initiation_value(payload).encode()
    with pytest.raises(ValueError):
        initiation_value(payload).body()


def test_initiation_payload_certificate_at_maximum_round_trips():
    ts = wire_hs.encode_timestamp(1_700_000_000.5)[0]
    cert = bytes(i % 251 for i in range(C.MAX_CERT_BYTES))
    plain = ts + struct.pack("!H", len(cert)) + cert
    assert wire_hs.decode_payload(plain) == (ts, cert)
    assert wire_hs.encode_payload(ts, cert) == plain
    # Sealed, the largest payload is exactly the largest the initiation carries.
    assert len(plain) + C.AEAD_TAG_BYTES == wire_hs.INIT_MAX_PAYLOAD


def test_initiation_payload_certificate_over_maximum_refused():
    ts = wire_hs.encode_timestamp(1_700_000_000.5)[0]
    cert = bytes(C.MAX_CERT_BYTES + 1)
    with pytest.raises(ParseError):
        wire_hs.decode_payload(ts + struct.pack("!H", len(cert)) + cert)
    with pytest.raises(ValueError):
        wire_hs.encode_payload(ts, cert)


INIT_FIXED_FIELDS = {"ephemeral": 32, "encrypted_static": 48, "mac1": 16, "mac2": 16}


@pytest.mark.parametrize("field", INIT_FIXED_FIELDS)
@pytest.mark.parametrize("delta", [-1, 1])
def test_initiation_fixed_field_wrong_length_refused_by_encode(field, delta):
    msg = dataclasses.replace(initiation_value(bytes(wire_hs.INIT_MIN_PAYLOAD)),
                              **{field: bytes(INIT_FIXED_FIELDS[field] + delta)})
    with pytest.raises(ValueError):
        msg.encode()


@pytest.mark.parametrize("delta", [-1, 1])
def test_initiation_wrong_total_length_refused(delta):
    # The only field after the payload is the fixed-size mac2: one byte less or
    # more no longer matches the payload length.
    data = initiation_bytes(bytes(wire_hs.INIT_MIN_PAYLOAD), mac2=bytes(16 + delta))
    with pytest.raises(ParseError):
        wire_hs.decode_initiation(data)


RESP_FIXED_FIELDS = {"ephemeral": 32, "encrypted_empty": 16, "mac1": 16, "mac2": 16}
RESPONSE = wire_hs.Response(5, 77, EPHEMERAL, bytes(range(16)), MAC1, MAC2)


@pytest.mark.parametrize("field", RESP_FIXED_FIELDS)
@pytest.mark.parametrize("delta", [-1, 1])
def test_response_fixed_field_wrong_length_refused(field, delta):
    with pytest.raises(ValueError):
        dataclasses.replace(RESPONSE, **{field: bytes(RESP_FIXED_FIELDS[field] + delta)}).encode()


@pytest.mark.parametrize("delta", [-1, 1])
def test_response_wrong_length_refused(delta):
    data = RESPONSE.encode()
    assert wire_hs.decode_response(data) == RESPONSE
    with pytest.raises(ParseError):
        wire_hs.decode_response(data[:-1] if delta < 0 else data + b"\x00")


@pytest.mark.parametrize("kw", [dict(sender_index=1 << 32), dict(sender_index=-1), dict(mtype=256)])
def test_handshake_encoders_refuse_out_of_range_integers(kw):
    with pytest.raises(ValueError):
        dataclasses.replace(initiation_value(bytes(wire_hs.INIT_MIN_PAYLOAD)), **kw).encode()
    with pytest.raises(ValueError):
        dataclasses.replace(RESPONSE, **kw).encode()
    with pytest.raises(ValueError):
        dataclasses.replace(RESPONSE, receiver_index=1 << 32).encode()


# --- data channel -------------------------------------------------------------------------

def test_data_packet_at_bounds_accepted():
    header = wire_data.encode_header(0xA1B2C3D4, 0x0102030405060708)
    for size in (wire_data.MIN_DATA_BYTES, C.MAX_DATAGRAM_BYTES):
        data = header + bytes(size - len(header))
        assert wire_data.decode_header(data) == (0xA1B2C3D4, 0x0102030405060708)
        assert wire_data.encode_header(*wire_data.decode_header(data)) == data[:C.DATA_HEADER_BYTES]


@pytest.mark.parametrize("size", [wire_data.MIN_DATA_BYTES - 1, C.MAX_DATAGRAM_BYTES + 1])
def test_data_packet_out_of_bounds_refused(size):
    # The ciphertext (with its tag) is the variable field: at least the tag,
    # at most what fills the largest UDP payload.
    data = wire_data.encode_header(1, 2) + bytes(size - C.DATA_HEADER_BYTES)
    with pytest.raises(ParseError):
        wire_data.decode_header(data)


# --- relay --------------------------------------------------------------------------------

SID = 0x0123456789ABCDEF


def relay_bytes(op: int, body: bytes) -> bytes:
    return struct.pack("!BBHQ", wire_relay.MSG_RELAY, op, 0, SID) + body


def test_relay_data_at_bounds_round_trips():
    for n in (1, wire_relay.MAX_RELAY_PAYLOAD_BYTES):
        inner = bytes(i % 249 for i in range(n))
        data = relay_bytes(wire_relay.OP_DATA, inner)
        assert wire_relay.decode(data) == wire_relay.RelayPacket(wire_relay.OP_DATA, SID, inner=inner)
        assert wire_relay.encode_data(SID, inner) == data
    assert len(data) == wire_relay.MAX_RELAY_DATAGRAM_BYTES


@pytest.mark.parametrize("n", [0, wire_relay.MAX_RELAY_PAYLOAD_BYTES + 1])
def test_relay_data_out_of_bounds_refused(n):
    with pytest.raises(ParseError):
        wire_relay.decode(relay_bytes(wire_relay.OP_DATA, bytes(n)))
    with pytest.raises(ValueError):
        wire_relay.encode_data(SID, bytes(n))


RELAY_FIXED = {
    wire_relay.OP_BIND: (wire_relay.TOKEN_BYTES, lambda body: wire_relay.encode_bind(SID, body)),
    wire_relay.OP_BOUND: (6, None),    # encode_bound packs its own body
    wire_relay.OP_ERROR: (1, None),    # encode_error packs its own body
}


@pytest.mark.parametrize("op", RELAY_FIXED, ids=["BIND", "BOUND", "ERROR"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_relay_fixed_body_wrong_length_refused(op, delta):
    size, encoder = RELAY_FIXED[op]
    good = bytes([1]) * size
    assert wire_relay.decode(relay_bytes(op, good)).op == op
    with pytest.raises(ParseError):
        wire_relay.decode(relay_bytes(op, bytes([1]) * (size + delta)))
    if encoder is not None:
        assert encoder(good) == relay_bytes(op, good)
        with pytest.raises(ValueError):
            encoder(bytes(size + delta))


def test_every_format_has_limit_cases():
    # The hand-listed formats: pin the number of fields covered so a case list
    # emptied by mistake fails here.
    assert len(CERT_LIMITS) >= 4 and len(CERT_FIXED) >= 3
    assert len(INIT_FIXED_FIELDS) >= 4 and len(RESP_FIXED_FIELDS) >= 4
    assert len(RELAY_FIXED) >= 3
    assert validate_fqdn(fqdn_of_length(C.MAX_FQDN_BYTES)) == fqdn_of_length(C.MAX_FQDN_BYTES)
