"""The host's addresses, for roaming: read them (pyroute2) and hear when they change (netlink).

``host_addresses`` lists the addresses usable for tunnels. ``AddressMonitor`` is a
netlink socket subscribed to address notifications (RTM_NEWADDR and RTM_DELADDR of
both families): it becomes readable when an address appears or goes, and the
daemon then reads the addresses again. Nothing is polled, so a quiet host costs
nothing (a poll every 0.5 s through pyroute2 took about 4 ms of CPU, and the GIL,
each time). A lost notification (the socket's buffer overflowed: ENOBUFS) counts
as a change too.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from pyroute2 import IPRoute

RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
MONITOR_RCVBUF_BYTES = 256 * 1024


def host_addresses(exclude: set[str]) -> list[str]:
    """Addresses of this host usable for tunnels: not loopback, link-local or our TUN."""
    out = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr():
            if names.get(a["index"]) in exclude:
                continue
            addr = a.get_attr("IFA_ADDRESS")
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                continue
            out.append(addr)
    return sorted(set(out))


class AddressMonitor:
    """A non-blocking netlink socket that hears the host's address changes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MONITOR_RCVBUF_BYTES)
            self.sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except OSError:
            self.sock.close()
            raise
        self.notifications = 0
        self.overflows = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        """Read every pending notification; True if there was any (or some were lost)."""
        changed = False
        for _ in range(1024):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # notifications were lost: assume a change
                    self.overflows += 1
                    changed = True
                    continue
                raise
            if data:
                self.notifications += 1
                changed = True
        return changed

    def close(self) -> None:
        self.sock.close()
