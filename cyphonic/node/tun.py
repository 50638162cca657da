"""Interface Handling for the node: the TUN device carrying the overlay.

The device is created non-persistent through /dev/net/tun (TUNSETIFF,
IFF_TUN | IFF_NO_PI), so it disappears with its file descriptor: a crash
leaves no interface, address or route behind to block the next start. It is
configured with pyroute2: the node's virtual IP with the overlay prefix (which
installs the prefix route), the MTU, and up.

Offloads (issue 15, ``offload``, the node's ``tun_offload``), three modes:

- ``"off"``: a plain device, one packet per read and per write.
- ``"merge"``: opened with IFF_VNET_HDR and TUNSETOFFLOAD with no flags: every read and write
  starts with a 10-byte virtio_net_hdr (``cyphonic.offload``), reads stay single packets with
  full checksums (the kernel computes them), and a write may carry a merged run of one TCP
  flow's segments (GSO), so the receiving stack handles one skb per run.
- ``"full"``: as merge, and TUNSETOFFLOAD asks for checksum offload and TCP segmentation
  (TSO4, TSO6), and UDP segmentation (USO4, USO6) where the kernel takes it (Linux 6.2+): one
  read may carry up to 64 KB of one TCP flow, which the caller cuts and checksums.

Where the kernel refuses a mode the next simpler one is tried (full -> merge -> off), and
``offload`` says which mode is in effect and why (``state`` "fallback", ``reason``). ``write``
always takes a bare packet (it adds the zero header when there is one), for the slow path.
"""

from __future__ import annotations

import fcntl
import os
import struct

from pyroute2 import IPRoute

from ..errors import CyphonicError
from ..offload import VNET_HDR_BYTES, ZERO_HDR

TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TSO_FLAGS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
USO_FLAGS = TUN_F_USO4 | TUN_F_USO6


class TunError(CyphonicError):
    pass


MODES = ("off", "merge", "full")


class Tun:
    """``offload``: one of ``MODES`` (falls back to a simpler one where the kernel refuses);
    ``ioctl``: for tests (fcntl.ioctl)."""

    def __init__(self, name: str, offload: str = "off", *, ioctl=fcntl.ioctl) -> None:
        if offload not in MODES:
            raise TunError(f"offload must be one of {', '.join(MODES)}, not {offload!r}")
        self.name = name
        self.vnet_hdr = False
        self.offload: dict = {"requested": offload, "mode": "off", "state": "off", "features": [], "reason": ""}
        self.fd = self._open()
        if offload != "off":
            try:
                self._probe(ioctl, offload)
            except OSError as exc:
                os.close(self.fd)
                self.fd = self._open()
                self.vnet_hdr = False
                self.offload.update(mode="off", state="fallback", features=[], reason=f"{exc.strerror or exc}")
        if not self.vnet_hdr:
            self._set_iff(ioctl, IFF_TUN | IFF_NO_PI)
        self.index = 0

    @staticmethod
    def _open() -> int:
        try:
            return os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(f"cannot open /dev/net/tun: {exc.strerror} (needs CAP_NET_ADMIN)") from None

    def _set_iff(self, ioctl, flags: int) -> None:
        try:
            ioctl(self.fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), flags))
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            raise TunError(f"cannot create TUN interface {self.name}: {exc.strerror}") from None

    def _probe(self, ioctl, mode: str) -> None:
        """IFF_VNET_HDR and TUNSETOFFLOAD for ``mode`` ("full" falls back to "merge"), or OSError
        (then the caller opens a plain device)."""
        features = struct.unpack("I", ioctl(self.fd, TUNGETFEATURES, bytes(4)))[0]
        if not features & IFF_VNET_HDR:
            raise OSError(0, "no IFF_VNET_HDR in TUNGETFEATURES")
        ioctl(self.fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
        self.vnet_hdr = True
        if mode == "full":
            try:
                names = ["csum", "tso4", "tso6"]
                try:
                    ioctl(self.fd, TUNSETOFFLOAD, TSO_FLAGS | USO_FLAGS)
                    names += ["uso4", "uso6"]
                except OSError:
                    ioctl(self.fd, TUNSETOFFLOAD, TSO_FLAGS)   # (an older kernel: no USO)
                self.offload.update(mode="full", state="on", features=names, reason="")
                return
            except OSError as exc:
                self.offload.update(state="fallback", reason=f"no TSO: {exc.strerror or exc}")
        ioctl(self.fd, TUNSETOFFLOAD, 0)   # reads: whole packets, checksums done by the kernel
        self.offload.update(mode="merge", features=["gso-writes"])
        if self.offload["state"] != "fallback":
            self.offload["state"] = "on"

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
        """One read as it comes (with its vnet header when ``vnet_hdr``)."""
        return os.read(self.fd, 65535 + VNET_HDR_BYTES)

    def write(self, packet: bytes) -> int:
        """Write one bare packet (the zero vnet header added when there is one)."""
        if self.vnet_hdr:
            return os.writev(self.fd, (ZERO_HDR, packet)) - VNET_HDR_BYTES
        return os.write(self.fd, packet)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the interface and its routes go with it
            self.fd = -1
