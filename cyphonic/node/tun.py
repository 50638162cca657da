"""Interface Handling for the node: the TUN device carrying the overlay.

The device is created non-persistent through /dev/net/tun (TUNSETIFF,
IFF_TUN | IFF_NO_PI), so it disappears with its file descriptor: a crash
leaves no interface, address or route behind to block the next start. It is
configured with pyroute2: the node's virtual IP with the overlay prefix (which
installs the prefix route), the MTU, and up.
"""

from __future__ import annotations

import fcntl
import os
import struct

from pyroute2 import IPRoute

from ..errors import CyphonicError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


class TunError(CyphonicError):
    pass


class Tun:
    def __init__(self, name: str) -> None:
        self.name = name
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(f"cannot open /dev/net/tun: {exc.strerror} (needs CAP_NET_ADMIN)") from None
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as exc:
            os.close(self.fd)
            raise TunError(f"cannot create TUN interface {name}: {exc.strerror}") from None
        self.index = 0

    def configure(self, vip4: str, prefix_len: int, mtu: int) -> None:
        try:
            with IPRoute() as ipr:
                self.index = ipr.link_lookup(ifname=self.name)[0]
                ipr.link("set", index=self.index, mtu=mtu)
                for a in ipr.get_addr(index=self.index, family=2):
                    ipr.addr("del", index=self.index, address=a.get_attr("IFA_ADDRESS"),
                             prefixlen=a["prefixlen"])
                ipr.addr("add", index=self.index, address=vip4, prefixlen=prefix_len)
                ipr.link("set", index=self.index, state="up")
        except Exception as exc:  # pyroute2's NetlinkError and friends
            raise TunError(f"cannot configure {self.name} ({vip4}/{prefix_len}, mtu {mtu}): {exc}") from None

    def read(self) -> bytes:
        return os.read(self.fd, 65535)

    def write(self, packet: bytes) -> int:
        return os.write(self.fd, packet)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the interface and its routes go with it
            self.fd = -1
