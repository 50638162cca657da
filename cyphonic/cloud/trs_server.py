"""The thin asyncio UDP edge of the Tunnel Relay Service (``cyphonic.cloud.trs``).

Two sockets on one port: an IPv4 socket and an IPv6-only socket
(``IPV6_V6ONLY=1``, so IPv4 never arrives as ``::ffff:a.b.c.d`` and each
family has exactly one way in). That is how an IPv4-only node reaches an
IPv6-only node: each binds to the relay over its own family, and a datagram
leaves on the socket whose family matches its destination.

The edge passes ``time.time()`` in (relay tokens expire in Unix seconds),
sends what comes out, keeps one timer armed at ``service.get_timer()``
(``cyphonic.driver.CoreDriver``).
Socket errors (ICMP unreachable reported as ``ConnectionRefusedError``, a full
send buffer, a destination of a family with no socket) are counted in
``errors``, never fatal. While asyncio reports a transport's send buffer
above its high-water mark, datagrams for that socket are dropped and counted
(``send_buffer_full``) instead of queued without bound.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections import Counter
from typing import Callable

from ..driver import CoreDriver
from ..udp import udp_socket
from . import constants as CC
from .trs import RelayService


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: "RelayServer", family: int) -> None:
        self.server = server
        self.family = family
        self.paused = False

    def datagram_received(self, data: bytes, addr) -> None:
        self.server._datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.server.errors[type(exc).__name__] += 1

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class RelayServer:
    """The running sockets of one ``RelayService``. ``close()`` stops them."""

    def __init__(self, service: RelayService, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.clock = clock
        self.errors: Counter = Counter()
        self.port: int = 0
        self._transports: dict[int, asyncio.DatagramTransport] = {}
        self._protocols: dict[int, _RelayProtocol] = {}
        self.driver = CoreDriver(service, self._send, clock=clock, errors=self.errors)

    @property
    def addresses(self) -> list:
        """Local socket names, IPv4 first."""
        return [t.get_extra_info("sockname") for _, t in sorted(self._transports.items())]

    def _datagram_received(self, data: bytes, addr) -> None:
        self.driver.receive(data, addr)

    def flush(self) -> None:
        """Send what the service queued, then re-arm the timer if its deadline moved."""
        self.driver.flush()

    def _send(self, data: bytes, addr) -> None:
        family = socket.AF_INET6 if (len(addr) == 4 or ":" in addr[0]) else socket.AF_INET
        transport = self._transports.get(family)
        if transport is None:
            self.errors["no_socket_for_family"] += 1
            return
        if self._protocols[family].paused:
            self.errors["send_buffer_full"] += 1
            return
        try:
            transport.sendto(data, addr)
        except (ValueError, TypeError) as exc:  # an address the transport refuses
            self.errors[type(exc).__name__] += 1

    def sockets(self) -> list[tuple[str, object]]:
        """``(name, socket)`` of each family's socket, for the kernel's drop counts in the stats
        (``cyphonic.socket_stats``)."""
        return [(f"relay{4 if family == socket.AF_INET else 6}", t.get_extra_info("socket"))
                for family, t in sorted(self._transports.items())]

    def close(self) -> None:
        self.driver.close()
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()


def _udp_socket(family: int, host: str, port: int) -> socket.socket:
    return udp_socket(family, host, port, buffer_bytes=CC.RELAY_SOCKET_BUFFER_BYTES)


def _bind_pair(host4: str | None, host6: str | None, port: int) -> dict[int, socket.socket]:
    """Bind the requested sockets on one port; with port 0, retry until both get the same one."""
    attempts = 20 if (port == 0 and host4 is not None and host6 is not None) else 1
    for attempt in range(attempts):
        socks: dict[int, socket.socket] = {}
        try:
            p = port
            if host4 is not None:
                socks[socket.AF_INET] = _udp_socket(socket.AF_INET, host4, p)
                p = socks[socket.AF_INET].getsockname()[1]
            if host6 is not None:
                socks[socket.AF_INET6] = _udp_socket(socket.AF_INET6, host6, p)
            return socks
        except OSError as exc:
            for s in socks.values():
                s.close()
            if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def serve_relay(service: RelayService, host4: str | None = "0.0.0.0", host6: str | None = "::",
                      port: int = CC.RELAY_PORT, *,
                      clock: Callable[[], float] = time.time) -> RelayServer:
    """Open the TRS sockets (either family may be None to disable it) and start serving."""
    if host4 is None and host6 is None:
        raise ValueError("serve_relay: at least one of host4 and host6 is needed")
    loop = asyncio.get_running_loop()
    server = RelayServer(service, clock)
    socks = _bind_pair(host4, host6, port)
    try:
        for family, sock in socks.items():
            proto = _RelayProtocol(server, family)
            transport, _ = await loop.create_datagram_endpoint(lambda p=proto: p, sock=sock)
            server._transports[family] = transport
            server._protocols[family] = proto
    except BaseException:
        server.close()
        for sock in socks.values():
            sock.close()
        raise
    server.port = next(iter(socks.values())).getsockname()[1]
    server.flush()
    return server
