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
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from cyphonic.cloud.keys import parse_cloud_key
from cyphonic.handshake import StaticIdentity
from cyphonic.health import Health
from cyphonic.node.engine import NodeEngine
from cyphonic.node.engine_host import EngineHost
from cyphonic.stream_ids import StreamIds
from cyphonic.udp import steered_udp_sockets
from cyphonic.wire import signaling as sig

from .config import AdapterConfig
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

    def open(self, gn: GeneralNode, identity: StaticIdentity, port: int, token: bytes, *, who: str, subject: str,
             deliver: Callable[[bytes], None], on_event: Callable[[object], None],
             after_round: Callable[[], int] | None = None, records_path: str | None = None) -> Link:
        """A link for ``gn`` on ``port`` (bound now; the engine starts with ``link.host.start()``).
        ``records_path``: where its peer records live (a restart without the cloud)."""
        sock, intake = steered_udp_sockets(socket.AF_INET, "0.0.0.0", port, buffer_bytes=SOCKET_BUFFER_BYTES)
        engine = NodeEngine(identity, self.ca_public, self.cloud_static, self.cfg.cloud_addr,
                            token=token, name_hint=gn.name, nms_addr=self.cfg.nms_addr,
                            local_endpoints=[sig.Endpoint(self.wan_addr, port)] if self.wan_addr else [])
        host = EngineHost(engine, {socket.AF_INET: sock}, deliver=deliver, on_event=on_event, log=self.log,
                          health=self.health, who=who, subject=subject, after_round=after_round, clock=self.clock,
                          records_path=records_path)
        return Link(gn, port, sock, host, intake=intake)

    @staticmethod
    def state(link: Link) -> str:
        return link.engine.signaling.state.value
