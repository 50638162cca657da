"""Cookie replies under load (docs/protocol.md 4.10): the answer to spoofed-source floods.

An initiation with a valid mac1 costs its responder two X25519 operations before it can
tell a real peer from an attacker who only knows the responder's public key, and the
per-source rate limit cannot help when every datagram claims another source. So a
responder counts the initiations that pass mac1 (a token bucket of
``load_per_s``); when the bucket runs dry it is *under load* until ``UNDER_LOAD_HOLD_S``
after it last ran dry. Under load, an initiation is processed only if its mac2 proves
that its sender received a cookie at the address it claims; any other gets a 64-byte
cookie reply and no Diffie-Hellman work. The initiator keeps the cookie and puts mac2 on
its next initiations; the per-source rate limit then applies to proven sources.

    cookie        = MAC(secret, address bytes)                16 bytes, never stored
    mac2          = MAC(cookie, initiation bytes before mac2)  16 bytes
    reply key     = HASH("cookie--" || responder static public)[0:32]
    reply         = XChaCha20-Poly1305(reply key, random nonce, ad = the initiation's mac1)(cookie)

``MAC`` is keyed BLAKE2b-128 and ``HASH`` BLAKE2b-512, as for mac1. The secret is 32
random bytes, replaced every ``COOKIE_SECRET_LIFETIME_S``; a mac2 made under the
previous secret is still accepted until the next change, so a cookie received just
before a change stays good. The reply's AD binds it to one initiation, so only someone
who saw that initiation can answer it, and the reply is smaller than any initiation: a
responder cannot be used to amplify.

Pure: ``now`` and the secret's randomness (``random_bytes``) come in; no sockets, no clock.
"""

from __future__ import annotations

from typing import Callable

from . import constants as C
from . import crypto
from .errors import AuthenticationError, ParseError
from .wire import cookie as wire
from .wire.handshake import MAC_BYTES

COOKIE_LABEL = b"cookie--"
_ZERO_MAC = b"\x00" * MAC_BYTES


def reply_key(static_public: bytes) -> bytes:
    """The key cookie replies to/from the holder of ``static_public`` are sealed with."""
    return crypto.hash_(COOKIE_LABEL + static_public)[:32]


def address_bytes(addr) -> bytes:
    """What a cookie is bound to: the source address as the responder's socket gave it.
    Only the responder ever computes a cookie, so this encoding is its own business: the
    host as text, "|", the port (what the kernel reports for one source is always the
    same text, and this is cheap under a flood); anything else (a relay path) its ``repr``,
    which is deterministic for tuples of str and int."""
    if type(addr) is tuple and len(addr) >= 2 and type(addr[0]) is str:
        return f"{addr[0]}|{addr[1]}".encode()
    return repr(addr).encode()


def mac2(cookie: bytes, covered: bytes) -> bytes:
    return crypto.mac(cookie, covered)


def split_macs(initiation: bytes) -> tuple[bytes, bytes, bytes]:
    """(bytes before mac2, mac1, mac2) of an encoded initiation (already decoded once)."""
    if len(initiation) < 2 * MAC_BYTES:
        raise ParseError("initiation too short for its MACs", reason="short")
    covered = bytes(initiation[:-MAC_BYTES])
    return covered, covered[-MAC_BYTES:], bytes(initiation[-MAC_BYTES:])


class CookieResponder:
    """The responder's side: load, the secret, mac2 checks and replies. One per static key
    that answers initiations (a ``Device``, a ``ControlServer``)."""

    def __init__(self, static_public: bytes, *, reply_type: int = wire.MSG_COOKIE,
                 load_per_s: float = C.HANDSHAKE_LOAD_PER_S,
                 random_bytes: Callable[[int], bytes] = crypto.random_bytes) -> None:
        self._reply_key = reply_key(static_public)
        self.reply_type = reply_type
        self.load_per_s = float(load_per_s)
        self.random_bytes = random_bytes
        self._tokens = self.load_per_s
        self._tokens_at: float | None = None
        self._loaded_until = float("-inf")
        self._secret = b""
        self._previous = b""
        self._secret_born = 0.0

    # --- load ------------------------------------------------------------------------

    def under_load(self, now: float) -> bool:
        return now < self._loaded_until

    def mark_loaded(self, now: float) -> None:
        """The edge saw its receive queue overflow (kernel drops): under load as well."""
        self._loaded_until = max(self._loaded_until, now + C.UNDER_LOAD_HOLD_S)

    def _take(self, now: float) -> bool:
        if self._tokens_at is None:
            self._tokens_at = now
        elapsed = max(0.0, now - self._tokens_at)  # a clock stepping back credits nothing
        self._tokens = min(self.load_per_s, self._tokens + elapsed * self.load_per_s)
        self._tokens_at = max(self._tokens_at, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    # --- admission --------------------------------------------------------------------

    def admit(self, initiation: bytes, addr, now: float) -> bool:
        """Call for every initiation that passed mac1, before any Diffie-Hellman work.
        True: go on (per-source rate limit, then the handshake). False: answer with
        ``reply(...)`` and drop it."""
        if not self._take(now):
            self.mark_loaded(now)
        if not self.under_load(now):
            return True
        return self.proven(initiation, addr, now)

    def proven(self, initiation: bytes, addr, now: float) -> bool:
        """Whether the initiation's mac2 proves a cookie for ``addr``."""
        covered, _, got = split_macs(initiation)
        if got == _ZERO_MAC:
            return False
        self._rotate(now)
        where = address_bytes(addr)
        for secret in (self._secret, self._previous):
            if secret and crypto.constant_time_eq(mac2(crypto.mac(secret, where), covered), got):
                return True
        return False

    def reply(self, initiation: bytes, sender_index: int, addr, now: float) -> bytes:
        """The cookie reply to an initiation refused under load, for ``addr``."""
        self._rotate(now)
        _, mac1, _ = split_macs(initiation)
        cookie = crypto.mac(self._secret, address_bytes(addr))
        nonce = self.random_bytes(wire.NONCE_BYTES)
        sealed = crypto.xaead_encrypt(self._reply_key, nonce, mac1, cookie)
        return wire.CookieReply(sender_index, nonce, sealed, self.reply_type).encode()

    def _rotate(self, now: float) -> None:
        if not self._secret or now - self._secret_born >= C.COOKIE_SECRET_LIFETIME_S \
                or now < self._secret_born:
            self._previous = self._secret
            self._secret = self.random_bytes(32)
            self._secret_born = now


class CookieJar:
    """The initiator's side, toward one responder: the last cookie it sent us."""

    __slots__ = ("_reply_key", "reply_type", "_cookie", "_received")

    def __init__(self, responder_static: bytes, reply_type: int = wire.MSG_COOKIE) -> None:
        self._reply_key = reply_key(responder_static)
        self.reply_type = reply_type
        self._cookie = b""
        self._received = 0.0

    def consume(self, data: bytes, sent_initiation: bytes, now: float) -> None:
        """Take a cookie reply to ``sent_initiation`` (the bytes we sent, with the mac1 the
        reply is bound to). Raise ParseError or AuthenticationError if it is not one."""
        msg = wire.decode(data, self.reply_type)
        _, mac1, _ = split_macs(sent_initiation)
        try:
            cookie = crypto.xaead_decrypt(self._reply_key, msg.nonce, mac1, msg.encrypted_cookie)
        except AuthenticationError as exc:
            raise AuthenticationError("cookie reply did not authenticate", reason="cookie_auth") from exc
        self._cookie = cookie
        self._received = now

    def valid(self, now: float) -> bool:
        return bool(self._cookie) and 0.0 <= now - self._received < C.COOKIE_USABLE_S

    def stamp(self, initiation: bytes, now: float) -> bytes:
        """``initiation`` with mac2 set from our cookie, or unchanged (mac2 zero) if we
        hold no usable cookie."""
        if not self.valid(now):
            self._cookie = b""
            return initiation
        covered = bytes(initiation[:-MAC_BYTES])
        return covered + mac2(self._cookie, covered)
