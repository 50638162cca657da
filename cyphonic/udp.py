"""The thin asyncio UDP edge around a sans-IO core (aioquic's protocol.py, in small).

Any core with ``receive_datagram(data, addr, now)``, ``datagrams_to_send()``,
``get_timer()``, ``handle_timer(now)`` and ``next_event()`` runs on it: the
tunnel ``Device``, the node's ``NodeEngine``, the cloud's cores.

It is ``cyphonic.driver.CoreDriver`` on an asyncio datagram transport: it passes
``time.time()`` in, sends what comes out, keeps one timer armed at
``device.get_timer()`` and hands events to a callback. Socket errors (for
example ECONNREFUSED after an ICMP port unreachable) are counted, never fatal.
The demo and the loopback tests run two-party scenarios on it; the daemons have
data paths of their own (``cyphonic.node.engine_host``, ``appliance/``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable

from .driver import CoreDriver


class DeviceProtocol(asyncio.DatagramProtocol):
    """Drives ``device`` (any sans-IO core) from one UDP socket, through ``CoreDriver``."""

    def __init__(self, device, on_event: Callable[[object], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 tap: Callable[[bytes, object], None] | None = None) -> None:
        self.device = device
        self.tap = tap  # sees every datagram sent (the demo keeps copies to replay them)
        self.clock = clock
        self.transport: asyncio.DatagramTransport | None = None
        self.driver = CoreDriver(device, self._send, on_event, clock=clock)
        self.errors: Counter = self.driver.errors

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.driver.receive(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.errors[type(exc).__name__] += 1

    def send_packet(self, packet: bytes) -> None:
        self.device.send_packet(packet, self.clock())
        self.flush()

    def connect(self, fqdn: str) -> bool:
        up = self.device.connect(fqdn, self.clock())
        self.flush()
        return up

    def flush(self) -> None:
        """Send queued datagrams, deliver events, re-arm the timer."""
        self.driver.flush()

    def _send(self, data: bytes, addr) -> None:
        if self.transport is None:
            return
        if self.tap is not None:
            self.tap(data, addr)
        self.transport.sendto(data, addr)

    def close(self) -> None:
        self.driver.close()
        if self.transport is not None:
            self.transport.close()


async def open_device(device, local_addr: tuple[str, int],
                      on_event: Callable[[object], None] | None = None,
                      tap: Callable[[bytes, object], None] | None = None) -> DeviceProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: DeviceProtocol(device, on_event, tap=tap),
                                                   local_addr=local_addr)
    return proto
