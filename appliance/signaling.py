"""Signaling: each general node's cloud link, and the adapter's own (the paper's Signaling Module).

Every general node (GN) is a node of the overlay in its own right: its own identity, login,
registration, route requests and tunnels. The protocol is the node daemon's, shared, not
copied:
- ``cyphonic.signaling.SignalingClient`` (login, registration, route requests) inside
  ``cyphonic.node.engine.NodeEngine`` (tunnels and their paths: direct, punched, relayed);
- ``cyphonic.node.engine_host.EngineHost`` drives the engine as it does the node daemon's one:
  the timer at its next deadline, sending, the common event handling (logging, tunnel paths,
  the Resolver told of tunnels, health), its health conditions and tunnel rows.

What is the adapter's own is here: each GN gets its own UDP port on the WAN side (so the
NMS sees its own observed endpoint and NAT traversal works per GN as for a node daemon), and
a ``Link`` record holds the GN, its socket, its ``EngineHost`` and its session installer
(``appliance.sessions``). The adapter's own identity is a ``Link`` too: it logs in and
registers like any node, and carries no general node's traffic.

Several cloud instances (``cloud`` a list, or a name with several records): the names are
resolved once (``resolve``, at start, from a thread), every link gets the same list and moves
on by itself when the instance it uses goes silent (``cyphonic.signaling``); each move is
logged with the link's name, and when every instance failed a whole round the names are
resolved again (``resolve_again``) and the links still backing off get the new list.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from cyphonic import signaling as sg
from cyphonic.cloud.keys import parse_cloud_key
from cyphonic.handshake import StaticIdentity
from cyphonic.health import Health
from cyphonic.node.config import NodeConfigError, is_address, resolve_cloud
from cyphonic.node.engine import NodeEngine
from cyphonic.node.engine_host import EngineHost, TimestampFloorFile
from cyphonic.stream_ids import StreamIds
from cyphonic.udp import steered_udp_sockets
from cyphonic.wire import signaling as sig

from .config import AdapterConfig, AdapterConfigError
from .constants import SOCKET_BUFFER_BYTES
from .general_nodes import GeneralNode
from .sessions import SessionInstaller


@dataclass
class Link:
    """One identity on the WAN: a general node's, or the adapter's own."""
    gn: GeneralNode
    port: int
    sock: socket.socket
    host: EngineHost
    sessions: SessionInstaller | None = None    # the adapter's own link seals nothing
    intake: socket.socket | None = None         # initiations only (udp.steered_udp_sockets)
    # The stream ids its keys handed out: as long as the link, since its engine (and the keys of
    # its tunnels) outlive a session installer that a new virtual IP replaces.
    stream_ids: StreamIds = field(default_factory=StreamIds)

    @property
    def engine(self) -> NodeEngine:
        return self.host.engine

    def close(self) -> None:
        """Close its sockets (after the way back stopped reading them)."""
        self.sock.close()
        if self.intake is not None:
            self.intake.close()


class Signaling:
    """Makes the links: one socket and one engine each, all toward the same cloud."""

    def __init__(self, cfg: AdapterConfig, *, health: Health, log: Callable[[str], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.health = health
        self.log = log
        self.clock = clock
        self.ca_public, self.cloud_static = parse_cloud_key(cfg.cloud_key)
        self.wan_addr: str | None = None       # told to the NMS as a local endpoint (same-NAT peers)
        # The cloud's instances: as configured until ``resolve`` turned names into addresses.
        self.instances: tuple = cfg.cloud_addrs
        self.links: list[Link] = []            # every link opened (for new instance lists)
        self._resolving = False

    def resolve(self) -> tuple:
        """Resolve the cloud's names (blocking: from a thread, before the links open); each
        A/AAAA record is an instance. A name that does not resolve is an ``AdapterConfigError``."""
        try:
            self.instances = resolve_cloud(self.cfg.cloud_addrs, single=bool(self.cfg.cloud_nms))
        except NodeConfigError as exc:
            raise AdapterConfigError(str(exc)) from None
        if len(self.instances) > 1:
            self.log("cloud instances: " + ", ".join(sg.address_text(a) for a in self.instances))
        return self.instances

    @property
    def has_names(self) -> bool:
        return any(not is_address(host) for host, _ in self.cfg.cloud_addrs)

    def resolve_again(self) -> bool:
        """Every instance failed a whole round on some link: resolve the names again (blocking:
        from a thread); True when the list changed (then ``apply_instances`` hands it out)."""
        if not self.has_names:
            return False
        instances = resolve_cloud(self.cfg.cloud_addrs, single=bool(self.cfg.cloud_nms))
        if instances == self.instances:
            return False
        self.instances = instances
        self.log("cloud instances now: " + ", ".join(sg.address_text(a) for a in instances))
        return True

    def apply_instances(self) -> None:
        for link in self.links:
            link.engine.signaling.set_instances(self.instances, self.clock())
            link.host.flush()

    def _round_failed(self) -> None:
        """A link found every instance silent: resolve the names again, once at a time, in a
        thread; DNS trouble keeps the instances we have."""
        if self._resolving or not self.has_names:
            return
        self._resolving = True

        async def again() -> None:
            try:
                if await asyncio.to_thread(self.resolve_again):
                    self.apply_instances()
            except Exception as exc:  # noqa: BLE001 - DNS trouble must not stop the adapter
                self.log(f"cannot resolve the cloud again: {exc}")
            finally:
                self._resolving = False
        asyncio.get_running_loop().create_task(again())

    def open(self, gn: GeneralNode, identity: StaticIdentity, port: int, token: bytes, *, who: str, subject: str,
             deliver: Callable[[bytes], None], on_event: Callable[[object], None],
             after_round: Callable[[], int] | None = None, records_path: str | None = None,
             timestamps: TimestampFloorFile | None = None) -> Link:
        """A link for ``gn`` on ``port`` (bound now; the engine starts with ``link.host.start()``).
        ``records_path``: where its peer records live (a restart without the cloud);
        ``timestamps``: the process's handshake timestamp reservation (shared by every link)."""
        sock, intake = steered_udp_sockets(socket.AF_INET, "0.0.0.0", port, buffer_bytes=SOCKET_BUFFER_BYTES)
        engine = NodeEngine(identity, self.ca_public, self.cloud_static, list(self.instances),
                            token=token, name_hint=gn.name, nms_addr=self.cfg.nms_addr,
                            local_endpoints=[sig.Endpoint(self.wan_addr, port)] if self.wan_addr else [])
        def event(e, who=who) -> None:
            if isinstance(e, sg.InstanceMoved):
                self.log(f"{who} {e}" + (" (every instance silent: backing off)" if e.round_failed else ""))
                if e.round_failed:
                    self._round_failed()
            on_event(e)
        host = EngineHost(engine, {socket.AF_INET: sock}, deliver=deliver, on_event=event, log=self.log,
                          health=self.health, who=who, subject=subject, after_round=after_round, clock=self.clock,
                          records_path=records_path, timestamps=timestamps)
        link = Link(gn, port, sock, host, intake=intake)
        self.links.append(link)
        return link

    def forget(self, link: Link) -> None:
        """A link closed for good (its general node removed)."""
        if link in self.links:
            self.links.remove(link)

    @staticmethod
    def instance(link: Link) -> str:
        """The cloud instance the link uses (``host:port``)."""
        return sg.address_text(link.engine.signaling.as_addr)

    @staticmethod
    def state(link: Link) -> str:
        return link.engine.signaling.state.value
