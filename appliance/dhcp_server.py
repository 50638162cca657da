"""The thin edge of Address configuration: one UDP socket on the LAN port, asyncio.

`serve_dhcp(server, ifname)` binds 0.0.0.0:67 with SO_BINDTODEVICE (only the LAN port's DHCP
traffic, whatever addresses it has) and SO_BROADCAST, feeds each datagram with the wall clock to
the sans-IO `DhcpServer` (appliance/address_config.py), and sends what comes back out of the same
interface:
  * broadcast replies, and RFC 2131's "unicast to yiaddr/chaddr" (`Reply.link_unicast`: the
    client has no address yet, so the kernel cannot ARP for it), go to 255.255.255.255:68.
    A plain UDP socket is enough for that; a raw/AF_PACKET socket (what ISC dhcpd uses to
    unicast to a bare MAC) is not needed, and every client we support (isc-dhcp-client,
    busybox udhcpc, dhcpcd) listens on a raw socket and takes broadcast replies;
  * replies to ciaddr (renew, INFORM) are ordinary unicast; with SO_BINDTODEVICE the kernel
    treats the destination as on-link even without a route to it. If that send fails, the
    reply is broadcast instead (counted `tx_unicast_fallback`);
  * replies to a relay (giaddr) go to giaddr:67.

It never parses or decides anything itself, and never lets an exception out of the receive path.

Run it by hand or in the lab (bindings on the command line; the appliance wires General Node
Management's table instead):
    python -m appliance.dhcp_server --iface lan0 --server-ip 100.64.0.254 \\
        --leases /var/lib/cyphonic/dhcp-leases.json --binding 02:00:00:00:00:07=100.64.0.7=gn
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import time
from typing import Callable

from .address_config import (BROADCAST, CLIENT_PORT, DEFAULT_LEASE_S, SERVER_PORT, Binding,
                             DhcpServer, Reply, advertised_mtu)
from .leases import LeaseStore

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def open_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode() + b"\0")
        sock.bind(("0.0.0.0", SERVER_PORT))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class DhcpEndpoint(asyncio.DatagramProtocol):
    """The running server on one interface. `close()` stops it."""

    def __init__(self, server: DhcpServer, ifname: str, sock: socket.socket, *, clock=time.time,
                 trace: Callable[[Reply], None] | None = None):
        self.server, self.ifname, self.sock, self.clock, self.trace = server, ifname, sock, clock, trace
        self.transport: asyncio.DatagramTransport | None = None
        self.sent: list[Reply] = []          # the last few replies (for tests and cyadm)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            replies = self.server.receive(data, self.clock())
            for r in replies:
                self._send(r)
        except Exception as e:               # the no-throw boundary of the edge
            self.server.drops["edge_error"] += 1
            self.server.log(f"dhcp edge: {e!r}")

    def error_received(self, exc) -> None:
        self.server.drops["socket_error"] += 1

    def _send(self, r: Reply) -> None:
        if r.ip == BROADCAST or r.link_unicast:
            dest = (BROADCAST, CLIENT_PORT)
        else:
            dest = (r.ip, r.port)
        # straight on the socket (not transport.sendto, which reports errors only to
        # error_received): a failed unicast can then fall back to broadcast at once
        try:
            self.sock.sendto(r.data, dest)
        except OSError:
            if dest[0] == BROADCAST or r.port != CLIENT_PORT:
                self.server.drops["send_error"] += 1
                return
            self.server.counters["tx_unicast_fallback"] += 1
            try:
                self.sock.sendto(r.data, (BROADCAST, CLIENT_PORT))
            except OSError:
                self.server.drops["send_error"] += 1
                return
        self.sent = (self.sent + [r])[-16:]
        if self.trace is not None:
            self.trace(r)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


async def serve_dhcp(server: DhcpServer, ifname: str, *,
                     trace: Callable[[Reply], None] | None = None) -> DhcpEndpoint:
    """Start answering DHCP on `ifname` (needs CAP_NET_BIND_SERVICE and CAP_NET_RAW for
    SO_BINDTODEVICE: root on the appliance). `trace(reply)` is called after each send."""
    loop = asyncio.get_running_loop()
    sock = open_socket(ifname)
    try:
        _, endpoint = await loop.create_datagram_endpoint(
            lambda: DhcpEndpoint(server, ifname, sock, trace=trace), sock=sock)
    except BaseException:
        sock.close()
        raise
    return endpoint


# --- command line (lab and manual use) --------------------------------------------------------

def _binding(s: str) -> Binding:
    parts = s.split("=")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError("MAC=VIP[=NAME]")
    return Binding(parts[0].lower(), parts[1], parts[2] if len(parts) == 3 else parts[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.dhcp_server", description=__doc__.split("\n")[0])
    ap.add_argument("--iface", required=True)
    ap.add_argument("--server-ip", required=True)
    ap.add_argument("--netmask", default="255.255.255.0")
    ap.add_argument("--router", help="default: the server IP")
    ap.add_argument("--dns", help="default: the server IP")
    ap.add_argument("--domain", default="cyphonic.internal")
    ap.add_argument("--mtu", type=int, default=advertised_mtu())
    ap.add_argument("--lease", type=int, default=DEFAULT_LEASE_S, help="lease time in seconds")
    ap.add_argument("--leases", required=True, help="lease file (JSON)")
    ap.add_argument("--binding", type=_binding, action="append", default=[],
                    metavar="MAC=VIP[=NAME]")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every reply")
    a = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    table = {b.mac: b for b in a.binding}
    server = DhcpServer(server_ip=a.server_ip, netmask=a.netmask, router=a.router or a.server_ip,
                        dns=a.dns or a.server_ip, domain=a.domain, mtu=a.mtu, lease_s=a.lease,
                        bindings=table.get, leases=LeaseStore(a.leases, log=log), log=log)

    async def run() -> None:
        def trace(r: Reply) -> None:
            log(f"dhcp: sent {r.message_type} to {r.ip} ({r.mac})")
        ep = await serve_dhcp(server, a.iface, trace=trace if a.verbose else None)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log(f"dhcp: serving on {a.iface} as {server.server_ip}")
        await stop.wait()
        ep.close()
        log(f"dhcp: stopped {server.stats()}")

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
