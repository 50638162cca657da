"""The adapter's workers with NFQUEUE's F_GSO (issue 15, step 5; appliance.packet_handling):
a queued super-packet is cut into complete TCP segments that fit the tunnel, each sealed with
the stream's next counter and sent as one UDP_SEGMENT run; a CSUMNOTREADY packet gets its
checksum finished; a super-packet the worker cannot cut (UDP GSO, truncated) goes back to the
kernel (F_GSO off, REPEAT, F_GSO on), within a guard; everything stays under the drain's DROP.

The queue is a fake netlink socket fed with messages laid out as the kernel's
(``test_nfqueue_wire.queued``), read through ``QueueDrain.recv`` as the package's
``run_socket`` does (``run_socket`` below), so the SKB_INFO flags reach the callback the way
they do in a worker."""

from __future__ import annotations

import errno
import os
import random
import struct
from collections import Counter
from types import SimpleNamespace

import pytest

from appliance import nfqueue_wire as nfw
from cyphonic import constants as C
from appliance import packet_handling as ph
from appliance.constants import NFQ_GSO_REPEATS_PER_DRAIN, NFQ_RECV_GSO_BYTES
from appliance.packet_handling import QueueDrain, SealTable, packet_handler
from cyphonic.datachannel import ReceiveSession, SendStream
from cyphonic.offload import l4_checksum_ok, ones_sum
from cyphonic.udp_batch import UDP_SEGMENT, GsoSender

from test_nfqueue_wire import queued

GN, PEER = bytes([100, 64, 0, 1]), bytes([100, 64, 1, 1])
KEY = bytes(range(32))
MTU = 1408
OVERHEAD = 32        # a sealed datagram: header 16 + tag 16
TCP_TS = b"\x01\x01\x08\x0a" + struct.pack("!II", 11, 22)     # NOP NOP timestamps: a 32-byte TCP header
ACK, PSH, FIN = 0x10, 0x08, 0x01


class Netlink:
    """The queue's netlink socket: ``recv`` hands out ``messages`` (an int raises that errno),
    then EAGAIN; ``send`` records in ``log`` (shared with the UDP socket: the order shows), and
    raises for a message whose nlmsg type is in ``fail_types``."""

    def __init__(self, log: list, messages=(), fail_types=()) -> None:
        self.log = log
        self.messages = list(messages)
        self.fail_types = set(fail_types)

    def recv(self, n, flags=0):
        if not self.messages:
            raise BlockingIOError(errno.EAGAIN, "empty")
        m = self.messages.pop(0)
        if isinstance(m, int):
            raise OSError(m, os.strerror(m))
        return m[:n]

    def send(self, data):
        if nfw.NLMSGHDR.unpack_from(data)[1] in self.fail_types:
            raise OSError(errno.ENOBUFS, "no buffer space")
        self.log.append(("netlink", bytes(data)))
        return len(data)


class Udp:
    def __init__(self, log: list) -> None:
        self.log = log

    def sendto(self, data, addr):
        self.log.append(("udp", bytes(data), len(data)))

    def sendmsg(self, buffers, ancdata, flags, addr):
        [(level, kind, seg)] = ancdata
        assert (level, kind) == (17, UDP_SEGMENT)
        self.log.append(("udp-gso", b"".join(bytes(b) for b in buffers), struct.unpack("=H", seg)[0]))


class Packet:
    def __init__(self, pid: int, payload: bytes) -> None:
        self.id = pid
        self.payload = payload

    def get_payload(self):
        return self.payload


def run_socket(drain: QueueDrain, on_packet) -> None:
    """NetfilterQueue.run_socket: recv until EAGAIN, each message to the callback right away."""
    while True:
        try:
            data = drain.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                continue
            raise
        hdr = nfw.find_attr(data, nfw.NFQA_PACKET_HDR)
        payload = nfw.find_attr(data, nfw.NFQA_PAYLOAD)
        on_packet(Packet(struct.unpack_from("!I", hdr)[0], payload))


def make_worker(messages=(), *, gso=True, mtu=MTU, fail_types=(), clock=lambda: 0.0, limit=256):
    log: list = []
    table = SealTable(0, 5, SimpleNamespace(send=lambda m: None), {}, Counter())
    table.sessions[(GN, PEER)] = (SendStream(KEY, 77, stream_id=3), ("192.0.2.7", 4000), Udp(log))
    sender = GsoSender(counters=table.counters)
    drain = QueueDrain(Netlink(log, messages, fail_types), 5, table.counters, sender, gso=gso, clock=clock,
                       limit=limit)
    offload = Counter()
    # a clock that never moves: no packet is "lone" (each piece joins the run, as in a bulk stream)
    on_packet = packet_handler(table, sender, drain, clock=lambda: 0.0, mtu=mtu if gso else 0,
                               offload_drops=offload)
    return SimpleNamespace(log=log, table=table, c=table.counters, drain=drain, on_packet=on_packet,
                           offload=offload)


def ip_checksum(h: bytes) -> int:
    return 0xFFFF - ones_sum(h) % 0xFFFF


def ipv4(proto: int, l4: bytes, *, total: int | None = None, ident: int = 0x1234, df: bool = True) -> bytes:
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total or 20 + len(l4), ident, 0x4000 if df else 0, 64,
                              proto, 0, GN, PEER))
    h[10:12] = ip_checksum(h).to_bytes(2, "big")
    return bytes(h) + l4


def pseudo(proto: int, l4_len: int) -> int:
    """The pseudo-header sum, as a sending stack leaves it in the field (CHECKSUM_PARTIAL)."""
    return (ones_sum(GN + PEER) + proto + l4_len) % 0xFFFF


def tcp(data: bytes, *, seq: int = 1000, flags: int = ACK | PSH, opts: bytes = TCP_TS, total: int | None = None):
    thl = 20 + len(opts)
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 777, (thl // 4) << 4, flags, 502, 0, 0) + opts + data)
    seg[16:18] = pseudo(6, len(seg)).to_bytes(2, "big")
    return ipv4(6, bytes(seg), total=total)


def udp(data: bytes, **kw) -> bytes:
    seg = bytearray(struct.pack("!HHHH", 40000, 5201, 8 + len(data), 0) + data)
    seg[6:8] = pseudo(17, len(seg)).to_bytes(2, "big")
    return ipv4(17, bytes(seg), **kw)


def datagrams(log: list) -> list[bytes]:
    """Every sealed datagram sent, in order (a GSO run cut by its segment size)."""
    out = []
    for kind, data, seg in (e for e in log if e[0] in ("udp", "udp-gso")):
        out.extend(data[i:i + seg] for i in range(0, len(data), seg))
    return out


def opened(log: list) -> list[tuple[bytes, int]]:
    r = ReceiveSession(KEY, 77)
    return [(bytes(p), c) for p, c in (r.open(d) for d in datagrams(log))]


# --- a GSO TCP super-packet: cut, sealed, one UDP_SEGMENT send ----------------------------------------------

@pytest.mark.parametrize("size", [20000, 1356, 1357, 63000])
def test_a_gso_tcp_super_packet_leaves_as_sealed_segments_that_cover_its_payload_exactly(size):
    data = random.Random(size).randbytes(size)
    w = make_worker([queued(40, tcp(data, flags=ACK | PSH), nfw.SKB_GSO | nfw.SKB_CSUMNOTREADY)])
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    seg_size = MTU - 20 - 32                           # the overlay MTU less IP and TCP (with options) headers
    n = -(-size // seg_size)
    kinds = [e[0] for e in w.log]
    per_send = C.MAX_DATAGRAM_BYTES // (MTU + OVERHEAD)       # (a UDP_SEGMENT send carries at most 64 KB)
    sends = -(-n // per_send)
    assert kinds == (["udp-gso"] * sends if n > 1 else ["udp"]) + ["netlink"]   # one send per 64 KB, then the verdict
    assert w.log[-1][1] == nfw.verdict_batch(5, nfw.NF_DROP, 40)
    pieces = opened(w.log)
    assert [c for _, c in pieces] == [(3 << 56) + i for i in range(n)]  # the stream's next counters, none twice
    seq, got = 1000, b""
    for i, (p, _) in enumerate(pieces):
        assert len(p) <= MTU and l4_checksum_ok(p) and ones_sum(p[:20]) % 0xFFFF == 0
        assert (p[2] << 8 | p[3]) == len(p) and p[12:20] == GN + PEER
        assert struct.unpack_from("!I", p, 24)[0] == seq                  # contiguous sequence numbers
        assert p[40:52] == TCP_TS and struct.unpack_from("!I", p, 28)[0] == 777
        assert p[33] == (ACK | PSH if i == n - 1 else ACK)                # PSH on the last piece only
        assert struct.unpack_from("!H", p, 4)[0] == (0x1234 + i) & 0xFFFF
        got += p[52:]
        seq += len(p) - 52
    assert got == data
    assert all(len(p) == MTU for p, _ in pieces[:-1])
    c = w.c
    assert (c["gso_reads"], c["gso_pieces"], c["sealed"], c["verdicts"]) == (1, n, n, 1)
    assert not c["csum_finished"] and not w.offload and not c["gso_repeated"]


def test_the_pieces_count_against_the_drains_bound():
    msgs = [queued(1, tcp(bytes(20000)), nfw.SKB_GSO), queued(2, tcp(bytes(100)), 0), queued(3, tcp(bytes(100)), 0)]
    w = make_worker(msgs, limit=16)
    run_socket(w.drain, w.on_packet)                  # 15 pieces and one packet: the bound is reached
    assert w.c["sealed"] == 16 and len(w.drain.sock.messages) == 1
    w.drain.end()
    run_socket(w.drain, w.on_packet)
    assert w.c["sealed"] == 17


# --- checksums left for us (CHECKSUM_PARTIAL) --------------------------------------------------------------

@pytest.mark.parametrize("make", [tcp, udp], ids=["tcp", "udp"])
def test_a_csumnotready_packet_gets_its_checksum_finished(make):
    pkt = make(b"hello, overlay" * 7)
    assert not l4_checksum_ok(pkt)                    # only the pseudo-header sum in the field
    w = make_worker([queued(7, pkt, nfw.SKB_CSUMNOTREADY), queued(8, pkt, nfw.SKB_CSUM_NOTVERIFIED)])
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    (first, _), (second, _) = opened(w.log)
    assert l4_checksum_ok(first) and first[:16] == pkt[:16] and len(first) == len(pkt)
    assert second == pkt                              # not CSUMNOTREADY: sealed as it came
    assert w.c["csum_finished"] == 1 and w.c["sealed"] == 2


def test_a_udp_checksum_that_sums_to_zero_is_sent_as_ffff():
    base = udp(bytes(2) + b"x" * 9)                   # two payload bytes chosen so the whole sum is 0
    word = 0xFFFF - ones_sum(base[20:]) % 0xFFFF      # (the field holds the pseudo-header sum already)
    pkt = udp(word.to_bytes(2, "big") + b"x" * 9)
    w = make_worker([queued(7, pkt, nfw.SKB_CSUMNOTREADY)])
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    [(p, _)] = opened(w.log)
    assert l4_checksum_ok(p) and p[26:28] == b"\xff\xff"      # 0 would mean "no checksum" (RFC 768)


def test_csumnotready_on_another_protocol_or_bad_offsets_is_a_counted_drop():
    icmp = ipv4(1, b"\x08\0\0\0" + bytes(60))
    short_tcp = ipv4(6, bytes(10))                    # the checksum field lies past the end
    w = make_worker([queued(1, icmp, nfw.SKB_CSUMNOTREADY), queued(2, short_tcp, nfw.SKB_CSUMNOTREADY)])
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    assert not datagrams(w.log) and w.c["drop_csum_not_ready"] == 1
    assert w.offload["offload_bad_csum_offsets"] == 1
    assert w.log == [("netlink", nfw.verdict_batch(5, nfw.NF_DROP, 2))]   # both under the DROP


# --- super-packets we cannot cut: back to the kernel, segmented -----------------------------------------

GSO_OFF = nfw.config(5, flags=0, mask=nfw.F_GSO, seq=2, ack=False)
GSO_ON = nfw.config(5, flags=nfw.F_GSO, mask=nfw.F_GSO, seq=2, ack=False)


def repeat(pid: int) -> bytes:
    return nfw.verdict(5, nfw.NF_REPEAT, pid, seq=3)


@pytest.mark.parametrize("pkt", [udp(bytes(13000)), tcp(bytes(65535 - 52))[:65531],
                                 tcp(bytes(3000), opts=b"")[:1000]],
                         ids=["udp_gso", "truncated_at_the_copy_range", "truncated"])
def test_a_super_packet_we_cannot_cut_is_handed_back_off_repeat_on(pkt):
    w = make_worker([queued(21, tcp(bytes(100)), 0), queued(22, pkt, nfw.SKB_GSO | nfw.SKB_CSUMNOTREADY),
                     queued(23, tcp(bytes(100)), 0)])
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    nl = [d for k, d, *_ in w.log if k == "netlink"]
    assert nl == [GSO_OFF, repeat(22), GSO_ON, nfw.verdict_batch(5, nfw.NF_DROP, 23)]
    assert w.c["gso_repeated"] == 1 and w.c["sealed"] == 2 and not w.c["gso_reads"]


def test_a_malformed_super_packet_is_a_counted_drop():
    bad = bytearray(tcp(bytes(5000)))
    bad[32] = 0x30                                   # a TCP header length of 12 bytes
    w = make_worker([queued(3, bytes(bad), nfw.SKB_GSO)])
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    assert w.offload["offload_bad_tcp_header"] == 1 and not w.c["gso_reads"] and not datagrams(w.log)
    assert w.log == [("netlink", nfw.verdict_batch(5, nfw.NF_DROP, 3))]


def test_a_super_packet_cut_into_more_than_64_pieces_goes_back_to_the_kernel():
    w = make_worker([queued(1, tcp(bytes(40000)), nfw.SKB_GSO)], mtu=576)   # 524-byte pieces: 77
    run_socket(w.drain, w.on_packet)
    assert [d for k, d, *_ in w.log] == [GSO_OFF, repeat(1), GSO_ON] and w.c["gso_repeated"] == 1


def test_the_hand_back_guard_per_drain_and_per_second(monkeypatch):
    monkeypatch.setattr(ph, "NFQ_GSO_REPEATS_PER_S", NFQ_GSO_REPEATS_PER_DRAIN + 4)
    now = [100.0]
    n = NFQ_GSO_REPEATS_PER_DRAIN + 2
    w = make_worker([queued(i, udp(bytes(5000)), nfw.SKB_GSO) for i in range(n)], clock=lambda: now[0])
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    assert w.c["gso_repeated"] == NFQ_GSO_REPEATS_PER_DRAIN and w.c["drop_gso_hand_back_limit"] == 2
    w.drain.sock.messages = [queued(100 + i, udp(bytes(5000)), nfw.SKB_GSO) for i in range(8)]
    run_socket(w.drain, w.on_packet)                  # a new drain, the same second: 4 more at most
    w.drain.end()
    assert w.c["gso_repeated"] == NFQ_GSO_REPEATS_PER_DRAIN + 4 and w.c["drop_gso_hand_back_limit"] == 6
    now[0] += 1.0
    w.drain.sock.messages = [queued(200, udp(bytes(5000)), nfw.SKB_GSO)]
    run_socket(w.drain, w.on_packet)                  # the next second
    assert w.c["gso_repeated"] == NFQ_GSO_REPEATS_PER_DRAIN + 5


def test_a_refused_toggle_ends_the_hand_backs_for_good():
    refused = nfw.NLMSGHDR.pack(36, nfw.NLMSG_ERROR, 0, 2, 0) + struct.pack("=i", -errno.EPERM) + bytes(16)
    w = make_worker([queued(1, udp(bytes(5000)), nfw.SKB_GSO), refused, queued(2, udp(bytes(5000)), nfw.SKB_GSO)])
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    assert w.c["gso_repeated"] == 1 and w.c["nfq_gso_toggle_refused"] == 1
    assert w.c["drop_gso_hand_back_refused"] == 1 and w.drain.repeat_refused
    assert [d for k, d, *_ in w.log][3:] == [nfw.verdict_batch(5, nfw.NF_DROP, 2)]   # no more toggles


def test_a_failed_send_leaves_the_packet_under_the_drop_and_gso_is_turned_on_again():
    w = make_worker([queued(9, udp(bytes(5000)), nfw.SKB_GSO)], fail_types={nfw.NFQNL_MSG_VERDICT})
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    assert [d for k, d, *_ in w.log] == [GSO_OFF, GSO_ON, nfw.verdict_batch(5, nfw.NF_DROP, 9)]
    assert w.c["drop_gso_hand_back_failed"] == 1 and w.c["nfq_repeat_ENOBUFS"] == 1 and not w.c["gso_repeated"]
    # the toggle itself fails: nothing repeated; turning GSO on again failed: tried at the drain's end
    w = make_worker([queued(9, udp(bytes(5000)), nfw.SKB_GSO)], fail_types={nfw.NFQNL_MSG_CONFIG})
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    assert [d for k, d, *_ in w.log] == [nfw.verdict_batch(5, nfw.NF_DROP, 9)]
    assert w.c["drop_gso_hand_back_failed"] == 1 and w.c["nfq_gso_off_ENOBUFS"] == 1
    w = make_worker([queued(9, udp(bytes(5000)), nfw.SKB_GSO)])
    w.drain.sock.send = lambda d, real=w.drain.sock.send: (
        (_ for _ in ()).throw(OSError(errno.ENOBUFS, "full")) if d == GSO_ON and not w.c["nfq_gso_on_ENOBUFS"]
        else real(d))
    run_socket(w.drain, w.on_packet)
    assert w.drain.gso_restore and w.c["gso_repeated"] == 1
    w.drain.end()
    assert not w.drain.gso_restore and [d for k, d, *_ in w.log][-2:] == [GSO_ON, nfw.verdict_batch(5, 0, 9)]


# --- configuration, and the switch off -----------------------------------------------------------------

def test_the_config_asks_for_gso_and_a_64k_copy_range_with_fail_open_off():
    w = make_worker()
    w.drain.configure()
    assert w.log == [("netlink", nfw.config(5, flags=nfw.F_GSO, mask=nfw.F_FAIL_OPEN | nfw.F_GSO,
                                            copy_range=0xFFFF, seq=1))]
    assert w.drain.recv_bytes == NFQ_RECV_GSO_BYTES >= 65531 + 1024
    off = make_worker(gso=False)
    off.drain.configure()
    assert off.log == [("netlink", nfw.config(5, flags=0, mask=nfw.F_FAIL_OPEN, seq=1))]


def test_with_nfq_gso_off_the_flags_are_not_read_and_nothing_is_cut_or_finished():
    pkt = tcp(bytes(500))
    w = make_worker([queued(1, pkt, nfw.SKB_GSO | nfw.SKB_CSUMNOTREADY)], gso=False)
    run_socket(w.drain, w.on_packet)
    w.drain.end()
    [(p, _)] = opened(w.log)
    assert p == pkt and not w.c["gso_reads"] and not w.c["csum_finished"]


def test_the_workers_args_carry_the_mtu_only_with_nfq_gso():
    from appliance.controller import Adapter

    for on in (True, False):
        ad = SimpleNamespace(cfg=SimpleNamespace(mtu=1408, nfq_gso=on), links={},
                             way_back=SimpleNamespace(heads_up=-1))
        assert Adapter._worker_args(ad) == ({}, -1, 1408 if on else 0)


def test_the_mtu_setting_is_bounded_so_every_cut_piece_can_be_sealed():
    from appliance import config as adapter_config
    from appliance.constants import MIN_MTU

    base = {"cloud": "192.0.2.1:47101", "cloud_key": "cyk1:" + "11" * 32 + ":" + "22" * 32}
    assert adapter_config.parse_config(base).mtu == C.DEFAULT_INNER_MTU
    assert adapter_config.parse_config({**base, "mtu": MIN_MTU}).mtu == MIN_MTU
    for bad in (MIN_MTU - 1, C.MAX_INNER_PACKET_BYTES + 1):
        with pytest.raises(adapter_config.AdapterConfigError, match="mtu"):
            adapter_config.parse_config({**base, "mtu": bad})
