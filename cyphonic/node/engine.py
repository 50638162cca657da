"""A node's overlay engine, sans-IO: signaling + tunnels + relay paths on one UDP socket.

``NodeEngine`` joins the Signaling Module (``cyphonic.signaling``), the tunnel
device (``cyphonic.device``) and the relay framing (``cyphonic.wire.relay``)
and carries out the route directions of the NMS:

- asked to reach a peer (``resolve``, triggered by DNS), it requests a route;
  on the direction it installs the peer from the certificate the NMS handed
  out (checked against the pinned CA) and, as initiator, handshakes to the
  given endpoints (several at once when punching or on the same LAN);
- told by the cloud that a peer will come (``DirectionPushed``), it accepts,
  installs the peer, punches its NAT toward the peer's endpoints, or
  initiates itself (reversed route);
- a path that does not handshake within PATH_ATTEMPT_S is reported failed to
  the NMS, which pushes a relay direction to both ends; over the relay the
  peer's endpoint is a ``RelayPath`` and datagrams are wrapped in relay DATA;
- a relayed peer that later reaches us directly moves to the direct path
  by itself (the device moves an endpoint on any authenticated packet).

Zero trust: the device accepts initiations only from peers the cloud told us
about. Demultiplexing of one socket is by the first byte: 1, 2, 4 tunnel;
5 relay; 6, 7, 8 control channel; 9 punch.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass

from .. import constants as C
from .. import events as ev
from .. import signaling as sg
from ..certs import TrustStore
from ..device import Device
from ..errors import CyphonicError, ParseError
from ..handshake import StaticIdentity
from ..wire import cert as wire_cert
from ..wire import relay as wire_relay
from ..wire import signaling as sig

RT = sig.RouteType


@dataclass(frozen=True)
class RelayPath:
    """A peer endpoint that is a relay session at the TRS."""
    trs: tuple
    session_id: int

    def __str__(self) -> str:
        return f"relay {self.trs[0]}:{self.trs[1]}#{self.session_id:x}"


# --- events --------------------------------------------------------------------------

@dataclass(frozen=True)
class TunnelUp:
    fqdn: str
    vip4: str
    path: str           # "direct", "local", "punched", "reversed", "relay"
    endpoint: object


@dataclass(frozen=True)
class Resolved:
    """A peer asked for by virtual IP (``asked``, a PTR name) turned out to be ``fqdn``."""
    asked: str
    fqdn: str
    vip4: str


@dataclass(frozen=True)
class TunnelFailed:
    fqdn: str
    code: sig.ErrorCode
    text: str


@dataclass
class _Route:
    fqdn: str
    direction: sig.RouteDirection | None
    deadline: float | None
    relay: RelayPath | None = None
    asked: bool = True          # we asked (vs. the cloud told us)
    done: bool = False
    fell_back: bool = False     # the path failed and we asked the NMS for the relay
    resend_at: float | None = None  # next re-send of the outstanding initiation (path attempt)


def endpoint_tuple(e: sig.Endpoint) -> tuple:
    return (e.host, e.port)


class NodeEngine:
    def __init__(self, identity: StaticIdentity, ca_public: bytes, cloud_static: bytes, cloud_addr, *,
                 token: bytes = b"", name_hint: str = "", local_endpoints=(), nms_addr=None,
                 rng: random.Random | None = None, local_vip4s=None, spread: bool = True) -> None:
        self.rng = rng or random.SystemRandom()
        self.ca_public = ca_public
        self.signaling = sg.SignalingClient(identity, cloud_static, cloud_addr, nms_addr, token=token,
                                            name_hint=name_hint, local_endpoints=tuple(local_endpoints),
                                            rng=self.rng, spread=spread)
        self.trust = TrustStore.of(ca_public)
        self.device: Device | None = None
        self._local_vip4s = local_vip4s
        self._timestamp_floor_ns = 0
        self.routes: dict[str, _Route] = {}
        self._relay_binds: dict[RelayPath, tuple[bytes, float]] = {}  # path -> (token, next bind)
        self._punches: deque = deque()                                 # (when, data, addr)
        self._events: deque = deque()
        self._out: deque = deque()
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()

    # --- API ---------------------------------------------------------------------------

    def set_timestamp_floor(self, floor_ns: int) -> None:
        """Before ``start``: every handshake timestamp (to the cloud and to peers) is above
        ``floor_ns``, the reservation of the last run (``cyphonic.timestamp_floor``), so peers
        that remember the last run take them even if the clock went back."""
        self._timestamp_floor_ns = floor_ns
        self.signaling.timestamp_floor_ns = floor_ns

    def _offset_before_login(self, records, now: float) -> float:
        """Until a login tells the cloud's time: the clock is at least the latest ``not_before``
        of the certificates the CA signed that we hold (our own and our records' peers'), since
        the cloud issued each of them at that time or later. A clock behind that (no RTC, no
        NTP, no cloud) is moved up to it for certificate checks, so a restart without the cloud
        still takes back the peers it had. Never later than that: signed times cannot be
        inflated by a clock that was once ahead."""
        latest = 0.0
        certs = [self.signaling.identity.certificate]
        for rec in list(records)[:C.MAX_PEER_RECORDS]:
            try:
                certs.append(bytes.fromhex(rec["certificate"]))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
        for raw in certs:
            try:
                cert = wire_cert.decode(raw)
                self.trust.verify(cert, float(cert.not_before))       # (the CA's signature)
            except CyphonicError:
                continue
            latest = max(latest, float(cert.not_before))
        return max(0.0, latest - now)

    @property
    def ready(self) -> bool:
        return self.device is not None and self.signaling.state == sg.State.READY

    def start(self, now: float) -> None:
        self.signaling.start(now)

    def stop(self, now: float) -> None:
        self.signaling.stop(now)

    def resolve(self, fqdn: str, now: float) -> str | None:
        """Bring the tunnel to ``fqdn`` up. Returns its virtual IP if it is up already;
        otherwise TunnelUp or TunnelFailed follows."""
        if self.device is not None:
            peer = self.device.peer(fqdn)
            if peer is not None and peer.sendable(now) is not None:
                return str(peer.cert.vip4)
            if peer is not None and not self.ready and peer.endpoint is not None:
                # The cloud is away and we know this peer (a record from before a restart, or
                # a tunnel that lapsed): handshake straight to where it was.
                self.device.connect(fqdn, now)
                return str(peer.cert.vip4)
        route = self.routes.get(fqdn)
        if route is not None and not route.done:
            return None
        if len(self.routes) >= C.MAX_PENDING_RESOLVES:
            self._prune_routes()
        if not self.ready:
            self._emit(TunnelFailed(fqdn, sig.ErrorCode.NOT_REGISTERED, "not connected to the cloud"))
            return None
        # The deadline is a backstop: the request's own timeout (or an answer) ends the route
        # first. Without one, a route whose answer went astray would swallow every later
        # resolve of the name (resolve returns early while a route is pending).
        self.routes[fqdn] = _Route(fqdn, None, now + C.ROUTE_ANSWER_S)
        self.signaling.request_route(fqdn, now)
        return None

    # --- peer records: a restart without the cloud (docs/protocol.md 11.6) -----------------

    def peer_records(self) -> list[dict]:
        """What to keep on disk so that a restart while the cloud is down reaches the peers
        we had: per peer with a direct endpoint, its certificate (signed by the CA, so the
        cache needs no signature of its own) and that endpoint. Relayed peers are left out:
        a relay session needs a token from the NMS."""
        if self.device is None:
            return []
        out = []
        for peer in list(self.device.peers_by_fqdn.values())[:C.MAX_PEER_RECORDS]:
            ep = peer.endpoint
            if peer.handshakes and isinstance(ep, tuple) and len(ep) >= 2:
                out.append({"certificate": peer.cert.encode().hex(), "endpoint": [str(ep[0]), int(ep[1])]})
        return out

    def restore(self, records, now: float) -> int:
        """Before the first login: make the device from our cached certificate and add the
        peers of ``records`` (``peer_records`` of a previous run). Each record is verified
        again (the CA's signature, a certificate expired at most ``OUTAGE_CERT_GRACE_S``
        ago); a bad one is counted (``restore_refused``) and skipped. Returns how many
        peers came back. Until the cloud answers, ``resolve`` answers for them from here."""
        identity = self.signaling.identity
        if self.device is not None or not identity.certificate:
            return 0
        try:
            self.device = Device(identity, self.trust, accept_unknown_peers=False,
                                 local_vip4s=self._local_vip4s, rng=self.rng,
                                 timestamp_floor_ns=self._timestamp_floor_ns)
        except CyphonicError:
            self.drops["restore_own_certificate"] += 1
            return 0
        self.device.expired_grace_s = C.OUTAGE_CERT_GRACE_S
        self.device.clock_offset_s = self._offset_before_login(records, now)
        restored = 0
        for rec in list(records)[:C.MAX_PEER_RECORDS]:
            try:
                ep = rec.get("endpoint")
                endpoint = (str(ep[0]), int(ep[1])) if ep else None
                self.device.restore_peer(bytes.fromhex(rec["certificate"]), now, endpoint=endpoint,
                                         grace_s=C.OUTAGE_CERT_GRACE_S)
                restored += 1
            except (CyphonicError, KeyError, TypeError, ValueError, IndexError, AttributeError):
                self.drops["restore_refused"] += 1
        self.counters["peers_restored"] += restored
        return restored

    def send_packet(self, packet: bytes, now: float) -> None:
        if self.device is None:
            self.drops["tx_not_ready"] += 1
            return
        self.device.send_packet(packet, now)

    def set_local_endpoints(self, endpoints, now: float) -> None:
        """Our addresses changed (roaming): re-register, and tell every peer at once with an
        authenticated keepalive from the new address, so their packets follow us."""
        self.signaling.set_local_endpoints(endpoints, now)
        if self.device is not None:
            self.counters["roaming_keepalives"] += self.device.keepalive_all(now)
        for path in self._relay_binds:
            self._relay_binds[path] = (self._relay_binds[path][0], now)  # re-bind from the new address

    def datagrams_to_send(self) -> list:
        out = list(self._out)
        self._out.clear()
        out.extend(self.signaling.datagrams_to_send())
        if self.device is not None:
            for data, addr in self.device.datagrams_to_send():
                if isinstance(addr, RelayPath):
                    if len(data) > wire_relay.MAX_RELAY_PAYLOAD_BYTES:
                        self.drops["relay_oversize"] += 1
                        continue
                    out.append((wire_relay.encode_data(addr.session_id, data), addr.trs))
                else:
                    out.append((data, addr))
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    def _emit(self, e) -> None:
        if len(self._events) >= C.MAX_EVENTS_QUEUED:
            self._events.popleft()
            self.drops["event_queue_full"] += 1
        self._events.append(e)

    # --- input -------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        if not data:
            self.drops["empty"] += 1
            return
        t = data[0]
        if t in (6, 7, 8, 10):
            self.signaling.receive_datagram(data, addr, now)
        elif t in (1, 2, 3, 4):
            if self.device is None:
                self.drops["tunnel_before_login"] += 1
            else:
                self.device.receive_datagram(data, addr, now)
        elif t == wire_relay.MSG_RELAY:
            self._receive_relay(data, addr, now)
        elif t == C.MSG_PUNCH:
            self.counters["punches_received"] += 1
        else:
            self.drops["unknown_type"] += 1
        self._process(now)

    def _receive_relay(self, data: bytes, addr, now: float) -> None:
        try:
            pkt = wire_relay.decode(data)
        except ParseError as exc:
            self.drops["relay_" + exc.reason] += 1
            return
        path = RelayPath(tuple(addr)[:2], pkt.session_id)
        if path not in self._relay_binds:
            self.drops["relay_unknown_session"] += 1
            return
        if pkt.op == wire_relay.OP_DATA and self.device is not None:
            self.device.receive_datagram(pkt.inner, path, now)
        elif pkt.op == wire_relay.OP_BOUND:
            self.counters["relay_bound"] += 1
            for route in self.routes.values():
                if route.relay == path and route.direction is not None and \
                        route.direction.role == sig.Role.INITIATOR and not route.done:
                    self.device.connect(route.fqdn, now)
        elif pkt.op == wire_relay.OP_ERROR:
            self.counters["relay_errors"] += 1
            token, _ = self._relay_binds[path]
            self._relay_binds[path] = (token, now + 1.0)  # re-bind soon (e.g. the TRS restarted)

    # --- events from the parts --------------------------------------------------------------

    def _process(self, now: float) -> None:
        for _ in range(10_000):
            e = self.signaling.next_event()
            if e is None:
                break
            self._on_signaling(e, now)
        if self.device is not None:
            # Cloud down: known peers' expired certificates still rekey (docs/protocol.md 11.6).
            self.device.expired_grace_s = 0.0 if self.signaling.state == sg.State.READY else C.OUTAGE_CERT_GRACE_S
            while (e := self.device.next_event()) is not None:
                self._on_device(e, now)

    def _on_signaling(self, e, now: float) -> None:
        if isinstance(e, sg.LoggedIn):
            identity = self.signaling.identity
            if self.device is None:
                self.device = Device(identity, self.trust, accept_unknown_peers=False,
                                     local_vip4s=self._local_vip4s, rng=self.rng,
                                     timestamp_floor_ns=self._timestamp_floor_ns)
            else:
                self.device.set_identity(identity)  # a renewed certificate
            self.device.clock_offset_s = e.clock_offset_s   # certificates on the cloud's time
            self._emit(e)
        elif isinstance(e, sg.RouteReady):
            if e.peer_fqdn != e.direction.peer_fqdn:  # asked by virtual IP (a PTR name)
                self.routes.pop(e.peer_fqdn, None)
                self._emit(Resolved(e.peer_fqdn, e.direction.peer_fqdn, str(e.direction.peer_vip4)))
            self._apply_direction(e.direction, now, asked=True)
        elif isinstance(e, sg.RouteFailed):
            route = self.routes.get(e.peer_fqdn)
            if route is not None:
                route.done = True
            self._emit(TunnelFailed(e.peer_fqdn, e.code, e.text))
        elif isinstance(e, sg.DirectionPushed):
            ok = self._apply_direction(e.direction, now, asked=False)
            self.signaling.answer_direction(e, ok, now, code=None if ok else sig.ErrorCode.CERT_INVALID)
        else:
            self._emit(e)  # LoginFailed, Registered, CloudLost, Notified, RelayGranted

    def _apply_direction(self, d: sig.RouteDirection, now: float, *, asked: bool) -> bool:
        if self.device is None:
            return False
        try:
            endpoints = [endpoint_tuple(x) for x in d.peer_endpoints]
            relay = None
            if d.route_type == RT.RELAY:
                if d.relay_endpoint is None:
                    raise CyphonicError("relay direction without a relay endpoint")
                relay = RelayPath(endpoint_tuple(d.relay_endpoint), d.relay_session_id)
                endpoints = [relay]
            self.device.add_peer(d.peer_certificate, now, endpoint=endpoints[0] if endpoints else None,
                                 candidates=endpoints[1:], expected_fqdn=d.peer_fqdn,
                                 persistent_keepalive_s=C.NAT_KEEPALIVE_S if self._behind_nat() else 0.0)
        except CyphonicError as exc:
            self.drops["bad_direction"] += 1
            route = self.routes.get(d.peer_fqdn)
            if route is not None and not route.done:
                route.done, route.deadline = True, None   # failed: the next resolve asks again
            self._emit(TunnelFailed(d.peer_fqdn, sig.ErrorCode.CERT_INVALID, str(exc)))
            return False
        route = self.routes.get(d.peer_fqdn)
        if route is None or route.done:
            route = self.routes[d.peer_fqdn] = _Route(d.peer_fqdn, d, None, asked=asked)
        route.direction = d
        route.relay = relay
        route.done = False
        route.fell_back = False
        route.deadline = now + (C.REKEY_ATTEMPT_S if relay else C.PATH_ATTEMPT_S)
        if relay is not None:
            self._relay_binds[relay] = (d.relay_token, now)  # bind now; initiator connects on BOUND
        elif d.role == sig.Role.INITIATOR:
            self.device.connect(d.peer_fqdn, now)
            route.resend_at = now + C.PATH_RESEND_S
        if d.route_type == RT.HOLE_PUNCH and d.role == sig.Role.RESPONDER:
            for i in range(C.PUNCH_PACKETS):
                for addr in endpoints:
                    self._punches.append((now + i * C.PUNCH_SPACING_S, addr))
        return True

    def _behind_nat(self) -> bool:
        reg = self.signaling.registration
        return bool(reg and reg.nat)

    def _on_device(self, e, now: float) -> None:
        if isinstance(e, ev.HandshakeCompleted):
            route = self.routes.get(e.fqdn)
            path = "direct"
            if route is not None and route.direction is not None:
                t = route.direction.route_type
                path = {RT.DIRECT: "direct", RT.LOCAL: "local", RT.HOLE_PUNCH: "punched",
                        RT.REVERSED: "reversed", RT.RELAY: "relay"}[t]
                if isinstance(e.endpoint, RelayPath):
                    path = "relay"
                if not route.done:
                    route.done = True
                    route.deadline = None
                    if e.initiator or t == RT.REVERSED:
                        self.signaling.confirm_route(route.direction.route_id, True, t, None, now)
            self._emit(TunnelUp(e.fqdn, e.vip4, path, e.endpoint))
        elif isinstance(e, ev.HandshakeFailed):
            self._path_failed(e.fqdn, now, "no handshake answer")
        self._emit(e)

    def _path_failed(self, fqdn: str, now: float, why: str) -> None:
        route = self.routes.get(fqdn)
        if route is None or route.done or route.direction is None:
            return
        d = route.direction
        route.deadline = None
        if d.route_type == RT.RELAY:
            route.done = True
            self._emit(TunnelFailed(fqdn, sig.ErrorCode.PEER_UNREACHABLE, f"relay path failed: {why}"))
            return
        self.counters["paths_failed"] += 1
        # Report it; the NMS pushes a relay direction to both ends.
        self.signaling.confirm_route(d.route_id, False, d.route_type, None, now)
        route.fell_back = True
        route.deadline = now + C.PATH_ATTEMPT_S * 3   # the relay direction should come well before this

    def _resend_initiation(self, route: _Route, now: float) -> None:
        """While a path is being tried, send the same initiation again every PATH_RESEND_S: a
        lost one then costs half a second, and a NAT mapping being punched gets another packet.
        The responder takes the first copy that arrives and refuses the rest as replays."""
        route.resend_at = None
        if route.done or route.fell_back or self.device is None:
            return
        peer = self.device.peer(route.fqdn)
        if peer is None or peer.handshake is None or not peer.handshake.message:
            return
        targets = ([peer.endpoint] if peer.endpoint is not None else []) + list(peer.candidates)
        for addr in targets:
            self.device._push(peer.handshake.message, addr)
        self.counters["initiations_resent"] += 1
        # The peer sent us a cookie: it is under a flood, and a copy is lost in its full receive
        # queue with the flood's odds. Copies are cheap for us (no new key agreement) and count
        # against the per-source limit at the peer, so try more often.
        loaded = peer.cookie is not None and peer.cookie.valid(now)
        route.resend_at = now + (C.PATH_RESEND_UNDER_LOAD_S if loaded else C.PATH_RESEND_S)

    def _prune_routes(self) -> None:
        for fqdn in [f for f, r in self.routes.items() if r.done][: len(self.routes) // 2 + 1]:
            del self.routes[fqdn]

    # --- timers ----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        times = [t for t in (self.signaling.get_timer(), self.device.get_timer() if self.device else None)
                 if t is not None]
        times += [r.deadline for r in self.routes.values() if r.deadline is not None and not r.done]
        times += [r.resend_at for r in self.routes.values() if r.resend_at is not None and not r.done]
        times += [t for _, t in self._relay_binds.values()]
        if self._punches:
            times.append(self._punches[0][0])
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self.signaling.handle_timer(now)
        if self.device is not None:
            self.device.handle_timer(now)
        for fqdn, route in list(self.routes.items()):
            if route.resend_at is not None and now >= route.resend_at:
                self._resend_initiation(route, now)
            if route.deadline is not None and not route.done and now >= route.deadline:
                if route.direction is not None and route.direction.route_type != RT.RELAY \
                        and not route.fell_back:
                    self._path_failed(fqdn, now, "timed out")
                else:
                    route.done = True
                    route.deadline = None
                    self.counters["routes_unanswered" if route.direction is None else "paths_given_up"] += 1
                    self._emit(TunnelFailed(fqdn, sig.ErrorCode.PEER_UNREACHABLE,
                                            "no answer from the cloud" if route.direction is None
                                            else "no path to the peer"))
        for path, (token, when) in list(self._relay_binds.items()):
            if now >= when:
                self._out.append((wire_relay.encode_bind(path.session_id, token), path.trs))
                self._relay_binds[path] = (token, now + C.RELAY_BIND_EVERY_S)
        while self._punches and self._punches[0][0] <= now:
            _, addr = self._punches.popleft()
            self._out.append((bytes([C.MSG_PUNCH]) + self.rng.getrandbits(64).to_bytes(8, "big"), addr))
        self._process(now)

    def status(self, now: float) -> dict:
        out = {"signaling": self.signaling.status(), "drops": dict(self.drops), "counters": dict(self.counters)}
        if self.device is not None:
            out["device"] = self.device.status(now)
        return out
