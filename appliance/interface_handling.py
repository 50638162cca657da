"""Interface Handling of the adapter (the paper's Fig. 4): proxy ARP on the LAN port for
overlay virtual addresses, and injection of decrypted packets toward the general node.

Three pieces:

* ``ArpResponder`` (sans-IO): takes raw Ethernet frames (``receive(frame, now)``) and returns
  the ARP reply frame to send, or None. It answers an ARP request (RFC 826) with the LAN
  port's own MAC when ``answer_for(target_ip, sender_ip, sender_mac)`` says so. The adapter's
  policy (``OverlayArpPolicy``): the adapter's gateway address, and addresses in the overlay
  prefix except the asking general node's own VIP and the VIPs of the other general nodes on
  this LAN (those answer for themselves). The sender's MAC is passed because an ARP probe
  (RFC 5227, sender IP 0.0.0.0: a DHCP client checking the address it was offered before it
  takes it) carries no sender address: the VIP of the asker is found from its MAC. Answering
  such a probe for the client's own VIP would make it DECLINE its lease.
  Never: raise on a frame, answer a gratuitous ARP (sender IP == target IP), answer a reply,
  or learn anything from a request. Every frame ends in exactly one of ``counters["replies"]``,
  ``counters["ignored"]`` (a well-formed request that is not ours to answer: most requests on a
  LAN) or ``drops[reason]``. Replies are rate-limited per sender MAC (token bucket).

* ``ArpEndpoint`` / ``serve_arp(responder, ifname)``: the asyncio edge, an AF_PACKET SOCK_RAW
  socket bound to the LAN port for ETH_P_ARP (non-blocking, ``loop.add_reader``), sending
  replies out of the same socket. Why user space and not the kernel: kernel proxy ARP
  (``proxy_arp`` sysctl or ``ip neigh add proxy``) answers only when forwarding is on and the
  target has a unicast route out of *another* interface, and it delays each answer by a random
  time up to ``proxy_delay`` (seen here as 380 to 490 ms); see FIELD-NOTES.md. The kernel keeps
  answering ARP for the interface's own addresses (we only add answers; if both answer, for the
  gateway address, both replies carry the same MAC). ``serve_arp`` writes 0 to
  ``net.ipv4.conf.<ifname>.proxy_arp`` so that the kernel never answers overlay addresses a
  second time, late; the adapter must not add kernel proxy-neighbour entries either (they work
  regardless of that sysctl).

* ``Injector``: puts a decrypted IPv4 packet on the LAN toward the general node, either through
  a raw IP socket (``inject``: ``AF_INET, SOCK_RAW, IPPROTO_RAW``, header included, bound to the
  LAN port with SO_BINDTODEVICE; the kernel routes by the packet's destination, resolves the
  general node's MAC by ARP, fills in the IP header checksum), or as a whole Ethernet frame
  through an AF_PACKET socket (``inject_frame``: the caller gives the general node's MAC, known
  from DHCP; nothing is filled in, the packet goes out exactly as given, bypassing the
  adapter's routing, netfilter and neighbour table). Both validate the IPv4 header minimally,
  never block (non-blocking sockets) and never raise: a bad packet or a send error is a counted
  drop (``drops[reason]``, send errors by errno name, e.g. ``EMSGSIZE``, ``EAGAIN``).
  With SO_BINDTODEVICE the kernel treats a destination without a route as on-link on that
  interface, so ``inject`` works even without a route to the general node.
  Batches (issue 15, step 4): ``enable_batches()`` opens a third socket, AF_PACKET with
  ``PACKET_VNET_HDR``, and ``inject_write(write, dst_mac)`` sends one ``cyphonic.offload.Coalescer``
  write on it as one frame: its virtio_net_hdr, the Ethernet header, the IPv4 packet. A merged
  run of one TCP flow (GSO TCPV4, NEEDS_CSUM with the pseudo-header sum) is one ``sendmsg``;
  the kernel (or the LAN port's TSO) cuts it, and on a veth the general node's stack takes it
  as one buffer. ``inject_plain(packet, dst_mac)`` sends one packet with a zero header (as
  ``inject_frame`` would). Refused (an old kernel, no CAP_NET_RAW): ``batches`` says why and the
  caller keeps ``inject``; a GSO frame the kernel refuses (EINVAL, EOPNOTSUPP) sets ``gso_refused``.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import fcntl
import ipaddress
import logging
import socket
import struct
from collections import Counter
from typing import Callable, Container

from cyphonic.offload import VNET_HDR_BYTES, ZERO_HDR
from cyphonic.ratelimit import RateLimiter

from .constants import (ARP_MAX_FRAMES_PER_WAKEUP, ARP_RATELIMIT_TABLE_MAX, ARP_RECV_BYTES, ARP_REPLY_BURST_PER_MAC,
                        ARP_REPLY_RATE_PER_MAC_PER_S)

log = logging.getLogger(__name__)

# --- constants ------------------------------------------------------------------------------
# Wire values (RFC 826, RFC 894, Linux if_ether.h / if_packet.h).
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ARP_HTYPE_ETHERNET = 1
ARP_OP_REQUEST = 1
ARP_OP_REPLY = 2
ETH_HEADER_BYTES = 14
ARP_FRAME_BYTES = ETH_HEADER_BYTES + 28          # 42: Ethernet header + ARP for IPv4 over Ethernet
BROADCAST_MAC = b"\xff" * 6
PACKET_OUTGOING = 4                               # sll_pkttype of frames this host sent
PACKET_IGNORE_OUTGOING = getattr(socket, "PACKET_IGNORE_OUTGOING", 23)   # Linux >= 4.20
SOL_PACKET = getattr(socket, "SOL_PACKET", 263)
PACKET_VNET_HDR = 15                              # if_packet.h: frames start with a virtio_net_hdr
SIOCGIFHWADDR = 0x8927
IPV4_MIN_HEADER_BYTES = 20

# Implementation choices.

AnswerFor = Callable[[str, str, bytes], bool]

_HEADER = struct.Struct("!6s6sH")                 # Ethernet II: dst, src, ethertype
_ARP = struct.Struct("!HHBBH6s4s6s4s")            # htype ptype hlen plen op sha spa tha tpa
_REPLY_FIXED = struct.pack("!HHBBH", ARP_HTYPE_ETHERNET, ETH_P_IP, 6, 4, ARP_OP_REPLY)
_ZERO_IP = b"\x00\x00\x00\x00"


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    mac = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if len(mac) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return mac


def _bad_unicast_ip(first_octet: int) -> bool:
    """0/8, 127/8, multicast and reserved/broadcast (224/3): never an ARP address."""
    return first_octet == 0 or first_octet == 127 or first_octet >= 224


class ArpResponder:
    """Answers ARP requests for addresses ``answer_for`` accepts, with ``own_mac`` (sans-IO)."""

    def __init__(self, own_mac: bytes, *, answer_for: AnswerFor,
                 rate_per_s: float = ARP_REPLY_RATE_PER_MAC_PER_S,
                 burst: float = ARP_REPLY_BURST_PER_MAC,
                 max_senders: int = ARP_RATELIMIT_TABLE_MAX) -> None:
        own_mac = bytes(own_mac)
        if len(own_mac) != 6 or own_mac[0] & 1 or own_mac == bytes(6):
            raise ValueError(f"own_mac must be a unicast MAC, got {own_mac.hex()}")
        self.own_mac = own_mac
        self.answer_for = answer_for
        self.limiter = RateLimiter(rate_per_s, burst, max_senders)
        self.counters: Counter = Counter()   # frames, requests, replies, ignored
        self.drops: Counter = Counter()      # reason -> frames dropped

    def receive(self, frame: bytes, now: float) -> bytes | None:
        """One received Ethernet frame in; the reply frame to send (42 bytes) or None."""
        self.counters["frames"] += 1
        try:
            reply, reason = self._receive(frame, now)
        except Exception as exc:          # the no-throw boundary: a bug here must not stop ARP
            reply, reason = None, "internal_" + type(exc).__name__
        if reason is not None:
            self.drops[reason] += 1
        return reply

    def _receive(self, frame: bytes, now: float) -> tuple[bytes | None, str | None]:
        if len(frame) < ARP_FRAME_BYTES:
            return None, "short"
        eth_dst, eth_src, ethertype = _HEADER.unpack_from(frame, 0)
        if ethertype != ETH_P_ARP:
            return None, "not_arp"                      # also VLAN-tagged frames
        if eth_dst != BROADCAST_MAC and eth_dst != self.own_mac:
            return None, "not_for_us"                   # promiscuous port: someone else's unicast
        if eth_src == self.own_mac:
            return None, "own_frame"
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, ETH_HEADER_BYTES)
        if htype != ARP_HTYPE_ETHERNET or hlen != 6:
            return None, "bad_hardware"
        if ptype != ETH_P_IP or plen != 4:
            return None, "bad_protocol"
        if op != ARP_OP_REQUEST:
            return None, "not_request"
        if sha != eth_src:
            return None, "sender_mac_mismatch"          # would let a forger aim our replies
        if sha[0] & 1 or sha == bytes(6):
            return None, "bad_sender_mac"
        if spa != _ZERO_IP and _bad_unicast_ip(spa[0]):
            return None, "bad_sender_ip"
        if _bad_unicast_ip(tpa[0]):
            return None, "bad_target_ip"
        if spa == tpa:
            return None, "gratuitous"                   # an announcement: never answered
        self.counters["requests"] += 1
        try:
            ours = bool(self.answer_for(socket.inet_ntoa(tpa), socket.inet_ntoa(spa), sha))
        except Exception:
            return None, "policy_error"
        if not ours:
            self.counters["ignored"] += 1
            return None, None
        if not self.limiter.allow(sha, now):
            return None, "rate_limited"
        self.counters["replies"] += 1
        # Reply (RFC 826): sender = us and the asked address; target = the asker as it asked
        # (for a probe that is 0.0.0.0, as Linux answers); unicast to the asker's MAC.
        return b"".join((sha, self.own_mac, b"\x08\x06", _REPLY_FIXED,
                         self.own_mac, tpa, sha, spa)), None

    def stats(self) -> dict:
        return {"counters": dict(self.counters), "drops": dict(self.drops),
                "rate_table": len(self.limiter)}


class OverlayArpPolicy:
    """The adapter's ``answer_for``: whom the LAN port answers for.

    Yes: ``gateway`` (the adapter's own LAN address), and any host address in the overlay
    ``prefix`` except
      * the asker's own VIP: ``vip_of_mac(sender_mac)`` (General Node Management's table,
        learnt from DHCP), which also covers ARP probes from 0.0.0.0;
      * the VIPs of the general nodes on this LAN (``local_vips()``), which answer for
        themselves (when given);
      * the prefix's network and broadcast addresses.
    """

    def __init__(self, prefix: str, *, gateway: str | None = None,
                 vip_of_mac: Callable[[bytes], str | None] = lambda mac: None,
                 local_vips: Callable[[], Container[str]] | None = None) -> None:
        self.prefix = ipaddress.IPv4Network(prefix)
        self.gateway = str(ipaddress.IPv4Address(gateway)) if gateway else None
        self.vip_of_mac = vip_of_mac
        self.local_vips = local_vips
        self._edges = {str(self.prefix.network_address), str(self.prefix.broadcast_address)}

    def __call__(self, target_ip: str, sender_ip: str, sender_mac: bytes) -> bool:
        if target_ip == self.gateway:
            return True
        if ipaddress.IPv4Address(target_ip) not in self.prefix or target_ip in self._edges:
            return False
        if target_ip == sender_ip or target_ip == self.vip_of_mac(sender_mac):
            return False
        if self.local_vips is not None and target_ip in self.local_vips():
            return False
        return True


# --- the edge -------------------------------------------------------------------------------

def interface_mac(ifname: str) -> bytes:
    """The interface's MAC, from the kernel of the *current* network namespace (SIOCGIFHWADDR;
    /sys/class/net would show the namespace /sys was mounted in)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        data = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", ifname.encode()[:15]))
    return data[18:24]


def disable_kernel_proxy_arp(ifname: str) -> bool:
    """net.ipv4.conf.<ifname>.proxy_arp = 0 (in the current namespace). False if it failed."""
    try:
        with open(f"/proc/sys/net/ipv4/conf/{ifname}/proxy_arp", "w") as f:
            f.write("0")
        return True
    except OSError as exc:
        log.warning("cannot turn off kernel proxy_arp on %s: %s", ifname, exc)
        return False


class ArpEndpoint:
    """Drives an ``ArpResponder`` from an AF_PACKET socket on ``ifname`` (see ``serve_arp``)."""

    def __init__(self, responder: ArpResponder, ifname: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.responder = responder
        self.ifname = ifname
        self.loop = loop
        self.errors: Counter = Counter()      # edge: send/receive errors by errno name
        self.skipped_outgoing = 0
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        try:
            self.sock.setblocking(False)
            try:   # don't hand us our own replies and the kernel's own requests back
                self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                pass   # old kernel: recvfrom's pkttype still tells us (checked below)
            self.sock.bind((ifname, ETH_P_ARP))
            loop.add_reader(self.sock.fileno(), self._on_readable)
        except BaseException:
            self.sock.close()
            raise
        self.closed = False

    def _on_readable(self) -> None:
        for _ in range(ARP_MAX_FRAMES_PER_WAKEUP):
            try:
                frame, addr = self.sock.recvfrom(ARP_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:            # e.g. ENETDOWN while the link bounces
                self._count(exc)
                return
            if addr[2] == PACKET_OUTGOING:
                self.skipped_outgoing += 1
                continue
            reply = self.responder.receive(frame, self.loop.time())
            if reply is not None:
                try:
                    self.sock.send(reply)
                except OSError as exc:
                    self._count(exc)

    def _count(self, exc: OSError) -> None:
        self.errors[_errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1

    def stats(self) -> dict:
        return {**self.responder.stats(), "edge_errors": dict(self.errors),
                "skipped_outgoing": self.skipped_outgoing}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


async def serve_arp(responder: ArpResponder, ifname: str, *,
                    turn_off_kernel_proxy_arp: bool = True) -> ArpEndpoint:
    """Start answering ARP on ``ifname`` (in the current network namespace) until ``close()``.
    Needs CAP_NET_RAW. Turns the kernel's proxy_arp off on that interface (see module doc)."""
    if turn_off_kernel_proxy_arp:
        disable_kernel_proxy_arp(ifname)
    return ArpEndpoint(responder, ifname, asyncio.get_running_loop())


# --- injection toward the general node ------------------------------------------------------

def ipv4_problem(packet: bytes) -> str | None:
    """None if ``packet`` looks like a whole IPv4 packet, else the drop reason (sans-IO)."""
    n = len(packet)
    if n < IPV4_MIN_HEADER_BYTES:
        return "short"
    b0 = packet[0]
    if b0 >> 4 != 4:
        return "not_ipv4"
    if b0 & 0x0F < 5 or (b0 & 0x0F) * 4 > n:
        return "bad_header_length"
    if int.from_bytes(packet[2:4], "big") != n:
        return "bad_total_length"
    return None


class Injector:
    """Sends decrypted IPv4 packets out of the LAN port ``ifname`` toward the general node.

    ``inject(packet)``: raw IP socket, the kernel routes and resolves the MAC.
    ``inject_frame(packet, dst_mac)``: a whole Ethernet frame through AF_PACKET.
    ``inject_write(write, dst_mac)``: a vnet header and a packet (``enable_batches`` first);
    ``inject_plain(packet, dst_mac)``: the same with a zero header.
    All return True when the kernel took the packet; otherwise a counted drop.
    Needs CAP_NET_RAW; create it in the namespace of the LAN port.
    """

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.sent = 0
        self.drops: Counter = Counter()
        self.own_mac = interface_mac(ifname)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        # Protocol 0: this packet socket only sends (no copy of every received frame); the
        # kernel reads the protocol from the frame's ethertype (SOCK_RAW).
        self.frame_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            self.sock.setblocking(False)
            self.frame_sock.bind((ifname, 0))
            self.frame_sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        self._eth_src_type = self.own_mac + b"\x08\x00"
        self.batch_sock: socket.socket | None = None   # AF_PACKET with PACKET_VNET_HDR (enable_batches)
        self.batches = "off"          # "on", or why not: "refused: <errno name>"
        self.gso_refused = False      # a GSO frame was refused by the kernel: send runs as packets

    def enable_batches(self) -> bool:
        """Open the packet socket with virtio_net_hdr frames; False (``batches`` says why) if the
        kernel refuses it. Never raises."""
        if self.batch_sock is not None:
            return True
        s = None
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)   # send only, as frame_sock
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            s.bind((self.ifname, 0))
            s.setblocking(False)
        except OSError as exc:
            if s is not None:
                s.close()
            self.batches = "refused: " + _errno.errorcode.get(exc.errno or 0, str(exc.errno))
            return False
        self.batch_sock = s
        self.batches = "on"
        return True

    def inject(self, packet: bytes) -> bool:
        reason = ipv4_problem(packet)
        if reason is not None:
            self.drops[reason] += 1
            return False
        try:
            self.sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
        except OSError as exc:
            self._count(exc)
            return False
        self.sent += 1
        return True

    def inject_frame(self, packet: bytes, dst_mac: bytes) -> bool:
        reason = ipv4_problem(packet)
        if reason is None and (len(dst_mac) != 6 or dst_mac[0] & 1):
            reason = "bad_dst_mac"
        if reason is not None:
            self.drops[reason] += 1
            return False
        try:
            self.frame_sock.sendmsg((dst_mac + self._eth_src_type, packet))
        except OSError as exc:
            self._count(exc)
            return False
        self.sent += 1
        return True

    def inject_write(self, write, dst_mac: bytes) -> bool:
        """One frame on the batch socket: ``write`` is a 10-byte virtio_net_hdr and an IPv4
        packet (a ``Coalescer`` write), ``dst_mac`` a checked unicast MAC (the caller's, once)."""
        view = memoryview(write)
        return self._send_vnet(view[:VNET_HDR_BYTES], view[VNET_HDR_BYTES:], dst_mac)

    def inject_plain(self, packet, dst_mac: bytes) -> bool:
        """One packet as one frame with a zero vnet header on the batch socket (no copy)."""
        return self._send_vnet(ZERO_HDR, packet, dst_mac)

    def _send_vnet(self, hdr, packet, dst_mac: bytes) -> bool:
        reason = ipv4_problem(packet)
        if reason is not None:
            self.drops[reason] += 1
            return False
        try:
            self.batch_sock.sendmsg((hdr, dst_mac + self._eth_src_type, packet))
        except OSError as exc:
            self._count(exc)
            if hdr[1] and exc.errno in (_errno.EINVAL, _errno.EOPNOTSUPP):
                self.gso_refused = True
            return False
        except (AttributeError, TypeError):   # no batch socket (never enabled, or closed)
            self.drops["batch_socket_closed"] += 1
            return False
        self.sent += 1
        return True

    def _count(self, exc: OSError) -> None:
        self.drops[_errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1

    def stats(self) -> dict:
        return {"sent": self.sent, "drops": dict(self.drops), "batches": self.batches}

    def close(self) -> None:
        self.sock.close()
        self.frame_sock.close()
        if self.batch_sock is not None:
            self.batch_sock.close()
            self.batch_sock = None
