"""NFQUEUE's netlink messages that the netfilterqueue package does not send, sans-IO.

The package (1.1.0) binds a queue, reads packets and gives one verdict per packet; it exposes
neither the queue flags nor batched verdicts. Both are plain nfnetlink messages
(``<linux/netfilter/nfnetlink_queue.h>``) that the worker writes on the package's own netlink
socket (the kernel accepts configuration of a queue only from the socket bound to it):

- ``config(queue, flags=, mask=)``: ``NFQNL_MSG_CONFIG`` with ``NFQA_CFG_MASK`` and
  ``NFQA_CFG_FLAGS``: the worker sets ``NFQA_CFG_F_FAIL_OPEN`` **explicitly off** (mask bit
  set, value 0): with it on, a full queue would forward a general node's clear packet to the
  WAN. Asked with an ACK (``parse_ack``).
- ``verdict_batch(queue, verdict, packet_id)``: ``NFQNL_MSG_VERDICT_BATCH``: one verdict for
  every packet of the queue with an id up to ``packet_id`` (the kernel's ``after()``, so the
  ids may wrap). The worker's verdict is always DROP (it sent the sealed copy), so one batch
  at the end of a drain covers every packet it read, whatever became of each.
- ``verdict(queue, verdict, packet_id)``: ``NFQNL_MSG_VERDICT`` for one packet, DROP or
  REPEAT only (issue 15, step 5: a GSO super-packet the worker cannot cut is handed back with
  NF_REPEAT while the queue's ``F_GSO`` is off, so the kernel queues it again segmented).
- ``skb_info(data)``: the ``NFQA_SKB_INFO`` flags of a queued packet's message (only sent while
  the queue has ``F_GSO``: ``SKB_CSUMNOTREADY``, ``SKB_GSO``, ``SKB_CSUM_NOTVERIFIED``), which the
  netfilterqueue package does not pass to its callback; ``find_attr`` finds any attribute of
  a queued packet's message. Both read the kernel's bytes: bounds-checked, they never raise.

Layouts are data, the C structs quoted beside them; netlink headers and attribute headers are
in host order, nfnetlink's payloads in network order. Encoders raise ``ValueError`` on values
out of range (our misuse); ``parse_ack`` returns None for anything that is not an ACK, and
the parsers of the kernel's messages (``find_attr``, ``skb_info``) None or 0 for anything
malformed.

Never: encode an ACCEPT verdict for the worker's queue (``DROP_ONLY`` below is what it
sends in batches; ``verdict`` refuses ACCEPT), or read a socket here.
"""

from __future__ import annotations

import struct
from typing import NamedTuple


def _layout(order: str, fields: tuple[tuple[str, str], ...]) -> struct.Struct:
    return struct.Struct(order + "".join(code for _, code in fields))


# struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags; __u32 nlmsg_seq; __u32 nlmsg_pid; };
NLMSGHDR_FIELDS = (("nlmsg_len", "I"), ("nlmsg_type", "H"), ("nlmsg_flags", "H"), ("nlmsg_seq", "I"),
                   ("nlmsg_pid", "I"))
NLMSGHDR = _layout("=", NLMSGHDR_FIELDS)
# struct nfgenmsg { __u8 nfgen_family; __u8 version; __be16 res_id; };   res_id: the queue number
NFGENMSG_FIELDS = (("nfgen_family", "B"), ("version", "B"), ("res_id", "H"))
NFGENMSG = _layout("!", NFGENMSG_FIELDS)
# struct nlattr { __u16 nla_len; __u16 nla_type; };   then the value, padded to 4 bytes
NLATTR_FIELDS = (("nla_len", "H"), ("nla_type", "H"))
NLATTR = _layout("=", NLATTR_FIELDS)
# struct nfqnl_msg_config_params { __be32 copy_range; __u8 copy_mode; } __attribute__ ((packed));
CONFIG_PARAMS_FIELDS = (("copy_range", "I"), ("copy_mode", "B"))
CONFIG_PARAMS = _layout("!", CONFIG_PARAMS_FIELDS)
# struct nfqnl_msg_verdict_hdr { __be32 verdict; __be32 id; };
VERDICT_HDR_FIELDS = (("verdict", "I"), ("id", "I"))
VERDICT_HDR = _layout("!", VERDICT_HDR_FIELDS)
# struct nlmsgerr { int error; struct nlmsghdr msg; ... };   error: 0 (an ACK) or -errno
NLMSGERR = _layout("=", (("error", "i"),))
_BE32 = struct.Struct("!I")

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
_ERROR_TYPE = struct.pack("=H", NLMSG_ERROR)      # nlmsg_type as it lies in a message
NFNETLINK_V0 = 0
AF_UNSPEC = 0
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = (NFNL_SUBSYS_QUEUE << 8) | 0
NFQNL_MSG_VERDICT = (NFNL_SUBSYS_QUEUE << 8) | 1
NFQNL_MSG_CONFIG = (NFNL_SUBSYS_QUEUE << 8) | 2
NFQNL_MSG_VERDICT_BATCH = (NFNL_SUBSYS_QUEUE << 8) | 3
# enum nfqnl_attr_config
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
# NFQA_CFG_F_*
F_FAIL_OPEN = 0x01
F_CONNTRACK = 0x02
F_GSO = 0x04
F_UID_GID = 0x08
F_SECCTX = 0x10
F_ALL = 0x1F
# enum nfqnl_attr_type (a queued packet's attributes, and a verdict's)
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14              # __be32, only while the queue has F_GSO (nfqnl_put_packet_info)
NLA_TYPE_MASK = 0x3FFF          # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
# NFQA_SKB_* (flags of NFQA_SKB_INFO)
SKB_CSUMNOTREADY = 0x1          # CHECKSUM_PARTIAL: the L4 checksum field holds the pseudo-header sum only
SKB_GSO = 0x2                   # a GSO super-packet (larger than the device's MTU)
SKB_CSUM_NOTVERIFIED = 0x4      # the checksum was not checked on the way in
# enum nfqnl_config_mode
COPY_NONE, COPY_META, COPY_PACKET = 0, 1, 2
# netfilter verdicts
NF_DROP = 0
NF_ACCEPT = 1
NF_REPEAT = 4                   # run the hook that queued the packet again (it is queued again)
DROP_ONLY = NF_DROP
_HEAD_BYTES = 16 + 4            # nlmsghdr + nfgenmsg: the attributes start here

_U32 = 0xFFFFFFFF


def attr(kind: int, value: bytes) -> bytes:
    """One netlink attribute: header, value, padding to 4 bytes."""
    size = NLATTR.size + len(value)
    if size > 0xFFFF:
        raise ValueError("attribute too long")
    return NLATTR.pack(size, kind) + value + b"\0" * (-size % 4)


def message(mtype: int, queue: int, attrs: bytes, *, seq: int = 0, ack: bool = False) -> bytes:
    """An nfnetlink message of the queue subsystem for ``queue`` (to the kernel: pid 0)."""
    if not 0 <= queue <= 0xFFFF:
        raise ValueError(f"queue number {queue} out of range")
    if not 0 <= seq <= _U32:
        raise ValueError("sequence number out of range")
    body = NFGENMSG.pack(AF_UNSPEC, NFNETLINK_V0, queue) + attrs
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body


def config(queue: int, *, flags: int, mask: int, copy_range: int | None = None,
           copy_mode: int = COPY_PACKET, max_len: int | None = None, seq: int = 0,
           ack: bool = True) -> bytes:
    """``NFQNL_MSG_CONFIG``: set the queue flags in ``mask`` to their bits in ``flags`` (a bit
    in ``mask`` and not in ``flags`` is turned off); optionally the copy mode and range and the
    queue's maximum length."""
    if mask & ~F_ALL or flags & ~mask:
        raise ValueError(f"flags {flags:#x} must be within mask {mask:#x}, and the mask within {F_ALL:#x}")
    attrs = attr(NFQA_CFG_MASK, _BE32.pack(mask)) + attr(NFQA_CFG_FLAGS, _BE32.pack(flags))
    if copy_range is not None:
        if not 0 <= copy_range <= 0xFFFF or copy_mode not in (COPY_NONE, COPY_META, COPY_PACKET):
            raise ValueError("copy range or mode out of range")
        attrs += attr(NFQA_CFG_PARAMS, CONFIG_PARAMS.pack(copy_range, copy_mode))
    if max_len is not None:
        if not 1 <= max_len <= _U32:
            raise ValueError("queue length out of range")
        attrs += attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(max_len))
    return message(NFQNL_MSG_CONFIG, queue, attrs, seq=seq, ack=ack)


def verdict_batch(queue: int, verdict: int, packet_id: int, *, seq: int = 0) -> bytes:
    """``NFQNL_MSG_VERDICT_BATCH``: ``verdict`` for every queued packet with an id up to
    ``packet_id``. No ACK (as libnetfilter_queue's own verdicts): nothing to read back."""
    if verdict not in (NF_DROP, NF_ACCEPT) or not 0 <= packet_id <= _U32:
        raise ValueError("verdict or packet id out of range")
    return message(NFQNL_MSG_VERDICT_BATCH, queue, attr(NFQA_VERDICT_HDR, VERDICT_HDR.pack(verdict, packet_id)),
                   seq=seq)


def verdict(queue: int, verdict: int, packet_id: int, *, seq: int = 0) -> bytes:
    """``NFQNL_MSG_VERDICT``: ``verdict`` for the one queued packet ``packet_id``: NF_DROP, or
    NF_REPEAT (its hook runs again: the packet is queued again, segmented if the queue's
    ``F_GSO`` is off by then). Never ACCEPT. No ACK: the kernel answers only a refusal
    (an unknown id: ENOENT), with ``seq``."""
    if verdict not in (NF_DROP, NF_REPEAT) or not 0 <= packet_id <= _U32:
        raise ValueError("verdict (DROP or REPEAT only) or packet id out of range")
    return message(NFQNL_MSG_VERDICT, queue, attr(NFQA_VERDICT_HDR, VERDICT_HDR.pack(verdict, packet_id)), seq=seq)


def find_attr(data, kind: int, mtype: int = NFQNL_MSG_PACKET) -> bytes | None:
    """The value of the first attribute ``kind`` of the nfnetlink message ``data`` of type
    ``mtype`` (a queued packet), or None: another message, no such attribute, or anything
    that does not add up (a length beyond the message or the bytes read). Never raises."""
    n = len(data)
    if n < _HEAD_BYTES:
        return None
    length, got_type, _flags, _seq, _pid = NLMSGHDR.unpack_from(data)
    if got_type != mtype or length < _HEAD_BYTES:
        return None
    end = length if length < n else n
    off = _HEAD_BYTES
    unpack = NLATTR.unpack_from
    while off + 4 <= end:
        size, got = unpack(data, off)
        if size < 4 or off + size > end:
            return None
        if got & NLA_TYPE_MASK == kind:
            return bytes(data[off + 4:off + size])
        off += (size + 3) & ~3
    return None


def skb_info(data) -> int:
    """The ``NFQA_SKB_INFO`` flags of a queued packet's message ``data`` (``SKB_*``); 0 when it
    has none (the queue's F_GSO is off, or the packet is an ordinary one) or is malformed."""
    value = find_attr(data, NFQA_SKB_INFO)
    if value is None or len(value) != 4:
        return 0
    return _BE32.unpack(value)[0]


def is_ack(data) -> bool:
    """True if ``data`` may be the kernel's answer to a request (``NLMSG_ERROR``: then
    ``parse_ack`` it); False for a queued packet. Two bytes looked at, no call: every read of a
    worker asks it."""
    return data[4:6] == _ERROR_TYPE


class Ack(NamedTuple):
    seq: int
    error: int      # 0: done; else the errno the kernel refused the request with


def parse_ack(data: bytes) -> Ack | None:
    """The kernel's answer to a request sent with an ACK (``NLMSG_ERROR``), or None for any
    other message (a queued packet) or a message too short to be one."""
    if len(data) < NLMSGHDR.size + NLMSGERR.size:
        return None
    length, mtype, _flags, seq, _pid = NLMSGHDR.unpack_from(data)
    if mtype != NLMSG_ERROR or length < NLMSGHDR.size + NLMSGERR.size:
        return None
    (error,) = NLMSGERR.unpack_from(data, NLMSGHDR.size)
    return Ack(seq, -error)
