"""Tunnel Relay Service (TRS), sans-IO: forwards ciphertext between the two
ends of a relay session the NMS authorized (docs/protocol.md, "Route types";
wire format in ``cyphonic.wire.relay``; tokens in ``cyphonic.cloud.relay_token``).

Driven like the device:

    trs.receive_datagram(data, addr, now)   # a UDP datagram arrived on an IPv4 or IPv6 socket
    trs.handle_timer(now)                   # when now >= trs.get_timer()
    trs.datagrams_to_send() -> [(bytes, addr)]

``now`` is Unix time in seconds (token expiries are Unix seconds too). No
sockets, no clock reads here; the asyncio edge is ``cyphonic.cloud.trs_server``.

Rules, in the order a datagram meets them:

1. Rate limit per source IP (token bucket, bounded table): refused is drop
   ``ratelimited``, answered by ERROR 4 at most once a second per source.
2. Parse (``cyphonic.wire.relay``): bad bytes are drop ``malformed``; BOUND or
   ERROR sent to the TRS are drop ``unexpected_op``; neither is answered.
3. BIND: the token must verify for this session id (drop ``relay_token``,
   ERROR 1; drop ``relay_expired``, ERROR 2). A new session is created (table
   full: the least recently active session is evicted if it is idle or
   expired, else drop ``table_full``, ERROR 5). The side the token names is
   bound to the source address; a re-bind from another address moves it
   (roaming). If the other side holds that very address, it loses it (the
   newest valid BIND owns an address). The answer is BOUND; the other side,
   if bound, is told with an unsolicited BOUND the first time its peer binds.
4. DATA: the session must exist and the source must be one of its bound
   addresses (drop ``unknown_session`` / ``not_bound``, ERROR 3); the
   datagram goes out unchanged to the other side's bound address, or is drop
   ``peer_not_bound``. A session past its token expiry is removed on the spot
   (drop ``relay_expired``, ERROR 2).
5. ``handle_timer`` sweeps every ``sweep_s``: sessions silent for ``idle_s``
   or past their expiry are removed.

What it must never do: read or alter a relayed payload; send anything to an
address other than (a) a side bound with a valid token, or (b) the source of
the datagram being answered, with an answer no larger than that datagram and
at most one ERROR a second per source and ``RELAY_ERRORS_TOTAL_PER_S`` in
all, however many sources a spoofing sender claims (no amplification, no open
reflection); raise out of ``receive_datagram``; grow without bound.

Addresses are whatever tuples the sockets give: (host, port) for IPv4,
(host, port, flowinfo, scope_id) for IPv6. They are compared by (host, port)
only, and the full tuple is kept for sending. A session's expiry is the
earliest token expiry among its bound sides (a side re-binding with a fresh
token extends its own part).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from ..errors import AuthenticationError, ParseError, RemoteProtocolError, ReplayError
from ..ratelimit import RateLimiter
from ..wire import relay as wire
from . import constants as CC
from .relay_token import token_expires, verify_token


@dataclass(slots=True, eq=False)
class RelaySession:
    """One relay session: two sides, each bound (or not) to one address."""

    session_id: int
    created: float
    last_active: float
    addrs: list = field(default_factory=lambda: [None, None])         # full socket tuples, for sending
    keys: list = field(default_factory=lambda: [None, None])          # (host, port), for comparing
    side_expires: list = field(default_factory=lambda: [0, 0])        # token expiry per side (unix s)
    packets_relayed: list = field(default_factory=lambda: [0, 0])     # [side 0 -> 1, side 1 -> 0]
    bytes_relayed: list = field(default_factory=lambda: [0, 0])       # whole relay datagrams, same split
    binds: int = 0

    @property
    def expires(self) -> int:
        """Earliest token expiry among the bound sides (0 if none is bound)."""
        bound = [self.side_expires[s] for s in (0, 1) if self.keys[s] is not None]
        return min(bound) if bound else 0

    def side_of(self, key) -> int | None:
        if key == self.keys[0]:
            return 0
        if key == self.keys[1]:
            return 1
        return None

    def bound(self, side: int) -> bool:
        return self.keys[side] is not None

    def status(self, now: float) -> dict:
        return {
            "session_id": self.session_id,
            "sides": [None if a is None else f"{a[0]}:{a[1]}" for a in self.addrs],
            "idle_s": round(now - self.last_active, 3),
            "expires": self.expires,
            "packets_relayed": list(self.packets_relayed),
            "bytes_relayed": list(self.bytes_relayed),
            "binds": self.binds,
        }


def _addr_key(addr) -> tuple:
    host, port = addr[0], addr[1]
    if not isinstance(host, str) or not isinstance(port, int):
        raise TypeError("socket address must start with (host str, port int)")
    return (host, port)


class RelayService:
    def __init__(self, relay_key: bytes, *,
                 max_sessions: int = CC.RELAY_MAX_SESSIONS,
                 idle_s: float = CC.RELAY_IDLE_S,
                 rate_per_s: float = CC.RELAY_RATE_PPS,
                 burst: float = CC.RELAY_BURST,
                 sweep_s: float = CC.RELAY_SWEEP_S,
                 ratelimit_sources: int = CC.RELAY_RATELIMIT_SOURCES,
                 error_rate_per_s: float = CC.RELAY_ERROR_RATE_PER_S,
                 error_burst: float = CC.RELAY_ERROR_BURST,
                 max_queued: int = CC.RELAY_MAX_DATAGRAMS_QUEUED) -> None:
        if not isinstance(relay_key, (bytes, bytearray)) or len(relay_key) != CC.RELAY_KEY_BYTES:
            raise ValueError(f"relay key must be {CC.RELAY_KEY_BYTES} bytes")
        if max_sessions < 1 or idle_s <= 0 or sweep_s <= 0 or max_queued < 1:
            raise ValueError("max_sessions, idle_s, sweep_s and max_queued must be positive")
        self._key = bytes(relay_key)
        self.max_sessions = int(max_sessions)
        self.idle_s = float(idle_s)
        self.sweep_s = float(sweep_s)
        self.max_queued = int(max_queued)
        # least recently active first: eviction takes the first entry
        self.sessions: OrderedDict[int, RelaySession] = OrderedDict()
        self.ratelimit = RateLimiter(rate_per_s, burst, ratelimit_sources)
        self.error_limit = RateLimiter(error_rate_per_s, error_burst, CC.RELAY_ERROR_SOURCES)
        self.error_total = RateLimiter(CC.RELAY_ERRORS_TOTAL_PER_S, CC.RELAY_ERRORS_TOTAL_PER_S, 1)
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        self._out: deque = deque()
        self._next_sweep: float | None = None

    # --- the sans-IO surface ------------------------------------------------------

    def receive_datagram(self, data, addr, now: float) -> None:
        """Handle one UDP datagram. Never raises: every refusal is a counted drop."""
        try:
            self.counters["rx_datagrams"] += 1
            key = _addr_key(addr)
            if not self.ratelimit.allow(key[0], now):
                self.drops["ratelimited"] += 1
                self._answer_ratelimited(data, addr, now)
                return
            op, session_id = wire.peek_header(data)
            if op == wire.OP_DATA:
                self._receive_data(data, session_id, key, addr, now)
            elif op == wire.OP_BIND:
                self._receive_bind(wire.decode(data), key, addr, now)
            else:
                raise RemoteProtocolError(f"relay op {op} is not for the TRS", reason="unexpected_op")
        except ParseError:
            self.drops["malformed"] += 1
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
        except Exception as exc:  # the no-throw boundary: bad input never kills the caller
            self.drops["internal_" + type(exc).__name__] += 1

    def datagrams_to_send(self) -> list[tuple[bytes, object]]:
        out = list(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        """When to call ``handle_timer`` next (the next sweep), or None with no sessions."""
        return self._next_sweep if self.sessions else None

    def handle_timer(self, now: float) -> None:
        if self._next_sweep is None or now < self._next_sweep:
            return
        self.sweep(now)

    def sweep(self, now: float) -> int:
        """Remove idle and expired sessions now; return how many went."""
        gone = 0
        for sid, sess in list(self.sessions.items()):
            if now >= sess.expires:
                self.counters["sessions_expired_token"] += 1
            elif now - sess.last_active >= self.idle_s:
                self.counters["sessions_expired_idle"] += 1
            else:
                continue
            del self.sessions[sid]
            gone += 1
        self._next_sweep = now + self.sweep_s if self.sessions else None
        return gone

    def stats(self) -> dict:
        return {
            "sessions": len(self.sessions),
            "max_sessions": self.max_sessions,
            "bound_sides": sum(s.bound(0) + s.bound(1) for s in self.sessions.values()),
            "ratelimit_sources": len(self.ratelimit),
            "queued": len(self._out),
            "drops": dict(self.drops),
            "counters": dict(self.counters),
        }

    def session_status(self, now: float) -> list[dict]:
        return [s.status(now) for s in self.sessions.values()]

    # --- handlers ------------------------------------------------------------------

    def _receive_data(self, data, session_id: int, key: tuple, addr, now: float) -> None:
        if len(data) <= wire.HEADER_BYTES:
            raise ParseError("relay DATA: empty payload")
        sess = self.sessions.get(session_id)
        if sess is None:
            self._error(addr, session_id, wire.RelayErrorCode.UNKNOWN_SESSION, now)
            raise RemoteProtocolError("DATA for an unknown relay session", reason="unknown_session")
        side = sess.side_of(key)
        if side is None:
            self._error(addr, session_id, wire.RelayErrorCode.UNKNOWN_SESSION, now)
            raise RemoteProtocolError("DATA from an address not bound to the session", reason="not_bound")
        if now >= sess.expires:
            del self.sessions[session_id]
            self.counters["sessions_expired_token"] += 1
            self._error(addr, session_id, wire.RelayErrorCode.EXPIRED, now)
            raise ReplayError("relay session past its token expiry", reason="relay_expired")
        sess.last_active = now
        self.sessions.move_to_end(session_id)
        dest = sess.addrs[1 - side]
        if dest is None:
            raise RemoteProtocolError("the other side is not bound yet", reason="peer_not_bound")
        n = len(data)
        sess.packets_relayed[side] += 1
        sess.bytes_relayed[side] += n
        self.counters["relayed_packets"] += 1
        self.counters["relayed_bytes"] += n
        self._push(data if isinstance(data, bytes) else bytes(data), dest)

    def _receive_bind(self, pkt: wire.RelayPacket, key: tuple, addr, now: float) -> None:
        sid = pkt.session_id
        try:
            side = verify_token(self._key, sid, pkt.token, now)
        except AuthenticationError:
            self._error(addr, sid, wire.RelayErrorCode.BAD_TOKEN, now)
            raise
        except ReplayError:
            self._error(addr, sid, wire.RelayErrorCode.EXPIRED, now)
            raise
        sess = self.sessions.get(sid)
        if sess is None:
            if len(self.sessions) >= self.max_sessions and not self._evict_one(now):
                self._error(addr, sid, wire.RelayErrorCode.TABLE_FULL, now)
                raise RemoteProtocolError("relay session table full", reason="table_full")
            sess = RelaySession(sid, created=now, last_active=now)
            self.sessions[sid] = sess
            self.counters["sessions_created"] += 1
            if self._next_sweep is None:
                self._next_sweep = now + self.sweep_s
        other = 1 - side
        if sess.keys[other] == key:
            sess.addrs[other] = sess.keys[other] = None
            self.counters["bind_took_address"] += 1
        peer_newly_bound = sess.keys[side] is None
        if sess.keys[side] is not None and sess.keys[side] != key:
            self.counters["roamed"] += 1
        sess.addrs[side] = addr
        sess.keys[side] = key
        sess.side_expires[side] = max(sess.side_expires[side], token_expires(pkt.token))
        sess.binds += 1
        sess.last_active = now
        self.sessions.move_to_end(sid)
        self.counters["binds"] += 1
        self._push(wire.encode_bound(sid, side, sess.bound(other), sess.expires), addr)
        self.counters["bound_sent"] += 1
        if peer_newly_bound and sess.bound(other):
            self._push(wire.encode_bound(sid, other, True, sess.expires), sess.addrs[other])
            self.counters["bound_sent"] += 1

    # --- helpers ------------------------------------------------------------------

    def _evict_one(self, now: float) -> bool:
        """Make room by evicting the least recently active session if it is idle or expired."""
        sid, oldest = next(iter(self.sessions.items()))
        if now - oldest.last_active >= self.idle_s or now >= oldest.expires:
            del self.sessions[sid]
            self.counters["sessions_evicted"] += 1
            return True
        return False

    def _answer_ratelimited(self, data, addr, now: float) -> None:
        try:
            _, sid = wire.peek_header(data)
        except ParseError:
            return  # not ours: never answered
        if len(data) < wire.ERROR_BYTES:
            return  # the answer would be larger than the question
        self._error(addr, sid, wire.RelayErrorCode.RATE_LIMITED, now)

    def _error(self, addr, session_id: int, code: int, now: float) -> None:
        """Answer an ERROR (13 bytes, never more than what it answers), at most once a second per source."""
        if self.error_limit.allow(addr[0], now) and self.error_total.allow(None, now):
            self._push(wire.encode_error(session_id, code), addr)
            self.counters["errors_sent"] += 1
        else:
            self.counters["errors_suppressed"] += 1

    def _push(self, datagram: bytes, addr) -> None:
        if len(self._out) >= self.max_queued:
            self._out.popleft()
            self.drops["out_queue_full"] += 1
        self._out.append((datagram, addr))
