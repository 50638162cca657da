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
import ctypes
import socket
import struct
import time
from collections import Counter
from typing import Callable

from .driver import CoreDriver


def udp_socket(family: int, host: str, port: int, *, buffer_bytes: int = 0,
               reuse_address: bool = False, reuse_port: bool = False) -> socket.socket:
    """A bound, non-blocking UDP socket; an IPv6 one is IPv6-only, so IPv4 never arrives as
    ``::ffff:a.b.c.d`` and each family has exactly one way in. ``buffer_bytes``: SO_RCVBUF and
    SO_SNDBUF, best effort (the kernel caps them at net.core.[rw]mem_max)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if buffer_bytes:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
                except OSError:
                    pass
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


# Initiations (tunnel and control channel) are the one message that costs a responder
# Diffie-Hellman work or a cookie reply, and what a spoofed-source flood is made of.
INITIATION_TYPES = (1, 6)
SO_ATTACH_REUSEPORT_CBPF = 51   # <asm-generic/socket.h>; not in Python's socket module


def _initiations_program() -> bytes:
    """A classic BPF program for a reuseport group of two sockets: index 1 (the intake) for
    a datagram whose first byte is an initiation type, 0 (the main socket) for any other.
    The kernel runs it on the UDP payload; a datagram too short to load from gets 0."""
    ld_b_abs, jeq_k, ret_k = 0x30, 0x15, 0x06
    ins = [(ld_b_abs, 0, 0, 0)]
    n = len(INITIATION_TYPES)
    for i, t in enumerate(INITIATION_TYPES):
        ins.append((jeq_k, n - i, 0, t))   # match: jump over the rest and "ret 0" to "ret 1"
    ins += [(ret_k, 0, 0, 0), (ret_k, 0, 0, 1)]
    return b"".join(struct.pack("HBBI", *i) for i in ins)


def steered_udp_sockets(family: int, host: str, port: int, *,
                        buffer_bytes: int = 0) -> tuple[socket.socket, socket.socket | None]:
    """Two sockets on one address and port: the main one, and an intake that the kernel
    fills with initiations only (``INITIATION_TYPES``, by a reuseport BPF program). A flood
    of initiations then overflows the intake's receive queue, not the one data packets and
    signaling wait in, and the reader can serve the main socket first. Everything is sent
    from the main socket.

    The port must be free: a plain bind probes it first, so a second daemon on the same port
    fails with EADDRINUSE as it would without SO_REUSEPORT (instead of silently joining).
    Where the kernel refuses the program, the intake is None and the main socket gets
    everything, as a plain ``udp_socket`` would."""
    probe = udp_socket(family, host, port)
    port = probe.getsockname()[1]
    probe.close()
    main = udp_socket(family, host, port, buffer_bytes=buffer_bytes, reuse_port=True)
    try:
        intake = udp_socket(family, host, port, buffer_bytes=buffer_bytes, reuse_port=True)
    except OSError:
        return main, None
    code = _initiations_program()
    buf = ctypes.create_string_buffer(code, len(code))
    try:
        main.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                        struct.pack("HL", len(code) // 8, ctypes.addressof(buf)))
    except OSError:
        intake.close()  # without the program the kernel would spread datagrams by hash
        return main, None
    return main, intake


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
