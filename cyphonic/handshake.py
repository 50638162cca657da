"""The tunnel handshake: Noise IK over X25519, ChaCha20-Poly1305 and BLAKE2b.

Protocol name ``Noise_IK_25519_ChaChaPoly_BLAKE2b``, prologue ``PROLOGUE``:

    <- s                       (responder static key, known from its certificate)
    -> e, es, s, ss   payload: timestamp || initiator certificate
    <- e, ee, se      payload: empty

Two messages, one round trip. The initiator already holds the responder's
certificate (the NMS hands it out with the route direction) and checks it
before sending; the responder learns the initiator's static key in message 1
and checks the certificate inside against that key. The cloud never sees a
session key: it only signs certificates.

Before any Diffie-Hellman work the responder checks ``mac1`` (keyed by its own
static key, so random junk and initiations for another node cost one BLAKE2b).
Timestamps (per initiator, strictly increasing) refuse replayed initiations;
``cyphonic.device`` applies them and the per-source and per-peer rate limits.

This module is pure: no sockets, no clocks; ``wall_now`` is an argument.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from . import constants as C
from . import crypto
from .errors import AuthenticationError, LocalProtocolError, ParseError
from .wire import handshake as wire

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2b"
PROLOGUE = b"cyphonic tunnel v1"
CONTROL_PROLOGUE = b"cyphonic control v1"
MAC1_LABEL = b"mac1----"


@dataclass(frozen=True)
class Purpose:
    """What a handshake is for: its prologue and message types. A tunnel handshake
    and a control-channel handshake (node to cloud) can never be mistaken for each other."""

    prologue: bytes
    initiation_type: int
    response_type: int
    data_type: int


TUNNEL = Purpose(PROLOGUE, wire.MSG_INITIATION, wire.MSG_RESPONSE, 4)
CONTROL = Purpose(CONTROL_PROLOGUE, wire.MSG_CONTROL_INITIATION, wire.MSG_CONTROL_RESPONSE, 8)

_INITIAL_H = PROTOCOL_NAME.ljust(crypto.HASH_BYTES, b"\x00")


@dataclass(frozen=True)
class StaticIdentity:
    """A node's static X25519 key pair and its certificate (encoded)."""

    private: bytes
    public: bytes
    certificate: bytes = b""

    @classmethod
    def generate(cls) -> "StaticIdentity":
        priv, pub = crypto.x25519_keypair()
        return cls(priv, pub)

    def with_certificate(self, certificate: bytes) -> "StaticIdentity":
        return StaticIdentity(self.private, self.public, certificate)


@dataclass(frozen=True)
class SessionKeys:
    """The result of a completed handshake."""

    send_key: bytes
    receive_key: bytes
    local_index: int
    remote_index: int
    initiator: bool
    peer_static: bytes


@functools.lru_cache(maxsize=64)
def retry_wait(elapsed_s: float) -> float:
    """How long to wait before retransmitting an unanswered initiation, ``elapsed_s``
    after the attempt started (jitter not included): the wait doubles from 1 s up to
    REKEY_TIMEOUT_S, so retransmissions go about 1, 2, 4 and 8 s after the start, then
    every 5 s.

    Tunnels and the control channel both use it. A lost first initiation costs a
    second, not five, which matters because a DNS query waits for the tunnel (the
    resolver holds it 5 s); a silent peer still gets one initiation per 5 s."""
    return min(C.REKEY_TIMEOUT_S, max(C.HANDSHAKE_FIRST_RETRY_S, elapsed_s))


def mac1_key(static_public: bytes) -> bytes:
    """(Cached: a responder computes its own for every initiation, a flood included.)"""
    return crypto.hash_(MAC1_LABEL + static_public)[:32]


class _SymmetricState:
    __slots__ = ("ck", "h", "k", "n")

    def __init__(self, prologue: bytes = PROLOGUE) -> None:
        self.h = _INITIAL_H
        self.ck = _INITIAL_H
        self.k: bytes | None = None
        self.n = 0
        self.mix_hash(prologue)

    def mix_hash(self, data: bytes) -> None:
        self.h = crypto.hash_(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp = crypto.hkdf(self.ck, ikm, 2)
        self.k = temp[:32]
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None
        c = crypto.aead_encrypt(self.k, self.n, self.h, plaintext)
        self.n += 1
        self.mix_hash(c)
        return c

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        p = crypto.aead_decrypt(self.k, self.n, self.h, ciphertext)
        self.n += 1
        self.mix_hash(ciphertext)
        return p

    def split(self) -> tuple[bytes, bytes]:
        t1, t2 = crypto.hkdf(self.ck, b"", 2)
        return t1[:32], t2[:32]


class InitiatorHandshake:
    """The initiator's side of one handshake attempt (one per attempt: fresh ephemeral)."""

    def __init__(self, identity: StaticIdentity, peer_static: bytes, local_index: int,
                 purpose: Purpose = TUNNEL) -> None:
        if len(peer_static) != 32:
            raise ValueError("peer static key must be 32 bytes")
        self.identity = identity
        self.peer_static = peer_static
        self.local_index = local_index
        self.purpose = purpose
        self._ss = _SymmetricState(purpose.prologue)
        self._ss.mix_hash(peer_static)
        self._e_priv = b""
        self.message = b""
        self.timestamp_ns = 0

    def create_initiation(self, wall_now: float, *, ephemeral: tuple[bytes, bytes] | None = None,
                          after_ns: int = 0) -> bytes:
        """Build message 1. ``ephemeral`` (private, public) is for known-answer tests only.

        Responders refuse an initiation whose timestamp is not newer than the last one
        from the same key, so a caller that initiates twice in one clock tick (or after
        its clock stepped back) passes the previous ``timestamp_ns`` as ``after_ns``:
        the timestamp is then at least 1 ns later."""
        if self.message:
            raise LocalProtocolError("one initiation per attempt: make a new InitiatorHandshake")
        ss = self._ss
        e_priv, e_pub = ephemeral or crypto.x25519_keypair()
        self._e_priv = e_priv
        ss.mix_hash(e_pub)
        ss.mix_key(crypto.x25519(e_priv, self.peer_static))
        enc_static = ss.encrypt_and_hash(self.identity.public)
        ss.mix_key(crypto.x25519(self.identity.private, self.peer_static))
        timestamp, self.timestamp_ns = wire.encode_timestamp(wall_now, after_ns)
        payload = wire.encode_payload(timestamp, self.identity.certificate)
        enc_payload = ss.encrypt_and_hash(payload)
        mtype = self.purpose.initiation_type
        msg = wire.Initiation(self.local_index, e_pub, enc_static, enc_payload, mtype=mtype)
        mac1 = crypto.mac(mac1_key(self.peer_static), msg.body())
        self.message = wire.Initiation(self.local_index, e_pub, enc_static, enc_payload, mac1,
                                       mtype=mtype).encode()
        return self.message

    def consume_response(self, data: bytes) -> SessionKeys:
        """Process message 2; raise ParseError or AuthenticationError if it is not ours or forged."""
        if not self._e_priv:
            raise ParseError("no initiation outstanding", reason="unexpected")
        resp = wire.decode_response(data, self.purpose.response_type)
        if resp.receiver_index != self.local_index:
            raise ParseError("response for another handshake", reason="index")
        if not crypto.constant_time_eq(crypto.mac(mac1_key(self.identity.public), resp.body()), resp.mac1):
            raise AuthenticationError("response mac1 invalid", reason="mac1")
        ss = _SymmetricState(self.purpose.prologue)
        ss.h, ss.ck, ss.k, ss.n = self._ss.h, self._ss.ck, self._ss.k, self._ss.n
        ss.mix_hash(resp.ephemeral)
        ss.mix_key(crypto.x25519(self._e_priv, resp.ephemeral))
        ss.mix_key(crypto.x25519(self.identity.private, resp.ephemeral))
        ss.decrypt_and_hash(resp.encrypted_empty)
        send, recv = ss.split()
        self._e_priv = b""  # one response per attempt
        return SessionKeys(send, recv, self.local_index, resp.sender_index, True, self.peer_static)


@dataclass
class ReceivedInitiation:
    """A message 1 that authenticated: who sent it and what it carried."""

    peer_static: bytes
    sender_index: int
    timestamp: bytes
    certificate: bytes
    peer_ephemeral: bytes
    _ss: _SymmetricState
    purpose: Purpose = TUNNEL


def check_mac1(identity: StaticIdentity, data: bytes, purpose: Purpose = TUNNEL) -> wire.Initiation:
    """Parse message 1 and check its mac1: the cheap gate before any DH."""
    msg = wire.decode_initiation(data, purpose.initiation_type)
    # (the layout is checked, so the bytes before the MACs are exactly ``msg.body()``)
    if not crypto.constant_time_eq(crypto.mac(mac1_key(identity.public), bytes(data[:-2 * wire.MAC_BYTES])),
                                   msg.mac1):
        raise AuthenticationError("initiation mac1 invalid", reason="mac1")
    return msg


def consume_initiation(identity: StaticIdentity, msg: wire.Initiation,
                       purpose: Purpose = TUNNEL) -> ReceivedInitiation:
    """Decrypt message 1 (after ``check_mac1``); raise AuthenticationError/ParseError."""
    if msg.mtype != purpose.initiation_type:
        raise ParseError("initiation of another purpose", reason="type")
    ss = _SymmetricState(purpose.prologue)
    ss.mix_hash(identity.public)
    ss.mix_hash(msg.ephemeral)
    ss.mix_key(crypto.x25519(identity.private, msg.ephemeral))
    peer_static = ss.decrypt_and_hash(msg.encrypted_static)
    ss.mix_key(crypto.x25519(identity.private, peer_static))
    payload = ss.decrypt_and_hash(msg.encrypted_payload)
    timestamp, cert = wire.decode_payload(payload)
    return ReceivedInitiation(peer_static, msg.sender_index, timestamp, cert, msg.ephemeral, ss, purpose)


def create_response(identity: StaticIdentity, received: ReceivedInitiation, local_index: int,
                    *, ephemeral: tuple[bytes, bytes] | None = None) -> tuple[bytes, SessionKeys]:
    """Build message 2 and the responder's session keys."""
    ss = received._ss
    e_priv, e_pub = ephemeral or crypto.x25519_keypair()
    ss.mix_hash(e_pub)
    ss.mix_key(crypto.x25519(e_priv, received.peer_ephemeral))
    ss.mix_key(crypto.x25519(e_priv, received.peer_static))
    enc = ss.encrypt_and_hash(b"")
    mtype = received.purpose.response_type
    msg = wire.Response(local_index, received.sender_index, e_pub, enc, mtype=mtype)
    mac1 = crypto.mac(mac1_key(received.peer_static), msg.body())
    out = wire.Response(local_index, received.sender_index, e_pub, enc, mac1, mtype=mtype).encode()
    init_send, init_recv = ss.split()
    return out, SessionKeys(init_recv, init_send, local_index, received.sender_index, False,
                            received.peer_static)
