"""Cookie reply (docs/protocol.md, "Cookie replies under load"): a responder under load
answers an initiation with this instead of doing Diffie-Hellman work.

Fixed 64 bytes:

    0   1  type = 3 (tunnel) or 10 (control channel)
    1   3  reserved, zero
    4   4  receiver index: the sender index of the initiation it answers
    8  24  nonce (random, XChaCha20-Poly1305)
    32 32  the cookie (16 bytes) encrypted and authenticated (16-byte tag)

The decoder refuses any other length (``short``/``oversize``), another type or nonzero
reserved bytes (``type``). What the fields mean is ``cyphonic.cookie``'s business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ParseError

MSG_COOKIE = 3
MSG_CONTROL_COOKIE = 10
COOKIE_BYTES = 16
NONCE_BYTES = 24
ENCRYPTED_COOKIE_BYTES = COOKIE_BYTES + 16
REPLY_BYTES = 64

_REPLY = struct.Struct("!B3xI24s32s")
assert _REPLY.size == REPLY_BYTES


@dataclass(frozen=True)
class CookieReply:
    receiver_index: int
    nonce: bytes
    encrypted_cookie: bytes
    mtype: int = MSG_COOKIE

    def encode(self) -> bytes:
        if self.mtype not in (MSG_COOKIE, MSG_CONTROL_COOKIE):
            raise ValueError(f"cookie reply: type {self.mtype} is not a cookie type")
        if not 0 <= self.receiver_index <= 0xFFFFFFFF:
            raise ValueError(f"cookie reply: receiver index {self.receiver_index} out of range")
        if len(self.nonce) != NONCE_BYTES or len(self.encrypted_cookie) != ENCRYPTED_COOKIE_BYTES:
            raise ValueError("cookie reply: nonce must be 24 bytes and the encrypted cookie 32")
        return _REPLY.pack(self.mtype, self.receiver_index, self.nonce, self.encrypted_cookie)


def decode(data: bytes, mtype: int = MSG_COOKIE) -> CookieReply:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("cookie reply: expected bytes", reason="type")
    n = len(data)
    if n < REPLY_BYTES:
        raise ParseError(f"cookie reply: {n} bytes, need {REPLY_BYTES}", reason="short")
    if n > REPLY_BYTES:
        raise ParseError(f"cookie reply: {n} bytes, need {REPLY_BYTES}", reason="oversize")
    got, receiver, nonce, enc = _REPLY.unpack(bytes(data))
    if got != mtype or bytes(data[1:4]) != b"\x00\x00\x00":
        raise ParseError("cookie reply: wrong type or reserved bits", reason="type")
    return CookieReply(receiver, nonce, enc, mtype)
