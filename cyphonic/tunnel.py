"""One peer's tunnel: its keypairs, handshake attempts, staged packets and timers.

State, per peer (docs/protocol.md, "Tunnel state machine"):

- ``current``: the keypair we seal with (and open with).
- ``previous``: the keypair before the last rotation, kept for opening only,
  so packets in flight during a rekey are not lost.
- ``next``: a responder's fresh keypair, not yet confirmed; it becomes
  ``current`` when the first packet sealed with it arrives (key confirmation:
  a responder never seals with keys the initiator may not have).
- ``handshake``: the initiator's outstanding attempt, retransmitted about 1, 2,
  4 and 8 s after the start, then every REKEY_TIMEOUT_S (``handshake.retry_wait``, plus jitter) with a
  fresh ephemeral, abandoned after REKEY_ATTEMPT_S.

This class holds state and answers timer questions; the transitions are driven
by ``cyphonic.device.Device``, which owns the index table and the queues.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from . import constants as C
from .certs import Certificate
from .cookie import CookieJar
from .datachannel import ReceiveSession, SendStream
from .handshake import InitiatorHandshake, SessionKeys


@dataclass
class Keypair:
    keys: SessionKeys
    created: float
    sender: SendStream
    receiver: ReceiveSession
    confirmed: bool
    # Deadlines of the device's fast paths (fixed at creation: ``created`` never changes).
    # Sealing: the initiator rekeys after REKEY_AFTER_S, the responder near the reject limit
    # (``Tunnel.wants_rekey``); opening: the initiator starts a new handshake near that limit.
    fast_send_until: float = field(init=False, repr=False)
    fast_receive_until: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        near_reject = self.created + C.REJECT_AFTER_S - C.KEEPALIVE_S - C.REKEY_TIMEOUT_S
        self.fast_send_until = self.created + C.REKEY_AFTER_S if self.keys.initiator else near_reject
        self.fast_receive_until = near_reject

    @classmethod
    def from_keys(cls, keys: SessionKeys, now: float, stream_id: int = 0) -> "Keypair":
        return cls(keys, now, SendStream(keys.send_key, keys.remote_index, stream_id),
                   ReceiveSession(keys.receive_key, keys.local_index), keys.initiator)

    @property
    def local_index(self) -> int:
        return self.keys.local_index

    def age(self, now: float) -> float:
        return now - self.created

    def can_send(self, now: float) -> bool:
        return self.confirmed and self.age(now) < C.REJECT_AFTER_S and not self.sender.exhausted


@dataclass
class Tunnel:
    cert: Certificate
    endpoint: object = None
    candidates: list = field(default_factory=list)   # extra endpoints to try (hole punching, same NAT)
    persistent_keepalive_s: float = 0.0

    current: Keypair | None = None
    previous: Keypair | None = None
    next: Keypair | None = None

    handshake: InitiatorHandshake | None = None
    handshake_started: float = 0.0
    handshake_retry_at: float = 0.0
    last_timestamp: bytes = b""
    last_initiation_consumed: float = float("-inf")
    last_handshake: float | None = None
    cookie: CookieJar | None = None         # the last cookie this peer sent us (it was under load)
    cookie_resend_round: float | None = None  # handshake round in which a cookie already made us resend

    staged: deque = field(default_factory=deque)
    last_sent: float = float("-inf")
    last_received: float = float("-inf")
    keepalive_due: float | None = None
    unanswered_since: float | None = None   # first data sent since we last heard from the peer

    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    rx_packets: int = 0
    handshakes: int = 0

    @property
    def fqdn(self) -> str:
        return self.cert.fqdn

    @property
    def static(self) -> bytes:
        return self.cert.static_public

    @property
    def vip4(self) -> bytes:
        return self.cert.vip4_packed

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]

    def sendable(self, now: float) -> Keypair | None:
        kp = self.current
        return kp if kp is not None and kp.can_send(now) else None

    def wants_rekey(self, now: float) -> bool:
        """The initiator of the current keypair rekeys after REKEY_AFTER_S; the responder
        only near the reject limit, so both sides do not start at once."""
        kp = self.current
        if kp is None or self.handshake is not None:
            return False
        limit = C.REKEY_AFTER_S if kp.keys.initiator else C.REJECT_AFTER_S - C.KEEPALIVE_S - C.REKEY_TIMEOUT_S
        return kp.age(now) >= limit or kp.sender.counter >= C.REKEY_AFTER_MESSAGES

    def next_deadline(self) -> float | None:
        times = []
        if self.handshake is not None:
            times.append(self.handshake_retry_at)
        if self.keepalive_due is not None:
            times.append(self.keepalive_due)
        if self.unanswered_since is not None and self.current is not None:
            times.append(self.unanswered_since + C.KEEPALIVE_S + C.REKEY_TIMEOUT_S)
        if self.persistent_keepalive_s > 0 and self.current is not None:
            times.append(self.last_sent + self.persistent_keepalive_s)
        for kp in self.keypairs():
            times.append(kp.created + C.REJECT_AFTER_S)
        return min(times) if times else None

    def status(self, now: float) -> dict:
        return {
            "fqdn": self.fqdn,
            "vip4": str(self.cert.vip4),
            "endpoint": list(self.endpoint) if isinstance(self.endpoint, tuple) else self.endpoint,
            "session": self.current is not None and self.current.can_send(now),
            "last_handshake_age_s": None if self.last_handshake is None else round(now - self.last_handshake, 3),
            "tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets, "rx_packets": self.rx_packets,
            "handshakes": self.handshakes, "staged": len(self.staged),
        }
