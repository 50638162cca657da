"""The cloud's sans-IO core: one control channel serving the AS and the NMS.

``CloudCore`` takes datagrams and ``now`` and gives datagrams, log lines and
counters. It dispatches each authenticated signaling message to the
Authentication Service (logins) or the Node Management Service (everything a
registered node asks), answers errors with an ``ErrorCode``, and never lets a
message crash the process: a handler that fails answers INTERNAL, logs and is
counted. Every few seconds it re-reads revocations and the policy from the
store, so `cyphonic-cloud revoke` and `policy set` take effect in a running
process.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter, deque

from ..certs import TrustStore
from ..control import ControlServer, Incoming, Reply, RequestTimedOut
from ..wire import signaling as sig
from . import constants as CC
from .authentication import AuthenticationService
from .cache import TimedCache
from .cluster import Cluster
from .keys import CloudKeys
from .node_management import NodeManagementService
from .store import Store, StoreError

REFRESH_S = 5.0


class CloudCore:
    def __init__(self, *, store: Store, keys: CloudKeys, domain: str, prefix: str,
                 services: tuple[str, ...] = ("as", "nms"), cert_lifetime_s: float = 86400,
                 registration_lifetime_s: float = 120, keepalive_interval_s: int = 25,
                 relay_endpoints: dict[int, sig.Endpoint] | None = None,
                 rng: random.Random | None = None, cluster: Cluster | None = None) -> None:
        self.store = store
        self.cluster = cluster    # several instances on one database; None: this process alone
        self.keys = keys
        self.server = ControlServer(keys.signaling, rng=rng)
        self.trust = TrustStore.of(keys.ca.public, revoked=store.revoked_serials())
        self.logs: deque[str] = deque(maxlen=CC.MAX_LOG_LINES_QUEUED)
        self.counters: Counter = Counter()
        self.services = tuple(services)
        self.auth = AuthenticationService(store, keys.ca, domain=domain,
                                          prefix=ipaddress.IPv4Network(prefix),
                                          cert_lifetime_s=cert_lifetime_s) if "as" in services else None
        self.nms = NodeManagementService(store, self.server, self.trust, relay_key=keys.relay_key,
                                         relay_endpoints=relay_endpoints or {},
                                         registration_lifetime_s=registration_lifetime_s,
                                         keepalive_interval_s=keepalive_interval_s,
                                         log=self.log, rng=rng, cluster=cluster) if "nms" in services else None
        self._next_refresh = 0.0
        self._last_db_log = -1e9
        self._identities = TimedCache(CC.IDENTITY_CACHE_S, CC.IDENTITY_CACHE_MAX)

    def log(self, line: str) -> None:
        self.logs.append(line)

    # --- I/O edge API ----------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        self.server.receive_datagram(data, addr, now)
        self._process(now)

    def datagrams_to_send(self) -> list:
        return self.server.datagrams_to_send()

    def get_timer(self) -> float | None:
        times = [t for t in (self.server.get_timer(), self.nms.get_timer() if self.nms else None,
                             self._next_refresh, self.cluster.get_timer() if self.cluster else None)
                 if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self.server.handle_timer(now)
        if self.cluster is not None:
            poll, refreshed = self.cluster.handle_timer(now)
            if refreshed and self.nms is not None:
                self.nms.cluster_tick(now)
            if poll:
                self.read_bus(now)
        if self.nms is not None:
            self.nms.handle_timer(now)
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_S
            self.refresh(now)
        self._process(now)

    def read_bus(self, now: float) -> None:
        """Read what other instances sent us (the edge calls this on a NOTIFY; SQLite polls)."""
        if self.cluster is None:
            return
        messages = self.cluster.receive(now)
        if messages and self.nms is not None:
            try:
                self.nms.on_bus(messages, now)
            except Exception as exc:  # no-throw boundary, as for datagrams
                self.counters["internal_errors"] += 1
                self.log(f"internal error handling the bus: {type(exc).__name__}: {exc}")
        self._process(now)

    def refresh(self, now: float) -> None:
        """Pick up revocations and policy changes made by the admin CLI (later, if the database
        is away now)."""
        try:
            revoked = self.store.revoked_serials()
        except StoreError:
            self.counters["database_unavailable"] += 1
            return
        if revoked != self.trust.revoked:
            self.trust.revoked = set(revoked)
            if self.nms is not None:
                for static, reg in list(self.nms.registrations.items()):
                    ident = self.store.get_identity(static)
                    if ident is None or ident.revoked:
                        del self.nms.registrations[static]
                        self.nms.unpublish(static)
                        self.server.notify(static, sig.Notify(kind=sig.NotifyKind.REVOKED, fqdn=reg.identity.fqdn,
                                                              detail="identity revoked"), now)
                        self.log(f"revoked node={reg.identity.fqdn}: registration removed")
        if self.nms is not None:
            self.nms.policy_changed()

    # --- dispatch ------------------------------------------------------------------------

    def _process(self, now: float) -> None:
        while (event := self.server.next_event()) is not None:
            try:
                if isinstance(event, Incoming):
                    self._incoming(event, now)
                elif isinstance(event, Reply) and self.nms is not None:
                    self.nms.on_reply(event, now)
                elif isinstance(event, RequestTimedOut) and self.nms is not None:
                    self.nms.on_timeout(event, now)
            except StoreError as exc:   # the database is away (a restart): say so, at once
                self.counters["database_unavailable"] += 1
                if now - self._last_db_log >= 1.0:
                    self._last_db_log = now
                    self.log(f"database unavailable handling {type(getattr(event, 'msg', event)).__name__}: {exc}")
                if isinstance(event, Incoming) and event.msg.request_id:
                    self.server.reply(event, sig.Error(code=sig.ErrorCode.INTERNAL,
                                                       text="cloud database unavailable, retry later"), now)
            except Exception as exc:  # no-throw boundary: one bad message never stops the cloud
                self.counters["internal_errors"] += 1
                self.log(f"internal error handling {type(getattr(event, 'msg', event)).__name__}: "
                         f"{type(exc).__name__}: {exc}")
                if isinstance(event, Incoming) and event.msg.request_id:
                    self.server.reply(event, sig.Error(code=sig.ErrorCode.INTERNAL, text="internal error"), now)

    def _incoming(self, inc: Incoming, now: float) -> None:
        msg = inc.msg
        self.counters["messages"] += 1
        reply: sig.Message | None
        if isinstance(msg, sig.LoginRequest):
            if self.auth is None:
                reply = sig.Error(code=sig.ErrorCode.BAD_MESSAGE, text="this cloud process runs no AS")
            else:
                result = self.auth.login(msg, inc.peer_static, now)
                self.log(result.log)
                self.counters["logins_ok" if result.identity else "logins_refused"] += 1
                reply = result.reply
        elif isinstance(msg, sig.Keepalive) and not msg.request_id and self.nms is None:
            reply = None  # channel keepalive to an AS-only process
        elif self.nms is None:
            reply = sig.Error(code=sig.ErrorCode.BAD_MESSAGE, text="this cloud process runs no NMS")
        else:
            identity = self._identity(inc.peer_static, now)
            if identity is None:
                reply = sig.Error(code=sig.ErrorCode.UNAUTHENTICATED, text="unknown identity: log in first")
            elif identity.revoked:
                reply = sig.Error(code=sig.ErrorCode.REVOKED, text="identity revoked")
            else:
                reply = self.nms.handle(inc, identity, now)
        if reply is not None and msg.request_id:
            if isinstance(reply, sig.Error):
                self.counters[f"errors_{reply.code.name.lower()}"] += 1
            self.server.reply(inc, reply, now)

    def _identity(self, static: bytes, now: float):
        """The node's identity, from a short-lived cache (``cache.TimedCache``: the store is the
        truth; a revocation reaches the cache within IDENTITY_CACHE_S)."""
        return self._identities.get(static, now, lambda: self.store.get_identity(static))

    def stats(self, now: float = 0.0) -> dict:
        out = {"counters": dict(self.counters), "control_drops": dict(self.server.drops),
               "control": dict(self.server.counters), "sessions": len(self.server.peers)}
        if self.nms is not None:
            out["nms"] = dict(self.nms.counters)
            out["registered"] = len(self.nms.registrations)
            out["relayed_routes"] = len(self.nms.relayed)
        if self.cluster is not None:
            out["cluster"] = self.cluster.status(now)
        return out
