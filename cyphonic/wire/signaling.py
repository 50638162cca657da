"""Plaintext codec of the signaling (control-plane) messages.

Signaling runs between a node and the cloud: the Authentication Service (AS,
login and certificates), the Node Management Service (NMS, registration,
route directions, hole punching) and the Tunnel Relay Service (TRS, relay
grants). This module only turns messages into bytes and back; encryption and
authentication are the job of the outer secure channel that carries them.

Format (docs/protocol.md, "Signaling wire format"): an 8-byte header
(version u8, type u8, flags u16, request_id u32, network byte order) followed
by the message's fields in order. The fields are declared as data: every
message class has ``FIELDS``, a tuple of ``(name, FieldType)``, and one
generic encoder and decoder walk it, as pyroute2's ``fields`` do. There is no
per-message parsing code.

Bounds: a whole message is at most ``MAX_SIGNALING_BYTES`` (1200) bytes; every
variable field has a declared maximum, and the largest message of every type
fits the bound. ``decode`` refuses longer input before parsing anything.
The maximum of a variable field (bytes, text, an endpoint count) lives in its
declaration in ``FIELDS`` and is checked by its field type, on both sides:
``decode`` accepts exactly the maximum and refuses one more with ``ParseError``,
``encode`` refuses one more with ``ValueError``. A field type refuses a
maximum its length prefix could not exceed, so maximum + 1 is always a datagram
that can be sent, and refused.

Never: ``decode`` raises nothing but ``ParseError``, whatever it is given
(wrong type, truncated, trailing bytes, unknown type or enum value). The
encoding is canonical: if ``decode(data)`` returns a message, then
``encode(message) == data``. ``encode`` raises ``ValueError`` for a value that
cannot be encoded (out of range, too long, not a valid name).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass
from typing import Any, ClassVar

from ..constants import (
    MAX_CERT_BYTES,
    MAX_ENDPOINTS,
    MAX_ERROR_TEXT_BYTES,
    MAX_FQDN_BYTES,
    MAX_SIGNALING_BYTES,
    MAX_TOKEN_BYTES,
    PROTOCOL_VERSION,
)
from ..errors import ParseError
from .common import Reader, Writer, validate_fqdn

__all__ = [
    "HEADER_BYTES", "MESSAGE_TYPES", "encode", "decode", "peek_header", "max_encoded_size",
    "Endpoint", "Message",
    "RouteType", "Role", "RouteResult", "NatType", "NotifyKind", "ErrorCode", "ERROR_TEXTS",
    "REGISTER_HAS_IPV4", "REGISTER_HAS_IPV6",
    "LoginRequest", "LoginResponse", "RegisterRequest", "RegisterResponse", "Keepalive",
    "KeepaliveAck", "RouteRequest", "RouteDirection", "RouteConfirm", "PunchRequest",
    "RelayAllocate", "RelayGrant", "TunnelRequest", "TunnelResponse", "Notify", "Error",
    "Deregister",
]

HEADER_BYTES = 8

# RegisterRequest.flags bits.
REGISTER_HAS_IPV4 = 0x01
REGISTER_HAS_IPV6 = 0x02


# --- Enums ---------------------------------------------------------------------

class RouteType(enum.IntEnum):
    """How two nodes reach each other (the paper's route types)."""
    DIRECT = 1       # the responder has a public address
    REVERSED = 2     # the responder is behind NAT, the initiator is not: it connects back
    HOLE_PUNCH = 3   # both behind NAT: simultaneous UDP hole punching
    LOCAL = 4        # same LAN: the local addresses
    RELAY = 5        # through the Tunnel Relay Service


class Role(enum.IntEnum):
    INITIATOR = 1
    RESPONDER = 2


class RouteResult(enum.IntEnum):
    OK = 0
    FAILED = 1


class NatType(enum.IntEnum):
    NONE = 0      # the observed endpoint is one of the reported local endpoints
    NAT = 1       # the node is behind a NAT
    UNKNOWN = 2


class NotifyKind(enum.IntEnum):
    PEER_MOVED = 1
    REVOKED = 2
    CLOUD_SHUTDOWN = 3
    POLICY_CHANGED = 4
    REREGISTER = 5


class ErrorCode(enum.IntEnum):
    BAD_MESSAGE = 1
    UNSUPPORTED_VERSION = 2
    UNAUTHENTICATED = 3
    TOKEN_UNKNOWN = 4
    TOKEN_EXPIRED = 5
    TOKEN_USED = 6
    REVOKED = 7
    NOT_REGISTERED = 8
    UNKNOWN_PEER = 9
    POLICY_DENIED = 10
    PEER_UNREACHABLE = 11
    RATE_LIMITED = 12
    INTERNAL = 13
    REPLAYED = 14
    CERT_INVALID = 15
    RELAY_UNAVAILABLE = 16

    def describe(self) -> str:
        """The human text a CLI prints for this code."""
        return ERROR_TEXTS[self]


ERROR_TEXTS: dict[ErrorCode, str] = {
    ErrorCode.BAD_MESSAGE: "malformed message",
    ErrorCode.UNSUPPORTED_VERSION: "unsupported protocol version",
    ErrorCode.UNAUTHENTICATED: "not authenticated",
    ErrorCode.TOKEN_UNKNOWN: "enrolment token unknown",
    ErrorCode.TOKEN_EXPIRED: "enrolment token expired",
    ErrorCode.TOKEN_USED: "enrolment token already used",
    ErrorCode.REVOKED: "node revoked",
    ErrorCode.NOT_REGISTERED: "node not registered",
    ErrorCode.UNKNOWN_PEER: "unknown peer",
    ErrorCode.POLICY_DENIED: "denied by policy",
    ErrorCode.PEER_UNREACHABLE: "peer unreachable",
    ErrorCode.RATE_LIMITED: "rate limited, retry later",
    ErrorCode.INTERNAL: "internal error in the cloud",
    ErrorCode.REPLAYED: "replayed request",
    ErrorCode.CERT_INVALID: "certificate invalid",
    ErrorCode.RELAY_UNAVAILABLE: "no relay available",
}
assert set(ERROR_TEXTS) == set(ErrorCode)


# --- Endpoint ------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """A UDP endpoint. ``host`` is normalised to the canonical text of the IP."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
            raise ValueError(f"endpoint host must be an IP address, got {self.host!r}")
        ip = ipaddress.ip_address(self.host)  # ValueError if not an address
        if getattr(ip, "scope_id", None):
            raise ValueError(f"endpoint host {self.host!r}: scoped addresses are not carried")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"endpoint port {self.port!r} not in 0..65535")
        object.__setattr__(self, "host", str(ip))

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.host)

    @property
    def family(self) -> int:
        return self.ip.version

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == 6 else f"{self.host}:{self.port}"


# --- Field types -----------------------------------------------------------------
# Each has encode(writer, value, name), decode(reader, name) and max_size (bytes).
# encode raises ValueError; decode raises ParseError (through Reader or itself).

class FieldType:
    max_size: int = 0

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        raise NotImplementedError

    def decode(self, r: Reader, name: str = "field") -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


class UInt(FieldType):
    """Unsigned big-endian integer of 1, 2, 4 or 8 bytes."""

    def __init__(self, size: int) -> None:
        self.size = self.max_size = size
        self.limit = 1 << (8 * size)
        self._write = {1: Writer.u8, 2: Writer.u16, 4: Writer.u32, 8: Writer.u64}[size]
        self._read = {1: Reader.u8, 2: Reader.u16, 4: Reader.u32, 8: Reader.u64}[size]

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected int, got {type(value).__name__}")
        if not 0 <= value < self.limit:
            raise ValueError(f"{name}: {value} not in 0..{self.limit - 1}")
        self._write(w, value)

    def decode(self, r: Reader, name: str = "field") -> int:
        return self._read(r, name)

    def __repr__(self) -> str:
        return f"U{8 * self.size}"


U8 = UInt(1)
U16 = UInt(2)
U32 = UInt(4)
U64 = UInt(8)


def _check_bytes(value: Any, name: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name}: expected bytes, got {type(value).__name__}")
    return bytes(value)


class Bool(FieldType):
    """One byte, 0 (False) or 1 (True); anything else is refused."""

    max_size = 1

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        if not isinstance(value, int) or value not in (0, 1):
            raise ValueError(f"{name}: expected a bool, got {value!r}")
        w.u8(1 if value else 0)

    def decode(self, r: Reader, name: str = "field") -> bool:
        v = r.u8(name)
        if v > 1:
            raise ParseError(f"{name}: boolean byte {v} is not 0 or 1")
        return v == 1


class Bytes(FieldType):
    """Exactly ``n`` bytes, no length prefix."""

    def __init__(self, n: int) -> None:
        self.n = self.max_size = n

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        b = _check_bytes(value, name)
        if len(b) != self.n:
            raise ValueError(f"{name}: need exactly {self.n} bytes, got {len(b)}")
        w.raw(b)

    def decode(self, r: Reader, name: str = "field") -> bytes:
        return r.take(self.n, name)

    def __repr__(self) -> str:
        return f"Bytes({self.n})"


def _check_declared_max(kind: str, max_len: int, len_bytes: int) -> None:
    """A declared maximum must leave room for maximum + 1 in its length prefix.

    Otherwise the bound check could never fire and nothing would test it.
    """
    if len_bytes not in (1, 2) or not 0 <= max_len < (1 << (8 * len_bytes)) - 1:
        raise ValueError(f"{kind}: maximum {max_len} leaves no room for one more in a {len_bytes}-byte length")


class VarBytes(FieldType):
    """A u8 (or u16) length, then at most ``max_len`` bytes."""

    def __init__(self, max_len: int, len_bytes: int = 1) -> None:
        _check_declared_max("VarBytes", max_len, len_bytes)
        self.max_len = max_len
        self.len_bytes = len_bytes
        self.max_size = len_bytes + max_len

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        w.var_bytes(_check_bytes(value, name), self.max_len, name, self.len_bytes)

    def decode(self, r: Reader, name: str = "field") -> bytes:
        return r.var_bytes(self.max_len, name, self.len_bytes)

    def __repr__(self) -> str:
        return f"VarBytes({self.max_len}, len_bytes={self.len_bytes})"


class Text(FieldType):
    """UTF-8 text: a u8 length in bytes, then at most ``max_len`` bytes."""

    def __init__(self, max_len: int) -> None:
        _check_declared_max("Text", max_len, 1)
        self.max_len = max_len
        self.max_size = 1 + max_len

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected str, got {type(value).__name__}")
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{name}: not encodable as UTF-8 (surrogates)") from None
        w.var_bytes(raw, self.max_len, name)

    def decode(self, r: Reader, name: str = "field") -> str:
        return r.text(self.max_len, name)

    def __repr__(self) -> str:
        return f"Text({self.max_len})"


class Fqdn(Text):
    """A node or domain name: Text(253) holding lower-case LDH labels.

    Empty (``""``) only where declared ``Fqdn(optional=True)``.
    """

    def __init__(self, optional: bool = False) -> None:
        super().__init__(MAX_FQDN_BYTES)
        self.optional = optional

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        if not (self.optional and value == ""):
            if not isinstance(value, str):
                raise ValueError(f"{name}: expected str, got {type(value).__name__}")
            try:
                validate_fqdn(value, name)
            except ParseError as exc:
                raise ValueError(str(exc)) from None
        super().encode(w, value, name)

    def decode(self, r: Reader, name: str = "field") -> str:
        value = super().decode(r, name)
        if self.optional and value == "":
            return value
        return validate_fqdn(value, name)

    def __repr__(self) -> str:
        return "Fqdn(optional=True)" if self.optional else "Fqdn()"


class IPv4(FieldType):
    """Four bytes -> ``ipaddress.IPv4Address``."""

    max_size = 4

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        if not isinstance(value, ipaddress.IPv4Address):
            raise ValueError(f"{name}: expected IPv4Address, got {value!r}")
        w.raw(value.packed)

    def decode(self, r: Reader, name: str = "field") -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(r.take(4, name))


class OptIPv6(FieldType):
    """A u8 length of 0 (None) or 16, then the address -> ``IPv6Address``."""

    max_size = 17

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        if value is None:
            w.u8(0)
            return
        if not isinstance(value, ipaddress.IPv6Address) or value.scope_id:
            raise ValueError(f"{name}: expected unscoped IPv6Address or None, got {value!r}")
        w.u8(16).raw(value.packed)

    def decode(self, r: Reader, name: str = "field") -> ipaddress.IPv6Address | None:
        n = r.u8(name)
        if n == 0:
            return None
        if n != 16:
            raise ParseError(f"{name}: IPv6 length {n} is not 0 or 16")
        return ipaddress.IPv6Address(r.take(16, name))


_FAMILY_LEN = {4: 4, 6: 16}


class EndpointField(FieldType):
    """Family u8 (4 or 6), the address (4 or 16 bytes), port u16 -> ``Endpoint``.

    Where declared ``optional``, a lone family byte 0 (no address, no port)
    means None.
    """

    max_size = 1 + 16 + 2

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        if value is None and self.optional:
            w.u8(0)
            return
        if not isinstance(value, Endpoint):
            raise ValueError(f"{name}: expected Endpoint, got {value!r}")
        ip = value.ip
        w.u8(ip.version).raw(ip.packed).u16(value.port)

    def decode(self, r: Reader, name: str = "field") -> Endpoint | None:
        family = r.u8(name)
        if family == 0 and self.optional:
            return None
        if family not in _FAMILY_LEN:
            raise ParseError(f"{name}: address family {family} is not 4 or 6")
        ip = ipaddress.ip_address(r.take(_FAMILY_LEN[family], name))
        return Endpoint(str(ip), r.u16(name))

    def __repr__(self) -> str:
        return "EndpointField(optional=True)" if self.optional else "EndpointField()"


class EndpointList(FieldType):
    """A u8 count (at most ``max_items``, MAX_ENDPOINTS unless declared), then
    that many endpoints -> tuple."""

    _item = EndpointField()

    def __init__(self, max_items: int = MAX_ENDPOINTS) -> None:
        _check_declared_max("EndpointList", max_items, 1)
        self.max_items = max_items
        self.max_size = 1 + max_items * EndpointField.max_size

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{name}: expected a tuple of Endpoint, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise ValueError(f"{name}: {len(value)} endpoints exceeds {self.max_items}")
        w.u8(len(value))
        for i, item in enumerate(value):
            self._item.encode(w, item, f"{name}[{i}]")

    def decode(self, r: Reader, name: str = "field") -> tuple[Endpoint, ...]:
        n = r.u8(name)
        if n > self.max_items:
            raise ParseError(f"{name}: {n} endpoints exceeds {self.max_items}")
        return tuple(self._item.decode(r, f"{name}[{i}]") for i in range(n))

    def __repr__(self) -> str:
        return f"EndpointList({self.max_items})"


class EnumField(FieldType):
    """An IntEnum carried as U8 or U16; an unknown value is refused.

    Where declared ``optional``, the value 0 means None (the enum must not
    have a member 0).
    """

    def __init__(self, enum_cls: type[enum.IntEnum], width: UInt = U8, optional: bool = False) -> None:
        if optional and 0 in enum_cls._value2member_map_:
            raise ValueError(f"{enum_cls.__name__} has a member 0; it cannot be optional")
        self.enum_cls = enum_cls
        self.width = width
        self.optional = optional
        self.max_size = width.max_size

    def encode(self, w: Writer, value: Any, name: str = "field") -> None:
        if value is None and self.optional:
            self.width.encode(w, 0, name)
            return
        if isinstance(value, enum.Enum) and not isinstance(value, self.enum_cls):
            raise ValueError(f"{name}: expected {self.enum_cls.__name__}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected {self.enum_cls.__name__}, got {value!r}")
        if value not in self.enum_cls._value2member_map_:
            raise ValueError(f"{name}: {value} is not a {self.enum_cls.__name__}")
        self.width.encode(w, int(value), name)

    def decode(self, r: Reader, name: str = "field") -> enum.IntEnum | None:
        raw = self.width.decode(r, name)
        if raw == 0 and self.optional:
            return None
        try:
            return self.enum_cls(raw)
        except ValueError:
            raise ParseError(f"{name}: unknown {self.enum_cls.__name__} {raw}") from None

    def __repr__(self) -> str:
        opt = ", optional=True" if self.optional else ""
        return f"EnumField({self.enum_cls.__name__}, {self.width!r}{opt})"


# --- Messages --------------------------------------------------------------------

class Message:
    """Base of the signaling messages: frozen dataclasses with TYPE and FIELDS."""

    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple[tuple[str, FieldType], ...]]
    request_id: int


MESSAGE_TYPES: dict[int, type[Message]] = {}


def _register(cls: type[Message]) -> type[Message]:
    """Add ``cls`` to MESSAGE_TYPES, checking its dataclass fields match FIELDS."""
    names = [f.name for f in dataclasses.fields(cls)]
    declared = ["request_id"] + [n for n, _ in cls.FIELDS]
    if names != declared:
        raise TypeError(f"{cls.__name__}: dataclass fields {names} != FIELDS {declared}")
    if cls.TYPE in MESSAGE_TYPES or not 0 < cls.TYPE < 256:
        raise TypeError(f"{cls.__name__}: type {cls.TYPE} reused or out of range")
    MESSAGE_TYPES[cls.TYPE] = cls
    return cls


_message = dataclass(frozen=True, kw_only=True)


@_register
@_message
class LoginRequest(Message):
    """Node -> AS. ``token`` is empty when the node proves its identity key instead."""
    TYPE = 1
    FIELDS = (
        ("token", VarBytes(MAX_TOKEN_BYTES)),
        ("name_hint", Text(63)),
        ("static_public", Bytes(32)),
        ("software", Text(32)),
    )
    request_id: int = 0
    token: bytes
    name_hint: str
    static_public: bytes
    software: str


@_register
@_message
class LoginResponse(Message):
    """AS -> node: the node's certificate, name and overlay addresses."""
    TYPE = 2
    FIELDS = (
        ("certificate", VarBytes(MAX_CERT_BYTES, len_bytes=2)),
        ("fqdn", Fqdn()),
        ("vip4", IPv4()),
        ("vip6", OptIPv6()),
        ("prefix_len", U8),
        ("overlay_domain", Fqdn()),
        ("cloud_time", U64),
    )
    request_id: int = 0
    certificate: bytes
    fqdn: str
    vip4: ipaddress.IPv4Address
    vip6: ipaddress.IPv6Address | None
    prefix_len: int
    overlay_domain: str
    cloud_time: int


@_register
@_message
class RegisterRequest(Message):
    """Node -> NMS: the node's local endpoints; flags REGISTER_HAS_IPV4/IPV6."""
    TYPE = 3
    FIELDS = (
        ("local_endpoints", EndpointList()),
        ("flags", U8),
    )
    request_id: int = 0
    local_endpoints: tuple[Endpoint, ...]
    flags: int


@_register
@_message
class RegisterResponse(Message):
    """NMS -> node: the endpoint the NMS saw, and how often to refresh it."""
    TYPE = 4
    FIELDS = (
        ("observed", EndpointField()),
        ("nat", EnumField(NatType)),
        ("keepalive_interval_s", U16),
        ("lifetime_s", U32),
    )
    request_id: int = 0
    observed: Endpoint
    nat: NatType
    keepalive_interval_s: int
    lifetime_s: int


@_register
@_message
class Keepalive(Message):
    """Node -> NMS: holds the registration and the NAT mapping."""
    TYPE = 5
    FIELDS = ()
    request_id: int = 0


@_register
@_message
class KeepaliveAck(Message):
    """NMS -> node: answers a Keepalive with the endpoint the NMS saw."""
    TYPE = 6
    FIELDS = (("observed", EndpointField()),)
    request_id: int = 0
    observed: Endpoint


@_register
@_message
class RouteRequest(Message):
    """Node -> NMS: how do I reach ``peer_fqdn``?"""
    TYPE = 7
    FIELDS = (("peer_fqdn", Fqdn()),)
    request_id: int = 0
    peer_fqdn: str


@_register
@_message
class RouteDirection(Message):
    """NMS -> both nodes: the route to use and what each side needs for it."""
    TYPE = 8
    FIELDS = (
        ("route_id", U64),
        ("route_type", EnumField(RouteType)),
        ("role", EnumField(Role)),
        ("peer_fqdn", Fqdn()),
        ("peer_vip4", IPv4()),
        ("peer_certificate", VarBytes(MAX_CERT_BYTES, len_bytes=2)),
        ("peer_endpoints", EndpointList()),
        ("relay_endpoint", EndpointField(optional=True)),
        ("relay_session_id", U64),
        ("relay_token", VarBytes(MAX_TOKEN_BYTES)),
        ("expires_s", U16),
    )
    request_id: int = 0
    route_id: int
    route_type: RouteType
    role: Role
    peer_fqdn: str
    peer_vip4: ipaddress.IPv4Address
    peer_certificate: bytes
    peer_endpoints: tuple[Endpoint, ...]
    relay_endpoint: Endpoint | None
    relay_session_id: int
    relay_token: bytes
    expires_s: int


@_register
@_message
class RouteConfirm(Message):
    """Node -> NMS: the outcome of a route direction."""
    TYPE = 9
    FIELDS = (
        ("route_id", U64),
        ("result", EnumField(RouteResult)),
        ("path_type", EnumField(RouteType)),
        ("endpoint", EndpointField(optional=True)),
    )
    request_id: int = 0
    route_id: int
    result: RouteResult
    path_type: RouteType
    endpoint: Endpoint | None


@_register
@_message
class PunchRequest(Message):
    """NMS -> node: start hole punching towards these endpoints."""
    TYPE = 10
    FIELDS = (
        ("route_id", U64),
        ("peer_endpoints", EndpointList()),
        ("start_delay_ms", U16),
        ("attempts", U8),
    )
    request_id: int = 0
    route_id: int
    peer_endpoints: tuple[Endpoint, ...]
    start_delay_ms: int
    attempts: int


@_register
@_message
class RelayAllocate(Message):
    """Node or NMS -> TRS: allocate a relay session for a route."""
    TYPE = 11
    FIELDS = (
        ("route_id", U64),
        ("peer_fqdn", Fqdn()),
    )
    request_id: int = 0
    route_id: int
    peer_fqdn: str


@_register
@_message
class RelayGrant(Message):
    """TRS -> node: where to send relayed traffic and with which session token."""
    TYPE = 12
    FIELDS = (
        ("route_id", U64),
        ("relay_endpoint", EndpointField()),
        ("relay_session_id", U64),
        ("relay_token", VarBytes(MAX_TOKEN_BYTES)),
        ("expires_s", U32),
    )
    request_id: int = 0
    route_id: int
    relay_endpoint: Endpoint
    relay_session_id: int
    relay_token: bytes
    expires_s: int


@_register
@_message
class TunnelRequest(Message):
    """NMS -> responder: a node wants a tunnel to you."""
    TYPE = 13
    FIELDS = (
        ("route_id", U64),
        ("initiator_fqdn", Fqdn()),
        ("initiator_vip4", IPv4()),
        ("initiator_certificate", VarBytes(MAX_CERT_BYTES, len_bytes=2)),
        ("initiator_endpoints", EndpointList()),
        ("route_type", EnumField(RouteType)),
    )
    request_id: int = 0
    route_id: int
    initiator_fqdn: str
    initiator_vip4: ipaddress.IPv4Address
    initiator_certificate: bytes
    initiator_endpoints: tuple[Endpoint, ...]
    route_type: RouteType


@_register
@_message
class TunnelResponse(Message):
    """Responder -> NMS: accepted or not; ``code`` is None (0 on the wire) or why not."""
    TYPE = 14
    FIELDS = (
        ("route_id", U64),
        ("accepted", Bool()),
        ("code", EnumField(ErrorCode, U16, optional=True)),
    )
    request_id: int = 0
    route_id: int
    accepted: bool
    code: ErrorCode | None


@_register
@_message
class Notify(Message):
    """Cloud -> node, unsolicited. ``fqdn`` is "" when the notice concerns no peer."""
    TYPE = 15
    FIELDS = (
        ("kind", EnumField(NotifyKind, U16)),
        ("fqdn", Fqdn(optional=True)),
        ("detail", Text(MAX_ERROR_TEXT_BYTES)),
    )
    request_id: int = 0
    kind: NotifyKind
    fqdn: str
    detail: str


@_register
@_message
class Error(Message):
    """Cloud -> node: the request with this request_id failed."""
    TYPE = 16
    FIELDS = (
        ("code", EnumField(ErrorCode, U16)),
        ("text", Text(MAX_ERROR_TEXT_BYTES)),
    )
    request_id: int = 0
    code: ErrorCode
    text: str


@_register
@_message
class Deregister(Message):
    """Node -> NMS: forget my registration (clean shutdown)."""
    TYPE = 17
    FIELDS = ()
    request_id: int = 0


# --- Codec -----------------------------------------------------------------------

def max_encoded_size(cls: type[Message]) -> int:
    """The largest encoding of a message of type ``cls``, header included."""
    return HEADER_BYTES + sum(ft.max_size for _, ft in cls.FIELDS)


for _cls in MESSAGE_TYPES.values():
    assert max_encoded_size(_cls) <= MAX_SIGNALING_BYTES, _cls


def encode(msg: Message) -> bytes:
    """The bytes of ``msg``. ValueError if a field cannot be encoded."""
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TYPE", None)) is not cls:
        raise TypeError(f"not a signaling message: {msg!r}")
    w = Writer()
    w.u8(PROTOCOL_VERSION).u8(cls.TYPE).u16(0)
    U32.encode(w, msg.request_id, f"{cls.__name__}.request_id")
    for name, ft in cls.FIELDS:
        ft.encode(w, getattr(msg, name), f"{cls.__name__}.{name}")
    out = w.getvalue()
    if len(out) > MAX_SIGNALING_BYTES:  # cannot happen while the assertion above holds
        raise ValueError(f"{cls.__name__}: {len(out)} bytes exceeds {MAX_SIGNALING_BYTES}")
    return out


def _as_bytes(data: Any, limit: int | None = None) -> bytes:
    """``data`` as bytes, refusing non-bytes and (before copying) more than ``limit`` bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"expected bytes, got {type(data).__name__}", reason="type")
    try:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if limit is not None and size > limit:
            raise ParseError(f"{size} bytes exceeds {limit}", reason="oversize")
        return bytes(data)
    except (TypeError, ValueError, BufferError) as exc:  # e.g. a released memoryview
        raise ParseError(f"unreadable buffer: {exc}", reason="type") from None


def peek_header(data: Any) -> tuple[int, int, int]:
    """``(version, type, request_id)`` of a message, checking only that 8 bytes exist.

    For answering what ``decode`` refuses: an unsupported version or unknown
    type can still be answered with an ``Error`` carrying the request_id.
    """
    r = Reader(_as_bytes(data))
    version = r.u8("header.version")
    mtype = r.u8("header.type")
    r.u16("header.flags")
    return version, mtype, r.u32("header.request_id")


def decode(data: Any) -> Message:
    """The message in ``data``; ParseError for anything else, and never another exception."""
    raw = _as_bytes(data, MAX_SIGNALING_BYTES)  # oversize is refused before parsing
    r = Reader(raw)
    version = r.u8("header.version")
    if version != PROTOCOL_VERSION:
        raise ParseError(f"unsupported version {version}", reason="version")
    mtype = r.u8("header.type")
    flags = r.u16("header.flags")
    request_id = r.u32("header.request_id")
    cls = MESSAGE_TYPES.get(mtype)
    if cls is None:
        raise ParseError(f"unknown message type {mtype}", reason="unknown_type")
    if flags:
        raise ParseError(f"reserved flags 0x{flags:04x} set", reason="flags")
    values = {name: ft.decode(r, f"{cls.__name__}.{name}") for name, ft in cls.FIELDS}
    r.expect_end(cls.__name__)
    return cls(request_id=request_id, **values)
