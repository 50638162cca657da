"""Relay tokens: the NMS's permission for one side of one relay session.

The NMS and the TRS share a 32-byte relay key. When the NMS picks the relay
route it draws a random 64-bit session id and mints one token per side; each
end presents its token in a relay BIND (``cyphonic.wire.relay``). The TRS
keeps no allocation state: a token that verifies is the allocation.

    0   1  side u8 (0 or 1)
    1   4  expires u32 (unix seconds; valid while now < expires)
    5  24  BLAKE2b-MAC(key, b"cyphonic relay v1" || session_id u64 || side u8 || expires u32),
           keyed BLAKE2b with a 24-byte digest

29 bytes in all (``TOKEN_BYTES``). The MAC binds the token to its session and
side, so a token for one session cannot open another, and side 0's token
cannot bind side 1.

A token is a bearer credential: whoever holds it may bind that side from any
address (this is how roaming works). It travels only inside the encrypted
signaling channel; a BIND is not replay-protected, so an on-path observer of
the relay path can re-bind a side to its own address until the token expires.
It then receives ciphertext only and breaks that relay (a denial of service
it could cause anyway by dropping packets).

Never: compare MACs with ``==``; accept a token whose MAC failed, even to
report it as expired.
"""

from __future__ import annotations

import secrets
import struct

from ..crypto import constant_time_eq, mac
from ..errors import AuthenticationError, ReplayError
from ..wire.relay import TOKEN_BYTES
from .constants import RELAY_KEY_BYTES

MAC_BYTES = 24
DOMAIN = b"cyphonic relay v1"
_HEAD = struct.Struct("!BI")
_MSG = struct.Struct("!QBI")


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != RELAY_KEY_BYTES:
        raise ValueError(f"relay key must be {RELAY_KEY_BYTES} bytes")


def _mac(key: bytes, session_id: int, side: int, expires: int) -> bytes:
    return mac(bytes(key), DOMAIN + _MSG.pack(session_id, side, expires), size=MAC_BYTES)


def new_relay_key() -> bytes:
    return secrets.token_bytes(RELAY_KEY_BYTES)


def new_session_id() -> int:
    """A random non-zero 64-bit relay session id."""
    while True:
        sid = secrets.randbits(64)
        if sid:
            return sid


def mint_token(key: bytes, session_id: int, side: int, expires: int) -> bytes:
    """The 29-byte token letting ``side`` (0 or 1) bind to ``session_id`` until ``expires``."""
    _check_key(key)
    if side not in (0, 1):
        raise ValueError(f"side must be 0 or 1, got {side}")
    if not 0 <= session_id < 1 << 64:
        raise ValueError("session id out of u64 range")
    expires = int(expires)
    if not 0 <= expires < 1 << 32:
        raise ValueError("expires out of u32 range")
    return _HEAD.pack(side, expires) + _mac(key, session_id, side, expires)


def token_expires(token: bytes) -> int:
    """The expiry a token claims (unverified: for the holder's own scheduling)."""
    if len(token) != TOKEN_BYTES:
        raise ValueError("not a relay token")
    return _HEAD.unpack_from(token)[1]


def verify_token(key: bytes, session_id: int, token: bytes, now: float) -> int:
    """Return the side the token grants, or raise.

    AuthenticationError (reason ``relay_token``): wrong size, wrong key, session,
    side or expiry (the MAC covers all of them). ReplayError (reason
    ``relay_expired``): authentic but ``now >= expires``. The MAC is checked
    first, in constant time.
    """
    _check_key(key)
    if not isinstance(token, (bytes, bytearray, memoryview)) or len(token) != TOKEN_BYTES:
        raise AuthenticationError("relay token of wrong size", reason="relay_token")
    token = bytes(token)
    side, expires = _HEAD.unpack_from(token)
    if not 0 <= session_id < 1 << 64:
        raise AuthenticationError("relay session id out of range", reason="relay_token")
    expected = _mac(key, session_id, side, expires)
    if not constant_time_eq(expected, token[_HEAD.size:]) or side > 1:
        raise AuthenticationError("relay token does not verify", reason="relay_token")
    if now >= expires:
        raise ReplayError("relay token expired", reason="relay_expired")
    return side
