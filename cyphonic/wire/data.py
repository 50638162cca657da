"""Data-channel packet header: the associated data of every sealed packet.

    0   1  type (MSG_DATA = 4)
    1   3  reserved, zero
    4   4  receiver index (chosen by the receiver at handshake; network order)
    8   8  counter (network order): stream id (top 8 bits) | per-stream counter (56 bits)
    16  n  ChaCha20-Poly1305 ciphertext of the inner packet, then the 16-byte tag

The AEAD nonce is bytes 4..16 of this header (receiver index || counter): it is
unique per key because the counter is (see docs/protocol.md, "Several
workers, one session"). An empty inner packet is a keepalive.

A data packet is MIN_DATA_BYTES (header and tag) to MAX_DATAGRAM_BYTES (the
largest UDP payload over IPv4) long; ``decode_header`` refuses one byte less
or more with ``ParseError``. This module encodes only the header: the sealer
(``cyphonic.datachannel``) refuses an inner packet that would not fit.
"""

from __future__ import annotations

import struct

from .. import constants as C
from ..errors import ParseError

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE = 3      # reserved for a cookie reply under load (not sent yet)
MSG_DATA = 4
MSG_RELAY = 5       # reserved for Tunnel Relay Service framing
MSG_CONTROL_INITIATION = 6   # control channel (node <-> cloud): same layouts as 1, 2 and 4
MSG_CONTROL_RESPONSE = 7
MSG_CONTROL_DATA = 8

HEADER = struct.Struct("!B3xIQ")
MIN_DATA_BYTES = C.DATA_HEADER_BYTES + C.AEAD_TAG_BYTES


def encode_header(receiver_index: int, counter: int) -> bytes:
    return HEADER.pack(MSG_DATA, receiver_index, counter)


def decode_header(data: bytes) -> tuple[int, int]:
    """Return (receiver index, counter) of a data packet or raise ParseError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("data packet: expected bytes", reason="type")
    if len(data) < MIN_DATA_BYTES:
        raise ParseError(f"data packet: {len(data)} bytes, need at least {MIN_DATA_BYTES}", reason="short")
    if len(data) > C.MAX_DATAGRAM_BYTES:
        raise ParseError("data packet: oversize", reason="oversize")
    mtype, idx, counter = HEADER.unpack_from(data)
    if mtype != MSG_DATA or data[1:4] != b"\x00\x00\x00":
        raise ParseError("data packet: wrong type or reserved bits", reason="type")
    return idx, counter


def message_type(data: bytes) -> int:
    """First byte of any tunnel datagram, or raise ParseError for an empty one."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("datagram: expected bytes", reason="type")
    if not data:
        raise ParseError("empty datagram", reason="short")
    return data[0]
