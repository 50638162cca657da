"""Minimal IPv4/ICMP packet building and reading (demo, tests, keepalive probes).

Only what the core needs; real packet crafting in the appliance uses scapy.
"""

from __future__ import annotations

import ipaddress
import struct


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, ident: int = 0) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, 0, ttl, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def icmp_echo(src: str, dst: str, ident: int, seq: int, data: bytes = b"", reply: bool = False) -> bytes:
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + data
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    return ipv4_packet(src, dst, 1, icmp, ident=seq)


def parse_icmp_echo(packet: bytes) -> tuple[str, str, int, int, int, bytes] | None:
    """(src, dst, type, ident, seq, data) of an ICMP echo/reply, else None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    itype, _, _, ident, seq = struct.unpack_from("!BBHHH", packet, ihl)
    if itype not in (0, 8):
        return None
    return (str(ipaddress.IPv4Address(packet[12:16])), str(ipaddress.IPv4Address(packet[16:20])),
            itype, ident, seq, packet[ihl + 8:])
