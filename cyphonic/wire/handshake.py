"""Tunnel handshake messages (docs/protocol.md, "Tunnel handshake").

Initiation (type 1), variable length because it carries the initiator's certificate:

    0   1  type = 1
    1   3  reserved, zero
    4   4  sender index (initiator's receiver index for this session)
    8  32  initiator ephemeral X25519 public key (clear)
    40 48  initiator static public key, AEAD-encrypted (32 + 16 tag)
    88  2  L: length of the encrypted payload (16 + 12 + 2 + 0 = 30 .. 16 + 12 + 2 + MAX_CERT_BYTES)
    90  L  encrypted payload: timestamp (12) || certificate length (2) || certificate
    ..  16 mac1: keyed BLAKE2b-128 of all bytes before it, key = HASH("mac1----" || responder static)
    ..  16 mac2: reserved for a cookie under load; zero

Response (type 2), fixed 92 bytes:

    0   1  type = 2
    1   3  reserved, zero
    4   4  sender index (responder's receiver index)
    8   4  receiver index (the initiator's sender index)
    12 32  responder ephemeral public key
    44 16  encrypted empty payload (tag only)
    60 16  mac1 (key from the initiator's static key)
    76 16  mac2, zero

Lengths: ``decode_initiation`` accepts an encrypted payload of exactly
INIT_MIN_PAYLOAD..INIT_MAX_PAYLOAD bytes (the payload's certificate is at most
MAX_CERT_BYTES) and ``decode_payload`` a certificate of at most MAX_CERT_BYTES;
one byte more is a ``ParseError``. The encoders refuse with ``ValueError``
what the decoders would refuse, including a fixed-size field of the wrong
length (``struct`` would silently pad or cut it), so that every encoding
decodes back to the same message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import constants as C
from ..errors import ParseError

MSG_INITIATION = 1
MSG_RESPONSE = 2
# The control channel to the cloud uses the same layouts under its own types
# (and its own Noise prologue), so a tunnel message can never pass for a control one.
MSG_CONTROL_INITIATION = 6
MSG_CONTROL_RESPONSE = 7
MAC_BYTES = 16
INIT_FIXED = 90
INIT_MIN_PAYLOAD = C.TIMESTAMP_BYTES + 2 + C.AEAD_TAG_BYTES
INIT_MAX_PAYLOAD = INIT_MIN_PAYLOAD + C.MAX_CERT_BYTES
INIT_MIN_BYTES = INIT_FIXED + INIT_MIN_PAYLOAD + 2 * MAC_BYTES
INIT_MAX_BYTES = INIT_FIXED + INIT_MAX_PAYLOAD + 2 * MAC_BYTES
RESPONSE_BYTES = 92

_INIT_HEAD = struct.Struct("!B3xI32s48sH")
_RESP = struct.Struct("!B3xII32s16s16s16s")
_U32_MAX = (1 << 32) - 1


@dataclass(frozen=True)
class Initiation:
    sender_index: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_payload: bytes
    mac1: bytes = b"\x00" * MAC_BYTES
    mac2: bytes = b"\x00" * MAC_BYTES
    mtype: int = MSG_INITIATION

    def body(self) -> bytes:
        """Bytes covered by mac1."""
        _check_header(self.mtype, self.sender_index)
        _check_fixed("ephemeral", self.ephemeral, C.KEY_BYTES)
        _check_fixed("encrypted_static", self.encrypted_static, C.KEY_BYTES + C.AEAD_TAG_BYTES)
        plen = len(self.encrypted_payload)
        if not INIT_MIN_PAYLOAD <= plen <= INIT_MAX_PAYLOAD:
            raise ValueError(f"initiation: payload of {plen} bytes not in "
                             f"{INIT_MIN_PAYLOAD}..{INIT_MAX_PAYLOAD}")
        return _INIT_HEAD.pack(self.mtype, self.sender_index, self.ephemeral,
                               self.encrypted_static, plen) + bytes(self.encrypted_payload)

    def encode(self) -> bytes:
        _check_fixed("mac1", self.mac1, MAC_BYTES)
        _check_fixed("mac2", self.mac2, MAC_BYTES)
        return self.body() + self.mac1 + self.mac2


@dataclass(frozen=True)
class Response:
    sender_index: int
    receiver_index: int
    ephemeral: bytes
    encrypted_empty: bytes
    mac1: bytes = b"\x00" * MAC_BYTES
    mac2: bytes = b"\x00" * MAC_BYTES
    mtype: int = MSG_RESPONSE

    def body(self) -> bytes:
        return self.encode()[:RESPONSE_BYTES - 2 * MAC_BYTES]

    def encode(self) -> bytes:
        _check_header(self.mtype, self.sender_index)
        if not 0 <= self.receiver_index <= _U32_MAX:
            raise ValueError(f"response: receiver index {self.receiver_index} out of range")
        _check_fixed("ephemeral", self.ephemeral, C.KEY_BYTES)
        _check_fixed("encrypted_empty", self.encrypted_empty, C.AEAD_TAG_BYTES)
        _check_fixed("mac1", self.mac1, MAC_BYTES)
        _check_fixed("mac2", self.mac2, MAC_BYTES)
        return _RESP.pack(self.mtype, self.sender_index, self.receiver_index, self.ephemeral,
                          self.encrypted_empty, self.mac1, self.mac2)


def _check_header(mtype: int, sender_index: int) -> None:
    if not 0 <= mtype <= 0xFF:
        raise ValueError(f"handshake: message type {mtype} out of range")
    if not 0 <= sender_index <= _U32_MAX:
        raise ValueError(f"handshake: sender index {sender_index} out of range")


def _check_fixed(name: str, value: bytes, n: int) -> None:
    # struct's "32s" pads a short value with zeros and cuts a long one: the
    # message would go out different from what the caller built.
    if len(value) != n:
        raise ValueError(f"handshake: {name} must be {n} bytes, got {len(value)}")


def decode_initiation(data: bytes, mtype: int = MSG_INITIATION) -> Initiation:
    if not isinstance(data, (bytes, bytearray)):
        raise ParseError("initiation: expected bytes")
    n = len(data)
    if n < INIT_MIN_BYTES:
        raise ParseError(f"initiation: {n} bytes is too short", reason="short")
    if n > INIT_MAX_BYTES:
        raise ParseError(f"initiation: {n} bytes is too long", reason="oversize")
    got, sender, eph, enc_static, plen = _INIT_HEAD.unpack_from(data)
    if got != mtype or data[1:4] != b"\x00\x00\x00":
        raise ParseError("initiation: wrong type or reserved bits", reason="type")
    if not INIT_MIN_PAYLOAD <= plen <= INIT_MAX_PAYLOAD:
        raise ParseError(f"initiation: payload length {plen} out of range")
    if n != INIT_FIXED + plen + 2 * MAC_BYTES:
        raise ParseError("initiation: length does not match payload length")
    end = INIT_FIXED + plen
    return Initiation(sender, eph, enc_static, bytes(data[INIT_FIXED:end]),
                      bytes(data[end:end + MAC_BYTES]), bytes(data[end + MAC_BYTES:]), mtype)


def decode_response(data: bytes, mtype: int = MSG_RESPONSE) -> Response:
    if not isinstance(data, (bytes, bytearray)):
        raise ParseError("response: expected bytes")
    if len(data) != RESPONSE_BYTES:
        raise ParseError(f"response: {len(data)} bytes, need {RESPONSE_BYTES}", reason="short")
    got, sender, receiver, eph, enc, mac1, mac2 = _RESP.unpack(data)
    if got != mtype or data[1:4] != b"\x00\x00\x00":
        raise ParseError("response: wrong type or reserved bits", reason="type")
    return Response(sender, receiver, eph, enc, mac1, mac2, mtype)


def encode_payload(timestamp: bytes, certificate: bytes) -> bytes:
    if len(timestamp) != C.TIMESTAMP_BYTES or len(certificate) > C.MAX_CERT_BYTES:
        raise ValueError("bad timestamp or certificate size")
    return timestamp + struct.pack("!H", len(certificate)) + certificate


def decode_payload(plain: bytes) -> tuple[bytes, bytes]:
    """(timestamp, certificate) from a decrypted initiation payload."""
    if len(plain) < C.TIMESTAMP_BYTES + 2:
        raise ParseError("initiation payload too short")
    ts = plain[:C.TIMESTAMP_BYTES]
    (clen,) = struct.unpack_from("!H", plain, C.TIMESTAMP_BYTES)
    if clen > C.MAX_CERT_BYTES:
        raise ParseError(f"initiation payload: certificate length {clen} exceeds {C.MAX_CERT_BYTES}")
    cert = plain[C.TIMESTAMP_BYTES + 2:]
    if clen != len(cert):
        raise ParseError("initiation payload: certificate length mismatch")
    return ts, cert


def encode_timestamp(wall_now: float, after_ns: int = -1) -> tuple[bytes, int]:
    """12-byte timestamp (seconds u64, nanoseconds u32) for ``wall_now``, strictly later
    than ``after_ns``; returns (bytes, nanoseconds since the epoch)."""
    secs = int(wall_now)
    ns = secs * 1_000_000_000 + int((wall_now - secs) * 1e9) % 1_000_000_000
    ns = max(ns, after_ns + 1)
    secs, nanos = divmod(ns, 1_000_000_000)
    return struct.pack("!QI", secs, nanos), ns
