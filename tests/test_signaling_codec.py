"""Signaling codec: round trips, hostile input, encode limits, known-answer vectors.

The invariant of every parser (docs/protocol.md): decode returns a message or
raises ParseError, never anything else, and a decoded message re-encodes to
exactly the input bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import pathlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyphonic.constants import MAX_ENDPOINTS, MAX_SIGNALING_BYTES, PROTOCOL_VERSION
from cyphonic.errors import ParseError
from cyphonic.wire import signaling as sig
from cyphonic.wire.signaling import Endpoint, ErrorCode, decode, encode

VECTORS = pathlib.Path(__file__).parent / "vectors" / "signaling.json"
ALL_TYPES = sorted(sig.MESSAGE_TYPES.values(), key=lambda c: c.TYPE)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MORE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- strategies built by walking FIELDS ---------------------------------------------

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
FQDNS = st.lists(_LABEL, min_size=1, max_size=5).map(".".join).filter(lambda s: len(s) <= 253)
ENDPOINTS = st.builds(
    Endpoint,
    host=st.ip_addresses().map(str),
    port=st.integers(0, 0xFFFF),
)


def _text(max_len: int) -> st.SearchStrategy[str]:
    # Cut at max_len bytes on a character boundary: covers multi-byte UTF-8 up to the limit.
    return st.text(max_size=max_len).map(
        lambda s: s.encode("utf-8")[:max_len].decode("utf-8", "ignore"))


def field_strategy(ft: sig.FieldType) -> st.SearchStrategy:
    if isinstance(ft, sig.UInt):
        return st.integers(0, ft.limit - 1)
    if isinstance(ft, sig.Bool):
        return st.booleans()
    if isinstance(ft, sig.Bytes):
        return st.binary(min_size=ft.n, max_size=ft.n)
    if isinstance(ft, sig.VarBytes):
        return st.binary(max_size=ft.max_len)
    if isinstance(ft, sig.Fqdn):  # before Text: Fqdn is a Text
        return (st.just("") | FQDNS) if ft.optional else FQDNS
    if isinstance(ft, sig.Text):
        return _text(ft.max_len)
    if isinstance(ft, sig.IPv4):
        return st.ip_addresses(v=4)
    if isinstance(ft, sig.OptIPv6):
        return st.none() | st.ip_addresses(v=6)
    if isinstance(ft, sig.EndpointField):
        return (st.none() | ENDPOINTS) if ft.optional else ENDPOINTS
    if isinstance(ft, sig.EndpointList):
        return st.lists(ENDPOINTS, max_size=MAX_ENDPOINTS).map(tuple)
    if isinstance(ft, sig.EnumField):
        members = st.sampled_from(list(ft.enum_cls))
        return (st.none() | members) if ft.optional else members
    raise AssertionError(f"no strategy for {ft!r}")


def message_strategy(cls: type[sig.Message]) -> st.SearchStrategy[sig.Message]:
    return st.builds(
        cls,
        request_id=st.integers(0, 0xFFFFFFFF),
        **{name: field_strategy(ft) for name, ft in cls.FIELDS},
    )


ANY_MESSAGE = st.sampled_from(ALL_TYPES).flatmap(message_strategy)


# --- deterministic samples: the largest and the smallest value of every field ----------

LONGEST_FQDN = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
assert len(LONGEST_FQDN) == 253


def sample_value(ft: sig.FieldType, full: bool):
    if isinstance(ft, sig.UInt):
        return ft.limit - 1 if full else 0
    if isinstance(ft, sig.Bool):
        return full
    if isinstance(ft, sig.Bytes):
        return bytes(range(ft.n)) if full else bytes(ft.n)
    if isinstance(ft, sig.VarBytes):
        return bytes(i % 251 for i in range(ft.max_len)) if full else b""
    if isinstance(ft, sig.Fqdn):
        return LONGEST_FQDN if full else ("" if ft.optional else "a")
    if isinstance(ft, sig.Text):
        return ("\u00e9" * (ft.max_len // 2) + "x" * (ft.max_len % 2)) if full else ""
    if isinstance(ft, sig.IPv4):
        return ipaddress.IPv4Address("203.0.113.7" if full else "0.0.0.0")
    if isinstance(ft, sig.OptIPv6):
        return ipaddress.IPv6Address("2001:db8::1") if full else None
    if isinstance(ft, sig.EndpointField):
        if full:
            return Endpoint("2001:db8::2", 65535)
        return None if ft.optional else Endpoint("0.0.0.0", 0)
    if isinstance(ft, sig.EndpointList):
        return tuple(Endpoint(f"2001:db8::{i + 1:x}", 1000 + i) for i in range(MAX_ENDPOINTS)) if full else ()
    if isinstance(ft, sig.EnumField):
        if full:
            return max(ft.enum_cls)
        return None if ft.optional else min(ft.enum_cls)
    raise AssertionError(f"no sample for {ft!r}")


def sample(cls: type[sig.Message], full: bool = True) -> sig.Message:
    return cls(request_id=0xFFFFFFFF if full else 0,
               **{name: sample_value(ft, full) for name, ft in cls.FIELDS})


SAMPLES = [sample(c, True) for c in ALL_TYPES] + [sample(c, False) for c in ALL_TYPES]


def decode_or_parse_error(data):
    """The fuzz invariant: a message that re-encodes to the input, or ParseError."""
    try:
        msg = decode(data)
    except ParseError:
        return None
    assert encode(msg) == bytes(data)
    return msg


# --- registry and declarations ---------------------------------------------------------

def test_registry_has_every_type_once():
    assert sorted(sig.MESSAGE_TYPES) == list(range(1, 18))
    names = [c.__name__ for c in ALL_TYPES]
    assert names == [
        "LoginRequest", "LoginResponse", "RegisterRequest", "RegisterResponse", "Keepalive",
        "KeepaliveAck", "RouteRequest", "RouteDirection", "RouteConfirm", "PunchRequest",
        "RelayAllocate", "RelayGrant", "TunnelRequest", "TunnelResponse", "Notify", "Error",
        "Deregister",
    ]


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_largest_message_fits_and_max_size_is_exact(cls):
    msg = sample(cls, full=True)
    data = encode(msg)
    assert len(data) == sig.max_encoded_size(cls) <= MAX_SIGNALING_BYTES
    assert decode(data) == msg


def test_messages_are_frozen_and_keyword_only():
    m = sig.Keepalive(request_id=3)
    with pytest.raises(AttributeError):
        m.request_id = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        sig.RouteRequest(1, "a.b")  # type: ignore[misc]
    assert sig.Keepalive() == sig.Keepalive(request_id=0)
    assert hash(sample(sig.RouteDirection)) == hash(sample(sig.RouteDirection))


def test_error_codes_have_texts():
    for code in ErrorCode:
        assert code.describe() == sig.ERROR_TEXTS[code] and code.describe()


# --- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_round_trip(cls, data):
    msg = data.draw(message_strategy(cls))
    raw = encode(msg)
    assert len(raw) <= MAX_SIGNALING_BYTES
    assert decode(raw) == msg
    assert decode(bytearray(raw)) == msg
    assert decode(memoryview(raw)) == msg
    assert sig.peek_header(raw) == (PROTOCOL_VERSION, cls.TYPE, msg.request_id)


def test_endpoint_is_canonical():
    assert Endpoint("2001:0db8:0:0::0001", 1).host == "2001:db8::1"
    assert Endpoint(ipaddress.IPv4Address("192.0.2.1"), 2) == Endpoint("192.0.2.1", 2)
    assert str(Endpoint("2001:db8::1", 443)) == "[2001:db8::1]:443"
    assert str(Endpoint("192.0.2.1", 443)) == "192.0.2.1:443"
    assert Endpoint("192.0.2.1", 1).family == 4
    for host, port in [("example.com", 1), ("1.2.3.4", 65536), ("1.2.3.4", -1),
                       ("fe80::1%eth0", 1), (16909060, 1), ("1.2.3.4", True)]:
        with pytest.raises(ValueError):
            Endpoint(host, port)  # type: ignore[arg-type]


# --- hostile input ------------------------------------------------------------------------

def header(mtype: int, version: int = PROTOCOL_VERSION, flags: int = 0, rid: int = 7) -> bytes:
    return struct.pack("!BBHI", version, mtype, flags, rid)


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x01\x05", header(5)[:7]])
def test_short_input(data):
    with pytest.raises(ParseError):
        decode(data)
    if len(data) < 8:
        with pytest.raises(ParseError):
            sig.peek_header(data)


@pytest.mark.parametrize("data", [None, "0105000000000000", 5, 1.5, [1, 5, 0, 0, 0, 0, 0, 0], object()])
def test_not_bytes(data):
    with pytest.raises(ParseError):
        decode(data)
    with pytest.raises(ParseError):
        sig.peek_header(data)


def test_odd_buffers():
    released = memoryview(bytearray(header(5)))
    released.release()
    with pytest.raises(ParseError):
        decode(released)
    with pytest.raises(ParseError) as info:
        decode(memoryview(bytearray(10_000)).cast("I"))  # 10000 bytes, 2500 items
    assert info.value.reason == "oversize"
    assert decode(memoryview(header(5)).cast("H")) == sig.Keepalive(request_id=7)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_truncation_is_refused(msg):
    data = encode(msg)
    for n in range(len(data)):
        with pytest.raises(ParseError):
            decode(data[:n])


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_trailing_byte_is_refused(msg):
    data = encode(msg)
    if len(data) < MAX_SIGNALING_BYTES:
        with pytest.raises(ParseError):
            decode(data + b"\x00")


def test_oversize_is_refused_before_parsing():
    for data in (bytes(MAX_SIGNALING_BYTES + 1), header(5) + bytes(MAX_SIGNALING_BYTES - 7),
                 b"\xff" * 5000):
        with pytest.raises(ParseError) as info:
            decode(data)
        assert info.value.reason == "oversize"


@pytest.mark.parametrize("mtype", [0, 18, 99, 255])
def test_unknown_type(mtype):
    with pytest.raises(ParseError) as info:
        decode(header(mtype))
    assert info.value.reason == "unknown_type"
    assert sig.peek_header(header(mtype, rid=42)) == (PROTOCOL_VERSION, mtype, 42)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version(version):
    with pytest.raises(ParseError) as info:
        decode(header(5, version=version))
    assert info.value.reason == "version"
    with pytest.raises(ParseError) as info:
        decode(bytes([version]))
    assert info.value.reason == "version"
    assert sig.peek_header(header(5, version=version, rid=9)) == (version, 5, 9)


@pytest.mark.parametrize("flags", [1, 0x8000, 0xFFFF])
def test_nonzero_flags(flags):
    assert decode(header(5)) == sig.Keepalive(request_id=7)
    with pytest.raises(ParseError) as info:
        decode(header(5, flags=flags))
    assert info.value.reason == "flags"


def _patched(msg: sig.Message, offset: int, new: bytes) -> bytes:
    data = bytearray(encode(msg))
    data[offset:offset + len(new)] = new
    return bytes(data)


BAD_FIELDS = {
    "error code 0": _patched(sig.Error(code=ErrorCode.INTERNAL, text=""), 8, b"\x00\x00"),
    "error code 999": _patched(sig.Error(code=ErrorCode.INTERNAL, text=""), 8, b"\x03\xe7"),
    "error text not utf-8": _patched(sig.Error(code=ErrorCode.INTERNAL, text="ab"), 11, b"\xff"),
    "error text length > 200": _patched(sig.Error(code=ErrorCode.INTERNAL, text=""), 10, b"\xc9"),
    "accepted = 2": _patched(sig.TunnelResponse(route_id=1, accepted=True, code=None), 16, b"\x02"),
    "tunnel code unknown": _patched(sig.TunnelResponse(route_id=1, accepted=False, code=None), 17, b"\x00\x63"),
    "endpoint family 5": _patched(sample(sig.KeepaliveAck), 8, b"\x05"),
    "endpoint family 0 not optional": header(6) + b"\x00",
    "absent endpoint followed by a byte": _patched(
        sig.RouteConfirm(route_id=1, result=sig.RouteResult.OK, path_type=sig.RouteType.DIRECT,
                         endpoint=None), 18, b"\x00\x00"),
    "9 endpoints": _patched(sig.RegisterRequest(local_endpoints=(), flags=0), 8, b"\x09"),
    "nat type 3": _patched(sample(sig.RegisterResponse), 27, b"\x03"),
    "upper-case fqdn": _patched(sig.RouteRequest(peer_fqdn="a.b"), 9, b"A"),
    "fqdn empty label": _patched(sig.RouteRequest(peer_fqdn="a.b"), 11, b"."),
    "empty fqdn where required": header(7) + b"\x00",
    "route type 0": _patched(sample(sig.RouteDirection), 16, b"\x00"),
    "role 3": _patched(sample(sig.RouteDirection), 17, b"\x03"),
    "vip6 length 4": _patched(sample(sig.LoginResponse, full=False), 8 + 2 + 2 + 4, b"\x04"),
    "notify kind 0": _patched(sample(sig.Notify), 8, b"\x00\x00"),
}


@pytest.mark.parametrize("data", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_field_values(data):
    with pytest.raises(ParseError):
        decode(data)


def test_optional_fields_decode_to_none_or_empty():
    m = sig.Notify(kind=sig.NotifyKind.CLOUD_SHUTDOWN, fqdn="", detail="bye")
    assert decode(encode(m)) == m
    m = sig.TunnelResponse(route_id=1, accepted=True, code=None)
    assert encode(m)[-2:] == b"\x00\x00"
    assert decode(encode(m)) == m


@MORE
@given(st.binary(max_size=300))
def test_random_bytes(data):
    decode_or_parse_error(data)


@MORE
@given(st.sampled_from(ALL_TYPES), st.integers(0, 0xFFFFFFFF), st.binary(max_size=300))
def test_random_body_after_valid_header(cls, rid, body):
    decode_or_parse_error(header(cls.TYPE, rid=rid) + body)


@MORE
@given(ANY_MESSAGE, st.data())
def test_bit_flips(msg, data):
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 8 * len(raw) - 1))
        raw[bit // 8] ^= 1 << (bit % 8)
    decode_or_parse_error(bytes(raw))


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_single_byte_corruption_of_samples(msg):
    data = encode(msg)
    for i in range(len(data)):
        for v in (0x00, 0xFF, data[i] ^ 0x01):
            decode_or_parse_error(data[:i] + bytes([v]) + data[i + 1:])


# --- encode limits -------------------------------------------------------------------

LOGIN = dict(token=b"", name_hint="", static_public=bytes(32), software="")


def _replace(msg, **kw):
    return dataclasses.replace(msg, **kw)


BAD_ENCODES = {
    "token 129 bytes": sig.LoginRequest(**{**LOGIN, "token": b"x" * 129}),
    "token str": sig.LoginRequest(**{**LOGIN, "token": "abc"}),
    "name_hint 64 bytes": sig.LoginRequest(**{**LOGIN, "name_hint": "n" * 64}),
    "name_hint 32 two-byte chars": sig.LoginRequest(**{**LOGIN, "name_hint": "\u00e9" * 32}),
    "name_hint surrogate": sig.LoginRequest(**{**LOGIN, "name_hint": "\ud800"}),
    "static_public 31 bytes": sig.LoginRequest(**{**LOGIN, "static_public": bytes(31)}),
    "request_id 2**32": sig.Keepalive(request_id=1 << 32),
    "request_id -1": sig.Keepalive(request_id=-1),
    "expires_s 65536": _replace(sample(sig.RouteDirection), expires_s=65536),
    "route_id negative": _replace(sample(sig.RouteDirection), route_id=-1),
    "route_id float": _replace(sample(sig.RouteDirection), route_id=1.0),
    "certificate 601 bytes": _replace(sample(sig.RouteDirection), peer_certificate=bytes(601)),
    "9 endpoints": sig.RegisterRequest(local_endpoints=(Endpoint("192.0.2.1", 1),) * 9, flags=3),
    "endpoint as tuple": sig.RegisterRequest(local_endpoints=(("192.0.2.1", 1),), flags=3),
    "None endpoint where required": sig.KeepaliveAck(observed=None),
    "upper-case fqdn": sig.RouteRequest(peer_fqdn="Node.example"),
    "empty fqdn where required": sig.RouteRequest(peer_fqdn=""),
    "fqdn 254 bytes": sig.RouteRequest(peer_fqdn=LONGEST_FQDN + "e"),
    "vip4 as str": _replace(sample(sig.LoginResponse), vip4="10.0.0.1"),
    "vip6 as IPv4": _replace(sample(sig.LoginResponse), vip6=ipaddress.IPv4Address("10.0.0.1")),
    "enum value unknown": sig.Error(code=99, text=""),
    "enum of another class": sig.RouteConfirm(route_id=1, result=sig.RouteType.DIRECT,
                                              path_type=sig.RouteType.DIRECT, endpoint=None),
    "None for required enum": sig.Error(code=None, text=""),
    "accepted = 2": sig.TunnelResponse(route_id=1, accepted=2, code=None),
    "error text 201 bytes": sig.Error(code=ErrorCode.INTERNAL, text="x" * 201),
}


@pytest.mark.parametrize("msg", BAD_ENCODES.values(), ids=BAD_ENCODES.keys())
def test_encode_refuses_bad_values(msg):
    with pytest.raises(ValueError):
        encode(msg)


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        encode(b"\x01\x05")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(sig.Message())


def test_encode_accepts_plain_ints_for_enums():
    m = sig.Error(code=7, text="")
    assert decode(encode(m)).code is ErrorCode.REVOKED


# --- known-answer vectors ------------------------------------------------------------

def jsonable(value):
    """The JSON form of a field value used in tests/vectors/signaling.json."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, Endpoint):
        return {"host": value.host, "port": value.port}
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    raise AssertionError(f"no JSON form for {value!r}")


def message_json(msg: sig.Message) -> dict:
    out = {"type": type(msg).__name__, "request_id": msg.request_id}
    out.update({name: jsonable(getattr(msg, name)) for name, _ in type(msg).FIELDS})
    return out


def _vectors():
    return json.loads(VECTORS.read_text())


def test_vectors_cover_required_types():
    names = {v["message"]["type"] for v in _vectors()}
    assert {"LoginRequest", "RouteDirection", "Error"} <= names


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_known_answer_vector(vector):
    data = bytes.fromhex(vector["hex"])
    msg = decode(data)
    assert message_json(msg) == vector["message"]
    assert encode(msg).hex() == vector["hex"]
