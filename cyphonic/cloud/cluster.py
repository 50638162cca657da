"""This cloud instance among the others: membership, liveness, relays, and the bus (docs/cloud.md).

Several cloud processes (instances) share one database and nothing else. Each
keeps a row in ``instances`` alive (``store_runtime``), learns from the table
which others are alive and which relays (TRS) there are, and hands the others
messages through the bus table (``cyphonic.wire.bus``): there is no consensus of
our own, the database is the one source of truth.

``Cluster`` is driven like the other cores: ``start(now)``, ``handle_timer(now)``
at ``get_timer()``, ``receive(now)`` when the edge is told (PostgreSQL NOTIFY) or
on its poll timer (SQLite: ``poll_s``). It reads no clock and opens no socket;
it calls the store, which may fail: a failure is counted, logged once, and the
instance goes on with what it knew (a dead database must not stop tunnels or the
sessions nodes hold).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..errors import ParseError
from ..wire import bus as wire_bus
from ..wire import signaling as sig
from .store import Store, StoreError
from .store_runtime import INSTANCE_HEARTBEAT_S, InstanceRecord

ROUTE_TAG_SHIFT = 47                # route ids: owner's tag in bits 47..62, 47 random bits below
BUS_POLL_S = 0.05                   # SQLite (no NOTIFY): read the bus this often while others are alive


def route_owner(route_id: int) -> int:
    """The tag of the instance that minted ``route_id`` (0: minted by a lone instance)."""
    return (route_id >> ROUTE_TAG_SHIFT) & 0xFFFF


def _endpoint(text: str) -> sig.Endpoint | None:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        return sig.Endpoint(host, int(port))
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class Relay:
    instance_id: str
    endpoints: dict            # family (4, 6) -> sig.Endpoint


class Cluster:
    def __init__(self, store: Store, instance_id: str, *, services: tuple[str, ...],
                 signaling: tuple[str, ...] = (), relay: tuple[str, ...] = (), host: str = "",
                 pid: int = 0, notified: bool = False, log=lambda line: None) -> None:
        self.store = store
        self.instance_id = instance_id
        self.services = tuple(services)
        self.signaling = tuple(signaling)
        self.relay = tuple(relay)
        self.host = host
        self.pid = pid
        self.notified = notified      # the edge wakes us on NOTIFY; poll only as a fallback
        self.log = log
        self.tag = 0
        self.instances: dict[str, InstanceRecord] = {}
        self.counters: Counter = Counter()
        self.drops: Counter = Counter()
        self.last_error = ""
        self._next_beat = 0.0
        self._next_poll: float | None = None
        self._joined = False

    # --- life cycle -------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Join (raises StoreError when the database cannot be reached: the process must not run
        without knowing its tag)."""
        rec = self.store.join_instance(self.instance_id, services=self.services, signaling=self.signaling,
                                       relay=self.relay, host=self.host, pid=self.pid, now=now)
        self.tag = rec.tag
        self._joined = True
        self._next_beat = now + INSTANCE_HEARTBEAT_S
        self._refresh(now)
        if "nms" in self.services:
            # The NMS instances alive learn of us at once (not at their next heartbeat): one
            # that was alone starts sharing its registrations before our first route request.
            for other in self.instances.values():
                if other.instance_id != self.instance_id and "nms" in other.services and other.alive(now):
                    self.send(other.instance_id, wire_bus.Kind.HELLO, 0, bytes(32), None, now)

    def stop(self) -> None:
        if self._joined:
            try:
                self.store.leave_instance(self.instance_id)
            except StoreError as exc:
                self.log(f"cluster: could not leave the instances table: {exc}")
            self._joined = False

    # --- what the others are ----------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        self.instances = {i.instance_id: i for i in self.store.list_instances()}

    def alive(self, instance_id: str, now: float) -> bool:
        rec = self.instances.get(instance_id)
        if rec is None:                  # joined since our last refresh
            self._refresh_quietly(now)
            rec = self.instances.get(instance_id)
        return rec is not None and (instance_id == self.instance_id or rec.alive(now))

    def others_alive(self, now: float) -> bool:
        return any(i.instance_id != self.instance_id and i.alive(now) and
                   ("nms" in i.services) for i in self.instances.values())

    def by_tag(self, tag: int) -> InstanceRecord | None:
        return next((i for i in self.instances.values() if i.tag == tag), None)

    def live_relays(self, now: float) -> list[Relay]:
        out = []
        for i in sorted(self.instances.values(), key=lambda r: r.tag):
            if "trs" not in i.services or not self.alive(i.instance_id, now):
                continue
            eps = {}
            for text in i.relay:
                ep = _endpoint(text)
                if ep is not None:
                    eps.setdefault(6 if ":" in ep.host else 4, ep)
            if eps:
                out.append(Relay(i.instance_id, eps))
        return out

    def relay_alive(self, instance_id: str, now: float) -> bool:
        return any(r.instance_id == instance_id for r in self.live_relays(now))

    # --- timers -----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        if not self._joined:
            return None
        return min(t for t in (self._next_beat, self._next_poll) if t is not None)

    def handle_timer(self, now: float) -> tuple[bool, bool]:
        """Heartbeat and refresh when due. Returns (read the bus now, the table was refreshed)."""
        poll = refreshed = False
        if now >= self._next_beat:
            self._next_beat = now + INSTANCE_HEARTBEAT_S
            try:
                try:
                    self.store.heartbeat_instance(self.instance_id, now)
                except StoreError as exc:
                    if "not in the instances table" not in str(exc):
                        raise
                    self.log(f"cluster: this instance was forgotten; joining again as {self.instance_id}")
                    self.start(now)
                self._refresh(now)
                refreshed = True
                if self.last_error:
                    self.log(f"cluster: database reachable again ({self.last_error} is over)")
                self.last_error = ""
            except StoreError as exc:
                self.counters["heartbeat_failures"] += 1
                if not self.last_error:
                    self.log(f"cluster: heartbeat failed: {exc}")
                self.last_error = str(exc)
        if self._next_poll is not None and now >= self._next_poll:
            poll = True
        if refreshed and self.notified and self.others_alive(now):
            poll = True        # a safety net once a heartbeat: a NOTIFY lost while LISTEN reconnected
        if poll or self._next_poll is None:
            self._next_poll = (now + BUS_POLL_S if self.others_alive(now) and not self.notified
                               else None)
        return poll, refreshed

    # --- the bus ------------------------------------------------------------------------------

    def send(self, target: str, kind: wire_bus.Kind, key: int, static: bytes, msg: sig.Message | None,
             now: float) -> bool:
        """Hand ``target`` a message; False (counted) when it cannot be written."""
        try:
            payload = wire_bus.BusMessage(kind, self.tag, key, static, msg).encode()
            self.store.bus_send(target, payload, now)
        except (StoreError, ValueError) as exc:
            self.drops["bus_send_failed"] += 1
            self.log(f"cluster: cannot send {kind.name} to {target}: {exc}")
            return False
        self.counters[f"bus_sent_{kind.name.lower()}"] += 1
        return True

    def reply_to(self, sender_tag: int) -> str | None:
        rec = self.by_tag(sender_tag)
        return rec.instance_id if rec is not None else None

    def receive(self, now: float) -> list[wire_bus.BusMessage]:
        """Every message waiting for this instance, decoded (malformed ones counted, dropped)."""
        try:
            payloads = self.store.bus_receive(self.instance_id)
        except StoreError as exc:
            self.drops["bus_receive_failed"] += 1
            if not self.last_error:
                self.log(f"cluster: cannot read the bus: {exc}")
            return []
        out = []
        for p in payloads:
            try:
                out.append(wire_bus.decode(p))
            except ParseError as exc:
                self.drops[f"bus_{exc.reason}"] += 1
                continue
        self.counters["bus_received"] += len(out)
        if out and any(self.by_tag(m.sender) is None for m in out):
            self._refresh_quietly(now)    # a sender that joined since the last refresh
        return out

    def _refresh_quietly(self, now: float) -> None:
        try:
            self._refresh(now)
        except StoreError:
            pass

    def status(self, now: float) -> dict:
        return {"instance_id": self.instance_id, "tag": self.tag,
                "alive": sorted(i for i in self.instances if self.alive(i, now)),
                "dead": sorted(i for i in self.instances if not self.alive(i, now)),
                "relays": [r.instance_id for r in self.live_relays(now)],
                "counters": dict(self.counters), "drops": dict(self.drops),
                "last_error": self.last_error}
