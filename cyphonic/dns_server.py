"""The thin asyncio edge of the Resolver Module (``cyphonic.resolver``).

UDP and TCP listeners on one (host, port) feed ``OverlayResolver.receive_query``
with ``time.time()``; the edge sends what comes out, calls ``on_resolve(fqdn,
asker)`` for every tunnel the resolver wants brought up, forwards passthrough
queries to the upstream resolver and keeps one timer armed at ``get_timer()``
(``cyphonic.driver.DeadlineTimer``).

- TCP (RFC 7766): 2-byte length framing, at most TCP_MAX_CONNECTIONS at once
  (more are closed at once), TCP_IDLE_S idle timeout, queries larger than
  TCP_MAX_QUERY_BYTES close the connection, a client that does not read its
  answers (write buffer over TCP_MAX_BUFFERED_BYTES) is closed. Answers to
  pipelined queries go out as they are ready (out of order is allowed).
- Upstream: one unconnected UDP socket. Each forwarded datagram gets a fresh
  random 16-bit id (the client's id never leaves); a reply counts only if it
  comes from the upstream address and carries an id we sent; the resolver
  restores the client's id and checks the question. Upstream must be an IP
  literal. Only UDP upstream: a truncated upstream reply is relayed as it is.
- ``flush()`` is for the daemon to call after it fed ``tunnel_up`` /
  ``tunnel_failed``; it is re-entrant (a nested call is folded into the
  running one). ``on_resolve`` may return the VIP when the tunnel is already up
  (``NodeEngine.resolve`` does); the edge then feeds ``tunnel_up`` itself.

It must never let a socket error or a callback's exception escape into the
event loop: both are counted in ``errors``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections import Counter
from typing import Callable

from .driver import DeadlineTimer, FlushRounds

log = logging.getLogger(__name__)

TCP_MAX_CONNECTIONS = 64
TCP_IDLE_S = 10.0
TCP_MAX_QUERY_BYTES = 4096
TCP_MAX_BUFFERED_BYTES = 256 * 1024
UPSTREAM_IDS_MAX = 4096         # forwarded datagrams awaiting a reply (ids are 16-bit)
UPSTREAM_GRACE_S = 1.0          # an id stays valid this long after the resolver's hold
BIND_ATTEMPTS = 16              # port 0: UDP picks a port, TCP must get the same one


class _TcpClient:
    """One TCP connection: the ``client`` the resolver sees (hashable by identity)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.closed = False

    def __repr__(self) -> str:
        return f"<tcp {self.peer}>"

    def send(self, data: bytes) -> bool:
        if self.closed or self.writer.is_closing():
            return False
        transport = self.writer.transport
        if transport.get_write_buffer_size() > TCP_MAX_BUFFERED_BYTES:
            self.close()
            return False
        self.writer.write(struct.pack("!H", len(data)) + data)
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, object], None], errors: Counter) -> None:
        self.on_datagram = on_datagram
        self.errors = errors
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.errors[type(exc).__name__] += 1


class DnsServer:
    def _asker(self, client) -> object:
        if self.asker_of is None:
            return None
        try:
            return self.asker_of(client)
        except Exception:  # noqa: BLE001 - a lookup must not stop DNS
            return None

    def __init__(self, resolver, *, on_resolve: Callable[[str, object], object],
                 upstream: tuple[str, int] | None, clock: Callable[[], float] = time.time) -> None:
        self.resolver = resolver
        self.asker_of: Callable[[object], object] | None = None
        self.on_resolve = on_resolve
        self.clock = clock
        self.upstream = upstream
        self._upstream_ip = ipaddress.ip_address(upstream[0]) if upstream else None
        self.errors: Counter = Counter()
        self.port: int | None = None
        self._udp: _UdpProtocol | None = None
        self._up: _UdpProtocol | None = None
        self._tcp_server: asyncio.base_events.Server | None = None
        self._tcp_clients: set[_TcpClient] = set()
        self._ids: dict[int, tuple[object, float]] = {}     # upstream id -> (token, expires)
        self.timer = DeadlineTimer(resolver.get_timer, self._fire, clock=clock)
        self._rounds = FlushRounds(self.errors)
        self._closed = False

    # --- setup ---------------------------------------------------------------------------

    async def _start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(BIND_ATTEMPTS if port == 0 else 1):
            transport, self._udp = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self._on_query_datagram, self.errors), local_addr=(host, port))
            bound = transport.get_extra_info("sockname")[1]
            try:
                self._tcp_server = await asyncio.start_server(self._serve_tcp, host, bound,
                                                              reuse_address=True)
            except OSError:
                transport.close()
                self._udp = None
                if port != 0 or attempt == BIND_ATTEMPTS - 1:
                    raise
                continue
            self.port = bound
            break
        if self.upstream is not None:
            family = socket.AF_INET6 if self._upstream_ip.version == 6 else socket.AF_INET
            _, self._up = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self._on_upstream_datagram, self.errors),
                family=family, local_addr=("::" if family == socket.AF_INET6 else "0.0.0.0", 0))

    def sockets(self) -> list[tuple[str, object]]:
        """``(name, socket)`` of the UDP listener and the upstream socket, for the kernel's
        drop counts in a status (``cyphonic.socket_stats``)."""
        return [(name, proto.transport.get_extra_info("socket"))
                for name, proto in (("dns", self._udp), ("dns upstream", self._up))
                if proto is not None and proto.transport is not None]

    def close(self) -> None:
        self._closed = True
        self.timer.close()
        for proto in (self._udp, self._up):
            if proto is not None and proto.transport is not None:
                proto.transport.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for c in list(self._tcp_clients):
            c.close()
        self._tcp_clients.clear()

    async def wait_closed(self) -> None:
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()

    # --- input ---------------------------------------------------------------------------

    def _on_query_datagram(self, data: bytes, addr) -> None:
        if self._closed:
            return
        self.resolver.receive_query(data, addr, self.clock(), tcp=False, asker=self._asker(addr))
        self.flush()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _TcpClient(writer)
        if len(self._tcp_clients) >= TCP_MAX_CONNECTIONS or self._closed:
            self.errors["tcp_too_many"] += 1
            client.close()
            return
        self._tcp_clients.add(client)
        try:
            while not client.closed:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S)
                (length,) = struct.unpack("!H", head)
                if length == 0 or length > TCP_MAX_QUERY_BYTES:
                    self.errors["tcp_bad_length"] += 1
                    break
                data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_S)
                self.resolver.receive_query(data, client, self.clock(), tcp=True, asker=self._asker(client))
                self.flush()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass   # the client went away or idled out
        except Exception as exc:   # no-throw boundary
            self.errors[type(exc).__name__] += 1
        finally:
            self._tcp_clients.discard(client)
            client.close()

    def _on_upstream_datagram(self, data: bytes, addr) -> None:
        try:
            if (ipaddress.ip_address(addr[0].split("%")[0]) != self._upstream_ip
                    or addr[1] != self.upstream[1]):
                self.errors["upstream_wrong_source"] += 1
                return
            if len(data) < 12:
                self.errors["upstream_short"] += 1
                return
            (rid,) = struct.unpack_from("!H", data)
            entry = self._ids.get(rid)
            if entry is None:
                self.errors["upstream_unknown_id"] += 1
                return
            token = entry[0]
            self.resolver.upstream_answer(token, data, self.clock())
            if not self.resolver.forward_pending(token):
                self._ids.pop(rid, None)
        except Exception as exc:   # no-throw boundary
            self.errors[type(exc).__name__] += 1
        self.flush()

    # --- output --------------------------------------------------------------------------

    def flush(self) -> None:
        """Send answers, ask for tunnels, forward upstream, re-arm the timer."""
        try:
            if self._rounds.run(self._round):
                self.timer.arm()
        except Exception as exc:   # no-throw boundary
            self.errors[type(exc).__name__] += 1
            log.exception("dns edge: flush failed")

    def _round(self) -> int:
        return self._send_answers() + self._ask_resolves() + self._send_forwards()

    def _send_answers(self) -> int:
        out = self.resolver.answers_to_send()
        for data, client, tcp in out:
            if tcp:
                if not (isinstance(client, _TcpClient) and client.send(data)):
                    self.errors["tcp_gone"] += 1
            elif self._udp is not None and self._udp.transport is not None and not self._closed:
                try:
                    self._udp.transport.sendto(data, client)
                except OSError as exc:
                    self.errors[type(exc).__name__] += 1
        return len(out)

    def _ask_resolves(self) -> int:
        wanted = self.resolver.resolves_wanted()
        for fqdn, asker in wanted:
            try:
                vip = self.on_resolve(fqdn, asker)
            except Exception as exc:   # the daemon's bug must not stop the edge
                self.errors["on_resolve_" + type(exc).__name__] += 1
                log.exception("dns edge: on_resolve(%s) failed", fqdn)
                continue
            if isinstance(vip, str):
                self.resolver.tunnel_up(fqdn, vip, self.clock(), asker=asker)
        return len(wanted)

    def _send_forwards(self) -> int:
        wanted = self.resolver.forwards_wanted()
        if not wanted:
            return 0
        now = self.clock()
        self._expire_ids(now)
        for token, query in wanted:
            if self._up is None or self._up.transport is None or len(self._ids) >= UPSTREAM_IDS_MAX:
                self.errors["upstream_unavailable" if self._up is None else "upstream_ids_full"] += 1
                self.resolver.upstream_failed(token, now)
                continue
            rid = secrets.randbelow(1 << 16)
            while rid in self._ids:
                rid = secrets.randbelow(1 << 16)
            self._ids[rid] = (token, now + self.resolver.hold_s + UPSTREAM_GRACE_S)
            try:
                self._up.transport.sendto(struct.pack("!H", rid) + query[2:], self.upstream)
            except OSError as exc:
                self.errors[type(exc).__name__] += 1
                self._ids.pop(rid, None)
                self.resolver.upstream_failed(token, now)
        return len(wanted)

    def _expire_ids(self, now: float) -> None:
        if len(self._ids) < UPSTREAM_IDS_MAX // 2:
            return
        for rid in [rid for rid, (_, expires) in self._ids.items() if expires <= now]:
            del self._ids[rid]

    def _fire(self, now: float) -> None:
        self.resolver.handle_timer(now)
        self.flush()


async def serve_dns(resolver, host: str, port: int, *, on_resolve: Callable[[str, object], object],
                    upstream: tuple[str, int] | None, clock: Callable[[], float] = time.time,
                    asker_of: Callable[[object], object] | None = None) -> DnsServer:
    """Start UDP and TCP listeners on (host, port) (port 0: a free port, the same for
    both; see ``DnsServer.port``) and the upstream socket."""
    server = DnsServer(resolver, on_resolve=on_resolve, upstream=upstream, clock=clock)
    server.asker_of = asker_of  # the adapter: which general node asked (by its address)
    try:
        await server._start(host, port)
    except BaseException:
        server.close()
        raise
    return server
