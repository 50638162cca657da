"""appliance.nfqueue_wire: the NFQUEUE configuration and batched-verdict messages, byte for byte.

The golden messages are those of the issue-15 experiment (docs/plans/issue-15-batching.md,
section 3) that this kernel accepted on the package's netlink socket: the configuration was
ACKed with errno 0, and one batch verdict emptied a queue of 50 packets. Host byte order here
is little-endian (x86-64 and the Pi's arm64 alike)."""

from __future__ import annotations

import errno
import struct

import pytest

from appliance import nfqueue_wire as nfw

# The golden bytes are in little-endian host order (netlink's headers are host-endian): every
# machine we build for (x86-64, the Pi's arm64) is little-endian.

# nlmsghdr: len 48, type 0x0302 (queue subsystem, CONFIG), flags REQUEST|ACK, seq 1, pid 0;
# nfgenmsg: AF_UNSPEC, v0, queue 7 (big-endian); MASK = FAIL_OPEN|GSO; FLAGS = GSO (fail-open off);
# PARAMS: copy range 0xffff, COPY_PACKET (5 bytes, padded to 8)
CONFIG_GOLDEN = bytes.fromhex("30000000" "0203" "0500" "01000000" "00000000" "0000" "0007"
                              "0800" "0400" "00000005" "0800" "0500" "00000004"
                              "0900" "0200" "0000ffff" "02000000")
# nlmsghdr: len 32, type 0x0303 (VERDICT_BATCH), flags REQUEST, seq 1; queue 7;
# VERDICT_HDR: NF_DROP, id 50 (big-endian)
VERDICT_GOLDEN = bytes.fromhex("20000000" "0303" "0100" "01000000" "00000000" "0000" "0007"
                               "0c00" "0200" "00000000" "00000032")


def test_config_and_batch_verdict_match_the_messages_the_kernel_accepted():
    assert nfw.config(7, flags=nfw.F_GSO, mask=nfw.F_FAIL_OPEN | nfw.F_GSO, copy_range=0xFFFF,
                      seq=1) == CONFIG_GOLDEN
    assert nfw.verdict_batch(7, nfw.NF_DROP, 50, seq=1) == VERDICT_GOLDEN


def test_the_workers_config_turns_fail_open_off_explicitly():
    msg = nfw.config(3, flags=0, mask=nfw.F_FAIL_OPEN, seq=1)
    assert msg == bytes.fromhex("24000000" "0203" "0500" "01000000" "00000000" "0000" "0003"
                                "0800" "0400" "00000001"      # MASK: fail-open is ours to set ...
                                "0800" "0500" "00000000")     # ... FLAGS: and it is off
    assert nfw.config(3, flags=0, mask=nfw.F_FAIL_OPEN, max_len=4096)[-8:] == bytes.fromhex("0800030000001000")


def test_packet_ids_and_queues_at_their_limits_and_misuse_refused():
    assert nfw.verdict_batch(65535, nfw.NF_DROP, 0xFFFFFFFF)[18:20] == b"\xff\xff"
    assert nfw.verdict_batch(0, nfw.NF_DROP, 0xFFFFFFFF)[-4:] == b"\xff\xff\xff\xff"
    for bad in (lambda: nfw.verdict_batch(65536, 0, 1), lambda: nfw.verdict_batch(1, 2, 1),
                lambda: nfw.verdict_batch(1, 0, 1 << 32), lambda: nfw.config(1, flags=1, mask=0),
                lambda: nfw.config(1, flags=0, mask=0x40), lambda: nfw.config(1, flags=0, mask=1, copy_range=1 << 16),
                lambda: nfw.config(1, flags=0, mask=1, max_len=0)):
        with pytest.raises(ValueError):
            bad()


def test_parse_ack():
    hdr = nfw.NLMSGHDR.pack(36, nfw.NLMSG_ERROR, 0, 9, 0)
    assert nfw.parse_ack(hdr + struct.pack("=i", 0) + bytes(16)) == nfw.Ack(9, 0)
    assert nfw.parse_ack(hdr + struct.pack("=i", -errno.EPERM) + bytes(16)) == nfw.Ack(9, errno.EPERM)
    packet = nfw.NLMSGHDR.pack(100, nfw.NFQNL_MSG_PACKET, 0, 0, 0) + bytes(84)
    assert nfw.parse_ack(packet) is None                       # a queued packet
    assert nfw.parse_ack(hdr[:10]) is None and nfw.parse_ack(b"") is None
    # is_ack, the two-byte test a worker asks of every read before it parses an ACK
    assert nfw.is_ack(hdr + bytes(20)) and not nfw.is_ack(packet) and not nfw.is_ack(b"") and not nfw.is_ack(hdr[:5])


def test_is_ack_never_hides_an_ack():
    """Whatever parse_ack takes for an ACK, is_ack lets through (it only spares the parse)."""
    import random

    rnd = random.Random(15)
    hdr = nfw.NLMSGHDR.pack(36, nfw.NLMSG_ERROR, 0, 9, 0) + struct.pack("=i", -1) + bytes(16)
    samples = [hdr, hdr[:35], queued(3, bytes(40), nfw.SKB_GSO)]
    for _ in range(3000):
        d = bytearray(rnd.randbytes(rnd.choice((0, 5, 6, 20, 36, 40, 80))))
        if d[4:6] and rnd.random() < 0.5:
            d[4:6] = struct.pack("=H", nfw.NLMSG_ERROR)[:len(d[4:6])]
        samples.append(bytes(d))
    for d in samples:
        if nfw.parse_ack(d) is not None:
            assert nfw.is_ack(d), d


def test_layouts_are_the_c_structs():
    assert (nfw.NLMSGHDR.size, nfw.NFGENMSG.size, nfw.NLATTR.size) == (16, 4, 4)
    assert (nfw.CONFIG_PARAMS.size, nfw.VERDICT_HDR.size) == (5, 8)   # (packed), two __be32
    assert [n for n, _ in nfw.VERDICT_HDR_FIELDS] == ["verdict", "id"]


# --- issue 15, step 5: one packet's REPEAT verdict, and the SKB_INFO flags of a queued packet ------------

# nlmsghdr: len 32, type 0x0301 (queue subsystem, VERDICT), flags REQUEST, seq 3; queue 7;
# VERDICT_HDR: NF_REPEAT (4), id 50 (big-endian)
REPEAT_GOLDEN = bytes.fromhex("20000000" "0103" "0100" "03000000" "00000000" "0000" "0007"
                              "0c00" "0200" "00000004" "00000032")
# F_GSO off, nothing else touched (mask GSO, flags 0), no ACK asked: a refusal still comes back
GSO_OFF_GOLDEN = bytes.fromhex("24000000" "0203" "0100" "02000000" "00000000" "0000" "0007"
                               "0800" "0400" "00000004" "0800" "0500" "00000000")


def test_a_single_verdict_drop_or_repeat_only_and_the_gso_toggle():
    assert nfw.verdict(7, nfw.NF_REPEAT, 50, seq=3) == REPEAT_GOLDEN
    assert nfw.verdict(7, nfw.NF_DROP, 50, seq=3)[-8:-4] == bytes(4)
    assert nfw.config(7, flags=0, mask=nfw.F_GSO, seq=2, ack=False) == GSO_OFF_GOLDEN
    on = nfw.config(7, flags=nfw.F_GSO, mask=nfw.F_GSO, seq=2, ack=False)
    assert on[:-4] == GSO_OFF_GOLDEN[:-4] and on[-4:] == bytes.fromhex("00000004")
    for bad in (nfw.NF_ACCEPT, 2, 3, 5):       # never ACCEPT (nor STOLEN, QUEUE, STOP)
        with pytest.raises(ValueError):
            nfw.verdict(7, bad, 1)
    with pytest.raises(ValueError):
        nfw.verdict(7, nfw.NF_REPEAT, 1 << 32)


def queued(packet_id: int, payload: bytes, info: int | None, queue: int = 7, cap_len: int | None = None) -> bytes:
    """A queued packet's message as nfqnl_build_packet_message lays it out (attribute order:
    header, in/out interfaces, hardware address, timestamp, cap length, skb info, payload)."""
    attrs = (nfw.attr(nfw.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 2))     # hook FORWARD
             + nfw.attr(5, struct.pack("!I", 3)) + nfw.attr(6, struct.pack("!I", 4))      # IFINDEX_IN/OUTDEV
             + nfw.attr(9, struct.pack("!HH8s", 6, 0, bytes.fromhex("02aabbccddee")))     # HWADDR
             + nfw.attr(4, struct.pack("!QQ", 1765000000, 123456)))                       # TIMESTAMP
    if cap_len is not None:
        attrs += nfw.attr(nfw.NFQA_CAP_LEN, struct.pack("!I", cap_len))
    if info is not None:
        attrs += nfw.attr(nfw.NFQA_SKB_INFO, struct.pack("!I", info))
    attrs += nfw.attr(nfw.NFQA_PAYLOAD, payload)
    body = nfw.NFGENMSG.pack(2, 0, queue) + attrs                                         # AF_INET
    return nfw.NLMSGHDR.pack(16 + len(body), nfw.NFQNL_MSG_PACKET, 0, 0, 0) + body


def test_skb_info_of_a_queued_packets_message():
    payload = bytes(range(256)) * 4 + b"\x01"       # 1025 bytes: the payload attribute is padded
    for info in (nfw.SKB_CSUMNOTREADY, nfw.SKB_GSO | nfw.SKB_CSUMNOTREADY, nfw.SKB_CSUM_NOTVERIFIED):
        msg = queued(9, payload, info)
        assert nfw.skb_info(msg) == info
        assert nfw.find_attr(msg, nfw.NFQA_PAYLOAD) == payload
        assert nfw.find_attr(msg, nfw.NFQA_PACKET_HDR)[:4] == struct.pack("!I", 9)
    assert nfw.skb_info(queued(9, payload, None)) == 0                   # F_GSO off: no such attribute
    assert nfw.skb_info(queued(9, payload, nfw.SKB_GSO, cap_len=70000)) == nfw.SKB_GSO
    # the NLA_F_NET_BYTEORDER bit on the attribute's type is not part of its kind
    msg = bytearray(queued(9, payload, nfw.SKB_GSO))
    at = bytes(msg).index(struct.pack("=HH", 8, nfw.NFQA_SKB_INFO))
    msg[at + 2:at + 4] = struct.pack("=H", nfw.NFQA_SKB_INFO | 0x4000)
    assert nfw.skb_info(bytes(msg)) == nfw.SKB_GSO
    # an ACK, a configuration message and a verdict are no queued packets
    assert nfw.skb_info(nfw.NLMSGHDR.pack(36, nfw.NLMSG_ERROR, 0, 1, 0) + bytes(20)) == 0
    assert nfw.find_attr(nfw.verdict(7, nfw.NF_DROP, 1), nfw.NFQA_VERDICT_HDR) is None
    assert nfw.find_attr(nfw.verdict(7, nfw.NF_DROP, 1), nfw.NFQA_VERDICT_HDR,
                         nfw.NFQNL_MSG_VERDICT) == struct.pack("!II", 0, 1)


def _skb_info_by_find_attr(data) -> int:
    """The reference skb_info must agree with: the flags of the attribute find_attr finds."""
    value = nfw.find_attr(data, nfw.NFQA_SKB_INFO)
    return struct.unpack("!I", value)[0] if value is not None and len(value) == 4 else 0


def test_skb_info_is_find_attrs_answer_on_any_bytes():
    import random

    rnd = random.Random(14)
    base = [queued(9, bytes(rnd.randrange(0, 90)), rnd.choice((None, 1, 2, 3, 6))) for _ in range(40)]
    for msg in base:
        for _ in range(40):
            d = bytearray(msg)
            for _ in range(rnd.randrange(0, 4)):        # a few bytes changed anywhere
                d[rnd.randrange(len(d))] = rnd.randrange(256)
            d = bytes(d[:rnd.randrange(len(d) + 1)]) if rnd.random() < 0.3 else bytes(d)
            assert nfw.skb_info(d) == _skb_info_by_find_attr(d), d.hex()


def test_the_parser_never_raises_on_truncated_or_garbage_messages():
    import random

    msg = queued(9, bytes(300), nfw.SKB_GSO)
    at = msg.index(struct.pack("=HH", 8, nfw.NFQA_SKB_INFO))
    for cut in range(len(msg)):                      # every truncation (a read shorter than nlmsg_len)
        info = nfw.skb_info(msg[:cut])
        assert info == (nfw.SKB_GSO if cut >= at + 8 else 0), cut
        nfw.find_attr(memoryview(msg)[:cut], nfw.NFQA_PAYLOAD)
    rng = random.Random(15)
    for _ in range(3000):                            # random bytes, and the message with bytes flipped
        junk = rng.randbytes(rng.randrange(0, 80))
        assert isinstance(nfw.skb_info(junk), int)
        assert nfw.find_attr(junk, nfw.NFQA_PAYLOAD) is None or isinstance(nfw.find_attr(junk, 10), bytes)
        bad = bytearray(msg)
        for _ in range(rng.randrange(1, 6)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        assert isinstance(nfw.skb_info(bytes(bad)), int)
        found = nfw.find_attr(bytes(bad), nfw.NFQA_PAYLOAD)
        assert found is None or len(found) <= len(bad)
    # lengths that do not add up: an attribute shorter than its header, one past the message
    head = msg[:20]
    assert nfw.find_attr(head + struct.pack("=HH", 2, 14) + bytes(8), 14) is None
    assert nfw.find_attr(head + struct.pack("=HH", 200, 14) + bytes(8), 14) is None
    assert nfw.skb_info(head + struct.pack("=HH", 6, 14) + bytes(4)) == 0     # a value that is not 4 bytes
    # nlmsg_len shorter than what was read: only nlmsg_len counts
    short = nfw.NLMSGHDR.pack(20, nfw.NFQNL_MSG_PACKET, 0, 0, 0) + msg[16:]
    assert nfw.skb_info(short) == 0
