"""A node's overlay endpoint, sans-IO: one identity, its peers, their tunnels.

Driven like aioquic's connection:

    device.receive_datagram(data, addr, now)   # a UDP datagram arrived
    device.send_packet(ip_packet, now)         # the local side wants to send an inner packet
    device.handle_timer(now)                   # when now >= device.get_timer()
    device.datagrams_to_send() -> [(bytes, addr)]
    device.next_event() -> event or None

``now`` is Unix time in seconds (the I/O edge passes ``time.time()``); timers
use differences only. No sockets, no clock reads, no threads here.

Every datagram handler has a no-throw boundary: bad input of any kind is a
counted drop in ``drops[reason]`` and leaves the state as it was. A peer's
endpoint moves only on an authenticated packet that passed the replay window.
All tables and queues are bounded (``cyphonic.constants``).
"""

from __future__ import annotations

import random
import struct
from collections import Counter, deque
from typing import Iterable

from . import constants as C
from . import events as ev
from . import handshake as hs
from .certs import Certificate, TrustStore
from .cookie import CookieJar, CookieResponder
from .datachannel import OPEN_BUFFER as _OPEN_BUF
from .datachannel import OPENED, RECV_STAGE, SEAL_STAGE, crypto_route_ok
from .datachannel import RECV_BUFFER as _RECV_BUF
from .datachannel import SEAL_BUFFER as _SEAL_BUF
from .outbox import Outbox
from .errors import (CertificateError, CertReason, CyphonicError, LocalProtocolError, ParseError, RateLimitedError,
                     RemoteProtocolError, ReplayError)
from .ratelimit import RateLimiter
from .tunnel import Keypair, Tunnel
from .wire import cert as wire_cert
from .wire import cookie as wire_cookie
from .wire import data as wire_data

_MAX_INDEXES = C.MAX_PEERS * 4
_REKEY_AFTER_MESSAGES = C.REKEY_AFTER_MESSAGES
_KEEPALIVE_S = C.KEEPALIVE_S
_MSG_DATA = wire_data.MSG_DATA
_MIN_DATA_BYTES = wire_data.MIN_DATA_BYTES
_MAX_DATAGRAM = C.MAX_DATAGRAM_BYTES
_MAX_INNER = C.MAX_INNER_PACKET_BYTES
_SRC = C.DATA_HEADER_BYTES + 12   # the staged packet's IPv4 source and destination, in the seal buffer
_DST = C.DATA_HEADER_BYTES + 16
_unpack_index = struct.Struct("!I").unpack_from


class Device(Outbox):
    def __init__(self, identity: hs.StaticIdentity, trust: TrustStore, *,
                 accept_unknown_peers: bool = True,
                 local_vip4s: Iterable[bytes] | None = None,
                 rng: random.Random | None = None,
                 handshake_load_per_s: float = C.HANDSHAKE_LOAD_PER_S, timestamp_floor_ns: int = 0) -> None:
        self.identity = identity
        self.trust = trust
        self.cert: Certificate = wire_cert.decode(identity.certificate)
        self.accept_unknown_peers = accept_unknown_peers
        self.local_vip4s = frozenset(local_vip4s) if local_vip4s else frozenset({self.cert.vip4.packed})
        self.rng = rng or random.SystemRandom()
        self.ratelimit = RateLimiter()
        self.cookies = CookieResponder(identity.public, load_per_s=handshake_load_per_s)
        self.peers_by_static: dict[bytes, Tunnel] = {}
        self.peers_by_vip: dict[bytes, Tunnel] = {}
        self.peers_by_fqdn: dict[str, Tunnel] = {}
        self._index: dict[int, tuple[Tunnel, object]] = {}  # local index -> (peer, handshake or keypair)
        Outbox.__init__(self)
        self.counters: Counter = Counter()
        # initiation timestamps strictly increase (see handshake), and start above the floor
        # the edge kept from the last run (cyphonic.timestamp_floor: a clock that went back)
        self._last_timestamp_ns = timestamp_floor_ns
        # How long past its expiry a known peer's certificate still rekeys: 0, except while the
        # owner's cloud link is down (NodeEngine sets it; docs/protocol.md 11.6).
        self.expired_grace_s = 0.0
        # Certificates are valid on the cloud's clock: ``now`` plus this is the time their
        # validity is checked at (NodeEngine sets it from each login; Signaling.clock_offset_s).
        self.clock_offset_s = 0.0

    def set_identity(self, identity: hs.StaticIdentity) -> None:
        """A renewed certificate for the same static key (later handshakes carry it)."""
        cert = wire_cert.decode(identity.certificate)
        if identity.public != self.identity.public:
            raise LocalProtocolError("set_identity keeps the static key; make a new Device instead")
        if self.local_vip4s == frozenset({self.cert.vip4.packed}):
            self.local_vip4s = frozenset({cert.vip4.packed})
        self.identity = identity
        self.cert = cert

    # --- peers ---------------------------------------------------------------

    def add_peer(self, certificate: bytes | Certificate, now: float, *, endpoint=None,
                 candidates: Iterable = (), persistent_keepalive_s: float = 0.0,
                 expected_fqdn: str | None = None) -> Tunnel:
        """Add (or update) a peer from its certificate; raises CertificateError if it is not valid."""
        return self._add_peer(certificate, now + self.clock_offset_s, endpoint=endpoint, candidates=candidates,
                              persistent_keepalive_s=persistent_keepalive_s, expected_fqdn=expected_fqdn)

    def _add_peer(self, certificate: bytes | Certificate, valid_at: float, *, endpoint=None,
                  candidates: Iterable = (), persistent_keepalive_s: float = 0.0,
                  expected_fqdn: str | None = None) -> Tunnel:
        """``add_peer`` with the certificate checked as of ``valid_at`` (on the cloud's clock)."""
        cert = self.trust.verify(certificate, valid_at, expected_fqdn=expected_fqdn)
        peer = self.peers_by_static.get(cert.static_public)
        if peer is None:
            peer = self._new_peer(cert)
        else:
            peer.cert = cert
        if endpoint is not None:
            peer.endpoint = endpoint
        peer.candidates = [c for c in candidates if c != peer.endpoint][:C.MAX_ENDPOINTS]
        peer.persistent_keepalive_s = persistent_keepalive_s
        return peer

    def restore_peer(self, certificate: bytes, now: float, *, endpoint=None, grace_s: float = 0.0) -> Tunnel:
        """A peer we had before a restart, from our own cache (a certificate the CA signed
        and an endpoint, which moves only with authenticated packets anyway). Verified as
        ``add_peer`` does, except that, with ``grace_s`` (the cloud is unreachable), a
        certificate that expired at most ``grace_s`` ago is taken as of its expiry, as
        ``expired_grace_s`` takes it from a known peer (docs/protocol.md 11.6)."""
        now += self.clock_offset_s              # (the cloud's time: it sets the validity)
        try:
            return self._add_peer(certificate, now, endpoint=endpoint)
        except CertificateError as exc:
            if exc.cert_reason is not CertReason.EXPIRED or grace_s <= 0:
                raise
            cert = wire_cert.decode(certificate)
            if now - cert.not_after > grace_s:
                raise
            self.counters["expired_certificate_in_outage"] += 1
            return self._add_peer(certificate, float(cert.not_after), endpoint=endpoint)

    def _new_peer(self, cert: Certificate) -> Tunnel:
        if len(self.peers_by_static) >= C.MAX_PEERS:
            raise LocalProtocolError("peer table full")
        holders = {id(p): p for p in (self.peers_by_vip.get(cert.vip4.packed),
                                      self.peers_by_fqdn.get(cert.fqdn)) if p is not None}
        # Another static key holds this name or address. Only a newer certificate (a higher
        # serial from the same CA) replaces it; an older one is someone replaying the past.
        for old in holders.values():
            if cert.serial <= old.cert.serial:
                raise RemoteProtocolError(f"{cert.fqdn}: an older certificate for a known peer",
                                          reason="identity_conflict")
        for old in holders.values():
            self.remove_peer(old.fqdn)
        peer = Tunnel(cert)
        self.peers_by_static[cert.static_public] = peer
        self.peers_by_vip[cert.vip4.packed] = peer
        self.peers_by_fqdn[cert.fqdn] = peer
        return peer

    def remove_peer(self, fqdn: str) -> None:
        peer = self.peers_by_fqdn.pop(fqdn, None)
        if peer is None:
            return
        self.peers_by_static.pop(peer.static, None)
        self.peers_by_vip.pop(peer.vip4, None)
        for idx, (p, _) in list(self._index.items()):
            if p is peer:
                del self._index[idx]

    def peer(self, fqdn: str) -> Tunnel | None:
        return self.peers_by_fqdn.get(fqdn)

    def revoke(self, serial: int) -> None:
        """Forget every peer whose certificate carries ``serial`` and refuse it from now on."""
        self.trust.revoked.add(serial)
        for peer in list(self.peers_by_fqdn.values()):
            if peer.cert.serial == serial:
                self.remove_peer(peer.fqdn)

    # --- caller API --------------------------------------------------------------

    def connect(self, fqdn: str, now: float) -> bool:
        """Bring the tunnel to ``fqdn`` up (DNS-triggered). True if a session is already up."""
        peer = self.peers_by_fqdn.get(fqdn)
        if peer is None:
            raise LocalProtocolError(f"unknown peer {fqdn}")
        if peer.sendable(now) is not None:
            return True
        self._begin_handshake(peer, now)
        return False

    def rekey(self, peer: Tunnel, now: float) -> None:
        """Start a new handshake with ``peer`` (one of ``peers_by_vip``'s tunnels) now, unless one
        is under way: for a caller that ran out of something tied to the current key (the
        adapter: stream ids for its workers, ``cyphonic.stream_ids``). The current keypair seals
        on until the new one replaces it. The tunnel itself, not its name: a certificate renewed
        with another FQDN leaves ``peers_by_fqdn`` behind for a moment."""
        self._begin_handshake(peer, now)

    # --- the fast path (the common case of send_packet / receive_datagram, no queues or events) ---

    def fast_send(self, packet: bytes, now: float):
        """Seal ``packet`` if it is the plain common case: a live, confirmed session that needs no
        rekey, to a UDP endpoint. Returns (datagram, endpoint), or None: then the caller must use
        ``send_packet`` (staging, handshakes, rekeys, relays and drops all live there)."""
        size = len(packet)
        if not 20 <= size <= _MAX_INNER:
            return None
        SEAL_STAGE[0:size] = packet
        out = self.fast_send_staged(size, now)
        return None if out is None else (_SEAL_BUF[0:out[0]], out[1])

    def fast_send_staged(self, size: int, now: float):
        """``fast_send`` of the packet an I/O edge read into ``datachannel.SEAL_STAGE`` (nothing
        copied): returns (datagram length, endpoint), the datagram being
        ``datachannel.SEALED[:length]``; or None (the packet is still in the stage).

        Per packet, so lean: few lookups, deadlines precomputed in the keypair (an idle process
        wakes with cold caches, and every object touched costs)."""
        peer = self.peers_by_vip.get(_SEAL_BUF[_DST:_DST + 4])
        if peer is None or size < 20:
            return None
        kp = peer.current
        ep = peer.endpoint
        if kp is None or type(ep) is not tuple or not kp.confirmed or peer.handshake is not None \
                or now >= kp.fast_send_until or _SEAL_BUF[_SRC:_SRC + 4] not in self.local_vip4s:
            return None
        sender = kp.sender
        if sender.packets_sent >= _REKEY_AFTER_MESSAGES:  # (= its counter: a device's own streams start at 0)
            return None
        length = sender.seal_staged(size)
        peer.last_sent = now
        peer.keepalive_due = None
        peer.tx_bytes += size
        peer.tx_packets += 1
        if peer.unanswered_since is None:
            peer.unanswered_since = now
        return length, ep

    def fast_receive(self, data: bytes, addr, now: float):
        """Open a data packet of a live session from its known endpoint. Returns the inner packet
        to deliver, b"" when the datagram was consumed (a keepalive, or a counted drop), or None:
        then the caller must use ``receive_datagram`` (new endpoints, key confirmation, rekeys)."""
        size = len(data)
        if size < _MIN_DATA_BYTES or size > _MAX_DATAGRAM or data[0] != _MSG_DATA:
            return None
        RECV_STAGE[0:size] = data
        plen = self.fast_receive_staged(size, addr, now)
        return None if plen is None else _OPEN_BUF[0:plen]

    def fast_receive_staged(self, size: int, addr, now: float):
        """``fast_receive`` of the datagram an I/O edge received into ``datachannel.RECV_STAGE``
        (nothing copied): returns the length of the inner packet to deliver, which is
        ``datachannel.OPENED[:length]``; 0 when the datagram was consumed (a keepalive, or a
        counted drop); or None: the caller must use ``receive_datagram`` (the datagram is still
        in the stage)."""
        if size < _MIN_DATA_BYTES or RECV_STAGE[0] != _MSG_DATA:
            return None
        entry = self._index.get(_unpack_index(_RECV_BUF, 4)[0])
        if entry is None:
            return None
        peer, kp = entry
        if kp is not peer.current or now >= kp.fast_receive_until or peer.endpoint != addr:
            return None  # (a handshake in the index is never current)
        try:
            plen, _ = kp.receiver.open_staged(size)
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            return 0
        peer.last_received = now
        peer.unanswered_since = None
        if not plen:
            self.counters["keepalives_received"] += 1
            return 0
        # crypto routing: an IPv4 packet from the peer's virtual IP to ours (crypto_route_ok, inline)
        if plen < 20 or OPENED[0] >> 4 != 4 or _OPEN_BUF[12:16] != peer.cert.vip4_packed \
                or _OPEN_BUF[16:20] not in self.local_vip4s:
            self.drops["crypto_route"] += 1
            return 0
        peer.rx_bytes += plen
        peer.rx_packets += 1
        if peer.keepalive_due is None:
            peer.keepalive_due = now + _KEEPALIVE_S
        return plen

    def maintain(self, now: float) -> None:
        """Start the rekeys that are due. A node daemon's device rekeys as it sends; the adapter's
        controller does not see the data its workers seal, so it calls this on a timer."""
        for peer in self.peers_by_fqdn.values():
            if peer.wants_rekey(now):
                self._begin_handshake(peer, now)

    def keepalive_all(self, now: float) -> int:
        """Send a keepalive on every live session (after our address changed: the peers move
        their endpoint for us on these authenticated packets at once). Returns how many."""
        n = 0
        for peer in self.peers_by_fqdn.values():
            if peer.sendable(now) is not None and peer.endpoint is not None:
                self._send_on(peer, b"", now)
                n += 1
        return n

    def send_packet(self, packet: bytes, now: float) -> None:
        """Seal an inner IPv4 packet toward the peer owning its destination (crypto routing out)."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            self.drops["tx_not_ipv4"] += 1
            return
        peer = self.peers_by_vip.get(packet[16:20])
        if peer is None:
            self.drops["tx_no_peer"] += 1
            return
        if packet[12:16] not in self.local_vip4s:
            self.drops["tx_bad_source"] += 1
            return
        self._send_on(peer, packet, now)

    def _send_on(self, peer: Tunnel, packet: bytes, now: float) -> None:
        kp = peer.sendable(now)
        if kp is None or peer.endpoint is None:
            if len(peer.staged) >= C.STAGED_PACKETS_PER_PEER:
                peer.staged.popleft()
                self.drops["tx_staged_overflow"] += 1
            peer.staged.append(packet)
            self._begin_handshake(peer, now)
            return
        self._push(kp.sender.seal(packet), peer.endpoint)
        peer.last_sent = now
        peer.keepalive_due = None
        if packet:
            peer.tx_bytes += len(packet)
            peer.tx_packets += 1
            if peer.unanswered_since is None:
                peer.unanswered_since = now
        if peer.wants_rekey(now):
            self._begin_handshake(peer, now)

    # --- handshake, initiator side ---------------------------------------------

    def _new_index(self) -> int:
        if len(self._index) >= _MAX_INDEXES:
            raise LocalProtocolError("index table full")
        while True:
            idx = self.rng.getrandbits(32)
            if idx and idx not in self._index:
                return idx

    def _begin_handshake(self, peer: Tunnel, now: float) -> None:
        if peer.handshake is not None:
            return
        if peer.endpoint is None and not peer.candidates:
            self.drops["handshake_no_endpoint"] += 1
            return
        peer.handshake_started = now
        self._send_initiation(peer, now)

    def _send_initiation(self, peer: Tunnel, now: float) -> None:
        if peer.handshake is not None:
            self._index.pop(peer.handshake.local_index, None)
        idx = self._new_index()
        attempt = hs.InitiatorHandshake(self.identity, peer.static, idx)
        msg = attempt.create_initiation(now, after_ns=self._last_timestamp_ns)
        if peer.cookie is not None:
            msg = peer.cookie.stamp(msg, now)  # mac2: the responder was under load
            attempt.message = msg              # (copies re-sent during a path attempt carry it too)
        self._last_timestamp_ns = attempt.timestamp_ns
        peer.handshake = attempt
        self._index[idx] = (peer, attempt)
        peer.handshake_retry_at = (now + hs.retry_wait(now - peer.handshake_started)
                                   + self.rng.random() * C.REKEY_TIMEOUT_JITTER_S)
        targets = ([peer.endpoint] if peer.endpoint is not None else []) + list(peer.candidates)
        for addr in targets:
            self._push(msg, addr)
        self.counters["initiations_sent"] += 1

    # --- receive -----------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        """Handle one UDP datagram. Never raises for bad input: drops are counted."""
        try:
            mtype = wire_data.message_type(data)
            if mtype == wire_data.MSG_DATA:
                self._receive_data(data, addr, now)
            elif mtype == wire_data.MSG_INITIATION:
                self._receive_initiation(data, addr, now)
            elif mtype == wire_data.MSG_RESPONSE:
                self._receive_response(data, addr, now)
            elif mtype == wire_cookie.MSG_COOKIE:
                self._receive_cookie(data, now)
            else:
                raise ParseError(f"unknown message type {mtype}", reason="unknown_type")
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
        except (CyphonicError, ValueError, TypeError) as exc:  # defensive: never let input kill the caller
            self.drops["internal_" + type(exc).__name__] += 1

    def _receive_initiation(self, data: bytes, addr, now: float) -> None:
        msg = hs.check_mac1(self.identity, data)
        if not self.cookies.admit(data, addr, now):
            self._push(self.cookies.reply(data, msg.sender_index, addr, now), addr)
            self.counters["cookie_replies_sent"] += 1
            raise RateLimitedError("under load: answered with a cookie reply", reason="under_load")
        if not self.ratelimit.allow(addr[0] if isinstance(addr, tuple) else addr, now):
            raise RateLimitedError("initiations from this source too fast")
        received = hs.consume_initiation(self.identity, msg)
        peer = self.peers_by_static.get(received.peer_static)
        cert = self._verify_peer_certificate(received.certificate, received.peer_static, peer, now)
        if peer is None:
            if not self.accept_unknown_peers:
                raise RemoteProtocolError("initiation from a peer we were not told about", reason="unknown_peer")
            peer = self._new_peer(cert)
            self._emit(ev.PeerAdded(cert.fqdn, str(cert.vip4), True))
        if received.timestamp <= peer.last_timestamp:
            raise ReplayError("initiation timestamp not newer than the last", reason="replay_initiation")
        if now - peer.last_initiation_consumed < C.HANDSHAKE_INITIATION_MIN_INTERVAL_S:
            raise RateLimitedError("initiations from this peer too fast", reason="ratelimited_peer")
        peer.cert = cert  # (a renewed certificate) only once the initiation passed every check
        peer.last_timestamp = received.timestamp
        peer.last_initiation_consumed = now
        idx = self._new_index()
        response, keys = hs.create_response(self.identity, received, idx)
        if peer.next is not None:
            self._index.pop(peer.next.local_index, None)
        peer.next = Keypair.from_keys(keys, now)
        self._index[idx] = (peer, peer.next)
        if peer.endpoint is None:
            peer.endpoint = addr
        # Otherwise the endpoint moves with the first data packet of the new session (key
        # confirmation): a replayed initiation, say after a restart forgot the last timestamp,
        # can then not redirect a live tunnel.
        self._push(response, addr)
        self.counters["responses_sent"] += 1

    def _verify_peer_certificate(self, certificate: bytes, static: bytes, peer: Tunnel | None,
                                 now: float) -> Certificate:
        """The certificate of an initiation, verified. During a cloud outage
        (``expired_grace_s``), an expired one of a peer we already have, for the same key and
        not older than the one we hold, is taken for ``expired_grace_s`` past its expiry: the
        peer could not renew it either. Everything else (signature, revocation, name, key)
        is checked as always."""
        fqdn = peer.fqdn if peer is not None else None
        now += self.clock_offset_s              # (the cloud's time: it sets the validity)
        try:
            return self.trust.verify(certificate, now, expected_static=static, expected_fqdn=fqdn)
        except CertificateError as exc:
            if exc.cert_reason is not CertReason.EXPIRED or peer is None or self.expired_grace_s <= 0:
                raise
            cert = wire_cert.decode(certificate)
            if now - cert.not_after > self.expired_grace_s or cert.serial < peer.cert.serial:
                raise
            cert = self.trust.verify(certificate, float(cert.not_after), expected_static=static, expected_fqdn=fqdn)
            self.counters["expired_certificate_in_outage"] += 1
            return cert

    def _receive_response(self, data: bytes, addr, now: float) -> None:
        if len(data) < 12:
            raise ParseError("response too short", reason="short")
        receiver = int.from_bytes(data[8:12], "big")
        entry = self._index.get(receiver)
        if entry is None or not isinstance(entry[1], hs.InitiatorHandshake):
            raise ParseError("response for no outstanding handshake", reason="unknown_index")
        peer, attempt = entry
        keys = attempt.consume_response(data)
        peer.handshake = None
        kp = Keypair.from_keys(keys, now)
        self._index[receiver] = (peer, kp)
        self._rotate(peer, kp)
        self._move_endpoint(peer, addr)
        self._completed(peer, now, initiator=True)
        if not peer.staged:
            self._send_on(peer, b"", now)  # key confirmation for the responder

    def _receive_cookie(self, data: bytes, now: float) -> None:
        """A cookie reply to one of our initiations: keep the cookie, and resend at once
        (once per handshake round: a reply can only be forged by someone who saw the
        initiation, and then it costs us one initiation, not a loop)."""
        if len(data) < 8:
            raise ParseError("cookie reply too short", reason="short")
        entry = self._index.get(int.from_bytes(data[4:8], "big"))
        if entry is None or not isinstance(entry[1], hs.InitiatorHandshake):
            raise ParseError("cookie reply for no outstanding handshake", reason="unknown_index")
        peer, attempt = entry
        jar = peer.cookie or CookieJar(peer.static)
        jar.consume(data, attempt.message, now)
        peer.cookie = jar
        self.counters["cookies_received"] += 1
        if peer.cookie_resend_round != peer.handshake_started:
            peer.cookie_resend_round = peer.handshake_started
            self._send_initiation(peer, now)

    def _receive_data(self, data: bytes, addr, now: float) -> None:
        idx, _ = wire_data.decode_header(data)
        entry = self._index.get(idx)
        if entry is None or not isinstance(entry[1], Keypair):
            raise ParseError("data for an unknown session", reason="unknown_index")
        peer, kp = entry
        if kp.age(now) >= C.REJECT_AFTER_S:
            raise ReplayError("session expired", reason="expired")
        plaintext, _ = kp.receiver.open(data)
        peer.last_received = now
        peer.unanswered_since = None
        self._move_endpoint(peer, addr)
        if kp is peer.next:
            kp.confirmed = True
            peer.next = None
            self._rotate(peer, kp)
            self._completed(peer, now, initiator=False)
        if plaintext:
            if not crypto_route_ok(plaintext, peer.vip4, self.local_vip4s):
                self.drops["crypto_route"] += 1
                return
            peer.rx_bytes += len(plaintext)
            peer.rx_packets += 1
            if peer.keepalive_due is None:
                peer.keepalive_due = now + C.KEEPALIVE_S
            self._emit(ev.PacketReceived(peer.fqdn, plaintext))
        else:
            self.counters["keepalives_received"] += 1
        if kp is peer.current and kp.keys.initiator and \
                kp.age(now) >= C.REJECT_AFTER_S - C.KEEPALIVE_S - C.REKEY_TIMEOUT_S:
            self._begin_handshake(peer, now)

    def _rotate(self, peer: Tunnel, kp: Keypair) -> None:
        if peer.previous is not None:
            self._index.pop(peer.previous.local_index, None)
        peer.previous = peer.current
        peer.current = kp

    def _completed(self, peer: Tunnel, now: float, *, initiator: bool) -> None:
        peer.last_handshake = now
        peer.handshakes += 1
        self._emit(ev.HandshakeCompleted(peer.fqdn, str(peer.cert.vip4), initiator,
                                         peer.endpoint, peer.cert.serial))
        staged, peer.staged = peer.staged, deque()
        for packet in staged:
            self._send_on(peer, packet, now)

    def _move_endpoint(self, peer: Tunnel, addr) -> None:
        if peer.endpoint != addr:
            old = peer.endpoint
            peer.endpoint = addr
            if old is not None:
                self._emit(ev.EndpointChanged(peer.fqdn, old, addr))

    # --- timers ------------------------------------------------------------------

    def get_timer(self) -> float | None:
        deadlines = [d for p in self.peers_by_static.values() if (d := p.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        for peer in list(self.peers_by_static.values()):
            self._peer_timers(peer, now)

    def _peer_timers(self, peer: Tunnel, now: float) -> None:
        if peer.handshake is not None and now >= peer.handshake_retry_at:
            if now - peer.handshake_started >= C.REKEY_ATTEMPT_S:
                self._index.pop(peer.handshake.local_index, None)
                peer.handshake = None
                dropped = len(peer.staged)
                peer.staged.clear()
                self.drops["tx_handshake_timeout"] += dropped
                self._emit(ev.HandshakeFailed(peer.fqdn, "no handshake response", dropped))
            else:
                self.counters["initiations_retransmitted"] += 1
                self._send_initiation(peer, now)
        for name in ("previous", "next", "current"):
            kp = getattr(peer, name)
            if kp is not None and kp.age(now) >= C.REJECT_AFTER_S:
                self._index.pop(kp.local_index, None)
                setattr(peer, name, None)
                if name == "current":
                    self._emit(ev.SessionExpired(peer.fqdn))
        if peer.unanswered_since is not None and now >= peer.unanswered_since + C.KEEPALIVE_S + C.REKEY_TIMEOUT_S:
            # Data went out and nothing came back, not even the passive keepalive the peer owes
            # us within KEEPALIVE_S: its keys may be gone (it restarted). Handshake again.
            peer.unanswered_since = None
            if peer.current is not None:
                self.counters["rekey_unanswered"] += 1
                self._begin_handshake(peer, now)
        if peer.keepalive_due is not None and now >= peer.keepalive_due:
            peer.keepalive_due = None
            if peer.sendable(now) is not None and peer.last_sent < peer.last_received:
                self._send_on(peer, b"", now)
        if peer.persistent_keepalive_s > 0 and peer.current is not None \
                and now >= peer.last_sent + peer.persistent_keepalive_s:
            self._send_on(peer, b"", now)

    # --- status --------------------------------------------------------------------

    def status(self, now: float) -> dict:
        return {
            "fqdn": self.cert.fqdn,
            "vip4": str(self.cert.vip4),
            "peers": [p.status(now) for p in self.peers_by_fqdn.values()],
            "drops": dict(self.drops),
            "counters": dict(self.counters),
        }
