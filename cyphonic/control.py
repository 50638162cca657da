"""The control channel: authenticated, encrypted, replay-protected signaling
between a node and the cloud, sans-IO.

The node (``ControlClient``) runs the same Noise IK handshake as tunnels do,
against the cloud's pinned static X25519 key, under its own prologue and
message types (``handshake.CONTROL``). On the first login the node has no
certificate yet: its initiation carries an empty one and the ``LoginRequest``
inside the channel carries the enrollment token. Every signaling message
(``cyphonic.wire.signaling``) then travels as the plaintext of a
``MSG_CONTROL_DATA`` packet: the same AEAD, header-as-AD and RFC 6479 replay
window as tunnel data.

Reliability, the same on both sides (``_Peer``):
- ``request(msg)`` gives the message a request id and retransmits it
  (CONTROL_RETRY_S, doubling to CONTROL_RETRY_MAX_S, CONTROL_RETRIES times)
  until a message with the same id comes back (event ``Reply``), or reports
  ``RequestTimedOut``.
  Once answers have been timed (round trips of requests answered without a
  resend, Karn's rule; RFC 6298's smoothed RTT and variance), a request is
  also resent once early, at that RTO but never before CONTROL_FAST_RETRY_MIN_S,
  when that is under half of CONTROL_RETRY_S: one lost datagram on a LAN then
  costs 0.2 s, not 1 s. The early resend is extra: the schedule above and the
  timeout stay as they are.
- An incoming request is delivered once (event ``Incoming``); the answer given
  with ``reply()`` is cached, so a retransmitted request is answered again from
  the cache and never processed twice (a one-time enrollment token stays
  one-time even when the answer was lost).
- Request ids: the client uses 1 .. 2^31-1, the cloud 2^31 .. 2^32-1; 0 means
  a notification that expects no answer. Each side starts at a random id per
  counterpart and counts on from there (wrapping), so a node that restarts does
  not reuse the ids its previous run used (the cloud may still hold that run's
  session and answers). The answer cache is keyed by the id *and* a digest of
  the request: the same id with other content is a new request (counted
  ``request_id_reused``), never answered from the cache. A restarted node once
  got its previous run's cached answers (a KeepaliveAck to its RouteRequest,
  a stale RegisterResponse), and its route never completed.

The cloud side (``ControlServer``) keeps one ``_Peer`` per node static key,
bounded (MAX_CONTROL_PEERS) and forgotten after CONTROL_PEER_IDLE_S of silence.
It tells the upper layer who is speaking (static key, certificate from the
handshake, and the observed source address, which is how the NMS detects NAT).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, replace

from . import constants as C
from . import handshake as hs
from .cookie import CookieJar, CookieResponder
from .datachannel import ReceiveSession, SendStream
from .errors import (CyphonicError, LocalProtocolError, ParseError, RateLimitedError,
                     RemoteProtocolError, ReplayError)
from .outbox import Outbox
from .ratelimit import RateLimiter
from .wire import cookie as wire_cookie
from .wire import data as wire_data
from .wire import signaling as sig

CONTROL_DATA = wire_data.MSG_CONTROL_DATA


# --- events --------------------------------------------------------------------

@dataclass(frozen=True)
class Connected:
    """The client's control session is up (after every handshake, rekeys included)."""
    addr: object


@dataclass(frozen=True)
class Unreachable:
    """The client's handshake got no answer for REKEY_ATTEMPT_S."""
    addr: object
    dropped: int


@dataclass(frozen=True)
class Incoming:
    """A request or notification from the other side. Answer requests with ``reply``."""
    msg: sig.Message
    peer_static: bytes
    addr: object
    certificate: bytes = b""


@dataclass(frozen=True)
class Reply:
    """The answer to one of our requests."""
    msg: sig.Message
    request: sig.Message
    peer_static: bytes


@dataclass(frozen=True)
class RequestTimedOut:
    request: sig.Message
    peer_static: bytes


# --- one end's view of the other ------------------------------------------------

@dataclass
class _Pending:
    msg: sig.Message
    data: bytes
    next_at: float
    interval: float
    tries: int
    retries: int = C.CONTROL_RETRIES
    sent_at: float = 0.0
    early_at: float | None = None     # the early resend, while it is still to come
    resent: bool = False              # then its answer is no RTT sample (Karn)
    deadline: float | None = None     # times out here whatever the retries left (``timeout_s``)


def _request_digest(plaintext: bytes) -> bytes:
    """What tells a retransmitted request from another one under the same id."""
    return hashlib.blake2b(plaintext, digest_size=8).digest()


class _Peer:
    """Keys, pending requests and the answered-request cache for one counterpart."""

    def __init__(self, peer_static: bytes, addr, certificate: bytes = b"", *, first_id: int = 0) -> None:
        self.peer_static = peer_static
        self.addr = addr
        self.certificate = certificate
        self.send: SendStream | None = None
        self.recv: ReceiveSession | None = None
        self.prev_recv: ReceiveSession | None = None
        self.created = 0.0
        self.prev_created = 0.0
        self.confirmed = False
        self.last_received = float("-inf")
        self.last_timestamp = b""
        self.pending: OrderedDict[int, _Pending] = OrderedDict()
        # request id -> (digest of the request, our answer or None while it is being answered)
        self.answered: OrderedDict[int, tuple[bytes, bytes | None]] = OrderedDict()
        self.next_id = first_id             # random per counterpart (see the module doc)
        self.srtt: float | None = None    # RFC 6298 round-trip estimate of answered requests
        self.rttvar = 0.0

    def rtt_sample(self, r: float) -> None:
        if r < 0:
            return
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r

    def early_resend_at(self, now: float) -> float | None:
        """When to resend a new request early (the measured RTO), or None: not timed yet, or
        that RTO is not much shorter than the regular first retransmission."""
        if self.srtt is None:
            return None
        rto = max(C.CONTROL_FAST_RETRY_MIN_S, self.srtt + 4 * self.rttvar)
        return now + rto if rto < C.CONTROL_RETRY_S / 2 else None

    def install(self, keys: hs.SessionKeys, now: float) -> None:
        self.prev_recv = self.recv
        self.prev_created = self.created
        self.send = SendStream(keys.send_key, keys.remote_index, mtype=CONTROL_DATA)
        self.recv = ReceiveSession(keys.receive_key, keys.local_index, mtype=CONTROL_DATA)
        self.created = now
        self.confirmed = keys.initiator

    def usable(self, now: float) -> bool:
        return (self.send is not None and self.confirmed and now - self.created < C.REJECT_AFTER_S
                and not self.send.exhausted)


class _Base(Outbox):
    """What client and server share: queues, counters, the request/answer logic."""

    purpose = hs.CONTROL

    def __init__(self, identity: hs.StaticIdentity, rng: random.Random | None) -> None:
        self.identity = identity
        self.rng = rng or random.SystemRandom()
        Outbox.__init__(self)
        self.counters: Counter = Counter()
        self._timers: list = []  # heap of (deadline, seq, peer static, request id)
        self._seq = 0

    def _first_request_id(self) -> int:
        """Where a counterpart's request ids start (see the module doc): random."""
        return self.rng.randrange(C.SERVER_REQUEST_ID_BASE - 1)

    def _arm(self, when: float, peer: _Peer, rid: int) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, peer.peer_static, rid))

    # requests and answers

    def _new_request(self, peer: _Peer, msg: sig.Message, now: float, first_id: int,
                     retries: int = C.CONTROL_RETRIES, timeout_s: float | None = None) -> sig.Message:
        if len(peer.pending) >= C.CONTROL_MAX_PENDING:
            raise LocalProtocolError("too many outstanding control requests")
        span = C.SERVER_REQUEST_ID_BASE - 1
        peer.next_id = peer.next_id % span + 1
        rid = first_id + peer.next_id - 1
        msg = replace(msg, request_id=rid)
        data = sig.encode(msg)
        early = peer.early_resend_at(now)
        deadline = now + timeout_s if timeout_s is not None else None
        peer.pending[rid] = _Pending(msg, data, now + C.CONTROL_RETRY_S, C.CONTROL_RETRY_S, 0, retries,
                                     sent_at=now, early_at=early, deadline=deadline)
        self._arm(now + C.CONTROL_RETRY_S, peer, rid)
        if deadline is not None:
            self._arm(deadline, peer, rid)
        if early is not None:
            self._arm(early, peer, rid)
        return msg

    def _deliver(self, peer: _Peer, plaintext: bytes, addr, now: float) -> None:
        msg = sig.decode(plaintext)
        rid = msg.request_id
        pending = peer.pending.pop(rid, None) if rid else None
        if pending is not None:
            if not pending.resent:
                peer.rtt_sample(now - pending.sent_at)
            self._emit(Reply(msg, pending.msg, peer.peer_static))
            return
        if rid:
            if self._ours(rid):
                # An answer to a request of ours that is no longer pending (answered already: a
                # resent request was answered twice; or given up). Never an Incoming: answering
                # it would be answered in turn, a duplicate each way, for ever.
                self.counters["late_answers"] += 1
                return
            digest = _request_digest(plaintext)
            seen = peer.answered.get(rid)
            if seen is not None and seen[0] == digest:
                self.counters["duplicate_requests"] += 1
                if seen[1] is not None:
                    self._send_plain(peer, seen[1], now)
                return
            if seen is not None:
                # The same id for another request: the counterpart restarted and its ids met
                # the ones its previous run used. A new request, not a retransmission.
                self.counters["request_id_reused"] += 1
                del peer.answered[rid]
            peer.answered[rid] = (digest, None)
            while len(peer.answered) > C.CONTROL_ANSWERED_CACHE:
                peer.answered.popitem(last=False)
        self._emit(Incoming(msg, peer.peer_static, addr, peer.certificate))

    def _reply(self, peer: _Peer, request: sig.Message, msg: sig.Message, now: float) -> None:
        msg = replace(msg, request_id=request.request_id)
        data = sig.encode(msg)
        seen = peer.answered.get(request.request_id)
        if seen is not None and seen[1] is None:
            peer.answered[request.request_id] = (seen[0], data)
        self._send_plain(peer, data, now)

    def _send_plain(self, peer: _Peer, data: bytes, now: float) -> bool:
        if not peer.usable(now) or peer.addr is None:
            return False
        self._push(peer.send.seal(data), peer.addr)
        return True

    def _retry_due(self, peer: _Peer, rid: int, now: float) -> None:
        p = peer.pending.get(rid)
        if p is None:
            return
        if p.deadline is not None and now >= p.deadline:
            del peer.pending[rid]
            self._emit(RequestTimedOut(p.msg, peer.peer_static))
            return
        if p.early_at is not None and p.early_at <= now < p.next_at:
            p.early_at = None
            p.resent = True
            self.counters["requests_resent_early"] += 1
            self._on_retry(peer, p, now)
            return
        if p.next_at > now:
            return
        p.early_at = None
        p.resent = True
        if p.tries >= p.retries:
            del peer.pending[rid]
            self._emit(RequestTimedOut(p.msg, peer.peer_static))
            return
        p.tries += 1
        p.interval = min(p.interval * 2, C.CONTROL_RETRY_MAX_S)
        p.next_at = now + p.interval
        self._arm(p.next_at, peer, rid)
        self.counters["requests_retransmitted"] += 1
        self._on_retry(peer, p, now)

    def _on_retry(self, peer: _Peer, p: _Pending, now: float) -> None:
        self._send_plain(peer, p.data, now)

    def _open(self, peer: _Peer, data: bytes, now: float) -> bytes:
        index = int.from_bytes(data[4:8], "big")
        for recv, created in ((peer.recv, peer.created), (peer.prev_recv, peer.prev_created)):
            if recv is not None and recv.local_index == index:
                if now - created >= C.REJECT_AFTER_S:
                    raise ReplayError("control session expired", reason="expired")
                plaintext, _ = recv.open(data)
                return plaintext
        raise ParseError("control data for an old session", reason="unknown_index")


class ControlClient(_Base):
    """The node's side: one control session to the cloud at ``cloud_addr``."""

    @staticmethod
    def _ours(rid: int) -> bool:
        return rid < C.SERVER_REQUEST_ID_BASE      # our request ids; the cloud's are above

    # Set by the owner (the signaling client, while it waits for a silent cloud to come back):
    # an unanswered initiation is resent at least this often, each wait drawn from
    # [1 - RECONNECT_JITTER, 1] of it, and never abandoned. None: the schedule of _initiate
    # alone, abandoned after REKEY_ATTEMPT_S.
    retry_cap_s: float | None = None

    def __init__(self, identity: hs.StaticIdentity, cloud_static: bytes, cloud_addr, *,
                 rng: random.Random | None = None, timestamp_floor_ns: int = 0) -> None:
        super().__init__(identity, rng)
        self.peer = _Peer(cloud_static, cloud_addr, first_id=self._first_request_id())
        self.handshake: hs.InitiatorHandshake | None = None
        self.handshake_started = 0.0
        self.handshake_retry_at = 0.0
        self.queue: deque = deque()
        self._last_timestamp_ns = timestamp_floor_ns   # (cyphonic.timestamp_floor)
        self.cookie = CookieJar(cloud_static, wire_cookie.MSG_CONTROL_COOKIE)
        self._cookie_resend_round: float | None = None

    @property
    def connected(self) -> bool:
        return self.peer.send is not None and self.peer.confirmed

    def set_cloud_address(self, addr, now: float) -> None:
        """The cloud moved, or our own address changed: handshake again from here."""
        self.peer.addr = addr
        self.peer.send = None
        self.handshake = None
        self._begin(now)

    def set_identity(self, identity: hs.StaticIdentity) -> None:
        """After login: the certificate goes into later handshakes."""
        self.identity = identity

    def close(self) -> None:
        """Stop using this cloud (the owner moved to another cloud instance): forget the
        session, the handshake, the queued messages, every outstanding request (no timeout
        events follow) and the events not yet pulled. Nothing of the old session is accepted
        afterwards. Request ids go on from where they were if the channel is used again, so a
        cloud that still holds our session never takes a new request for one it answered."""
        self.handshake = None
        self.peer.send = None
        self.peer.recv = self.peer.prev_recv = None
        self.peer.confirmed = False
        self.peer.pending.clear()
        self.queue.clear()
        self._timers.clear()
        self._out.clear()
        self._events.clear()
        self.retry_cap_s = None

    def request(self, msg: sig.Message, now: float, retries: int = C.CONTROL_RETRIES,
                timeout_s: float | None = None) -> sig.Message:
        """Send a request that expects an answer; returns it with its request id. Without an
        answer it is sent ``retries`` more times (1 s, 2 s, 4 s, 8 s, 8 s apart), then times out;
        with ``timeout_s`` it times out that long after now at the latest (the signaling client's
        probe of one of several cloud instances: silence is noticed in 1.5 s, not 31 s)."""
        msg = self._new_request(self.peer, msg, now, 1, retries, timeout_s)
        self._send_or_queue(self.peer.pending[msg.request_id].data, now)
        return msg

    def notify(self, msg: sig.Message, now: float) -> None:
        """Send a message that expects no answer (request id 0)."""
        self._send_or_queue(sig.encode(replace(msg, request_id=0)), now)

    def reply(self, incoming: Incoming, msg: sig.Message, now: float) -> None:
        self._reply(self.peer, incoming.msg, msg, now)

    def _send_or_queue(self, data: bytes, now: float) -> None:
        if self.peer.usable(now):
            self._push(self.peer.send.seal(data), self.peer.addr)
            if now - self.peer.created >= C.REKEY_AFTER_S:
                self._begin(now)
            return
        if len(self.queue) >= C.CONTROL_QUEUE_MAX:
            self.queue.popleft()
            self.drops["queue_full"] += 1
        self.queue.append(data)
        self._begin(now)

    def _on_retry(self, peer: _Peer, p: _Pending, now: float) -> None:
        if not self._send_plain(peer, p.data, now) and p.data not in self.queue:
            self._send_or_queue(p.data, now)

    def _begin(self, now: float) -> None:
        if self.handshake is not None or self.peer.addr is None:
            return
        self.handshake_started = now
        self._initiate(now)
        self._cap_retry(now)

    def _cap_retry(self, now: float) -> None:
        if self.retry_cap_s is not None:
            wait = self.retry_cap_s * (1.0 - C.RECONNECT_JITTER * self.rng.random())
            self.handshake_retry_at = min(self.handshake_retry_at, now + wait)

    def _initiate(self, now: float) -> None:
        idx = self.rng.getrandbits(32) or 1
        self.handshake = hs.InitiatorHandshake(self.identity, self.peer.peer_static, idx, hs.CONTROL)
        message = self.handshake.create_initiation(now, after_ns=self._last_timestamp_ns)
        self._push(self.cookie.stamp(message, now), self.peer.addr)
        self._last_timestamp_ns = self.handshake.timestamp_ns
        # Retransmit about 1, 2, 4 and 8 s after the start, then every 5 s (hs.retry_wait): a lost first initiation
        # costs a second, not five, and a silent cloud is not hammered. Holding a cookie, the
        # cloud is alive and under load, and what is lost now is lost in its full receive
        # queue: try again soon (docs/protocol.md 4.10).
        if self.cookie.valid(now):
            wait = C.COOKIE_RETRY_S
        else:
            wait = hs.retry_wait(now - self.handshake_started)
        self.handshake_retry_at = now + wait + self.rng.random() * C.REKEY_TIMEOUT_JITTER_S
        self.counters["initiations_sent"] += 1

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        try:
            mtype = wire_data.message_type(data)
            if mtype == hs.CONTROL.response_type:
                if self.handshake is None:
                    raise ParseError("no control handshake outstanding", reason="unexpected")
                keys = self.handshake.consume_response(data)
                self.handshake = None
                self.peer.install(keys, now)
                self.peer.addr = addr
                self._emit(Connected(addr))
                queued, self.queue = self.queue, deque()
                for item in queued:
                    self._push(self.peer.send.seal(item), self.peer.addr)
                if not queued:
                    self._push(self.peer.send.seal(sig.encode(sig.Keepalive(request_id=0))), self.peer.addr)
            elif mtype == wire_cookie.MSG_CONTROL_COOKIE:
                self._receive_cookie(data, now)
            elif mtype == CONTROL_DATA:
                if len(data) < 8:
                    raise ParseError("control data too short", reason="short")
                plaintext = self._open(self.peer, data, now)
                self.peer.last_received = now
                self._deliver(self.peer, plaintext, addr, now)
            else:
                raise ParseError(f"not a control message (type {mtype})", reason="unknown_type")
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
        except (CyphonicError, ValueError, TypeError) as exc:
            self.drops["internal_" + type(exc).__name__] += 1

    def _receive_cookie(self, data: bytes, now: float) -> None:
        """The cloud is under load: keep its cookie and resend at once, once per handshake
        round (a forged reply needs our initiation's mac1 and then costs one initiation)."""
        if self.handshake is None or not self.handshake.message:
            raise ParseError("no control handshake outstanding", reason="unexpected")
        if len(data) != wire_cookie.REPLY_BYTES:
            raise ParseError("cookie reply of the wrong size", reason="short")
        if int.from_bytes(data[4:8], "big") != self.handshake.local_index:
            raise ParseError("cookie reply for another handshake", reason="index")
        self.cookie.consume(data, self.handshake.message, now)
        self.counters["cookies_received"] += 1
        if self._cookie_resend_round != self.handshake_started:
            self._cookie_resend_round = self.handshake_started
            self._initiate(now)

    def get_timer(self) -> float | None:
        times = [t[0] for t in self._timers[:1]]
        if self.handshake is not None:
            times.append(self.handshake_retry_at)
        if self.peer.send is not None:
            times.append(self.peer.created + C.REJECT_AFTER_S)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.handshake is not None and now >= self.handshake_retry_at:
            # Abandoned after REKEY_ATTEMPT_S, unless the owner keeps trying (retry_cap_s): then
            # the messages queued for the session (a login) stay, to go out when it comes.
            if now - self.handshake_started >= C.REKEY_ATTEMPT_S and self.retry_cap_s is None:
                self.handshake = None
                dropped = len(self.queue)
                self.queue.clear()
                self._emit(Unreachable(self.peer.addr, dropped))
            else:
                self.counters["initiations_retransmitted"] += 1
                self._initiate(now)
                self._cap_retry(now)
        if self.peer.send is not None and now - self.peer.created >= C.REJECT_AFTER_S:
            self.peer.send = None
            self.peer.confirmed = False
        while self._timers and self._timers[0][0] <= now:
            _, _, _, rid = heapq.heappop(self._timers)
            pending = self.peer.pending.get(rid)
            self._retry_due(self.peer, rid, now)
            if pending is not None and rid not in self.peer.pending and pending.data in self.queue:
                # Timed out while waiting for a session: it is not sent later either (a login
                # retried through a long outage would otherwise reach the cloud once per try).
                self.queue.remove(pending.data)


class ControlServer(_Base):
    """The cloud's side: a control session per node, keyed by the node's static key."""

    @staticmethod
    def _ours(rid: int) -> bool:
        return rid >= C.SERVER_REQUEST_ID_BASE     # our request ids; the nodes' are below

    def __init__(self, identity: hs.StaticIdentity, *, rng: random.Random | None = None,
                 max_peers: int = C.MAX_CONTROL_PEERS,
                 handshake_load_per_s: float = C.CONTROL_HANDSHAKE_LOAD_PER_S) -> None:
        super().__init__(identity, rng)
        self.max_peers = max_peers
        self.peers: OrderedDict[bytes, _Peer] = OrderedDict()  # confirmed, oldest activity first
        # Handshakes answered but not yet confirmed by a data packet live apart, in a smaller
        # table: a flood of initiations (fresh keys, spoofed sources) can only evict other
        # unconfirmed entries, never the sessions of nodes that proved their return path.
        self._unconfirmed: OrderedDict[bytes, _Peer] = OrderedDict()
        self._by_index: dict[int, _Peer] = {}
        self.ratelimit = RateLimiter()
        self.cookies = CookieResponder(identity.public, reply_type=wire_cookie.MSG_CONTROL_COOKIE,
                                       load_per_s=handshake_load_per_s)
        self._next_sweep = 0.0

    def peer(self, static: bytes) -> _Peer | None:
        return self.peers.get(static)

    def reply(self, incoming: Incoming, msg: sig.Message, now: float) -> None:
        peer = self.peers.get(incoming.peer_static)
        if peer is None:
            self.drops["reply_to_gone_peer"] += 1
            return
        self._reply(peer, incoming.msg, msg, now)

    def request(self, static: bytes, msg: sig.Message, now: float) -> sig.Message | None:
        """A cloud-initiated request (e.g. a route direction for a responder); retransmitted."""
        peer = self.peers.get(static)
        if peer is None:
            return None
        msg = self._new_request(peer, msg, now, C.SERVER_REQUEST_ID_BASE)
        self._send_plain(peer, peer.pending[msg.request_id].data, now)
        return msg

    def notify(self, static: bytes, msg: sig.Message, now: float) -> bool:
        peer = self.peers.get(static)
        if peer is None:
            return False
        return self._send_plain(peer, sig.encode(replace(msg, request_id=0)), now)

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        try:
            mtype = wire_data.message_type(data)
            if mtype == hs.CONTROL.initiation_type:
                self._initiation(data, addr, now)
            elif mtype == CONTROL_DATA:
                if len(data) < 8:
                    raise ParseError("control data too short", reason="short")
                peer = self._by_index.get(int.from_bytes(data[4:8], "big"))
                if peer is None:
                    raise ParseError("control data for an unknown session", reason="unknown_index")
                plaintext = self._open(peer, data, now)
                if peer.recv is not None and peer.recv.local_index == int.from_bytes(data[4:8], "big"):
                    peer.confirmed = True
                    if self._unconfirmed.pop(peer.peer_static, None) is not None:
                        if len(self.peers) >= self.max_peers:
                            self._evict_oldest()
                        self.peers[peer.peer_static] = peer
                peer.last_received = now
                peer.addr = addr  # authenticated and not replayed: the node may have moved
                if peer.peer_static in self.peers:
                    self.peers.move_to_end(peer.peer_static)
                self._deliver(peer, plaintext, addr, now)
            else:
                raise ParseError(f"not a control message (type {mtype})", reason="unknown_type")
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
        except (CyphonicError, ValueError, TypeError) as exc:
            self.drops["internal_" + type(exc).__name__] += 1

    def _initiation(self, data: bytes, addr, now: float) -> None:
        msg = hs.check_mac1(self.identity, data, hs.CONTROL)
        if not self.cookies.admit(data, addr, now):
            self._push(self.cookies.reply(data, msg.sender_index, addr, now), addr)
            self.counters["cookie_replies_sent"] += 1
            raise RateLimitedError("under load: answered with a cookie reply", reason="under_load")
        if not self.ratelimit.allow(addr[0] if isinstance(addr, tuple) else addr, now):
            raise RateLimitedError("control initiations from this source too fast")
        received = hs.consume_initiation(self.identity, msg, hs.CONTROL)
        static = received.peer_static
        peer = self.peers.get(static) or self._unconfirmed.get(static)
        if peer is not None and received.timestamp <= peer.last_timestamp:
            raise ReplayError("control initiation not newer than the last", reason="replay_initiation")
        if peer is None:
            if len(self._unconfirmed) >= C.MAX_CONTROL_UNCONFIRMED:
                _, stale = self._unconfirmed.popitem(last=False)
                self._forget(stale)
                self.drops["unconfirmed_evicted"] += 1
            peer = _Peer(static, addr, first_id=self._first_request_id())
            self._unconfirmed[static] = peer
        peer.last_timestamp = received.timestamp
        peer.certificate = received.certificate
        idx = self.rng.getrandbits(32)
        while idx == 0 or idx in self._by_index:
            idx = self.rng.getrandbits(32)
        response, keys = hs.create_response(self.identity, received, idx)
        if peer.prev_recv is not None:
            self._by_index.pop(peer.prev_recv.local_index, None)
        peer.install(keys, now)
        self._by_index[idx] = peer
        if static in self.peers:
            self.peers.move_to_end(static)
        else:
            self._unconfirmed.move_to_end(static)
            peer.addr = addr  # a confirmed peer's address moves only with authenticated data
        peer.last_received = now
        self._push(response, addr)
        self.counters["sessions"] += 1

    def _forget(self, peer: _Peer) -> None:
        if self.peers.get(peer.peer_static) is peer:
            del self.peers[peer.peer_static]
        if self._unconfirmed.get(peer.peer_static) is peer:
            del self._unconfirmed[peer.peer_static]
        for recv in (peer.recv, peer.prev_recv):
            if recv is not None:
                self._by_index.pop(recv.local_index, None)

    def _evict_oldest(self) -> None:
        _, peer = next(iter(self.peers.items()))
        self._forget(peer)
        self.drops["peer_evicted"] += 1

    def get_timer(self) -> float | None:
        times = [self._next_sweep] if (self.peers or self._unconfirmed) else []
        if self._timers:
            times.append(self._timers[0][0])
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, static, rid = heapq.heappop(self._timers)
            peer = self.peers.get(static)
            if peer is not None:
                self._retry_due(peer, rid, now)
        if now >= self._next_sweep:
            self._next_sweep = now + C.CONTROL_SWEEP_S
            for table, idle_s in ((self.peers, C.CONTROL_PEER_IDLE_S), (self._unconfirmed, C.REKEY_ATTEMPT_S)):
                for peer in list(table.values()):  # oldest activity first
                    if now - peer.last_received < idle_s:
                        break
                    self._forget(peer)
                    self.counters["sessions_expired"] += 1
