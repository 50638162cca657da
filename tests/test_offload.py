"""cyphonic/offload.py: vnet headers, cutting super-packets, finishing checksums, merging segments.

Every checksum is checked by ``ref_sum`` below, a plain 16-bit word loop with end-around carry
(RFC 1071), independent of the module's int-mod-0xFFFF trick."""

from __future__ import annotations

import os
import random
import struct
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.offload import (F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, GSO_UDP_L4, VNET_HDR_BYTES,
                              ZERO_HDR, Coalescer, VirtioNetHdr, checksum, finish_checksum, l4_checksum_ok, ones_sum,
                              split_gso)

SRC, DST = bytes([10, 77, 0, 2]), bytes([10, 77, 0, 3])
SRC6, DST6 = bytes.fromhex("fd000000000000000000000000000002"), bytes.fromhex("fd000000000000000000000000000003")


# --- the reference: straightforward, slow, obviously right ------------------------------------

def ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_ip_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 15) * 4
    return ref_sum(pkt[:ihl]) == 0xFFFF


def ref_l4_ok(pkt: bytes) -> bool:
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 15) * 4
        proto = pkt[9]
        pseudo = pkt[12:20] + bytes([0, proto]) + struct.pack("!H", len(pkt) - ihl)
    else:
        ihl = 40
        proto = pkt[6]
        pseudo = pkt[8:40] + struct.pack("!I", len(pkt) - ihl) + bytes([0, 0, 0, proto])
    if proto == 17 and pkt[ihl + 6:ihl + 8] == b"\0\0":
        return False   # we always fill UDP checksums
    return ref_sum(pseudo + pkt[ihl:]) == 0xFFFF


def ref_fill(pkt: bytearray) -> bytearray:
    """Complete checksums (IP header and L4) with the reference."""
    v4 = pkt[0] >> 4 == 4
    ihl = (pkt[0] & 15) * 4 if v4 else 40
    proto = pkt[9] if v4 else pkt[6]
    if v4:
        pkt[10:12] = b"\0\0"
        pkt[10:12] = struct.pack("!H", 0xFFFF ^ ref_sum(bytes(pkt[:ihl])))
    at = ihl + (16 if proto == 6 else 6)
    pkt[at:at + 2] = b"\0\0"
    if v4:
        pseudo = pkt[12:20] + bytes([0, proto]) + struct.pack("!H", len(pkt) - ihl)
    else:
        pseudo = pkt[8:40] + struct.pack("!I", len(pkt) - ihl) + bytes([0, 0, 0, proto])
    c = 0xFFFF ^ ref_sum(bytes(pseudo) + bytes(pkt[ihl:]))
    pkt[at:at + 2] = struct.pack("!H", c or 0xFFFF)
    return pkt


def tcp4(payload: bytes, *, seq=1000, ack=5000, flags=0x18, ip_id=7, options=b"", ttl=64, tos=0, df=True,
         src=SRC, dst=DST, sport=40000, dport=5201, fill=True) -> bytearray:
    thl = 20 + len(options)
    total = 20 + thl + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ip_id, 0x4000 if df else 0, ttl, 6, 0, src, dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, 65000, 0, 0) + options
    pkt = bytearray(ip + tcp + payload)
    return ref_fill(pkt) if fill else pkt


def tcp6(payload: bytes, *, seq=1000, flags=0x18, options=b"") -> bytearray:
    thl = 20 + len(options)
    ip = struct.pack("!IHBB16s16s", 0x60000000, thl + len(payload), 6, 64, SRC6, DST6)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 5000, (thl // 4) << 4, flags, 65000, 0, 0) + options
    return ref_fill(bytearray(ip + tcp + payload))


def udp4(payload: bytes, *, ip_id=9) -> bytearray:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), ip_id, 0x4000, 64, 17, 0, SRC, DST)
    udp = struct.pack("!HHHH", 40000, 5201, 8 + len(payload), 0)
    return ref_fill(bytearray(ip + udp + payload))


def as_read(pkt: bytearray, gso_type: int, gso_size: int) -> tuple[bytearray, VirtioNetHdr]:
    """What a TUN read shows for a packet the stack handed over with TSO/USO: the L4 checksum field
    holds only the pseudo-header sum (lengths of the whole super-packet)."""
    v4 = pkt[0] >> 4 == 4
    ihl = 20 if v4 else 40
    proto = pkt[9] if v4 else pkt[6]
    thl = (pkt[ihl + 12] >> 4) * 4 if proto == 6 else 8
    at = ihl + (16 if proto == 6 else 6)
    pseudo = (pkt[12:20] if v4 else pkt[8:40]) + bytes([0, proto]) + struct.pack("!H", len(pkt) - ihl)
    pkt[at:at + 2] = struct.pack("!H", ref_sum(bytes(pseudo)))
    return pkt, VirtioNetHdr(F_NEEDS_CSUM, gso_type, ihl + thl, gso_size, ihl, at - ihl)


def payload_of(pkt) -> bytes:
    pkt = bytes(pkt)
    v4 = pkt[0] >> 4 == 4
    ihl = (pkt[0] & 15) * 4 if v4 else 40
    proto = pkt[9] if v4 else pkt[6]
    thl = (pkt[ihl + 12] >> 4) * 4 if proto == 6 else 8
    return pkt[ihl + thl:]


# --- the header and the sums ----------------------------------------------------------------

def test_vnet_header_round_trips_and_a_short_one_is_none():
    h = VirtioNetHdr(1, GSO_TCPV4, 52, 1380, 20, 16)
    raw = h.build()
    assert len(raw) == VNET_HDR_BYTES and raw == bytes([1, 1, 52, 0, 0x64, 0x05, 20, 0, 16, 0])
    assert VirtioNetHdr.parse(raw + b"rest") == h
    assert VirtioNetHdr.parse(raw[:9]) is None
    assert VirtioNetHdr.parse(ZERO_HDR) == VirtioNetHdr()


def test_ones_sum_folded_lengths_match_the_reference_and_its_folds_are_bounded():
    """Packet-sized buffers are folded twice before the division (offload.FOLD_MIN_BYTES ..
    FOLD_MAX_BYTES): every length around both ends, odd and even, random and extreme bytes,
    bytes and views; and the kept folds stay bounded however many lengths pass."""
    from cyphonic import offload
    rng = random.Random(7)
    lengths = [*range(offload.FOLD_MIN_BYTES - 3, offload.FOLD_MIN_BYTES + 4), 1356, 1427, 1428, 1448,
               *range(offload.FOLD_MAX_BYTES - 3, offload.FOLD_MAX_BYTES + 4), 9000, 65535]
    for n in lengths:
        for data in (rng.randbytes(n), b"\xff" * n, b"\0" * n, b"\xff" * (n - 1) + b"\x01"):
            assert ones_sum(data) % 0xFFFF == ref_sum(data) % 0xFFFF, n
            buf = bytearray(b"xx" + data)
            assert ones_sum(memoryview(buf)[2:]) == ones_sum(data)
    for n in range(offload.FOLD_MIN_BYTES, offload.FOLD_MIN_BYTES + 3 * offload.FOLDS_KEPT):
        ones_sum(bytes(n))
        assert len(offload._folds) <= offload.FOLDS_KEPT


@given(st.binary(max_size=3000))
def test_ones_sum_matches_the_reference(data):
    assert ones_sum(data) % 0xFFFF == ref_sum(data) % 0xFFFF
    if len(data) % 2 == 0:
        assert ref_sum(data + struct.pack("!H", checksum(data))) == 0xFFFF


def test_finish_checksum_completes_a_lone_tcp_and_udp_packet():
    for pkt, gso in ((tcp4(b"hello world!"), GSO_TCPV4), (udp4(b"x" * 101), GSO_UDP_L4)):
        want = bytes(pkt)
        read, hdr = as_read(pkt, gso, 0)
        hdr = hdr._replace(gso_type=GSO_NONE, gso_size=0)
        assert not ref_l4_ok(bytes(read))
        out = split_gso(read, hdr)
        assert out == [read] and ref_l4_ok(bytes(read)) and ref_ip_ok(bytes(read))
        assert l4_checksum_ok(read) and ref_l4_ok(want) and payload_of(read) == payload_of(want)


def test_finish_checksum_refuses_offsets_outside_the_packet():
    drops = Counter()
    pkt = tcp4(b"abc")
    assert not finish_checksum(pkt, VirtioNetHdr(1, 0, 0, 0, 20, 200), drops)
    assert split_gso(pkt, VirtioNetHdr(1, 0, 0, 0, 500, 16), drops) == []
    assert drops["offload_bad_csum_offsets"] == 2


# --- cutting super-packets ------------------------------------------------------------------

def check_tcp_pieces(orig: bytes, pieces, gso: int, v6: bool = False):
    ihl = 40 if v6 else 20
    thl = (orig[ihl + 12] >> 4) * 4
    seq0 = struct.unpack("!I", orig[ihl + 4:ihl + 8])[0]
    flags0 = orig[ihl + 13]
    data = payload_of(orig)
    assert len(pieces) == -(-len(data) // gso)
    for i, p in enumerate(pieces):
        p = bytes(p)
        assert ref_l4_ok(p), i
        if v6:
            assert struct.unpack("!H", p[4:6])[0] == len(p) - 40
        else:
            assert ref_ip_ok(p), i
            assert struct.unpack("!H", p[2:4])[0] == len(p)
            assert struct.unpack("!H", p[4:6])[0] == (struct.unpack("!H", orig[4:6])[0] + i) & 0xFFFF
        assert struct.unpack("!I", p[ihl + 4:ihl + 8])[0] == (seq0 + i * gso) & 0xFFFFFFFF
        last = i == len(pieces) - 1
        want = flags0 if len(pieces) == 1 else (flags0 & ~0x09 if not last else flags0)
        if i:
            want &= ~0x80
        assert p[ihl + 13] == want, (i, p[ihl + 13], want)
        assert p[ihl:ihl + 4] == orig[ihl:ihl + 4] and p[ihl + 8:ihl + 12] == orig[ihl + 8:ihl + 12]
        assert p[ihl + 20:ihl + thl] == orig[ihl + 20:ihl + thl]   # options
        assert len(payload_of(p)) == (gso if not last else len(data) - gso * i)
    assert b"".join(payload_of(p) for p in pieces) == data


segments = st.tuples(st.integers(1, 40), st.integers(500, 1460), st.integers(0, 1459), st.integers(0, 2**32 - 1),
                     st.sampled_from([0x10, 0x18, 0x19, 0x11, 0x98]), st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]),
                     st.integers(0, 0xFFFF))


@settings(max_examples=60, deadline=None)
@given(segments, st.integers(0, 2**32))
def test_split_cuts_tcp4_like_the_kernel_and_coalesce_puts_it_back(seg, seed):
    count, gso, tail, seq, flags, options, ip_id = seg
    tail = tail % gso
    data = random.Random(seed).randbytes(min(count * gso + tail, 65535 - 40 - len(options)))
    orig = tcp4(data, seq=seq, flags=flags, options=options, ip_id=ip_id)
    read, hdr = as_read(bytearray(orig), GSO_TCPV4, gso)
    drops = Counter()
    pieces = split_gso(read, hdr, drops)
    assert not drops
    check_tcp_pieces(bytes(orig), pieces, gso)
    # the way in: the pieces of one super-packet (ACK only, PSH at most on the last) merge back
    counters = Counter()
    co = Coalescer(counters=counters)
    writes = [w for p in pieces for w in co.push(memoryview(bytes(p)))] + co.flush()
    if flags & ~0x18 or len(pieces) > 64:
        return   # FIN/CWR segments are written alone; over 64 segments: more than one write
    assert len(writes) == 1, (len(pieces), counters)
    w = bytes(writes[0])
    h = VirtioNetHdr.parse(w)
    merged = w[VNET_HDR_BYTES:]
    assert payload_of(merged) == data and ref_ip_ok(merged)
    assert merged[:10] == orig[:10] and merged[12:20] == orig[12:20]   # (only the checksum differs)
    assert merged[20:36] == orig[20:36] and merged[38:] == orig[38:]
    if len(pieces) == 1:
        assert h == VirtioNetHdr() and ref_l4_ok(merged)
    else:
        assert h == VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40 + len(options), gso, 20, 16)
        assert counters["merged_writes"] == 1 and counters["merged_segments"] == len(pieces)
        # and the kernel (here: split_gso again) cuts it into the same pieces
        again = split_gso(bytearray(merged), h)
        assert [bytes(p) for p in again] == [bytes(p) for p in pieces]


def test_split_tcp6_and_udp_l4():
    data = os.urandom(5000)
    orig = tcp6(data, seq=2**32 - 3000)
    read, hdr = as_read(bytearray(orig), GSO_TCPV6, 1200)
    pieces = split_gso(read, hdr)
    check_tcp_pieces(bytes(orig), pieces, 1200, v6=True)
    data = os.urandom(1300 * 9 + 77)
    orig = udp4(data, ip_id=0xFFFE)
    read, hdr = as_read(bytearray(orig), GSO_UDP_L4, 1300)
    pieces = split_gso(read, hdr)
    assert len(pieces) == 10
    for i, p in enumerate(pieces):
        p = bytes(p)
        assert ref_ip_ok(p) and ref_l4_ok(p)
        assert struct.unpack("!H", p[4:6])[0] == (0xFFFE + i) & 0xFFFF
        assert struct.unpack("!H", p[24:26])[0] == len(p) - 20
    assert b"".join(payload_of(p) for p in pieces) == data


def test_malformed_reads_are_counted_drops_never_exceptions():
    drops = Counter()
    good = tcp4(os.urandom(3000))
    cases = [
        (b"", VirtioNetHdr(1, GSO_TCPV4, 40, 1000, 20, 16)),
        (good[:30], VirtioNetHdr(1, GSO_TCPV4, 40, 1000, 20, 16)),
        (good, VirtioNetHdr(1, GSO_TCPV4, 40, 0, 20, 16)),
        (good, VirtioNetHdr(1, GSO_UDP_L4, 28, 1000, 20, 6)),
        (good, VirtioNetHdr(1, GSO_TCPV6, 60, 1000, 40, 16)),
        (good, VirtioNetHdr(1, GSO_UDP, 28, 1000, 20, 6)),
        (b"\x70" + bytes(100), VirtioNetHdr(1, GSO_TCPV4, 40, 10, 20, 16)),
        (b"\x41" + bytes(100), VirtioNetHdr(1, GSO_TCPV4, 40, 10, 20, 16)),
    ]
    for pkt, hdr in cases:
        assert split_gso(bytearray(pkt), hdr, drops) == []
    assert sum(drops.values()) == len(cases), drops
    rnd = random.Random(15)
    co = Coalescer()
    for _ in range(3000):
        pkt = bytearray(rnd.randbytes(rnd.randrange(0, 200)))
        if pkt and rnd.random() < 0.5:
            pkt[0] = rnd.choice([0x45, 0x46, 0x60])
        hdr = VirtioNetHdr(*(rnd.randrange(256) for _ in range(2)), *(rnd.randrange(70000) % 65536 for _ in range(4)))
        out = split_gso(pkt, hdr, drops)
        assert isinstance(out, list)
        co.push(memoryview(bytes(pkt)))
    co.flush()


# --- the Coalescer's rules ----------------------------------------------------------------------

def run_of(n, size=1000, **kw):
    seq = kw.pop("seq", 1)
    return [tcp4(os.urandom(size), seq=seq + i * size, flags=0x10, ip_id=i, **kw) for i in range(n)]


def push_all(co, pkts):
    return [bytes(w) for p in pkts for w in co.push(memoryview(bytes(p)))] + [bytes(w) for w in co.flush()]


def test_a_run_merges_and_other_packets_keep_their_place_with_a_zero_header():
    co = Coalescer()
    a = run_of(3)
    ping = bytearray(b"\x45" + bytes(27))
    b = run_of(2, seq=3001)
    writes = push_all(co, [*a, ping, *b])
    assert [VirtioNetHdr.parse(w).gso_type for w in writes] == [GSO_TCPV4, GSO_NONE, GSO_TCPV4]
    assert writes[1] == ZERO_HDR + ping
    assert co.counters["merged_writes"] == 2 and co.counters["plain_writes"] == 1


def test_for_a_packet_socket_the_offsets_count_the_link_header_and_nothing_else_changes():
    a = run_of(3, options=b"\x01\x01\x08\x0a" + bytes(8))
    plain, framed = Coalescer(), Coalescer(link_header_bytes=14)
    [tun] = push_all(plain, a)
    [frame] = push_all(framed, a)
    assert frame[VNET_HDR_BYTES:] == tun[VNET_HDR_BYTES:]
    assert VirtioNetHdr.parse(frame) == VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 14 + 52, 1000, 14 + 20, 16)
    # a packet written alone keeps its zero header
    ping = bytearray(b"\x45" + bytes(27))
    assert push_all(framed, [ping]) == [ZERO_HDR + ping]


def test_what_is_never_merged():
    cases = {
        "ack": [tcp4(b"a" * 100, seq=1, flags=0x10), tcp4(b"b" * 100, seq=101, flags=0x10, ack=9)],
        "port": [tcp4(b"a" * 100, seq=1, flags=0x10), tcp4(b"b" * 100, seq=101, flags=0x10, sport=1)],
        "gap": [tcp4(b"a" * 100, seq=1, flags=0x10), tcp4(b"b" * 100, seq=102, flags=0x10)],
        "bigger": [tcp4(b"a" * 100, seq=1, flags=0x10), tcp4(b"b" * 101, seq=101, flags=0x10)],
        "syn": [tcp4(b"a" * 100, seq=1, flags=0x10), tcp4(b"b" * 100, seq=101, flags=0x12)],
        "fin": [tcp4(b"a" * 100, seq=1, flags=0x10), tcp4(b"b" * 100, seq=101, flags=0x11)],
        "psh first": [tcp4(b"a" * 100, seq=1, flags=0x18), tcp4(b"b" * 100, seq=101, flags=0x10)],
        "ttl": [tcp4(b"a" * 100, seq=1, flags=0x10), tcp4(b"b" * 100, seq=101, flags=0x10, ttl=3)],
        "tos": [tcp4(b"a" * 100, seq=1, flags=0x10), tcp4(b"b" * 100, seq=101, flags=0x10, tos=4)],
        "options": [tcp4(b"a" * 100, seq=1, flags=0x10, options=b"\x01\x01\x01\x01"),
                    tcp4(b"b" * 100, seq=101, flags=0x10, options=b"\x01\x01\x01\x00")],
        "id without DF": [tcp4(b"a" * 100, seq=1, flags=0x10, df=False, ip_id=1),
                          tcp4(b"b" * 100, seq=101, flags=0x10, df=False, ip_id=5)],
        "pure ack": [tcp4(b"", seq=1, flags=0x10), tcp4(b"", seq=1, flags=0x10)],
    }
    for why, pkts in cases.items():
        co = Coalescer()
        writes = push_all(co, pkts)
        assert [bytes(w[VNET_HDR_BYTES:]) for w in writes] == [bytes(p) for p in pkts], why
        assert all(w[:VNET_HDR_BYTES] == ZERO_HDR for w in writes), why
        assert not co.counters["merged_writes"], why
    # a shorter segment ends a run; PSH on the last is kept
    co = Coalescer()
    pkts = [tcp4(b"a" * 100, seq=1, flags=0x10), tcp4(b"b" * 100, seq=101, flags=0x10),
            tcp4(b"c" * 50, seq=201, flags=0x18), tcp4(b"d" * 100, seq=251, flags=0x10)]
    writes = push_all(co, pkts)
    assert len(writes) == 2 and VirtioNetHdr.parse(writes[0]).gso_size == 100
    assert writes[0][VNET_HDR_BYTES + 33] == 0x18 and payload_of(writes[0][VNET_HDR_BYTES:]) == b"a" * 100 + b"b" * 100 + b"c" * 50


def test_a_segment_with_a_bad_checksum_is_never_merged():
    for bad in (0, 1, 2):
        pkts = run_of(3)
        pkts[bad][-1] ^= 0xFF   # payload changed, checksum not
        co = Coalescer()
        writes = push_all(co, pkts)
        assert co.counters["coalesce_bad_checksum"] == 1, bad
        alone = [w for w in writes if w[:VNET_HDR_BYTES] == ZERO_HDR]
        assert bytes(pkts[bad]) in [w[VNET_HDR_BYTES:] for w in alone]
        for w in writes:   # whatever merged holds only good segments
            if w[:VNET_HDR_BYTES] != ZERO_HDR:
                assert bytes(pkts[bad])[40:] not in w
        assert b"".join(payload_of(w[VNET_HDR_BYTES:]) for w in writes) == b"".join(payload_of(p) for p in pkts)


def test_runs_are_bounded():
    co = Coalescer()
    writes = push_all(co, run_of(150, size=400))
    assert [VirtioNetHdr.parse(w).gso_type for w in writes] == [GSO_TCPV4] * 3
    assert co.counters["merged_segments"] == 150
    co = Coalescer()
    writes = push_all(co, run_of(60, size=1460))
    assert all(len(w) - VNET_HDR_BYTES <= 65535 for w in writes) and len(writes) == 2


# --- the tun_offload setting: its values, and the modes the TUN probe ends in -----------------

NODE_KEY = "cyk1:" + "11" * 32 + ":" + "22" * 32


def node_cfg(**kw):
    from cyphonic.node.config import parse_config
    return parse_config({"cloud": "192.0.2.1:47101", "cloud_key": NODE_KEY, **kw}, "node.toml")


def test_tun_offload_takes_a_mode_or_a_boolean_and_true_is_the_default_mode():
    from cyphonic.node.config import DEFAULTS, TUN_OFFLOAD_TRUE
    assert node_cfg().tun_offload == DEFAULTS["tun_offload"] == TUN_OFFLOAD_TRUE
    assert node_cfg(tun_offload=True).tun_offload == TUN_OFFLOAD_TRUE
    assert node_cfg(tun_offload=False).tun_offload == "off"
    for mode in ("merge", "full", "off"):
        assert node_cfg(tun_offload=mode).tun_offload == mode


def test_tun_offload_refuses_anything_else_and_says_what_it_takes():
    import pytest

    from cyphonic.node.config import NodeConfigError
    for bad in ("on", "tso", "", "MERGE", 1, 0, 1.0, ["merge"]):
        with pytest.raises(NodeConfigError) as e:
            node_cfg(tun_offload=bad)
        assert str(e.value) == f'node.toml: tun_offload: must be "merge", "full", "off", true or false, not {bad!r}'


def test_the_example_config_parses_with_the_default_mode():
    import tomllib

    from cyphonic.node.config import DEFAULTS, example_config, parse_config
    doc = tomllib.loads(example_config())
    assert doc["tun_offload"] == DEFAULTS["tun_offload"]
    assert parse_config({**doc, "cloud": "192.0.2.1:47101", "cloud_key": NODE_KEY}).tun_offload == doc["tun_offload"]


class FakeIoctl:
    """Records the ioctls; ``refuse(req, arg)`` says which fail (EINVAL)."""

    def __init__(self, refuse=lambda req, arg: False, features=None) -> None:
        from cyphonic.node import tun as T
        self.T = T
        self.calls: list = []
        self.refuse = refuse
        self.features = T.IFF_TUN | T.IFF_NO_PI | T.IFF_VNET_HDR if features is None else features

    def __call__(self, fd, req, arg=0):
        T = self.T
        flags = struct.unpack("16sH", arg)[1] if req == T.TUNSETIFF else arg
        self.calls.append((req, flags))
        if self.refuse(req, flags):
            raise OSError(22, "Invalid argument")
        if req == T.TUNGETFEATURES:
            return struct.pack("I", self.features)
        return 0


def open_tun(monkeypatch, mode, ioctl):
    from cyphonic.node import tun as T
    monkeypatch.setattr(T.Tun, "_open", staticmethod(lambda: os.open(os.devnull, os.O_RDONLY)))
    t = T.Tun("cyt0", mode, ioctl=ioctl)
    t.close()
    return t


def test_each_tun_mode_asks_the_kernel_for_what_it_needs(monkeypatch):
    from cyphonic.node import tun as T
    vnet = T.IFF_TUN | T.IFF_NO_PI | T.IFF_VNET_HDR
    io = FakeIoctl()
    t = open_tun(monkeypatch, "off", io)
    assert io.calls == [(T.TUNSETIFF, T.IFF_TUN | T.IFF_NO_PI)] and not t.vnet_hdr
    assert t.offload == {"requested": "off", "mode": "off", "state": "off", "features": [], "reason": ""}

    io = FakeIoctl()
    t = open_tun(monkeypatch, "merge", io)   # a vnet header, and no read offloads at all
    assert io.calls == [(T.TUNGETFEATURES, bytes(4)), (T.TUNSETIFF, vnet), (T.TUNSETOFFLOAD, 0)] and t.vnet_hdr
    assert t.offload == {"requested": "merge", "mode": "merge", "state": "on", "features": ["gso-writes"],
                         "reason": ""}

    io = FakeIoctl()
    t = open_tun(monkeypatch, "full", io)
    assert io.calls[-1] == (T.TUNSETOFFLOAD, T.TSO_FLAGS | T.USO_FLAGS) and t.vnet_hdr
    assert t.offload["mode"] == "full" and t.offload["state"] == "on"
    assert t.offload["features"] == ["csum", "tso4", "tso6", "uso4", "uso6"]

    io = FakeIoctl(refuse=lambda req, arg: req == T.TUNSETOFFLOAD and arg & T.USO_FLAGS)   # no USO: TSO alone
    t = open_tun(monkeypatch, "full", io)
    assert io.calls[-1] == (T.TUNSETOFFLOAD, T.TSO_FLAGS) and t.offload["features"] == ["csum", "tso4", "tso6"]


def test_a_refused_mode_falls_back_to_the_next_simpler_one_and_says_why(monkeypatch):
    import pytest

    from cyphonic.node import tun as T
    no_tso = FakeIoctl(refuse=lambda req, arg: req == T.TUNSETOFFLOAD and arg != 0)
    t = open_tun(monkeypatch, "full", no_tso)
    assert t.vnet_hdr and t.offload == {"requested": "full", "mode": "merge", "state": "fallback",
                                        "features": ["gso-writes"], "reason": "no TSO: Invalid argument"}
    no_offload = FakeIoctl(refuse=lambda req, arg: req == T.TUNSETOFFLOAD)
    for mode in ("full", "merge"):
        t = open_tun(monkeypatch, mode, no_offload)
        assert not t.vnet_hdr and t.offload == {"requested": mode, "mode": "off", "state": "fallback",
                                                "features": [], "reason": "Invalid argument"}
        assert no_offload.calls[-1] == (T.TUNSETIFF, T.IFF_TUN | T.IFF_NO_PI)   # opened again, plain
    no_vnet = FakeIoctl(features=T.IFF_TUN | T.IFF_NO_PI)
    t = open_tun(monkeypatch, "merge", no_vnet)
    assert t.offload["mode"] == "off" and "no IFF_VNET_HDR" in t.offload["reason"]
    with pytest.raises(T.TunError, match="offload must be one of off, merge, full, not True"):
        T.Tun("cyt0", True)
