"""TUN offloads as data: the virtio_net_hdr, cutting a super-packet into MTU pieces, and
merging a flow's segments into one (issue 15, step 3). Sans-IO: no sockets, clocks or files.

With ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` (``cyphonic.node.tun``) every TUN read and write
starts with a 10-byte ``struct virtio_net_hdr`` (``<linux/virtio_net.h>``, little-endian on
every host we run on, as the kernel uses for TUN unless TUNSETVNETBE)::

    struct virtio_net_hdr {
        __u8   flags;        /* VIRTIO_NET_HDR_F_NEEDS_CSUM 1, _DATA_VALID 2 */
        __u8   gso_type;     /* _GSO_NONE 0, _TCPV4 1, _UDP 3, _TCPV6 4, _UDP_L4 5; | _ECN 0x80 */
        __u16  hdr_len;      /* IP + transport header bytes */
        __u16  gso_size;     /* transport payload bytes per segment */
        __u16  csum_start;   /* where the checksummed part starts (the transport header) */
        __u16  csum_offset;  /* the checksum field, from csum_start (TCP 16, UDP 6) */
    };

The way out (a TUN read): the kernel hands a TCP (or UDP, with USO) super-packet of up to
64 KB with one header; ``split_gso`` cuts it into ``gso_size`` pieces the way the kernel's
own segmentation would (``tcp_gso_segment``, and wireguard-go's ``tun/offload_linux.go``):
IP total length, IP id (+i), IP header checksum, TCP sequence (+i * gso_size), FIN and PSH
on the last piece only (CWR on the first only), UDP length, and the full TCP/UDP checksum
of each piece. Once TUN_F_CSUM is on even a lone packet can come with only the
pseudo-header sum in its checksum field (NEEDS_CSUM): ``finish_checksum`` completes it.
Every piece is then sealed as its own tunnel packet: nothing changes on the wire.

The way in (TUN writes): ``Coalescer`` merges consecutive TCP/IPv4 segments of one flow
(same addresses, ports, ACK number, TCP options, TOS, TTL and DF; contiguous sequence
numbers; equal payload sizes, the last may be shorter; only ACK, and PSH on the last; IP
ids consecutive unless DF) into one write with a GSO header (NEEDS_CSUM, TCPV4, and the
pseudo-header sum in the checksum field, as a sending stack leaves it), so the receiving
TCP stack handles one buffer per run. A segment whose checksum does not verify is never
merged (merging would hide it: the kernel trusts NEEDS_CSUM), it is written alone for the
kernel to drop and count. Runs are bounded (``MAX_MERGED_SEGMENTS``, 65,535 IP bytes);
every other packet is written alone with a zero header, in order. ``link_header_bytes``: the
same writes for a packet socket (``PACKET_VNET_HDR``, the adapter's way back), whose frames
start with a link-layer header that the caller puts between the vnet header and the packet:
the header's ``hdr_len`` and ``csum_start`` count from the frame's start, so they include it.

One's-complement sums (``ones_sum``, the one place they are computed) use
``int.from_bytes(b, "big") % 0xFFFF`` (2**16 = 1 mod 0xFFFF: the remainder is the
end-around-carry sum, 0 standing for 0xFFFF), several times faster in CPython than summing
16-bit words. For a packet-sized buffer the number is first folded twice at 16-bit-aligned
widths (hi + lo, which keeps it mod 0xFFFF), so the division runs on a quarter of it: about
a quarter less time for a 1,400-byte segment, every segment the receiver merges and every
piece a sender cuts.

Never: raise on a packet's contents (a malformed packet is a counted drop: ``drops[reason]``),
merge across flows, ACK numbers or a bad checksum, or hold a packet past ``flush()``.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import NamedTuple

VNET_HDR_BYTES = 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3           # UFO (IP fragmentation): never asked for (no TUN_F_UFO)
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

MAX_MERGED_SEGMENTS = 64     # segments per coalesced write (the kernel's GSO limit is higher)
MAX_IP_BYTES = 65535         # the IPv4 total length field

PROTO_TCP = 6
PROTO_UDP = 17
_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_PSH, _TCP_ACK, _TCP_URG, _TCP_CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x80

TCP_SYN = _TCP_SYN

_HDR = struct.Struct("<BBHHHH")
_pack_into = struct.pack_into
ZERO_HDR = bytes(VNET_HDR_BYTES)
_NOTHING = ()


class VirtioNetHdr(NamedTuple):
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def parse(cls, data) -> "VirtioNetHdr | None":
        """The header at the front of ``data``; None if it is shorter than 10 bytes."""
        if len(data) < VNET_HDR_BYTES:
            return None
        return cls._make(_HDR.unpack_from(data))

    def build(self) -> bytes:
        return _HDR.pack(*self)


FOLD_MIN_BYTES = 512     # below this, one division is cheaper than folding first
FOLD_MAX_BYTES = 4096    # above this, the folds' masks are not worth keeping (and gain little)
FOLDS_KEPT = 64          # lengths whose folds are kept (a stream has a few: MSS and the rest)
_folds: dict[int, tuple[int, int, int, int]] = {}


def _fold_for(n: int) -> tuple[int, int, int, int]:
    if len(_folds) >= FOLDS_KEPT:
        _folds.clear()
    k1 = n * 4 & ~15                      # half of the bits, then a quarter, 16-bit aligned
    k2 = n * 2 & ~15
    f = _folds[n] = (k1, (1 << k1) - 1, k2, (1 << k2) - 1)
    return f


def ones_sum(data) -> int:
    """The one's-complement sum of ``data`` as 16-bit big-endian words (an odd length padded
    with a zero byte), reduced mod 0xFFFF (0 stands for 0xFFFF)."""
    n = len(data)
    s = int.from_bytes(data, "big")
    if n & 1:
        s <<= 8
        n += 1
    if FOLD_MIN_BYTES <= n <= FOLD_MAX_BYTES:
        k1, m1, k2, m2 = _folds.get(n) or _fold_for(n)
        s = (s >> k1) + (s & m1)
        s = (s >> k2) + (s & m2)
    return s % 0xFFFF


def checksum(data, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data`` plus ``initial`` (a ones_sum): never 0, so it
    is right for UDP too (0xFFFF stands for 0)."""
    return 0xFFFF - (ones_sum(data) + initial) % 0xFFFF


def _pseudo(packet, v6: bool, proto: int, l4_len: int) -> int:
    addrs = packet[8:40] if v6 else packet[12:20]
    return (int.from_bytes(addrs, "big") + proto + l4_len) % 0xFFFF


def l4_checksum_ok(packet) -> bool:
    """True if the TCP or UDP checksum of an IPv4 or IPv6 packet (no extension headers) verifies;
    False for anything else."""
    n = len(packet)
    if n < 20:
        return False
    v = packet[0] >> 4
    if v == 4:
        ihl = (packet[0] & 15) * 4
        proto = packet[9]
        v6 = False
    elif v == 6 and n >= 40:
        ihl, proto, v6 = 40, packet[6], True
    else:
        return False
    if proto not in (PROTO_TCP, PROTO_UDP) or n < ihl + 8:
        return False
    seg = packet[ihl:n]
    return (ones_sum(seg) + _pseudo(packet, v6, proto, n - ihl)) % 0xFFFF == 0


def finish_checksum(packet, hdr: VirtioNetHdr, drops: Counter | None = None) -> bool:
    """Complete, in place, the checksum of a non-GSO packet read with NEEDS_CSUM (the field holds
    the pseudo-header sum): the sum from ``csum_start`` to the end, complemented, at
    ``csum_start + csum_offset``. ``packet`` is writable (a bytearray or a memoryview of one).
    False (and ``drops["offload_bad_csum_offsets"]``) when the offsets lie outside the packet."""
    return finish_checksum_at(packet, len(packet), hdr.csum_start, hdr.csum_offset, drops)


def finish_checksum_at(buf, n: int, start: int, offset: int, drops: Counter | None = None) -> bool:
    """``finish_checksum`` of the packet ``buf[:n]`` with the header's two offsets (no header
    object: the TUN reader's per-packet form)."""
    at = start + offset
    if not start < n or at + 2 > n:
        if drops is not None:
            drops["offload_bad_csum_offsets"] += 1
        return False
    c = 0xFFFF - ones_sum(buf[start:n])
    buf[at] = c >> 8
    buf[at + 1] = c & 0xFF
    return True


def split_gso(packet, hdr: VirtioNetHdr, drops: Counter | None = None) -> list:
    """The packets a TUN read of ``packet`` (after its vnet header ``hdr``) stands for, each
    complete and at most ``hdr_len + gso_size`` bytes: the packet itself for a non-GSO read (its
    checksum finished if NEEDS_CSUM: then ``packet`` must be writable), the pieces of a TCPv4/v6
    or UDP (USO) super-packet otherwise. [] for a malformed read, counted in ``drops`` (never
    raises)."""
    gso_type = hdr.gso_type & ~GSO_ECN
    if gso_type == GSO_NONE:
        if hdr.flags & F_NEEDS_CSUM and not finish_checksum(packet, hdr, drops):
            return []
        return [packet]
    try:
        return _split(packet, gso_type, hdr.gso_size)
    except _Malformed as exc:
        if drops is not None:
            drops[exc.reason] += 1
        return []


class _Malformed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _split(packet, gso_type: int, gso: int) -> list:
    n = len(packet)
    if n < 20:
        raise _Malformed("offload_short")
    v = packet[0] >> 4
    if v == 4:
        ihl = (packet[0] & 15) * 4
        if ihl < 20 or n < ihl:
            raise _Malformed("offload_bad_ip_header")
        proto = packet[9]
        v6 = False
    elif v == 6:
        if n < 40:
            raise _Malformed("offload_short")
        ihl, proto, v6 = 40, packet[6], True     # (no extension headers: the kernel's TSO has none here)
    else:
        raise _Malformed("offload_bad_ip_version")
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        if proto != PROTO_TCP or (gso_type == GSO_TCPV6) != v6 or n < ihl + 20:
            raise _Malformed("offload_gso_mismatch")
        thl = (packet[ihl + 12] >> 4) * 4
        if thl < 20:
            raise _Malformed("offload_bad_tcp_header")
    elif gso_type == GSO_UDP_L4:
        if proto != PROTO_UDP:
            raise _Malformed("offload_gso_mismatch")
        thl = 8
    else:
        raise _Malformed("offload_gso_type_unsupported")
    hlen = ihl + thl
    if n <= hlen or gso <= 0:
        raise _Malformed("offload_bad_gso_size" if gso <= 0 else "offload_short")
    if hlen + gso > MAX_IP_BYTES:
        raise _Malformed("offload_bad_gso_size")
    tcp = gso_type != GSO_UDP_L4
    view = packet if type(packet) is memoryview else memoryview(packet)
    template = bytearray(view[:hlen])
    ck = ihl + (16 if tcp else 6)
    template[ck:ck + 2] = b"\0\0"
    if v6:
        pseudo = int.from_bytes(template[8:40], "big") + proto
    else:
        ip_id = int.from_bytes(template[4:6], "big")
        template[10:12] = b"\0\0"
        template[2:6] = b"\0\0\0\0"         # (total length and id: per piece)
        ip_base = int.from_bytes(template[:ihl], "big") % 0xFFFF
        pseudo = int.from_bytes(template[12:20], "big") + proto
    if tcp:
        seq = int.from_bytes(template[ihl + 4:ihl + 8], "big")
        flags = template[ihl + 13]
        first_flags = flags & ~(_TCP_FIN | _TCP_PSH)
        mid_flags = flags & ~(_TCP_FIN | _TCP_PSH | _TCP_CWR)
        last_flags = flags & ~_TCP_CWR
        base = bytearray(template[ihl:hlen])
        base[4:8] = b"\0\0\0\0"
        base[13] = 0
    else:
        base = bytearray(template[ihl:hlen])
        base[4:6] = b"\0\0"
    l4_base = int.from_bytes(base, "big") % 0xFFFF + pseudo
    pack = _pack_into
    out = []
    count = -(-(n - hlen) // gso)
    last = count - 1
    for i in range(count):
        off = hlen + i * gso
        end = off + gso
        if end > n:
            end = n
        plen = end - off
        payload = view[off:end]
        h = template + payload                # (a copy)
        l4_len = thl + plen
        if v6:
            pack("!H", h, 4, l4_len)
        else:
            pid = (ip_id + i) & 0xFFFF
            pack("!HH", h, 2, hlen + plen, pid)
            pack("!H", h, 10, 0xFFFF - (ip_base + hlen + plen + pid) % 0xFFFF)
        if tcp:
            sq = (seq + i * gso) & 0xFFFFFFFF
            f = flags if count == 1 else first_flags if not i else last_flags if i == last else mid_flags
            h[ihl + 13] = f
            pack("!I", h, ihl + 4, sq)
            hsum = l4_base + (sq >> 16) + (sq & 0xFFFF) + f + l4_len
        else:
            pack("!H", h, ihl + 4, l4_len)
            hsum = l4_base + l4_len + l4_len
        pack("!H", h, ck, 0xFFFF - (ones_sum(payload) + hsum) % 0xFFFF)
        out.append(h)
    return out


class Coalescer:
    """Merges consecutive TCP/IPv4 segments of one flow into GSO writes for a TUN with vnet
    headers. ``push(packet)`` returns the writes that are ready (each a bytes-like object: a
    vnet header and a packet) in order, usually none; ``flush()`` returns the rest, at the end of
    every drain. One run is open at a time: a packet that does not continue it closes it.
    ``counters``: ``merged_writes`` and ``merged_segments`` (writes of two or more segments),
    ``plain_writes`` (packets written alone), ``coalesce_bad_checksum`` (segments written alone
    because their checksum did not verify)."""

    __slots__ = ("counters", "max_segments", "link_header_bytes", "_run", "_h", "_next_seq", "_size", "_n", "_closed",
                 "_checked", "_ip_id", "_df", "_thl", "_psh", "_pseudo")

    def __init__(self, *, counters: Counter | None = None, max_segments: int = MAX_MERGED_SEGMENTS,
                 link_header_bytes: int = 0) -> None:
        self.counters: Counter = Counter() if counters is None else counters
        self.max_segments = max_segments
        self.link_header_bytes = link_header_bytes   # 14 for Ethernet frames on a packet socket
        self._run: bytearray | None = None   # ZERO_HDR || first packet || later payloads
        self._h = b""           # the first segment's headers
        self._next_seq = 0
        self._size = 0          # the run's payload size per segment (its first's)
        self._n = 0
        self._closed = False    # a shorter or PSH segment ended it
        self._checked = False   # the first segment's checksum was verified
        self._ip_id = 0
        self._df = False
        self._thl = 0
        self._psh = False
        self._pseudo = 0

    @property
    def pending(self) -> int:
        return self._n

    def push(self, packet):
        """Add one packet (copied: the caller's buffer is free again). Returns the writes now ready."""
        n = len(packet)
        h = bytes(packet[:80])                    # the headers (indexing bytes is cheap)
        if self._n and not self._closed and n > 40:
            # the common case first: the next segment of the open run. Equal bytes to its first
            # segment's: version, header length, TOS; DF and fragment bits, TTL, protocol;
            # addresses and ports; ACK number and TCP header length; options
            fh = self._h
            thl = self._thl
            if h[33] | _TCP_PSH == _TCP_ACK | _TCP_PSH and h[28:33] == fh[28:33] and h[12:24] == fh[12:24] \
                    and h[6:10] == fh[6:10] and h[:2] == fh[:2] and (h[2] << 8 | h[3]) == n \
                    and (thl == 20 or h[40:20 + thl] == fh[40:20 + thl]):
                payload = n - 20 - thl
                run = self._run
                if int.from_bytes(h[24:28], "big") == self._next_seq and 0 < payload <= self._size \
                        and self._n < self.max_segments and len(run) - 10 + payload <= MAX_IP_BYTES \
                        and (self._df or (h[4] << 8 | h[5]) == (self._ip_id + self._n) & 0xFFFF):
                    return self._extend(packet, h, n, payload)
        # a candidate: IPv4 without options or fragments, TCP, data, only ACK (and PSH)
        if n < 41 or h[0] != 0x45 or h[9] != PROTO_TCP or h[6] & 0x3F or h[7] \
                or h[33] | _TCP_PSH != _TCP_ACK | _TCP_PSH or (h[2] << 8 | h[3]) != n:
            return self._alone(packet)
        thl = (h[32] >> 4) * 4
        payload = n - 20 - thl
        if thl < 20 or payload <= 0:
            return self._alone(packet)
        return self._start(packet, h, thl, payload, [self._emit()] if self._n else [])

    def _extend(self, packet, h: bytes, n: int, payload: int):
        if not self._checked:
            if not l4_checksum_ok(self._run[10:]):   # (a copy: a view would pin the run)
                self.counters["coalesce_bad_checksum"] += 1
                return self._start(packet, h, self._thl, payload, [self._emit()])
            self._checked = True
        if (ones_sum(packet[20:n]) + self._pseudo + n) % 0xFFFF:
            self.counters["coalesce_bad_checksum"] += 1
            return [self._emit(), self._alone_write(packet)]
        self._run += packet[20 + self._thl:n]
        self._n += 1
        self._next_seq = (self._next_seq + payload) & 0xFFFFFFFF
        if h[33] & _TCP_PSH:
            self._psh = self._closed = True
        elif payload < self._size:
            self._closed = True
        return [self._emit()] if self._closed else _NOTHING

    def flush(self) -> list:
        return [self._emit()] if self._n else []

    def _start(self, packet, h: bytes, thl: int, payload: int, out: list):
        self._run = bytearray(ZERO_HDR)
        self._run += packet
        self._h = h
        self._thl = thl
        self._next_seq = (int.from_bytes(h[24:28], "big") + payload) & 0xFFFFFFFF
        self._size = payload
        self._n = 1
        self._psh = self._closed = bool(h[33] & _TCP_PSH)
        self._checked = False
        self._ip_id = h[4] << 8 | h[5]
        self._df = bool(h[6] & 0x40)
        # the pseudo-header sum less the TCP length (added per segment)
        self._pseudo = (int.from_bytes(h[12:20], "big") + PROTO_TCP - 20) % 0xFFFF
        if self._closed:
            out.append(self._emit())
        return out

    def _alone(self, packet) -> list:
        if self._n:
            return [self._emit(), self._alone_write(packet)]
        return [self._alone_write(packet)]

    def _alone_write(self, packet) -> bytes:
        self.counters["plain_writes"] += 1
        return ZERO_HDR + packet

    def _emit(self):
        run, n = self._run, self._n
        self._run = None
        self._n = 0
        if n == 1:
            self.counters["plain_writes"] += 1
            return run                       # (a zero header and the packet as it came)
        total = len(run) - VNET_HDR_BYTES
        thl = self._thl
        run[12:14] = total.to_bytes(2, "big")                     # IP total length
        run[20:22] = b"\0\0"
        c = 0xFFFF - int.from_bytes(run[10:30], "big") % 0xFFFF   # IP header checksum
        run[20:22] = c.to_bytes(2, "big")
        if self._psh:
            run[10 + 33] |= _TCP_PSH
        # the checksum field: the pseudo-header sum (not complemented), as a sending stack leaves it
        s = (int.from_bytes(run[22:30], "big") + PROTO_TCP + total - 20) % 0xFFFF or 0xFFFF
        run[10 + 36:10 + 38] = s.to_bytes(2, "big")
        l2 = self.link_header_bytes
        _HDR.pack_into(run, 0, F_NEEDS_CSUM, GSO_TCPV4, l2 + 20 + thl, self._size, l2 + 20, 16)
        self.counters["merged_writes"] += 1
        self.counters["merged_segments"] += n
        return run
