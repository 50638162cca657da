"""The thin asyncio UDP edge around a sans-IO core (aioquic's protocol.py, in small).

Any core with ``receive_datagram(data, addr, now)``, ``datagrams_to_send()``,
``get_timer()``, ``handle_timer(now)`` and ``next_event()`` runs on it: the
tunnel ``Device``, the node's ``NodeEngine``, the cloud's cores.

It passes ``time.time()`` in, sends what comes out, keeps one timer armed at
``device.get_timer()`` and hands events to a callback. Socket errors (for
example ECONNREFUSED after an ICMP port unreachable) are counted, never fatal.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable



class DeviceProtocol(asyncio.DatagramProtocol):
    """Drives ``device`` (any sans-IO core) from one UDP socket."""

    def __init__(self, device, on_event: Callable[[object], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 tap: Callable[[bytes, object], None] | None = None) -> None:
        self.device = device
        self.tap = tap  # sees every datagram sent (the demo keeps copies to replay them)
        self.on_event = on_event or (lambda e: None)
        self.clock = clock
        self.transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.errors: Counter = Counter()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.device.receive_datagram(data, addr, self.clock())
        self.flush()

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
        for _ in range(64):  # event handlers may send (an echo reply): go round until quiet
            sent = self._send_queued()
            delivered = 0
            while (event := self.device.next_event()) is not None:
                self.on_event(event)
                delivered += 1
            if not sent and not delivered:
                break
        self._arm()

    def _send_queued(self) -> int:
        out = self.device.datagrams_to_send()
        if self.transport is not None:
            for data, addr in out:
                if self.tap is not None:
                    self.tap(data, addr)
                try:
                    self.transport.sendto(data, addr)
                except OSError as exc:
                    self.errors[type(exc).__name__] += 1
        return len(out)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.device.get_timer()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - self.clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.device.handle_timer(self.clock())
        self.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()


async def open_device(device, local_addr: tuple[str, int],
                      on_event: Callable[[object], None] | None = None,
                      tap: Callable[[bytes, object], None] | None = None) -> DeviceProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: DeviceProtocol(device, on_event, tap=tap),
                                                   local_addr=local_addr)
    return proto
