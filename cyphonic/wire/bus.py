"""Messages between cloud instances, carried by the database (docs/cloud.md, "Several instances").

Instances share no memory and no socket: one instance hands another a message
by writing it to the store's bus table (``Store.bus_send``), and the receiver
reads its own (``Store.bus_receive``). What travels is a signaling message on
behalf of a node that one instance holds a control session with and the other
does not:

    0   1  version = 1
    1   1  kind (below)
    2   2  the sender's instance tag (``store_runtime``: where to send the answer)
    4   8  key: the sender's handle for the answer (echoed in the *_RESULT)
    12 32  the node's static public key
    44  .. a signaling message (``cyphonic.wire.signaling``), or nothing

Kinds:
    PUSH            "send this request to the node; tell me what it answers"
    PUSH_RESULT     the node's answer; nothing after the header: it did not answer
                    (no session here, or timed out)
    FORWARD         "the node sent me this about a route you own; answer it"
    FORWARD_RESULT  the owner's answer for the node; nothing: no answer
    MOVED           "the node registered with me now": forget its registration (nothing after)
    HELLO           "I have just joined": share your registrations now (no node: static zero)

The database is trusted (every instance holds the CA key anyway), so there is no
MAC; the decoder still refuses anything malformed with ``ParseError`` and never
anything else, so a corrupt row is a counted drop.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..errors import ParseError
from . import signaling as sig

VERSION = 1
STATIC_BYTES = 32
MAX_BUS_BYTES = 4096          # the header and the largest signaling message, with room

_HEADER = struct.Struct("!BBH Q 32s")
HEADER_BYTES = _HEADER.size
assert HEADER_BYTES == 44


class Kind(enum.IntEnum):
    PUSH = 1
    PUSH_RESULT = 2
    FORWARD = 3
    FORWARD_RESULT = 4
    MOVED = 5
    HELLO = 6


@dataclass(frozen=True)
class BusMessage:
    kind: Kind
    sender: int          # the sending instance's tag, 1..65535
    key: int
    static: bytes
    msg: sig.Message | None

    def encode(self) -> bytes:
        if not 1 <= self.sender <= 0xFFFF:
            raise ValueError(f"bus message: sender tag {self.sender} out of range")
        if not 0 <= self.key < 1 << 64:
            raise ValueError(f"bus message: key {self.key} out of range")
        if len(self.static) != STATIC_BYTES:
            raise ValueError("bus message: the static key must be 32 bytes")
        if self.msg is None and self.kind in (Kind.PUSH, Kind.FORWARD):
            raise ValueError(f"bus message: {self.kind.name} needs a message")
        body = sig.encode(self.msg) if self.msg is not None else b""
        return _HEADER.pack(VERSION, int(self.kind), self.sender, self.key, self.static) + body


def decode(data: bytes) -> BusMessage:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("bus message: expected bytes", reason="type")
    data = bytes(data)
    if len(data) > MAX_BUS_BYTES:
        raise ParseError(f"bus message: {len(data)} bytes, at most {MAX_BUS_BYTES}", reason="oversize")
    if len(data) < HEADER_BYTES:
        raise ParseError(f"bus message: {len(data)} bytes, need {HEADER_BYTES}", reason="short")
    version, kind, sender, key, static = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ParseError(f"bus message: version {version}, expected {VERSION}", reason="version")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ParseError(f"bus message: unknown kind {kind}", reason="type") from None
    if not sender:
        raise ParseError("bus message: sender tag 0", reason="type")
    body = data[HEADER_BYTES:]
    if not body and kind in (Kind.PUSH, Kind.FORWARD):
        raise ParseError(f"bus message: {kind.name} without a message", reason="short")
    msg = sig.decode(body) if body else None   # raises ParseError on a bad message
    return BusMessage(kind, sender, key, static, msg)
