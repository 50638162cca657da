"""Events the sans-IO core hands to its caller (``Device.next_event()``).

Small frozen dataclasses, as h11's events are. Peers are named by FQDN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Address = Any  # (host, port) tuple as the socket layer uses it


@dataclass(frozen=True)
class PeerAdded:
    fqdn: str
    vip4: str
    initiated_by_peer: bool


@dataclass(frozen=True)
class HandshakeCompleted:
    fqdn: str
    vip4: str
    initiator: bool
    endpoint: Address
    certificate_serial: int


@dataclass(frozen=True)
class HandshakeFailed:
    fqdn: str
    reason: str
    packets_dropped: int


@dataclass(frozen=True)
class PacketReceived:
    fqdn: str
    packet: bytes


@dataclass(frozen=True)
class EndpointChanged:
    fqdn: str
    old: Address
    new: Address


@dataclass(frozen=True)
class SessionExpired:
    fqdn: str
