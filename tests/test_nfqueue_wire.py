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


def test_layouts_are_the_c_structs():
    assert (nfw.NLMSGHDR.size, nfw.NFGENMSG.size, nfw.NLATTR.size) == (16, 4, 4)
    assert (nfw.CONFIG_PARAMS.size, nfw.VERDICT_HDR.size) == (5, 8)   # (packed), two __be32
    assert [n for n, _ in nfw.VERDICT_HDR_FIELDS] == ["verdict", "id"]
