"""The Node Management Service (NMS): registrations, NAT detection and route selection.

Registration: a node reports its local endpoints; the NMS sees the source
address and port the request came from (the observed endpoint). If the
observed endpoint is not among the local ones, a NAT sits in between.
Registrations expire without keepalives; a re-registration from a new
address (roaming) replaces the old one and the virtual IP stays.

Route selection for initiator A asking for responder B (docs/cloud.md):
policy first (REFUSED on deny), then

| situation                                           | route      | who initiates |
|-----------------------------------------------------|------------|---------------|
| no common address family (IPv4 meets IPv6)          | RELAY      | A, via TRS    |
| both behind NAT with the same public address        | LOCAL      | A -> B local  |
| B reachable (no NAT at B)                           | DIRECT     | A -> B        |
| only B behind NAT                                   | REVERSED   | B -> A        |
| both behind NAT                                     | HOLE_PUNCH | both at once  |
| punching (or direct) reported failed                | RELAY      | A, via TRS    |

The responder is told first, over its registered path, with a RouteDirection
(a cloud request, retransmitted on loss); when it accepts, the initiator gets
its RouteDirection as the answer to its RouteRequest. A route not answered in
ROUTE_PENDING_S is answered PEER_UNREACHABLE.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from .. import constants as C
from ..certs import TrustStore
from ..control import ControlServer, Incoming, Reply, RequestTimedOut
from ..errors import CertificateError
from ..wire import signaling as sig
from . import constants as CC
from . import policy as pol
from .relay_token import mint_token
from .store import Identity, Store

E = sig.ErrorCode


@dataclass
class Registration:
    identity: Identity
    static: bytes
    certificate: bytes
    observed: sig.Endpoint
    local: tuple[sig.Endpoint, ...]
    nat: bool
    expires: float
    families: frozenset[int]


@dataclass
class Route:
    route_id: int
    route_type: sig.RouteType
    a: Registration
    b: Registration
    request: Incoming | None         # A's RouteRequest, answered when B accepts
    created: float
    relay_session_id: int = 0
    confirmed: dict = field(default_factory=dict)


def vip_from_ptr_name(name: str) -> str | None:
    """``2.0.64.100.in-addr.arpa`` -> ``100.64.0.2``: a node asks for a peer by virtual IP this
    way when a packet, not a DNS query, brings the tunnel up."""
    if not name.endswith(".in-addr.arpa"):
        return None
    parts = name[: -len(".in-addr.arpa")].split(".")
    try:
        return str(ipaddress.IPv4Address(".".join(reversed(parts))))
    except ValueError:
        return None


def _family(host: str) -> int:
    return 6 if ":" in host else 4


def _endpoint_of(addr) -> sig.Endpoint:
    return sig.Endpoint(str(ipaddress.ip_address(addr[0])), int(addr[1]))


class NodeManagementService:
    def __init__(self, store: Store, server: ControlServer, trust: TrustStore, *,
                 relay_key: bytes | None, relay_endpoints: dict[int, sig.Endpoint],
                 registration_lifetime_s: float, keepalive_interval_s: int,
                 log=lambda line: None, rng: random.Random | None = None) -> None:
        self.store = store
        self.server = server
        self.trust = trust
        self.relay_key = relay_key
        self.relay_endpoints = relay_endpoints
        self.lifetime_s = registration_lifetime_s
        self.keepalive_s = max(1, int(keepalive_interval_s))
        self.log = log
        # Route and relay session ids need to be unique, not secret: a seeded PRNG (no system call each)
        self.rng = rng or random.Random()  # seeded from the OS entropy source
        self.registrations: OrderedDict[bytes, Registration] = OrderedDict()
        self.routes: OrderedDict[int, Route] = OrderedDict()
        # (node static key, cloud request id) -> route id. Request ids are counted per node,
        # so the id alone would cross two nodes' answers.
        self._server_requests: dict[tuple[bytes, int], int] = {}
        self._verified: OrderedDict[bytes, tuple[bytes, object]] = OrderedDict()  # static -> (cert, parsed)
        self.counters: Counter = Counter()
        self._next_sweep = 0.0
        self._policy_cache: dict | None = None

    # --- policy -----------------------------------------------------------------

    def policy(self) -> dict:
        if self._policy_cache is None:
            self._policy_cache = self.store.get_policy() or dict(pol.DEFAULT_POLICY)
        return self._policy_cache

    def policy_changed(self) -> None:
        self._policy_cache = None

    # --- dispatch -----------------------------------------------------------------

    def handle(self, inc: Incoming, identity: Identity, now: float) -> sig.Message | None:
        """Answer one NMS message from an authenticated, non-revoked identity (None: no answer now)."""
        msg = inc.msg
        if isinstance(msg, sig.RegisterRequest):
            return self._register(inc, identity, now)
        reg = self.registrations.get(inc.peer_static)
        if isinstance(msg, sig.Deregister):
            if self.registrations.pop(inc.peer_static, None) is not None:
                self.log(f"deregistered node={identity.fqdn}")
            return None
        if reg is None:
            return sig.Error(code=E.NOT_REGISTERED, text="register first")
        if isinstance(msg, sig.Keepalive):
            return self._keepalive(inc, reg, now)
        if isinstance(msg, sig.RouteRequest):
            return self._route_request(inc, reg, now)
        if isinstance(msg, sig.RouteConfirm):
            self._route_confirm(inc, reg, now)
            return None
        if isinstance(msg, sig.RelayAllocate):
            return self._relay_allocate(inc, reg, now)
        return sig.Error(code=E.BAD_MESSAGE, text=f"{type(msg).__name__} is not an NMS request")

    # --- registration -------------------------------------------------------------

    def _register(self, inc: Incoming, identity: Identity, now: float) -> sig.Message:
        try:
            self._verify_session_cert(inc, identity, now)
        except CertificateError as exc:
            return sig.Error(code=E.CERT_INVALID, text=f"log in again: {exc}"[:200])
        observed = _endpoint_of(inc.addr)
        local = tuple(inc.msg.local_endpoints)
        nat = observed not in local
        families = {_family(e.host) for e in local} | {_family(observed.host)}
        old = self.registrations.pop(inc.peer_static, None)
        if old is None and len(self.registrations) >= CC.MAX_REGISTRATIONS:
            _, evicted = self.registrations.popitem(last=False)
            self.counters["registrations_evicted"] += 1
            self.log(f"registration evicted node={evicted.identity.fqdn} (table full)")
        reg = Registration(identity, inc.peer_static, inc.certificate, observed, local, nat,
                           now + self.lifetime_s, frozenset(families))
        self.registrations[inc.peer_static] = reg
        self.counters["registrations"] += 1
        if old is None or old.observed != observed:
            self.log(f"registered node={identity.fqdn} vip={identity.vip4} observed={observed.host}:"
                     f"{observed.port} nat={'yes' if nat else 'no'}" + (" (moved)" if old else ""))
        return sig.RegisterResponse(observed=observed, nat=sig.NatType.NAT if nat else sig.NatType.NONE,
                                    keepalive_interval_s=self.keepalive_s, lifetime_s=int(self.lifetime_s))

    def _keepalive(self, inc: Incoming, reg: Registration, now: float) -> sig.Message | None:
        observed = _endpoint_of(inc.addr)
        if observed != reg.observed:
            reg.observed = observed
            reg.nat = observed not in reg.local
            self.log(f"node moved node={reg.identity.fqdn} observed={observed.host}:{observed.port}")
        reg.expires = now + self.lifetime_s
        self.registrations.move_to_end(inc.peer_static)
        self.counters["keepalives"] += 1
        return sig.KeepaliveAck(observed=observed) if inc.msg.request_id else None

    def _verify_session_cert(self, inc: Incoming, identity: Identity, now: float) -> None:
        """The certificate the node's control handshake carried. The signature is checked once
        per certificate; validity and revocation every time (both are cheap)."""
        cached = self._verified.get(inc.peer_static)
        if cached is not None and cached[0] == inc.certificate:
            cert = cached[1]
            if cert.serial in self.trust.revoked or now - C.MAX_CLOCK_SKEW_S > cert.not_after \
                    or cert.fqdn != identity.fqdn:
                self._verified.pop(inc.peer_static, None)
                cached = None
        if cached is None:
            cert = self.trust.verify(inc.certificate, now, expected_static=inc.peer_static,
                                     expected_fqdn=identity.fqdn)
            self._verified[inc.peer_static] = (inc.certificate, cert)
            while len(self._verified) > CC.MAX_REGISTRATIONS:
                self._verified.popitem(last=False)

    # --- route selection ----------------------------------------------------------

    def select(self, a: Registration, b: Registration) -> sig.RouteType:
        if not (a.families & b.families):
            return sig.RouteType.RELAY
        if a.nat and b.nat and a.observed.host == b.observed.host:
            return sig.RouteType.LOCAL
        if _family(a.observed.host) != _family(b.observed.host):
            return sig.RouteType.RELAY  # the observed paths differ in family: only the relay joins them
        if not b.nat:
            return sig.RouteType.DIRECT
        if not a.nat:
            return sig.RouteType.REVERSED
        return sig.RouteType.HOLE_PUNCH

    def _route_request(self, inc: Incoming, a: Registration, now: float) -> sig.Message | None:
        fqdn = inc.msg.peer_fqdn
        vip = vip_from_ptr_name(fqdn)
        target = self.store.get_identity_by_vip(vip) if vip else self.store.get_identity_by_fqdn(fqdn)
        if target is None or target.revoked:
            self.counters["routes_unknown_peer"] += 1
            return sig.Error(code=E.UNKNOWN_PEER, text=f"no node {fqdn}")
        subject = lambda i: pol.Subject(i.name, i.fqdn, tuple(i.groups))  # noqa: E731
        if not pol.allowed(self.policy(), subject(a.identity), subject(target)):
            self.counters["routes_denied"] += 1
            self.log(f"route denied by policy from={a.identity.fqdn} to={fqdn}")
            return sig.Error(code=E.POLICY_DENIED, text=f"policy forbids {a.identity.fqdn} -> {fqdn}")
        b = self.registrations.get(target.static_public)
        if b is None or b.expires < now:
            self.counters["routes_unreachable"] += 1
            return sig.Error(code=E.PEER_UNREACHABLE, text=f"{fqdn} is not registered")
        if b.static == a.static:
            return sig.Error(code=E.BAD_MESSAGE, text="a route to oneself")
        route_type = self.select(a, b)
        if len(self.routes) >= CC.MAX_ROUTES:
            _, old = self.routes.popitem(last=False)
            self.counters["routes_evicted"] += 1
            if old.request is not None:  # never leave an initiator without an answer
                self.server.reply(old.request, sig.Error(code=E.PEER_UNREACHABLE, text="cloud busy"), now)
        route = Route(self.rng.getrandbits(63) or 1, route_type, a, b, inc, now)
        self.routes[route.route_id] = route
        return self._direct_responder(route, now)

    def _direct_responder(self, route: Route, now: float) -> sig.Message | None:
        """Tell B first; A is answered when B accepts."""
        if route.route_type == sig.RouteType.RELAY:
            err = self._mint_relay(route, now)
            if err is not None:
                self.routes.pop(route.route_id, None)
                return err
        direction_b = self._direction(route, for_a=False)
        sent = self.server.request(route.b.static, direction_b, now)
        if sent is None:
            self.routes.pop(route.route_id, None)
            return sig.Error(code=E.PEER_UNREACHABLE, text=f"{route.b.identity.fqdn} has no control session")
        self._server_requests[(route.b.static, sent.request_id)] = route.route_id
        self.counters[f"routes_{route.route_type.name.lower()}"] += 1
        self.log(f"route {route.route_type.name} from={route.a.identity.fqdn} to={route.b.identity.fqdn} "
                 f"id={route.route_id}")
        return None

    def _mint_relay(self, route: Route, now: float) -> sig.Message | None:
        fa = _family(route.a.observed.host)
        fb = _family(route.b.observed.host)
        if self.relay_key is None or fa not in self.relay_endpoints or fb not in self.relay_endpoints:
            return sig.Error(code=E.RELAY_UNAVAILABLE, text="no relay for these address families")
        route.relay_session_id = self.rng.getrandbits(64) or 1
        self.counters["relay_grants"] += 1
        return None

    def _direction(self, route: Route, *, for_a: bool) -> sig.RouteDirection:
        me, peer = (route.a, route.b) if for_a else (route.b, route.a)
        t = route.route_type
        if for_a:
            role = sig.Role.RESPONDER if t == sig.RouteType.REVERSED else sig.Role.INITIATOR
        else:
            role = sig.Role.INITIATOR if t == sig.RouteType.REVERSED else sig.Role.RESPONDER
        if t == sig.RouteType.LOCAL:
            endpoints = peer.local
        elif t == sig.RouteType.RELAY:
            endpoints = ()
        else:
            endpoints = (peer.observed,) + tuple(e for e in peer.local if e != peer.observed and
                                                  _family(e.host) == _family(peer.observed.host))
        relay_ep, token = None, b""
        if t == sig.RouteType.RELAY:
            fam = _family(me.observed.host)
            relay_ep = self.relay_endpoints[fam]
            side = 0 if for_a else 1
            token = mint_token(self.relay_key, route.relay_session_id, side,
                               int(route.created + CC.RELAY_TOKEN_LIFETIME_S))
        return sig.RouteDirection(route_id=route.route_id, route_type=t, role=role,
                                  peer_fqdn=peer.identity.fqdn,
                                  peer_vip4=ipaddress.IPv4Address(peer.identity.vip4),
                                  peer_certificate=peer.certificate,
                                  peer_endpoints=tuple(endpoints[:C.MAX_ENDPOINTS]),
                                  relay_endpoint=relay_ep, relay_session_id=route.relay_session_id,
                                  relay_token=token, expires_s=int(CC.ROUTE_PENDING_S))

    def on_reply(self, event: Reply, now: float) -> None:
        route_id = self._server_requests.pop((event.peer_static, event.request.request_id), None)
        route = self.routes.get(route_id) if route_id is not None else None
        if route is None:
            return
        msg = event.msg
        if route.request is None:  # a pushed (fallback) direction was acknowledged
            return
        if isinstance(msg, sig.TunnelResponse) and msg.accepted:
            self.server.reply(route.request, self._direction(route, for_a=True), now)
            route.request = None
        else:
            code = msg.code if isinstance(msg, sig.TunnelResponse) and msg.code else E.PEER_UNREACHABLE
            self.server.reply(route.request, sig.Error(code=code, text=f"{route.b.identity.fqdn} refused"), now)
            self.routes.pop(route.route_id, None)
            self.log(f"route refused by responder from={route.a.identity.fqdn} to={route.b.identity.fqdn}")

    def on_timeout(self, event: RequestTimedOut, now: float) -> None:
        route_id = self._server_requests.pop((event.peer_static, event.request.request_id), None)
        route = self.routes.pop(route_id, None) if route_id is not None else None
        if route is not None and route.request is not None:
            self.server.reply(route.request, sig.Error(code=E.PEER_UNREACHABLE,
                                                       text=f"{route.b.identity.fqdn} did not answer"), now)
            self.log(f"route failed: responder silent from={route.a.identity.fqdn} to={route.b.identity.fqdn}")

    def _route_confirm(self, inc: Incoming, reg: Registration, now: float) -> None:
        msg = inc.msg
        route = self.routes.get(msg.route_id)
        if route is None or reg.static not in (route.a.static, route.b.static):
            self.counters["confirm_unknown_route"] += 1
            return
        route.confirmed[reg.static] = msg.result
        if msg.result == sig.RouteResult.OK:
            self.counters["routes_established"] += 1
            self.log(f"route established {msg.path_type.name} by={reg.identity.fqdn} id={route.route_id}")
            return
        if route.route_type == sig.RouteType.RELAY:
            self.counters["routes_failed"] += 1
            self.log(f"route failed over the relay id={route.route_id}")
            return
        self._fallback_to_relay(route, now, why=f"{route.route_type.name} failed")

    def _relay_allocate(self, inc: Incoming, reg: Registration, now: float) -> sig.Message:
        route = self.routes.get(inc.msg.route_id)
        if route is None or reg.static not in (route.a.static, route.b.static):
            return sig.Error(code=E.BAD_MESSAGE, text="unknown route")
        if route.route_type != sig.RouteType.RELAY:
            err = self._fallback_to_relay(route, now, why="relay asked for", requester=reg.static)
            if err is not None:
                return err
        d = self._direction(route, for_a=(reg.static == route.a.static))
        return sig.RelayGrant(route_id=route.route_id, relay_endpoint=d.relay_endpoint,
                              relay_session_id=route.relay_session_id, relay_token=d.relay_token,
                              expires_s=int(CC.RELAY_TOKEN_LIFETIME_S))

    def _fallback_to_relay(self, route: Route, now: float, *, why: str, requester: bytes | None = None):
        """Switch a route to the relay and push the new direction to both ends (or, when one
        end asked for the relay itself, to the other end only: the asker gets a RelayGrant)."""
        route.route_type = sig.RouteType.RELAY
        err = self._mint_relay(route, now)
        if err is not None:
            self.log(f"route cannot fall back to relay id={route.route_id}: {err.text}")
            return err
        self.log(f"route falls back to RELAY id={route.route_id} ({why})")
        route.request = None
        for for_a, reg in ((True, route.a), (False, route.b)):
            if reg.static == requester:
                continue
            sent = self.server.request(reg.static, self._direction(route, for_a=for_a), now)
            if sent is not None:
                self._server_requests[(reg.static, sent.request_id)] = route.route_id
        return None

    # --- timers ---------------------------------------------------------------------

    def get_timer(self) -> float | None:
        return self._next_sweep if (self.registrations or self.routes) else None

    def handle_timer(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + CC.REGISTRATION_SWEEP_S
        for static, reg in list(self.registrations.items()):
            if reg.expires < now:
                del self.registrations[static]
                self.counters["registrations_expired"] += 1
                self.log(f"registration expired node={reg.identity.fqdn}")
        for rid, route in list(self.routes.items()):  # oldest first
            if now - route.created < max(CC.ROUTE_KEEP_S, CC.ROUTE_PENDING_S):
                break
            del self.routes[rid]
            if route.request is not None:
                self.server.reply(route.request, sig.Error(code=E.PEER_UNREACHABLE,
                                                           text=f"{route.b.identity.fqdn} did not answer"), now)

    def status(self, now: float) -> list[dict]:
        return [{"fqdn": r.identity.fqdn, "vip4": r.identity.vip4,
                 "observed": f"{r.observed.host}:{r.observed.port}", "nat": r.nat,
                 "expires_in_s": round(r.expires - now, 1)} for r in self.registrations.values()]
