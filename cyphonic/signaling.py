"""The Signaling Module: a node's side of the conversation with the cloud, sans-IO.

The paper's Signaling Module, used as it is by the node daemon and by the
adapter (once for itself and once per general node). It drives login
(Authentication Service), registration and keepalives (Node Management
Service), route requests, route directions pushed by the cloud, and relay
requests, over ``cyphonic.control`` channels (one per cloud address; the AS
and the NMS may share one).

Life cycle::

    IDLE --start--> LOGGING_IN --LoginResponse--> REGISTERING --RegisterResponse--> READY
      LOGGING_IN --token/identity refused--> FAILED      (the operator must act)
      any --cloud silent (keepalive or request timed out)--> RECONNECTING --next try--> LOGGING_IN

After a cloud restart the cloud has no session for us: our keepalive times out,
we handshake, log in again (by key) and re-register, by ourselves. The
certificate is renewed by a fresh login at two thirds of its lifetime.

Getting back (the recovery target: logged in again within 5 s of the cloud's
return). From the start and from the first failure until the link is ready, the
client tries again on a timer: RECONNECT_MIN_S, doubling to RECONNECT_MAX_S (to
ENROLL_RETRY_MAX_S while it has no certificate (after ENROLL_FAST_S of tries every
ENROLL_FAST_RETRY_S), or once the cloud answered with a
refusal), each wait drawn from the lower half of its value so that links that
failed together spread out. A try starts a control handshake unless one is under
way or the cloud answered one since the last failure, and sends the login (or
registration) unless it is out. Meanwhile the channel resends its initiation at
least as often as that cap (``ControlClient.retry_cap_s``) and does not abandon
it. A handshake the cloud answers is acted on at once: the queued login goes out
with the session, and if none was out one is sent then. So a node that has
logged in before is back within about RECONNECT_MAX_S of the cloud's return, for
as long as the outage lasts, sending one initiation every 1.25 to 2.5 s meanwhile.

Several cloud instances (issue 13: each serves AS+NMS on its own address, all share the
signaling key, the CA and the database, so any of them takes our login and registration).
The client is given their addresses in a list and uses one at a time, starting with the
first. With more than one:
- it notices silence fast: its keepalive goes every FAILOVER_PROBE_S (not the cloud's 25 s),
  and a keepalive, login, registration or relay request unanswered for FAILOVER_SILENT_S is
  silence (``ControlClient.request(timeout_s=...)``). Route requests are not timed so: the
  cloud answers one only once the peer accepted;
- when the instance in use goes silent (never on a refusal: an instance that answers is
  alive, and the usual back-off applies there), it moves to the next one in the list at once
  (event ``InstanceMoved``): a control handshake, a login by key (the token is never sent
  again once we hold a certificate), a registration. Its channel to the silent instance is
  closed (``ControlClient.close``): nothing it sent is resent, and nothing late from it is taken;
- route requests outstanding at the silent instance fail at once with RouteFailed
  (PEER_UNREACHABLE, naming the instance), rather than hanging for 31 s; the caller asks
  again (the node daemon's next DNS query or packet does) and the new instance answers;
- moving on is immediate until every instance was found silent since the link was last
  ready (a whole round); from then on each move waits the back-off above
  (RECONNECT_MIN_S .. RECONNECT_MAX_S), and ``CloudLost`` is emitted once;
- tunnels are not the client's business: nothing here touches them, and the engine keeps
  its device and peers across a move.
With one instance (a single address, or the AS and NMS apart) nothing of this applies: the
timers and the behaviour are the ones above.
"""

from __future__ import annotations

import enum
import random
from collections import Counter, deque
from dataclasses import dataclass

from . import constants as C
from .control import Connected, ControlClient, Incoming, Reply, RequestTimedOut, Unreachable
from .errors import LocalProtocolError
from .handshake import StaticIdentity
from .wire import cert as wire_cert
from .wire import signaling as sig

E = sig.ErrorCode
FATAL_LOGIN_CODES = {E.TOKEN_UNKNOWN, E.TOKEN_EXPIRED, E.TOKEN_USED, E.REVOKED, E.UNAUTHENTICATED}
KEEPALIVE_RETRIES = 2


class State(enum.Enum):
    IDLE = "idle"
    LOGGING_IN = "logging in"
    REGISTERING = "registering"
    READY = "ready"
    RECONNECTING = "reconnecting"
    FAILED = "failed"


# --- events -----------------------------------------------------------------------

@dataclass(frozen=True)
class LoggedIn:
    fqdn: str
    vip4: str
    prefix_len: int
    domain: str
    certificate: bytes
    enrolled: bool          # True when this login consumed the enrollment token
    clock_offset_s: float = 0.0   # the cloud's clock minus ours, at this login (Signaling.clock_offset_s)


@dataclass(frozen=True)
class LoginFailed:
    code: sig.ErrorCode
    text: str


@dataclass(frozen=True)
class Registered:
    observed: sig.Endpoint
    nat: bool


@dataclass(frozen=True)
class RouteReady:
    """The cloud's answer to our route request: what to do to reach ``peer_fqdn``."""
    peer_fqdn: str
    direction: sig.RouteDirection


@dataclass(frozen=True)
class RouteFailed:
    peer_fqdn: str
    code: sig.ErrorCode
    text: str


@dataclass(frozen=True)
class DirectionPushed:
    """The cloud tells us about a route another node asked for (we are its responder, or the
    route changed to the relay). Answer with ``answer_direction``."""
    direction: sig.RouteDirection
    incoming: Incoming


@dataclass(frozen=True)
class RelayGranted:
    grant: sig.RelayGrant


@dataclass(frozen=True)
class Notified:
    msg: sig.Notify


@dataclass(frozen=True)
class CloudLost:
    reason: str


@dataclass(frozen=True)
class InstanceMoved:
    """The cloud instance in use went silent: the client moves to the next one (``host:port``
    texts). ``round_failed``: every instance was silent since the link was last ready, so this
    move waits the back-off (an edge that resolved a DNS name may resolve it again now)."""
    old: str
    new: str
    reason: str
    round_failed: bool

    def __str__(self) -> str:
        return f"cloud instance {self.old} silent; moving to {self.new}"


def address_text(addr) -> str:
    """``host:port`` (``[v6]:port``) of a cloud address as the status shows it."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def instance_list(addrs) -> tuple:
    """One address (a ``(host, port)`` tuple) or a list of them: the instances, in order,
    each once."""
    if isinstance(addrs, list) or (isinstance(addrs, tuple) and addrs
                                   and all(isinstance(a, (tuple, list)) for a in addrs)):
        out: list = []
        for a in addrs:
            a = tuple(a)
            if a not in out:
                out.append(a)
        return tuple(out)
    return (addrs,)


class SignalingClient:
    """``as_addr``: the cloud's address, or a list of the addresses of its instances (see the
    module's docstring). ``nms_addr``: a separate NMS, with a single cloud address only."""

    def __init__(self, identity: StaticIdentity, cloud_static: bytes, as_addr, nms_addr=None, *,
                 token: bytes = b"", name_hint: str = "", software: str = "cyphonic/0.1",
                 local_endpoints: tuple[sig.Endpoint, ...] = (), rng: random.Random | None = None,
                 spread: bool = True) -> None:
        self.identity = identity
        self.cloud_static = cloud_static
        self.instances = instance_list(as_addr)
        if not self.instances:
            raise LocalProtocolError("no cloud address")
        if nms_addr is not None and len(self.instances) > 1:
            raise LocalProtocolError("a separate NMS address needs a single cloud address")
        self._split_nms = nms_addr is not None
        # The instance to start at: with several, one picked by our key, so that nodes given
        # the same list spread over the instances (``spread=False``: the first listed).
        self._spread = spread
        self._index = self._first_index()           # the instance in use
        self.as_addr = self.instances[self._index]
        self.nms_addr = nms_addr or self.as_addr
        self._hops = 0                              # instances found silent since the link was last ready
        self._announced_lost = False                # CloudLost emitted for this outage
        self.token = token
        self.name_hint = name_hint
        self.software = software
        self.local_endpoints = tuple(local_endpoints)[:C.MAX_ENDPOINTS]
        self.rng = rng or random.SystemRandom()
        self.drops: Counter = Counter()   # control datagrams from addresses that are not the cloud; answers of the wrong kind
        self.state = State.IDLE
        self.channels: dict = {}
        # every control handshake's timestamp is above this (cyphonic.timestamp_floor; the engine sets it)
        self.timestamp_floor_ns = 0
        self._events: deque = deque()
        self._requests: dict[int, str] = {}        # request id -> what it was for
        self._route_requests: dict[int, str] = {}  # request id -> peer fqdn
        self.login_info: LoggedIn | None = None
        # The cloud's clock minus ours, learned at each login (its LoginResponse carries its
        # time, inside the authenticated channel): certificates are checked, and renewed, on the
        # cloud's time, since it is the cloud that sets their validity. A Pi without a real-time
        # clock and without NTP is behind by every hour it was off (docs/protocol.md 3.2).
        self.clock_offset_s = 0.0
        self.registration: Registered | None = None
        self._keepalive_at: float | None = None
        self._keepalive_s = 25.0
        self._relogin_at: float | None = None
        self._reconnect_at: float | None = None   # the next try; None while ready (or idle, failed)
        self._retries = 0                          # tries since the link was last ready: the wait doubles
        self._alive_since = 0.0                    # a control session older than this is not trusted
        self._refused = False                      # the cloud answered, with a refusal: no need to hurry
        self._started_at = 0.0                     # start(): an enrolling node tries fast at first
        self.last_error: str = ""
        self._sent_token = False

    # --- channels ---------------------------------------------------------------

    def _channel(self, addr) -> ControlClient:
        ch = self.channels.get(addr)
        if ch is None:
            ch = ControlClient(self.identity, self.cloud_static, addr, rng=self.rng,
                               timestamp_floor_ns=self.timestamp_floor_ns)
            self.channels[addr] = ch
        return ch

    def owns(self, addr) -> bool:
        return addr in self.channels

    def _first_index(self) -> int:
        if not self._spread or len(self.instances) < 2:
            return 0
        return int.from_bytes(self.identity.public[:4], "big") % len(self.instances)

    @property
    def several(self) -> bool:
        """More than one cloud instance: the fast probe and moving on apply."""
        return len(self.instances) > 1

    def _request(self, addr, msg: sig.Message, now: float, **kw) -> sig.Message:
        """A request to the cloud; with several instances it times out after FAILOVER_SILENT_S."""
        timeout_s = C.FAILOVER_SILENT_S if self.several else None
        return self._channel(addr).request(msg, now, timeout_s=timeout_s, **kw)

    def _live_channels(self) -> list[ControlClient]:
        """The channels of the instance in use (with one instance: every channel)."""
        if not self.several:
            return list(self.channels.values())
        ch = self.channels.get(self.as_addr)
        return [ch] if ch is not None else []

    def datagrams_to_send(self) -> list:
        out = []
        for ch in self.channels.values():
            out.extend(ch.datagrams_to_send())
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    def _emit(self, event) -> None:
        if len(self._events) >= C.MAX_EVENTS_QUEUED:
            self._events.popleft()
        self._events.append(event)

    # --- life cycle -----------------------------------------------------------------

    def start(self, now: float) -> None:
        self._alive_since = now
        self._started_at = now
        self._attempt(now)

    def _login(self, now: float) -> None:
        self.state = State.LOGGING_IN
        token = b"" if self.login_info is not None or self.identity.certificate else self.token
        self._sent_token = bool(token)
        msg = sig.LoginRequest(token=token, name_hint=self.name_hint, static_public=self.identity.public,
                               software=self.software)
        sent = self._request(self.as_addr, msg, now)
        self._requests[sent.request_id] = "login"

    def _register(self, now: float) -> None:
        self.state = State.REGISTERING if self.state != State.READY else State.READY
        flags = 0
        for e in self.local_endpoints:
            flags |= sig.REGISTER_HAS_IPV6 if ":" in e.host else sig.REGISTER_HAS_IPV4
        sent = self._request(self.nms_addr, sig.RegisterRequest(local_endpoints=self.local_endpoints,
                                                                flags=flags), now)
        self._requests[sent.request_id] = "register"

    def set_local_endpoints(self, endpoints, now: float) -> None:
        """Our addresses changed (roaming): re-register from the new path; the virtual IP stays."""
        self.local_endpoints = tuple(endpoints)[:C.MAX_ENDPOINTS]
        if self.state in (State.READY, State.REGISTERING):
            for ch in self._live_channels():
                ch.set_cloud_address(ch.peer.addr, now)  # new path: new handshake from the new address
            self._register(now)

    def request_route(self, peer_fqdn: str, now: float) -> int:
        sent = self._channel(self.nms_addr).request(sig.RouteRequest(peer_fqdn=peer_fqdn), now)
        self._route_requests[sent.request_id] = peer_fqdn
        return sent.request_id

    def confirm_route(self, route_id: int, ok: bool, path_type: sig.RouteType,
                      endpoint: sig.Endpoint | None, now: float) -> None:
        self._channel(self.nms_addr).notify(sig.RouteConfirm(
            route_id=route_id, result=sig.RouteResult.OK if ok else sig.RouteResult.FAILED,
            path_type=path_type, endpoint=endpoint), now)

    def answer_direction(self, pushed: DirectionPushed, accepted: bool, now: float,
                         code: sig.ErrorCode | None = None) -> None:
        self._channel(self.nms_addr).reply(pushed.incoming, sig.TunnelResponse(
            route_id=pushed.direction.route_id, accepted=accepted, code=None if accepted else code), now)

    def request_relay(self, route_id: int, peer_fqdn: str, now: float) -> None:
        sent = self._request(self.nms_addr, sig.RelayAllocate(route_id=route_id, peer_fqdn=peer_fqdn), now)
        self._requests[sent.request_id] = "relay"

    def stop(self, now: float) -> None:
        """Deregister (best effort: one notification, no retransmission)."""
        if self.state == State.READY:
            self._channel(self.nms_addr).notify(sig.Deregister(), now)
        self.state = State.IDLE
        self._reconnect_at = None

    # --- input ------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        ch = self.channels.get(addr)
        if ch is None:
            for c in self.channels.values():  # the cloud answered from another address of its own
                if c.peer.addr is not None and c.peer.addr[:2] == tuple(addr)[:2]:
                    ch = c
                    break
        if ch is None:
            self.drops["unknown_source"] += 1
            return
        ch.receive_datagram(data, addr, now)
        self._drain(ch, now)

    def _drain(self, ch: ControlClient, now: float) -> None:
        # A move to another instance closes ``ch`` (its events go with it): the loop ends there.
        while (e := ch.next_event()) is not None:
            if isinstance(e, Reply):
                self._on_reply(e, now)
            elif isinstance(e, Incoming):
                self._on_incoming(ch, e, now)
            elif isinstance(e, RequestTimedOut):
                self._on_timeout(e, now)
            elif isinstance(e, Unreachable):
                self._lost(f"cloud at {e.addr} unreachable", now)
            elif isinstance(e, Connected):
                self._on_connected(ch, now)

    def _on_reply(self, e: Reply, now: float) -> None:
        rid = e.request.request_id
        msg = e.msg
        what = self._requests.pop(rid, None)
        peer = self._route_requests.pop(rid, None)
        if peer is not None:
            if isinstance(msg, sig.RouteDirection):
                self._emit(RouteReady(peer, msg))
            elif isinstance(msg, sig.Error):
                self._emit(RouteFailed(peer, msg.code, msg.text))
                if msg.code == E.NOT_REGISTERED:
                    self._register(now)
            else:
                # Never leave a route request unanswered: whoever waits for it (the engine, a
                # held DNS query) would wait for ever.
                self.drops["unexpected_answer"] += 1
                self._emit(RouteFailed(peer, E.BAD_MESSAGE, f"the cloud answered with {type(msg).__name__}"))
            return
        if what == "login":
            self._on_login(msg, now)
        elif what == "register":
            if isinstance(msg, sig.RegisterResponse):
                self.state = State.READY
                self.last_error = ""           # ready again: what went wrong before is over
                self._reconnect_at = None
                self._retries = 0
                self._refused = False
                self._hops = 0
                self._announced_lost = False
                for ch in self.channels.values():
                    ch.retry_cap_s = None          # rekeys keep the channel's own schedule
                # Several instances: probe the one in use often enough to move within seconds.
                self._keepalive_s = (C.FAILOVER_PROBE_S if self.several
                                     else max(1.0, float(msg.keepalive_interval_s)))
                self._keepalive_at = now + self._keepalive_s
                self.registration = Registered(msg.observed, msg.nat == sig.NatType.NAT)
                self._emit(self.registration)
            elif isinstance(msg, sig.Error):
                self.last_error = f"registration refused: {msg.code.name} {msg.text}"
                if msg.code in (E.CERT_INVALID, E.UNAUTHENTICATED):
                    self._login(now)
                else:
                    self._lost(self.last_error, now, refused=True)
        elif what == "keepalive":
            if isinstance(msg, sig.KeepaliveAck):
                if self.registration is not None and msg.observed != self.registration.observed:
                    self.registration = Registered(msg.observed, self.registration.nat)
                    self._emit(self.registration)
            elif isinstance(msg, sig.Error) and msg.code in (E.NOT_REGISTERED, E.UNAUTHENTICATED, E.CERT_INVALID):
                self._login(now) if msg.code != E.NOT_REGISTERED else self._register(now)
        elif what == "relay":
            if isinstance(msg, sig.RelayGrant):
                self._emit(RelayGranted(msg))
            elif isinstance(msg, sig.Error):
                self._emit(RouteFailed("", msg.code, msg.text))

    def _on_login(self, msg: sig.Message, now: float) -> None:
        if isinstance(msg, sig.Error):
            self.last_error = f"login refused: {msg.code.name} ({sig.ERROR_TEXTS.get(msg.code, '')}) {msg.text}"
            if msg.code in FATAL_LOGIN_CODES:
                self.state = State.FAILED
                self._reconnect_at = None
                self._emit(LoginFailed(msg.code, msg.text))
            else:
                self._lost(self.last_error, now, refused=True)
            return
        if not isinstance(msg, sig.LoginResponse):
            self._lost("unexpected answer to login", now, refused=True)
            return
        cert = wire_cert.decode(msg.certificate)
        enrolled = self._sent_token
        self._sent_token = False
        self.identity = self.identity.with_certificate(msg.certificate)
        if cert.not_before <= msg.cloud_time <= cert.not_after:
            self.clock_offset_s = msg.cloud_time - now
        elif msg.cloud_time:    # a broken clock at the cloud: the certificate it sent is a better witness
            self.drops["cloud_time_implausible"] += 1
        self.login_info = LoggedIn(msg.fqdn, str(msg.vip4), msg.prefix_len, msg.overlay_domain,
                                   msg.certificate, enrolled, self.clock_offset_s)
        self.token = b""  # used up: never send it again
        self._emit(self.login_info)
        lifetime = min(cert.not_after - cert.not_before, max(60.0, cert.not_after - (now + self.clock_offset_s)))
        self._relogin_at = now + lifetime * 2 / 3
        for ch in self.channels.values():
            ch.set_identity(self.identity)
        nms = self._channel(self.nms_addr)
        nms.set_cloud_address(self.nms_addr, now)  # handshake again so the NMS sees our certificate
        self._alive_since = now
        self._register(now)

    def _on_incoming(self, ch: ControlClient, e: Incoming, now: float) -> None:
        msg = e.msg
        if isinstance(msg, sig.RouteDirection):
            self._emit(DirectionPushed(msg, e))
        elif isinstance(msg, sig.Notify):
            self._emit(Notified(msg))
            if msg.kind == sig.NotifyKind.REVOKED:
                self.state = State.FAILED
                self._reconnect_at = None
                self._emit(LoginFailed(E.REVOKED, msg.detail))
            elif msg.kind == sig.NotifyKind.REREGISTER:
                self._register(now)

    def _on_timeout(self, e: RequestTimedOut, now: float) -> None:
        rid = e.request.request_id
        self._requests.pop(rid, None)
        peer = self._route_requests.pop(rid, None)
        if peer is not None:
            self._emit(RouteFailed(peer, E.PEER_UNREACHABLE, "the cloud did not answer"))
        self._lost(f"the cloud did not answer {type(e.request).__name__}", now)

    def _lost(self, reason: str, now: float, refused: bool = False) -> None:
        """The way up or the ready link failed: try again on the timer. ``refused``: the cloud
        answered (a non-final error: rate limited, internal), so its session is alive and the
        tries may back off as far as ENROLL_RETRY_MAX_S; otherwise it went silent."""
        if self.state == State.FAILED:
            return
        if not refused and self.several and self.state != State.IDLE:
            self._move(reason, now)
            return
        self.last_error = reason
        if refused:
            self._refused = True
        else:
            self._alive_since = now           # the cloud went silent: whatever session we had is suspect
        if self._reconnect_at is not None:
            return  # already trying again on a timer: more timeouts of the old session change nothing
        was_ready = self.state == State.READY
        self.state = State.RECONNECTING
        self._keepalive_at = None
        self._reconnect_at = now + self._retry_wait(now)
        if was_ready:
            self._emit(CloudLost(reason))

    def _move(self, reason: str, now: float) -> None:
        """The instance in use went silent: close its channel, fail the route requests it
        holds, and go to the next instance, at once unless a whole round of them failed."""
        old = self.as_addr
        ch = self.channels.get(old)
        if ch is not None:
            ch.close()
        old_text = address_text(old)
        for peer in self._route_requests.values():
            self._emit(RouteFailed(peer, E.PEER_UNREACHABLE, f"cloud instance {old_text} went silent"))
        self._route_requests.clear()
        self._requests.clear()            # they were all at the silent instance
        self._index = (self._index + 1) % len(self.instances)
        self.as_addr = self.nms_addr = self.instances[self._index]
        self._hops += 1
        round_failed = self._hops >= len(self.instances)
        self.last_error = f"cloud instance {old_text} silent ({reason})"
        self.state = State.RECONNECTING
        self._keepalive_at = None
        self._alive_since = now
        moved = InstanceMoved(old_text, address_text(self.as_addr), reason, round_failed)
        self._emit(moved)
        if round_failed:
            if not self._announced_lost:
                self._announced_lost = True
                self._emit(CloudLost(f"every cloud instance silent (last: {old_text}, {reason})"))
            self._reconnect_at = now + self._retry_wait(now)
        else:
            # The next try is the login's own timeout (a move); this timer is only a safety net.
            self._attempt(now, wait=2 * C.FAILOVER_SILENT_S)

    def set_instances(self, addrs, now: float) -> None:
        """The cloud's addresses changed (the edge resolved its name again, after a whole
        round failed). The instance in use stays if it is still listed; otherwise the next try
        goes to the one our key picks (or the first listed, without spreading)."""
        new = instance_list(list(addrs))
        if not new or new == self.instances:
            return
        if self._split_nms and len(new) > 1:
            raise LocalProtocolError("a separate NMS address needs a single cloud address")
        self.instances = new
        if self.as_addr in new:
            self._index = new.index(self.as_addr)
            return
        ch = self.channels.get(self.as_addr)
        if ch is not None and not self._split_nms:
            ch.close()
        was_ready = self.state == State.READY
        self._index = self._first_index()
        self.as_addr = new[self._index]
        if not self._split_nms:
            self.nms_addr = self.as_addr
        self._requests.clear()
        for peer in self._route_requests.values():
            self._emit(RouteFailed(peer, E.PEER_UNREACHABLE, "the cloud's addresses changed"))
        self._route_requests.clear()
        if was_ready or self.state in (State.LOGGING_IN, State.REGISTERING):
            self.state = State.RECONNECTING
            self._keepalive_at = None
            self._attempt(now)

    # --- getting back -----------------------------------------------------------------------

    def _retry_wait(self, now: float) -> float:
        """The wait before the next try: doubling from RECONNECT_MIN_S to the cap, drawn from
        [1 - RECONNECT_JITTER, 1] of that so that links which failed together spread out."""
        base = min(self._cap(now), C.RECONNECT_MIN_S * 2 ** self._retries)
        self._retries = min(self._retries + 1, 16)
        return base * (1.0 - C.RECONNECT_JITTER * self.rng.random())

    def _cap(self, now: float) -> float:
        """The short cap is for a silent cloud that a node with a certificate waits to come back.
        A node enrolling (no certificate yet) tries every ENROLL_FAST_RETRY_S for its first
        ENROLL_FAST_S: the operator is waiting for it, and under a flood of initiations only a
        fraction of any node's get through the cloud's full intake queue, so first contact is a
        matter of tries (docs/protocol.md 4.10); after that it backs off to ENROLL_RETRY_MAX_S,
        so a wrong address is not hammered."""
        if self._refused:
            return C.ENROLL_RETRY_MAX_S
        if self.identity.certificate:
            return C.RECONNECT_MAX_S
        if now - self._started_at < C.ENROLL_FAST_S:
            return C.ENROLL_FAST_RETRY_S
        return C.ENROLL_RETRY_MAX_S

    def _step(self) -> tuple[object, str]:
        """The channel and the request the way up waits for now."""
        if self.state == State.REGISTERING:
            return self.nms_addr, "register"
        return self.as_addr, "login"

    def _attempt(self, now: float, wait: float | None = None) -> None:
        """One try: a handshake unless one is under way (the channel resends it, at least every
        RECONNECT_MAX_S meanwhile) or the cloud answered one since the last failure, the login
        (or registration) unless it is out already, and the next try after the wait."""
        addr, what = self._step()
        ch = self._channel(addr)
        ch.retry_cap_s = self._cap(now)
        if ch.handshake is None and not (ch.connected and ch.peer.created >= self._alive_since):
            ch.set_cloud_address(ch.peer.addr, now)
            self._alive_since = now
        if what not in self._requests.values():
            self._login(now) if what == "login" else self._register(now)
        self._reconnect_at = now + (self._retry_wait(now) if wait is None else wait)

    def _on_connected(self, ch: ControlClient, now: float) -> None:
        """The cloud answered a handshake: while trying to get back, do not wait for the next
        try. A login or registration waiting for this session already went out with it."""
        if self._reconnect_at is None or self.state not in (State.RECONNECTING, State.LOGGING_IN,
                                                            State.REGISTERING):
            return
        addr, what = self._step()
        if ch is self.channels.get(addr) and what not in self._requests.values():
            self._attempt(now)

    # --- timers ---------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        times = [t for t in (self._keepalive_at, self._relogin_at, self._reconnect_at) if t is not None]
        times += [t for ch in self.channels.values() if (t := ch.get_timer()) is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for ch in list(self.channels.values()):
            t = ch.get_timer()
            if t is not None and t <= now:
                ch.handle_timer(now)
                self._drain(ch, now)
        if self._reconnect_at is not None and now >= self._reconnect_at:
            if self.state in (State.RECONNECTING, State.LOGGING_IN, State.REGISTERING):
                self._attempt(now)
            else:
                self._reconnect_at = None
        if self._keepalive_at is not None and now >= self._keepalive_at and self.state == State.READY:
            self._keepalive_at = now + self._keepalive_s
            if "keepalive" not in self._requests.values():  # one outstanding keepalive at a time
                # Few retries: a silent cloud is noticed within about 7 s and we reconnect.
                # With several instances it is the probe: unanswered for FAILOVER_SILENT_S, we move.
                sent = self._request(self.nms_addr, sig.Keepalive(), now, retries=KEEPALIVE_RETRIES)
                self._requests[sent.request_id] = "keepalive"
        if self._relogin_at is not None and now >= self._relogin_at and self.state == State.READY:
            self._relogin_at = None
            sent = self._request(self.as_addr, sig.LoginRequest(
                token=b"", name_hint=self.name_hint, static_public=self.identity.public,
                software=self.software), now)
            self._requests[sent.request_id] = "login"

    def link_health(self) -> tuple[str, str] | None:
        """The link's health as a ``cyphonic.health`` code and text, or None while ready. From
        the first failure (a request or keepalive unanswered, a login refused) until the link is
        ready again it is ``cloud-unreachable``, through every retry's logging in and
        registering, so that it does not flap between samples; ``connecting`` is only the first
        way up; ``login-failed`` is final (the operator must act)."""
        if self.state == State.READY:
            return None
        if self.state == State.FAILED:
            return "login-failed", self.last_error
        if self.last_error:
            return "cloud-unreachable", self.last_error
        return "connecting", f"cloud link: {self.state.value}"

    def status(self) -> dict:
        return {"state": self.state.value, "fqdn": self.login_info.fqdn if self.login_info else None,
                "vip4": self.login_info.vip4 if self.login_info else None,
                "observed": (f"{self.registration.observed.host}:{self.registration.observed.port}"
                             if self.registration else None),
                "nat": self.registration.nat if self.registration else None,
                "instance": address_text(self.as_addr),
                "instances": [address_text(a) for a in self.instances],
                # the cloud's clock minus ours (None until a login told it)
                "clock_offset_s": round(self.clock_offset_s, 1) if self.login_info else None,
                "last_error": self.last_error}
