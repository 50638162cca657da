"""Tunnel Relay Service (TRS) framing: message type 5 on the wire.

Every relay datagram starts with a fixed 12-byte header (network order),
then a body whose size the op fixes:

    0   1  type = 5 (MSG_RELAY)
    1   1  op: 1 BIND, 2 BOUND, 3 DATA, 4 ERROR
    2   2  reserved, zero
    4   8  relay session id (chosen by the NMS, u64)
    12  n  body:

    op 1 BIND   node -> TRS   n = 29   token (cyphonic.cloud.relay_token): side u8 | expires u32 | MAC 24
    op 2 BOUND  TRS -> node   n = 6    side u8 (0/1) | peer_bound u8 (0/1) | expires u32 (unix seconds)
    op 3 DATA   both ways     n = 1 .. MAX_RELAY_PAYLOAD_BYTES (65495)   an opaque inner datagram
    op 4 ERROR  TRS -> node   n = 1    code u8 (RelayErrorCode; unknown non-zero codes are accepted)

BIND (re)binds the sender's current address to its side of the session and
doubles as a keepalive. The TRS forwards a DATA datagram from one bound side
to the other side's bound address byte for byte (same session id, op 3). The
inner datagram is a tunnel datagram (handshake or data, types 1, 2, 4) the
relay cannot read: it holds no session key.

The largest relay datagram is 65507 bytes (the largest UDP payload over IPv4),
so an inner datagram is at most 65507 - 12 bytes. Relaying costs 12 bytes of
path MTU.

``decode`` checks the input type, the total size, type, reserved bits, op and
the exact body size (in that order) and raises only ``ParseError``; its
``reason`` is one of ``type``, ``short``, ``oversize``, ``reserved``,
``bad_op``, ``bad_body``. Encoders raise ``ValueError`` for out-of-range
arguments (a caller bug, never network input).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..errors import ParseError

MSG_RELAY = 5

OP_BIND = 1
OP_BOUND = 2
OP_DATA = 3
OP_ERROR = 4
OPS = frozenset({OP_BIND, OP_BOUND, OP_DATA, OP_ERROR})

HEADER = struct.Struct("!BBHQ")
HEADER_BYTES = HEADER.size                                   # 12
TOKEN_BYTES = 29                                             # side u8 | expires u32 | MAC 24
MAX_RELAY_DATAGRAM_BYTES = 65507                             # largest UDP payload over IPv4
MAX_RELAY_PAYLOAD_BYTES = MAX_RELAY_DATAGRAM_BYTES - HEADER_BYTES  # 65495
MAX_RELAY_PAYLOAD = MAX_RELAY_PAYLOAD_BYTES                  # the name the brief uses
RELAY_OVERHEAD_BYTES = HEADER_BYTES

_BOUND = struct.Struct("!BBI")
_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1

BIND_BYTES = HEADER_BYTES + TOKEN_BYTES      # 41
BOUND_BYTES = HEADER_BYTES + _BOUND.size     # 18
ERROR_BYTES = HEADER_BYTES + 1               # 13
MIN_DATA_BYTES = HEADER_BYTES + 1            # 13


class RelayErrorCode(enum.IntEnum):
    BAD_TOKEN = 1        # the token's MAC does not verify (wrong session, side or key)
    EXPIRED = 2          # the token is past its expiry
    UNKNOWN_SESSION = 3  # no such session, or the sender is not bound to it
    RATE_LIMITED = 4     # the sender's source address is over its packet rate
    TABLE_FULL = 5       # the TRS holds its maximum of active sessions


@dataclass(frozen=True, slots=True)
class RelayPacket:
    """One decoded relay datagram. Fields not carried by ``op`` keep their defaults."""

    op: int
    session_id: int
    token: bytes = b""          # BIND
    side: int = 0               # BOUND
    peer_bound: bool = False    # BOUND
    expires: int = 0            # BOUND (unix seconds)
    inner: bytes = b""          # DATA
    code: int = 0               # ERROR


def _header(op: int, session_id: int) -> bytes:
    if not 0 <= session_id <= _U64_MAX:
        raise ValueError(f"relay session id {session_id} out of range")
    return HEADER.pack(MSG_RELAY, op, 0, session_id)


def encode_bind(session_id: int, token: bytes) -> bytes:
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"relay token must be {TOKEN_BYTES} bytes, got {len(token)}")
    return _header(OP_BIND, session_id) + bytes(token)


def encode_bound(session_id: int, side: int, peer_bound: bool, expires: int) -> bytes:
    if side not in (0, 1):
        raise ValueError(f"side must be 0 or 1, got {side}")
    if not 0 <= expires <= _U32_MAX:
        raise ValueError(f"expires {expires} out of u32 range")
    return _header(OP_BOUND, session_id) + _BOUND.pack(side, 1 if peer_bound else 0, expires)


def encode_data(session_id: int, inner: bytes) -> bytes:
    if not 1 <= len(inner) <= MAX_RELAY_PAYLOAD_BYTES:
        raise ValueError(f"relay payload must be 1..{MAX_RELAY_PAYLOAD_BYTES} bytes, got {len(inner)}")
    return _header(OP_DATA, session_id) + bytes(inner)


def encode_error(session_id: int, code: int) -> bytes:
    if not 1 <= code <= 255:
        raise ValueError(f"relay error code {code} out of range")
    return _header(OP_ERROR, session_id) + bytes((int(code),))


wrap = encode_data


def peek_header(data) -> tuple[int, int]:
    """Return (op, session id) after checking only the header; raises ParseError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"relay datagram: expected bytes, got {type(data).__name__}", reason="type")
    n = len(data)
    if n < HEADER_BYTES:
        raise ParseError(f"relay datagram: {n} bytes, need at least {HEADER_BYTES}", reason="short")
    if n > MAX_RELAY_DATAGRAM_BYTES:
        raise ParseError(f"relay datagram: {n} bytes exceeds {MAX_RELAY_DATAGRAM_BYTES}", reason="oversize")
    mtype, op, reserved, session_id = HEADER.unpack_from(data)
    if mtype != MSG_RELAY:
        raise ParseError(f"relay datagram: type {mtype}, expected {MSG_RELAY}", reason="type")
    if reserved != 0:
        raise ParseError("relay datagram: reserved bits set", reason="reserved")
    if op not in OPS:
        raise ParseError(f"relay datagram: unknown op {op}", reason="bad_op")
    return op, session_id


def decode(data) -> RelayPacket:
    """Parse one relay datagram or raise ParseError (and nothing else)."""
    op, session_id = peek_header(data)
    body = bytes(data[HEADER_BYTES:])
    n = len(body)
    if op == OP_DATA:
        if n < 1:
            raise ParseError("relay DATA: empty payload", reason="bad_body")
        return RelayPacket(OP_DATA, session_id, inner=body)
    if op == OP_BIND:
        if n != TOKEN_BYTES:
            raise ParseError(f"relay BIND: body {n} bytes, expected {TOKEN_BYTES}", reason="bad_body")
        return RelayPacket(OP_BIND, session_id, token=body)
    if op == OP_BOUND:
        if n != _BOUND.size:
            raise ParseError(f"relay BOUND: body {n} bytes, expected {_BOUND.size}", reason="bad_body")
        side, peer_bound, expires = _BOUND.unpack(body)
        if side > 1 or peer_bound > 1:
            raise ParseError("relay BOUND: side and peer_bound must be 0 or 1", reason="bad_body")
        return RelayPacket(OP_BOUND, session_id, side=side, peer_bound=bool(peer_bound), expires=expires)
    # OP_ERROR
    if n != 1:
        raise ParseError(f"relay ERROR: body {n} bytes, expected 1", reason="bad_body")
    if body[0] == 0:
        raise ParseError("relay ERROR: code 0", reason="bad_body")
    return RelayPacket(OP_ERROR, session_id, code=body[0])


def unwrap(data) -> tuple[int, bytes]:
    """Return (session id, inner datagram) of a relay DATA datagram; raises ParseError."""
    pkt = decode(data)
    if pkt.op != OP_DATA:
        raise ParseError(f"relay datagram: op {pkt.op} is not DATA", reason="bad_op")
    return pkt.session_id, pkt.inner
