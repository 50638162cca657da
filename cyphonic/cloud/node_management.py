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

Several instances (``cluster.Cluster``; docs/cloud.md, "Several instances"):
every registration is also written to the store with the instance that holds
it, so an instance that is asked for a route to a node registered elsewhere
finds it there (while that instance is alive). The route is owned by the
instance A asked (its tag is in the route id); the responder is still told
first, through its own instance: the owner PUSHes the direction over the bus,
that instance sends it on its control session and passes the answer back.
Route confirmations and relay requests that reach an instance which does not
own the route are FORWARDed to the owner, and its answer comes back the same
way. Relays are picked per route among the live TRS instances; when one dies
the owner moves its relayed routes to another and pushes the new direction to
both ends.
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
from ..wire import bus as wire_bus
from .cache import TimedCache
from .cluster import ROUTE_TAG_SHIFT, Cluster, route_owner
from .relay_token import mint_token
from .store import Identity, Store, StoreError
from .store_runtime import RegistrationRecord

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
    instance: str = ""          # "" here; else the instance that holds the node's control session


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
    relay_instance: str = ""             # the TRS instance the relay session is at ("" from config)
    relay_eps: dict = field(default_factory=dict)   # family -> sig.Endpoint of that TRS


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


def _ep_text(e: sig.Endpoint) -> str:
    return f"[{e.host}]:{e.port}" if ":" in e.host else f"{e.host}:{e.port}"


def _ep_parse(text: str) -> sig.Endpoint:
    host, _, port = text.rpartition(":")
    return sig.Endpoint(host.strip("[]"), int(port))


class NodeManagementService:
    def __init__(self, store: Store, server: ControlServer, trust: TrustStore, *,
                 relay_key: bytes | None, relay_endpoints: dict[int, sig.Endpoint],
                 registration_lifetime_s: float, keepalive_interval_s: int,
                 log=lambda line: None, rng: random.Random | None = None,
                 cluster: Cluster | None = None) -> None:
        self.store = store
        self.cluster = cluster
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
        # Several instances: requests we PUSHed to another instance's node (key -> route id),
        # PUSHes we carry for another instance ((node, our request id) -> (instance, key)),
        # node requests we FORWARDed to a route's owner (key -> the node's Incoming), and the
        # relayed routes we own (kept as long as their tokens, to move them off a dead TRS).
        self._bus_keys = 0
        self._pushed: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self._carried: OrderedDict[tuple[bytes, int], tuple[str, int]] = OrderedDict()
        self._forwarded: OrderedDict[int, Incoming] = OrderedDict()
        self.relayed: OrderedDict[int, Route] = OrderedDict()
        self._shared = False      # registrations written to the store (other NMS instances alive)
        self._targets = TimedCache(CC.IDENTITY_CACHE_S, CC.IDENTITY_CACHE_MAX)   # route targets
        self._written: dict[bytes, tuple] = {}    # what our row in the store says, per node
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
                self.unpublish(inc.peer_static)
            return None
        if reg is None:
            return sig.Error(code=E.NOT_REGISTERED, text="register first")
        if isinstance(msg, sig.Keepalive):
            return self._keepalive(inc, reg, now)
        if isinstance(msg, sig.RouteRequest):
            return self._route_request(inc, reg, now)
        if isinstance(msg, (sig.RouteConfirm, sig.RelayAllocate)) and self._elsewhere(msg.route_id, now):
            return self._forward(inc, now)
        if isinstance(msg, sig.RouteConfirm):
            self._route_confirm(msg, reg, now)
            return None
        if isinstance(msg, sig.RelayAllocate):
            return self._relay_allocate(msg, reg, now)
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
            self.unpublish(evicted.static)
            self.counters["registrations_evicted"] += 1
            self.log(f"registration evicted node={evicted.identity.fqdn} (table full)")
        reg = Registration(identity, inc.peer_static, inc.certificate, observed, local, nat,
                           now + self.lifetime_s, frozenset(families))
        self.registrations[inc.peer_static] = reg
        self.counters["registrations"] += 1
        self._publish(reg, now)
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
            self._publish(reg, now)
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
        # Cached like the requester's own identity (a revocation applies within IDENTITY_CACHE_S,
        # and the revoked serials are re-read every few seconds anyway): one query less per route.
        if vip:
            target = self._targets.get(("vip", vip), now, lambda: self.store.get_identity_by_vip(vip))
        else:
            target = self._targets.get(("fqdn", fqdn), now, lambda: self.store.get_identity_by_fqdn(fqdn))
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
            b = self._remote_registration(target, now)
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
        route = Route(self._new_route_id(), route_type, a, b, inc, now)
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
        if not self._request_node(route.b, direction_b, route.route_id, now):
            self.routes.pop(route.route_id, None)
            return sig.Error(code=E.PEER_UNREACHABLE, text=f"{route.b.identity.fqdn} has no control session")
        self.counters[f"routes_{route.route_type.name.lower()}"] += 1
        self.log(f"route {route.route_type.name} from={route.a.identity.fqdn} to={route.b.identity.fqdn} "
                 f"id={route.route_id}")
        return None

    def _mint_relay(self, route: Route, now: float, *, avoid: str = "") -> sig.Message | None:
        """A new relay session for the route, at a live TRS that serves both ends' families
        (picked by the session id among the live ones, so routes spread over relays); the
        configured relay endpoints when the cluster knows no TRS (one process, unit tests)."""
        fa = _family(route.a.observed.host)
        fb = _family(route.b.observed.host)
        if self.relay_key is None:
            return sig.Error(code=E.RELAY_UNAVAILABLE, text="no relay key")
        session_id = self.rng.getrandbits(64) or 1
        relays = self.cluster.live_relays(now) if self.cluster is not None else []
        fitting = [r for r in relays if fa in r.endpoints and fb in r.endpoints and r.instance_id != avoid]
        if fitting:
            pick = fitting[session_id % len(fitting)]
            route.relay_instance, route.relay_eps = pick.instance_id, dict(pick.endpoints)
        elif not relays and fa in self.relay_endpoints and fb in self.relay_endpoints:
            route.relay_instance, route.relay_eps = "", dict(self.relay_endpoints)
        else:
            return sig.Error(code=E.RELAY_UNAVAILABLE, text="no relay for these address families")
        route.relay_session_id = session_id
        self.counters["relay_grants"] += 1
        if self.cluster is not None and route_owner(route.route_id) == self.cluster.tag:
            self.relayed[route.route_id] = route
            self.relayed.move_to_end(route.route_id)
            while len(self.relayed) > CC.MAX_ROUTES:
                self.relayed.popitem(last=False)
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
            relay_ep = route.relay_eps[fam]
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
        if self._carried_answer(event.peer_static, event.request.request_id, event.msg, now):
            return
        route_id = self._server_requests.pop((event.peer_static, event.request.request_id), None)
        self._answered(route_id, event.msg, now)

    def _answered(self, route_id: int | None, msg: sig.Message, now: float) -> None:
        """The responder answered the direction we sent it (here, or through its instance)."""
        route = self.routes.get(route_id) if route_id is not None else None
        if route is None:
            return
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
        if self._carried_answer(event.peer_static, event.request.request_id, None, now):
            return
        route_id = self._server_requests.pop((event.peer_static, event.request.request_id), None)
        self._silent(route_id, now)

    def _silent(self, route_id: int | None, now: float) -> None:
        route = self.routes.pop(route_id, None) if route_id is not None else None
        if route is not None and route.request is not None:
            self.server.reply(route.request, sig.Error(code=E.PEER_UNREACHABLE,
                                                       text=f"{route.b.identity.fqdn} did not answer"), now)
            self.log(f"route failed: responder silent from={route.a.identity.fqdn} to={route.b.identity.fqdn}")

    def _route_confirm(self, msg: sig.RouteConfirm, reg: Registration, now: float) -> None:
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

    def _relay_allocate(self, msg: sig.RelayAllocate, reg: Registration, now: float) -> sig.Message:
        route = self.routes.get(msg.route_id) or self.relayed.get(msg.route_id)
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
            self._request_node(self._locate(reg, now), self._direction(route, for_a=for_a), route.route_id, now)
        return None

    # --- several instances (cluster.Cluster) ----------------------------------------------

    def _new_route_id(self) -> int:
        tag = self.cluster.tag if self.cluster is not None else 0
        return (tag << ROUTE_TAG_SHIFT) | (self.rng.getrandbits(ROUTE_TAG_SHIFT) or 1)

    def _record(self, reg: Registration, now: float) -> RegistrationRecord:
        return RegistrationRecord(reg.static, self.cluster.instance_id, _ep_text(reg.observed),
                                  tuple(_ep_text(e) for e in reg.local), reg.nat, reg.certificate, now)

    def _publish(self, reg: Registration, now: float) -> None:
        """Write where the node is to the store, for the other instances (not on keepalives).
        An instance alone keeps its registrations to itself (no write per registration; what
        one process on SQLite registers is bounded by it otherwise) and shares them all at once
        when another NMS instance appears (``cluster_tick``)."""
        if self.cluster is None:
            return
        if not self._shared and not self.cluster.others_alive(now):
            return
        record = self._record(reg, now)
        same = (record.observed, record.local, record.nat, record.certificate)
        if self._shared and self._written.get(reg.static) == same:
            return     # the row says this already (a move elsewhere would have told us: MOVED)
        try:
            before = self.store.get_registration(reg.static)
            if not self._shared:
                self._share(True, now)           # all our rows, this one with them; then as usual
            if before is not None and before.instance_id != self.cluster.instance_id and \
                    self.cluster.alive(before.instance_id, now):
                # It was registered at another live instance (it moved here while that one was
                # unreachable for it): that instance must not answer for it from a stale entry.
                self.cluster.send(before.instance_id, wire_bus.Kind.MOVED, 0, reg.static, None, now)
            self.store.put_registration(record)
            self._written[reg.static] = same
        except StoreError as exc:
            self.counters["registrations_unpublished"] += 1
            self.log(f"registration of node={reg.identity.fqdn} not shared with other instances: {exc}")

    def unpublish(self, static: bytes) -> None:
        self._written.pop(static, None)
        if self.cluster is None or not self._shared:
            return
        try:
            self.store.drop_registration(static, self.cluster.instance_id)
        except StoreError as exc:
            self.counters["registrations_unpublished"] += 1
            self.log(f"registration row not removed: {exc}")

    def _remote_registration(self, target: Identity, now: float) -> Registration | None:
        """The node's registration at another live instance, from the store."""
        if self.cluster is None:
            return None
        rec = self.store.get_registration(target.static_public)
        if rec is None or rec.instance_id == self.cluster.instance_id or \
                not self.cluster.alive(rec.instance_id, now):
            return None
        try:
            observed = _ep_parse(rec.observed)
            local = tuple(_ep_parse(t) for t in rec.local)
        except ValueError:
            self.counters["registrations_unreadable"] += 1
            return None
        families = {_family(e.host) for e in local} | {_family(observed.host)}
        return Registration(target, rec.static_public, rec.certificate, observed, local, rec.nat,
                            now + self.lifetime_s, frozenset(families), instance=rec.instance_id)

    def _locate(self, reg: Registration, now: float) -> Registration:
        """Where the node is now (it may have moved to another instance since the route began)."""
        here = self.registrations.get(reg.static)
        if here is not None:
            return here
        try:
            there = self._remote_registration(reg.identity, now)
        except StoreError:
            there = None
        return there or reg

    def _request_node(self, reg: Registration, msg: sig.Message, route_id: int, now: float) -> bool:
        """Send a request to a node: on our control session, or PUSHed to its instance."""
        if not reg.instance or self.cluster is None or reg.instance == self.cluster.instance_id:
            sent = self.server.request(reg.static, msg, now)
            if sent is None:
                return False
            self._server_requests[(reg.static, sent.request_id)] = route_id
            return True
        self._bus_keys += 1
        key = self._bus_keys
        if not self.cluster.send(reg.instance, wire_bus.Kind.PUSH, key, reg.static, msg, now):
            return False
        self._pushed[key] = (route_id, reg.static, reg.instance)
        self.counters["pushed_to_instance"] += 1
        return True

    def _elsewhere(self, route_id: int, now: float) -> bool:
        """The route was minted by another instance that is alive (we cannot answer for it)."""
        if self.cluster is None or route_id in self.routes or route_id in self.relayed:
            return False
        owner = route_owner(route_id)
        if owner in (0, self.cluster.tag):
            return False
        rec = self.cluster.by_tag(owner)
        return rec is not None and self.cluster.alive(rec.instance_id, now)

    def _forward(self, inc: Incoming, now: float) -> sig.Message | None:
        owner = self.cluster.by_tag(route_owner(inc.msg.route_id))
        self._bus_keys += 1
        key = self._bus_keys
        if not self.cluster.send(owner.instance_id, wire_bus.Kind.FORWARD, key, inc.peer_static, inc.msg, now):
            return sig.Error(code=E.INTERNAL, text="cannot reach the route's instance")
        self.counters["forwarded_to_owner"] += 1
        if inc.msg.request_id:
            self._forwarded[key] = inc
        return None

    def on_bus(self, messages: list, now: float) -> None:
        for m in messages:
            sender = self.cluster.reply_to(m.sender)
            if m.kind == wire_bus.Kind.PUSH:
                self._carry(m, sender, now)
            elif m.kind == wire_bus.Kind.PUSH_RESULT:
                entry = self._pushed.pop(m.key, None)
                if entry is None:
                    self.counters["bus_late_results"] += 1
                elif m.msg is None:
                    self._silent(entry[0], now)
                else:
                    self._answered(entry[0], m.msg, now)
            elif m.kind == wire_bus.Kind.FORWARD:
                self._owner_answers(m, sender, now)
            elif m.kind == wire_bus.Kind.HELLO:
                self.cluster._refresh_quietly(now)
                if not self._shared and self.cluster.others_alive(now):
                    self._share(True, now)
            elif m.kind == wire_bus.Kind.MOVED:
                self._written.pop(m.static, None)
                gone = self.registrations.pop(m.static, None)
                if gone is not None:
                    self.counters["registrations_moved_away"] += 1
                    self.log(f"node={gone.identity.fqdn} registered at another instance now")
            elif m.kind == wire_bus.Kind.FORWARD_RESULT:
                inc = self._forwarded.pop(m.key, None)
                if inc is not None and m.msg is not None:
                    self.server.reply(inc, m.msg, now)

    def _carry(self, m: wire_bus.BusMessage, sender: str | None, now: float) -> None:
        """Another instance asks us to send a request to a node whose session we hold."""
        if sender is None:
            self.counters["bus_unknown_sender"] += 1
            return
        sent = self.server.request(m.static, m.msg, now) if m.static in self.registrations else None
        if sent is None:
            self.cluster.send(sender, wire_bus.Kind.PUSH_RESULT, m.key, m.static, None, now)
            return
        self._carried[(m.static, sent.request_id)] = (sender, m.key)
        self.counters["carried_for_instance"] += 1

    def _carried_answer(self, static: bytes, request_id: int, msg: sig.Message | None, now: float) -> bool:
        entry = self._carried.pop((static, request_id), None)
        if entry is None:
            return False
        self.cluster.send(entry[0], wire_bus.Kind.PUSH_RESULT, entry[1], static, msg, now)
        return True

    def _owner_answers(self, m: wire_bus.BusMessage, sender: str | None, now: float) -> None:
        """A node's confirmation or relay request about one of our routes, via its instance."""
        route = self.routes.get(m.msg.route_id) or self.relayed.get(m.msg.route_id)
        reg = None
        if route is not None:
            reg = route.a if route.a.static == m.static else route.b if route.b.static == m.static else None
        reply: sig.Message | None
        if reg is None:
            self.counters["confirm_unknown_route"] += 1
            reply = sig.Error(code=E.BAD_MESSAGE, text="unknown route")
        elif isinstance(m.msg, sig.RouteConfirm):
            self._route_confirm(m.msg, reg, now)
            reply = None
        elif isinstance(m.msg, sig.RelayAllocate):
            reply = self._relay_allocate(m.msg, reg, now)
        else:
            reply = sig.Error(code=E.BAD_MESSAGE, text=f"{type(m.msg).__name__} cannot be forwarded")
        if m.msg.request_id and sender is not None and reply is not None:
            self.cluster.send(sender, wire_bus.Kind.FORWARD_RESULT, m.key, m.static, reply, now)

    def _share(self, on: bool, now: float) -> None:
        """Another NMS instance appeared (share every registration now, and each from now on),
        or the last one went (stop; the rows are replaced when one appears again)."""
        self._written.clear()
        if not on:
            self._shared = False
            return
        try:
            self.store.replace_registrations(self.cluster.instance_id,
                                             [self._record(r, now) for r in self.registrations.values()])
        except StoreError as exc:
            self.log(f"registrations not shared with the other instances yet: {exc}")
            return
        self._shared = True
        self.log(f"another instance is alive: {len(self.registrations)} registration(s) shared")

    def cluster_tick(self, now: float) -> None:
        """After each cluster refresh: give up on PUSHes to instances that died, and move our
        relayed routes off relays that died (new session at a live TRS, pushed to both ends)."""
        if self.cluster is None:
            return
        others = self.cluster.others_alive(now)
        if others != self._shared:
            self._share(others, now)
        for key, (route_id, _static, target) in list(self._pushed.items()):
            if not self.cluster.alive(target, now):
                del self._pushed[key]
                self._silent(route_id, now)
        for route in list(self.relayed.values()):
            if not route.relay_instance or self.cluster.relay_alive(route.relay_instance, now):
                continue
            dead = route.relay_instance
            err = self._mint_relay(route, now, avoid=dead)
            if err is not None:
                self.log(f"relay {dead} is gone and no other serves route id={route.route_id}: {err.text}")
                self.relayed.pop(route.route_id, None)
                continue
            self.counters["relay_moves"] += 1
            self.log(f"relay {dead} is gone: route id={route.route_id} moves to {route.relay_instance}")
            for for_a, reg in ((True, route.a), (False, route.b)):
                self._request_node(self._locate(reg, now), self._direction(route, for_a=for_a),
                                   route.route_id, now)

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
                self.unpublish(static)
        for rid, route in list(self.relayed.items()):
            if now - route.created >= CC.RELAY_TOKEN_LIFETIME_S:
                del self.relayed[rid]
        for table in (self._pushed, self._carried, self._forwarded):
            while len(table) > CC.MAX_ROUTES:
                table.popitem(last=False)
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
