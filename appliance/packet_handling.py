"""Packet Handling: the NFQUEUE worker pool (the sealing half of the data path).

Each worker is a process bound to one NFQUEUE queue (the packet filter spreads
the general nodes' overlay-bound packets over the queues). For every queued
packet it looks up the session by (source VIP, destination VIP), seals it with
its **own stream id** of that session's key, handed out by the controller
(``appliance.sessions``, by the rule of ``cyphonic.stream_ids``: no nonce is
ever used twice across processes), sends it from the general node's UDP
socket (the controller's, inherited at fork or passed over the pipe, so the
source port is the one the NMS registered), and gives the verdict DROP for the clear original. A
packet with no session is dropped (the queue fails closed) and reported to the
controller, which brings the tunnel up (a packet triggers a tunnel, as a DNS
query does).

Batches (issue 15): a worker reads its queue through ``QueueDrain`` (at most
``NFQ_DRAIN_PACKETS`` packets per drain), adds each sealed datagram to a
``cyphonic.udp_batch.GsoSender`` (runs of up to 64 datagrams per ``sendmsg``), and when the
drain ends sends the runs and then **one** verdict for every packet it read: DROP, always
(``appliance.nfqueue_wire.verdict_batch``), so a packet whose handling failed is dropped
too. At bind the queue's fail-open flag is set explicitly off (``nfqueue_wire.config``):
a full queue drops, it never lets a clear packet through; and its netlink receive buffer
is ``NFQ_SOCKET_BYTES``. A drain ends when the queue is empty or the bound is reached: a lone
packet is sealed, sent and judged in the wakeup it arrived in, never held for a timer.

Super-packets (issue 15, step 5; the config key ``nfq_gso``): the queue is configured with
``F_GSO`` and a 64 KB copy range, so the kernel queues the general node's TSO/GRO
super-packets whole (one read per up to 64 KB) and leaves checksums unfinished where the skb
has them so (CHECKSUM_PARTIAL); ``QueueDrain.recv`` reads each message's ``NFQA_SKB_INFO``
flags, which the package does not pass on. A CSUMNOTREADY packet gets its TCP/UDP checksum
finished in the stage; a GSO TCPv4 packet is cut into complete segments of at most the
overlay MTU (``_cut``: which segment size and why), each sealed as its own datagram with the
stream's next counter, so a super-packet of N pieces leaves as one ``UDP_SEGMENT`` send; any
other GSO packet (UDP, whose segment size NFQUEUE does not tell; one truncated by the copy
range) is handed back to the kernel to segment (``QueueDrain.hand_back``: F_GSO off, REPEAT,
F_GSO on). Every piece and every hand-back stays under the drain's one DROP verdict.

The receiving half (open, replay window, crypto routing, injection) runs in
the controller, which owns every receive session: one replay window per
session, one owner, so no packet is ever accepted twice (``appliance.way_back``).
The processes are started, supervised and asked for counters by
``appliance.worker_pool``. See docs/adapter-design.md for the design.

Control messages (controller -> worker, over a pipe, never on the packet path):
  ("tx", gn_vip, peer_vip, key, remote_index, stream_id, endpoint, port)  install or replace
  ("untx", gn_vip, peer_vip)                                         remove
  ("add_port", port) + the socket's fd (SCM_RIGHTS, ``send_socket``)  a general node was added
  ("close_port", port)                                               a general node was removed
  ("stats",)                                                         answered with counters
  ("stop",)
Worker -> controller: ("miss", gn_vip, peer_vip) (rate-limited), ("stats", dict).

A worker holds the general nodes' sockets it had at fork and those passed to it since: adding
or removing a general node never restarts a worker (the other general nodes' packets in its
queue would be lost). A general node's sessions and socket leave a worker together, at
``close_port``: from then on it never sends from that socket. Only the controller writes the
pipe; a message that breaks the protocol (an ``add_port`` with no socket, or not one bound to
that port) stops the worker, and the supervisor forks a fresh one that inherits every socket.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import time
import warnings
from collections import Counter

from cyphonic import constants as C
from cyphonic.busy_poll import BusyPoll, in_burst
from cyphonic.datachannel import SEAL_STAGE, SEALED, SendStream
from cyphonic.offload import (F_NEEDS_CSUM, GSO_TCPV4, PROTO_TCP, PROTO_UDP, VirtioNetHdr, finish_checksum_at,
                              split_gso)
from cyphonic.udp_batch import GsoSender
from cyphonic.wire import relay as wire_relay

from . import nfqueue_wire as nfw
from .nfqueue_wire import is_ack, skb_info
from .constants import (MISS_REPORT_EVERY_S, NFQ_CONFIG_SEQ, NFQ_COPY_RANGE, NFQ_DRAIN_PACKETS, NFQ_GSO_MAX_PIECES,
                        NFQ_GSO_REPEATS_PER_DRAIN, NFQ_GSO_REPEATS_PER_S, NFQ_GSO_TOGGLE_SEQ, NFQ_MAX_LEN,
                        NFQ_RECV_BYTES, NFQ_RECV_GSO_BYTES, NFQ_REPEAT_SEQ, NFQ_SOCKET_BYTES, WORKER_BIND_ATTEMPTS,
                        WORKER_BIND_RETRY_S, WORKER_MAX_SESSIONS, WORKER_SOCKET_WAIT_S)

PR_SET_PDEATHSIG = 1        # prctl(2)
_MAX_INNER = C.MAX_INNER_PACKET_BYTES
_DONTWAIT = int(socket.MSG_DONTWAIT)   # (a plain int, as every constant a packet passes)


class ReplyWait:
    """The controller's busy polling for the answer to a lone packet that a worker sent.

    The node daemon waits for the answer to a lone packet of its own. Here the packet leaves
    from a worker and its answer comes back to the controller, so a worker about to send a
    lone packet (the first after a pause, by ``busy_poll.in_burst``: a ping, a request) writes to an
    eventfd first, the heads-up: written before the send, the controller wakes while the
    worker sends and the peer answers, not where the peer needs the CPU. The controller,
    woken by it, asks the policy (``cyphonic.busy_poll.BusyPoll``) how long to spin, and
    stops when an answer is delivered. A heads-up read after an answer was delivered within
    twice the budget came late: there is nothing left to wait for."""

    def __init__(self, busy_s: float, spin, stop_spin, clock=time.time) -> None:
        self.policy = BusyPoll(busy_s, answer_gap_s=2 * busy_s)
        self.spin = spin            # DataPathSelector.spin / stop_spin
        self.stop_spin = stop_spin
        self.clock = clock
        self.heads_ups = 0          # heads-ups read (each a lone packet a worker sent)

    # the policy's state, for the status and for sample_idle_cpus
    busy_s = property(lambda self: self.policy.budget_s)
    idle_cpus = property(lambda self: self.policy.idle_cpus, lambda self, v: setattr(self.policy, "idle_cpus", v))
    lone_at = property(lambda self: self.policy.lone_at)
    sent_at = property(lambda self: self.policy.sent_at)
    quick = property(lambda self: self.policy.quick)
    busy_polls = property(lambda self: self.policy.busy_polls)

    def heads_up(self) -> None:
        self.heads_ups += 1
        spin_s = self.policy.lone_sent(self.clock())
        if spin_s:
            self.spin(spin_s)

    def delivered(self, now: float) -> None:
        """A packet went to a general node (call before injecting it: the CPU is for it now)."""
        if self.policy.delivered(now):
            self.stop_spin()


# --- a general node's socket over a worker's pipe -------------------------------------------------

def send_socket(conn, sock: socket.socket) -> None:
    """Pass ``sock`` (its fd, SCM_RIGHTS) over ``conn``, a multiprocessing pipe (a Unix socket
    pair), right after the ``("add_port", port)`` message. Raises OSError (a closed pipe, or a
    closed ``sock``: nothing is sent then)."""
    fd = sock.fileno()
    if fd < 0:
        raise OSError("the socket is closed")
    carrier = socket.socket(fileno=conn.fileno())      # the pipe's fd, borrowed: detached below
    try:
        socket.send_fds(carrier, [b"S"], [fd])
    finally:
        carrier.detach()


def receive_socket(conn, wait_s: float = WORKER_SOCKET_WAIT_S) -> socket.socket | None:
    """The socket ``send_socket`` passed after an ``add_port`` message; None if none came within
    ``wait_s`` (the sender is gone, or broke the protocol)."""
    fd = conn.fileno()
    if not select.select([fd], [], [], wait_s)[0]:
        return None
    carrier = socket.socket(fileno=fd)
    try:
        data, fds, _flags, _ = socket.recv_fds(carrier, 1, 1)
    finally:
        carrier.detach()
    if data != b"S" or len(fds) != 1:
        for extra in fds:
            os.close(extra)
        return None
    return socket.socket(fileno=fds[0])


def _bound_to(sock: socket.socket, port: int) -> bool:
    try:
        return sock.type == socket.SOCK_DGRAM and sock.getsockname()[1] == port
    except (OSError, IndexError, TypeError):
        return False


class SealTable:
    """What a worker seals with: the send sessions by (general node VIP, peer VIP), and the
    general nodes' sockets by port. Changed only by the controller's messages (``control``);
    the packet handler reads ``sessions`` (the same dict, never replaced)."""

    def __init__(self, index: int, queue_num: int, conn, sockets: dict, counters: Counter,
                 prefixed: dict[str, Counter] | None = None) -> None:
        self.index = index
        self.queue_num = queue_num
        self.conn = conn
        self.sockets: dict[int, socket.socket] = dict(sockets)
        self.counters = counters
        self.prefixed = prefixed or {}   # more counters, reported with a prefix (the sender's as send_*)
        self.sessions: dict[tuple[bytes, bytes], tuple] = {}  # (gn vip, peer vip) -> (SendStream, endpoint, sock)
        self.tx_bytes: Counter = Counter()                   # per session, for cyadm

    def control(self, msg) -> bool:
        """One control message; False: stop the worker."""
        kind = msg[0]
        sessions, counters = self.sessions, self.counters
        if kind == "tx":
            _, gn_vip, peer_vip, key, remote_index, stream_id, endpoint, port = msg
            sock = self.sockets.get(port)
            if sock is None:
                counters["install_unknown_gn"] += 1
                return True
            if len(sessions) >= WORKER_MAX_SESSIONS and (gn_vip, peer_vip) not in sessions:
                counters["install_table_full"] += 1
                return True
            sessions[(gn_vip, peer_vip)] = (SendStream(key, remote_index, stream_id), endpoint, sock)
            counters["installs"] += 1
        elif kind == "untx":
            sessions.pop((msg[1], msg[2]), None)
        elif kind == "add_port":
            port = msg[1]
            sock = receive_socket(self.conn)
            if sock is None or not _bound_to(sock, port):
                counters["add_port_refused"] += 1
                if sock is not None:
                    sock.close()
                return False      # the pipe is out of step: a fresh worker inherits every socket
            self.close_port(port)  # (a copy held already, e.g. forked just now: replaced)
            self.sockets[port] = sock
            counters["ports_added"] += 1
        elif kind == "close_port":
            self.close_port(msg[1])
        elif kind == "stats":
            per = {f"{'.'.join(map(str, k[0]))}>{'.'.join(map(str, k[1]))}": v for k, v in self.tx_bytes.items()
                   if k in sessions}
            more = {prefix + k: v for prefix, table in self.prefixed.items() for k, v in table.items()}
            self.conn.send(("stats", {"index": self.index, "queue": self.queue_num, "pid": os.getpid(),
                                      "sessions": len(sessions), "ports": len(self.sockets), **counters,
                                      **more, "per_session": per}))
        elif kind == "stop":
            return False
        return True

    def close_port(self, port: int) -> None:
        """The general node on ``port`` is gone: its sessions first, then its socket."""
        sock = self.sockets.pop(port, None)
        if sock is not None:
            for k in [k for k, s in self.sessions.items() if s[2] is sock]:
                del self.sessions[k]
            sock.close()


class QueueDrain:
    """A worker's reads of its NFQUEUE and its verdicts, on the package's netlink socket ``sock``.

    ``NetfilterQueue.run_socket(drain)`` reads through ``recv``: at most ``limit`` packets a
    drain (then EAGAIN, so the batch is bounded and the epoll loop comes back; a super-packet's
    pieces each count, ``charge``), with the ACK of our configuration taken out of the stream
    (``config_acked``, or ``nfq_config_refused``) and the kernel's ENOBUFS (packets it could not
    queue to us: dropped, fail-open being off) counted as ``nfq_enobufs``. The packet callback
    calls ``seen(id)`` first thing. ``end()`` closes the drain: the sender's runs go out, then
    one DROP verdict for every packet read (``verdict_batches``; ``verdicts``: the packets they
    covered). Counters in ``counters``.

    With ``gso`` (the config key ``nfq_gso``): the queue is configured with ``F_GSO`` and a
    copy range of 64 KB, ``recv`` reads up to ``NFQ_RECV_GSO_BYTES`` and keeps the message's
    ``NFQA_SKB_INFO`` flags in ``skb_info`` for the callback of that same message (run_socket
    calls it right after each ``recv``). ``hand_back(id)`` returns a super-packet the worker
    cannot cut to the kernel: F_GSO off, a REPEAT verdict for it, F_GSO on again, each one
    netlink message that the kernel handles inside the send, so the packet is queued again,
    segmented, before F_GSO is back. Bounded (``NFQ_GSO_REPEATS_PER_DRAIN``, ``_PER_S``) and
    given up for good once the kernel refuses a toggle: then such packets are dropped
    (counted), never looped."""

    def __init__(self, sock, queue_num: int, counters: Counter, sender: GsoSender | None = None,
                 limit: int = NFQ_DRAIN_PACKETS, gso: bool = False, clock=time.monotonic) -> None:
        self.sock = sock
        self.queue_num = queue_num
        self.counters = counters
        self.sender = sender
        self.limit = limit
        self.left = limit
        self.last_id: int | None = None
        self.count = 0
        self.gso = gso
        self.recv_bytes = NFQ_RECV_GSO_BYTES if gso else NFQ_RECV_BYTES
        self.skb_info = 0             # the NFQA_SKB_INFO flags of the message recv returned last
        self.clock = clock
        self.repeat_refused = False   # the kernel refused to toggle F_GSO: never hand back again
        self.gso_restore = False      # turning F_GSO on again failed: tried again at end()
        self._drain_repeats = 0
        self._window_at = float("-inf")
        self._window_repeats = 0

    def configure(self) -> None:
        """Fail-open explicitly off (mask bit set, value 0), asked with an ACK; with ``gso``
        in the same message F_GSO on and the copy range raised to 64 KB (the package caps
        its own at 4016 bytes)."""
        if self.gso:
            msg = nfw.config(self.queue_num, flags=nfw.F_GSO, mask=nfw.F_FAIL_OPEN | nfw.F_GSO,
                             copy_range=NFQ_COPY_RANGE, seq=NFQ_CONFIG_SEQ)
        else:
            msg = nfw.config(self.queue_num, flags=0, mask=nfw.F_FAIL_OPEN, seq=NFQ_CONFIG_SEQ)
        try:
            self.sock.send(msg)
        except OSError as exc:
            self.counters["nfq_config_" + (errno.errorcode.get(exc.errno, "") or type(exc).__name__)] += 1

    def recv(self, _bufsize: int = NFQ_RECV_BYTES) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "drain bound reached")
        while True:
            try:
                data = self.sock.recv(self.recv_bytes, _DONTWAIT)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.counters["nfq_enobufs"] += 1
                raise
            ack = nfw.parse_ack(data) if is_ack(data) else None
            if ack is None:
                self.left -= 1
                if self.gso:
                    self.skb_info = skb_info(data)
                return data
            if not ack.error:
                self.counters["config_acked"] += 1
            elif ack.seq == NFQ_GSO_TOGGLE_SEQ:
                self.counters["nfq_gso_toggle_refused"] += 1
                self.repeat_refused = True
            elif ack.seq == NFQ_REPEAT_SEQ:
                self.counters["nfq_repeat_refused"] += 1   # (the packet stays under the batch DROP)
            else:
                self.counters["nfq_config_refused"] += 1

    def seen(self, packet_id: int) -> None:
        self.last_id = packet_id
        self.count += 1

    def charge(self, packets: int) -> None:
        """``packets`` more count against this drain's bound (a super-packet's other pieces)."""
        self.left -= packets

    def hand_back(self, packet_id: int) -> bool:
        """Give the queued super-packet ``packet_id`` back to the kernel to segment (F_GSO off,
        REPEAT, F_GSO on). True if the REPEAT was sent; False: it was not (the guard, a
        refusal seen before, a send that failed; each counted as a ``drop_``), and the packet
        stays under the drain's DROP (fail closed)."""
        c = self.counters
        if self.repeat_refused:
            c["drop_gso_hand_back_refused"] += 1
            return False
        now = self.clock()
        if now - self._window_at >= 1.0:
            self._window_at, self._window_repeats = now, 0
        if self._drain_repeats >= NFQ_GSO_REPEATS_PER_DRAIN or self._window_repeats >= NFQ_GSO_REPEATS_PER_S:
            c["drop_gso_hand_back_limit"] += 1
            return False
        self._drain_repeats += 1
        self._window_repeats += 1
        send = self.sock.send
        q = self.queue_num
        try:
            send(nfw.config(q, flags=0, mask=nfw.F_GSO, seq=NFQ_GSO_TOGGLE_SEQ, ack=False))
        except OSError as exc:
            self._count_error("nfq_gso_off_", exc)
            c["drop_gso_hand_back_failed"] += 1
            return False
        try:
            send(nfw.verdict(q, nfw.NF_REPEAT, packet_id, seq=NFQ_REPEAT_SEQ))
            repeated = True
        except OSError as exc:
            self._count_error("nfq_repeat_", exc)
            c["drop_gso_hand_back_failed"] += 1
            repeated = False
        self._gso_on()
        if repeated:
            c["gso_repeated"] += 1
        return repeated

    def _gso_on(self) -> None:
        try:
            self.sock.send(nfw.config(self.queue_num, flags=nfw.F_GSO, mask=nfw.F_GSO, seq=NFQ_GSO_TOGGLE_SEQ,
                                      ack=False))
            self.gso_restore = False
        except OSError as exc:   # the kernel segments meanwhile: slower, never unsafe
            self._count_error("nfq_gso_on_", exc)
            self.gso_restore = True

    def _count_error(self, prefix: str, exc: OSError) -> None:
        self.counters[prefix + (errno.errorcode.get(exc.errno or 0, "") or type(exc).__name__)] += 1

    def end(self) -> None:
        """The drain is over: send what was sealed, then DROP every packet read (fail closed)."""
        self.left = self.limit
        self._drain_repeats = 0
        self.skb_info = 0
        if self.gso_restore:
            self._gso_on()
        if self.sender is not None:
            self.sender.flush()
        last, self.last_id = self.last_id, None
        if last is None:
            return
        n, self.count = self.count, 0
        try:
            self.sock.send(nfw.verdict_batch(self.queue_num, nfw.DROP_ONLY, last))
        except OSError as exc:  # the packets stay queued: the next batch covers them, or the queue drops
            self.counters["nfq_verdict_" + (errno.errorcode.get(exc.errno, "") or type(exc).__name__)] += 1
            return
        self.counters["verdict_batches"] += 1
        self.counters["verdicts"] += n


def packet_handler(table: "SealTable", sender: GsoSender, drain: QueueDrain, heads_up: int = -1,
                   clock=time.monotonic, mtu: int = 0, offload_drops: Counter | None = None):
    """The NFQUEUE callback of a worker: seal each packet with its session's stream and add it
    to ``sender``; no verdict here (``drain.end`` drops them all). Never raises.

    With ``drain.gso`` the message's ``NFQA_SKB_INFO`` flags (``drain.skb_info``) say more:
    a CSUMNOTREADY packet gets its TCP or UDP checksum finished in the stage (``csum_finished``;
    another protocol: ``drop_csum_not_ready``); a GSO TCPv4 super-packet is cut into pieces of
    at most ``mtu`` bytes (``_cut``; ``gso_reads``, ``gso_pieces``), each sealed as its own
    datagram with the stream's next counter; any other super-packet goes back to the kernel
    (``drain.hand_back``). ``offload_drops``: the cut's own drop reasons (``offload_*``)."""
    counters = table.counters
    sessions = table.sessions                          # (gn vip, peer vip) -> (SendStream, endpoint, sock)
    tx_bytes = table.tx_bytes
    conn = table.conn
    last_miss: dict[tuple[bytes, bytes], float] = {}
    last_sent = 0.0
    eventfd_write = os.eventfd_write
    seen = drain.seen
    add = sender.add
    send_now = sender.send_now
    stage = SEAL_STAGE
    sealed = SEALED
    odrops: Counter = counters if offload_drops is None else offload_drops

    def seal(s, key, size: int) -> None:
        """The packet staged in ``stage[:size]``: sealed with the session ``s`` and sent or added."""
        nonlocal last_sent
        stream, endpoint, sock = s
        length = stream.seal_staged(size)      # the stream's next counter, never another
        now = clock()
        lone = not in_burst(now, last_sent)    # the first packet after a pause (a ping, a request)
        last_sent = now
        if lone and heads_up >= 0:  # tell the controller to wait awake for the answer (ReplyWait)
            try:
                eventfd_write(heads_up, 1)
            except OSError:
                counters["heads_up_failed"] += 1
        if endpoint[0] == "relay":
            dest, datagram = endpoint[1], wire_relay.encode_data(endpoint[2], sealed[:length])
        else:
            dest, datagram = endpoint, sealed[:length]
        if lone and not sender.pending:
            send_now(sock, dest, datagram)     # nothing before it waits: out at once, no copy
        else:
            add(sock, dest, datagram)          # (copied into the run: the stage is free)
        counters["sealed"] += 1
        counters["sealed_bytes"] += size
        tx_bytes[key] += size

    def super_packet(pkt, payload, size: int, s, key) -> None:
        """A GSO packet: cut (TCPv4, whole) and each piece sealed, or handed back to the kernel."""
        parts = _cut(payload, size, mtu, odrops)
        if parts is None:                      # not ours to cut: the kernel segments it
            drain.hand_back(pkt.id)            # (counted either way)
            return
        if not parts:                          # malformed (counted: offload_*)
            return
        counters["gso_reads"] += 1
        counters["gso_pieces"] += len(parts)
        drain.charge(len(parts) - 1)
        for part in parts:
            n = len(part)
            stage[0:n] = part
            seal(s, key, n)

    def on_packet(pkt) -> None:
        try:
            seen(pkt.id)   # first: whatever happens below, the drain's verdict (DROP) covers it
            info = drain.skb_info              # (0 unless the queue has F_GSO)
            payload = pkt.get_payload()
            size = len(payload)
            if size < 20 or payload[0] >> 4 != 4:
                counters["drop_not_ipv4"] += 1
                return
            key = (payload[12:16], payload[16:20])
            s = sessions.get(key)
            if s is None:
                counters["drop_no_session"] += 1
                now = clock()
                if now - last_miss.get(key, 0.0) >= MISS_REPORT_EVERY_S:
                    if len(last_miss) > WORKER_MAX_SESSIONS:
                        last_miss.clear()
                    last_miss[key] = now
                    conn.send(("miss", key[0], key[1]))
                return
            if info & nfw.SKB_GSO:
                super_packet(pkt, payload, size, s, key)
                return
            if size > _MAX_INNER:
                counters["drop_oversize"] += 1
                return
            stage[0:size] = payload
            if info & nfw.SKB_CSUMNOTREADY:    # the L4 checksum field holds the pseudo-header sum
                proto = payload[9]
                offset = 16 if proto == PROTO_TCP else 6 if proto == PROTO_UDP else 0
                if not offset:
                    counters["drop_csum_not_ready"] += 1
                    return
                if not finish_checksum_at(stage, size, (payload[0] & 15) * 4, offset, odrops):
                    return                     # (counted: offload_bad_csum_offsets)
                counters["csum_finished"] += 1
            seal(s, key, size)
        except OSError as exc:  # e.g. the miss report's pipe: never end the loop
            counters["send_" + (os.strerror(exc.errno) if exc.errno else type(exc).__name__)] += 1
        except Exception as exc:  # noqa: BLE001 - no-throw boundary of the packet path
            counters["internal_" + type(exc).__name__] += 1

    return on_packet


def _cut(payload, size: int, mtu: int, drops: Counter) -> list | None:
    """The pieces of a GSO super-packet, each a complete TCP/IPv4 segment of at most ``mtu``
    bytes (``cyphonic.offload.split_gso``: sequence numbers, IP ids, flags, both checksums);
    [] if it is malformed (counted in ``drops``: ``offload_*``); None if it is not ours to cut:
    not TCPv4 (a UDP GSO packet's segment size is the sender's choice, which NFQUEUE does not
    tell), truncated (IP total length above the 65,531 bytes copied), no room for a payload
    in ``mtu``, or more than ``NFQ_GSO_MAX_PIECES`` pieces.

    The segment size: NFQUEUE gives the flags of a GSO packet, not its ``gso_size``, so we
    choose ``mtu - IP header - TCP header (with options)``: every piece fits the tunnel. The
    adapter clamps every overlay SYN's MSS to ``mtu - 40`` and gives the general node that MTU
    by DHCP, so in the usual case this is the general node's own segment size (its MSS less
    its options). A peer that advertised a smaller MSS than the clamp can receive segments of
    up to this size, larger than it asked for (as after any re-segmenting middlebox)."""
    ihl = (payload[0] & 15) * 4
    if payload[9] != PROTO_TCP or ihl < 20 or size < ihl + 20 or (payload[2] << 8 | payload[3]) != size \
            or payload[6] & 0x3F or payload[7]:
        return None
    hlen = ihl + (payload[ihl + 12] >> 4) * 4
    gso_size = mtu - hlen
    if gso_size <= 0 or -(-(size - hlen) // gso_size) > NFQ_GSO_MAX_PIECES:
        return None
    return split_gso(payload, VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, hlen, gso_size, ihl, 16), drops)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the controller dies (even by kill -9), so a
    restarted controller finds its queues free."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def worker_main(index: int, queue_num: int, conn, sockets: dict, heads_up: int = -1, gso_mtu: int = 0) -> None:
    """Run worker ``index`` on NFQUEUE ``queue_num`` until told to stop (in a forked child).
    ``heads_up``: the controller's eventfd, written before each lone packet is sent (ReplyWait),
    or -1 (no busy polling). ``gso_mtu``: the overlay MTU with the config key ``nfq_gso`` on
    (the queue hands over super-packets, cut into pieces of at most this size), 0 when off."""
    from netfilterqueue import NetfilterQueue

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    parent = os.getppid()
    counters: Counter = Counter()
    send_drops: Counter = Counter()                    # the sender's drops and errors, as send_*
    offload_drops: Counter = Counter()                 # super-packets that could not be cut, as drop_offload_*
    table = SealTable(index, queue_num, conn, sockets, counters,
                      prefixed={"send_": send_drops, "drop_": offload_drops})
    sender = GsoSender(counters=counters, drops=send_drops, errors=send_drops)
    drain = QueueDrain(None, queue_num, counters, sender, gso=gso_mtu > 0)
    on_packet = packet_handler(table, sender, drain, heads_up, mtu=gso_mtu, offload_drops=offload_drops)

    nfq = NetfilterQueue()
    for attempt in range(WORKER_BIND_ATTEMPTS):  # a dying predecessor may hold the queue a moment longer
        try:
            with warnings.catch_warnings():     # a smaller buffer than asked is read back below
                warnings.simplefilter("ignore")
                nfq.bind(queue_num, on_packet, max_len=NFQ_MAX_LEN, sock_len=NFQ_SOCKET_BYTES)
            break
        except OSError:
            if attempt == WORKER_BIND_ATTEMPTS - 1:
                os._exit(3)  # the supervisor will try again
            time.sleep(WORKER_BIND_RETRY_S)
    nfq_fd = nfq.get_fd()
    nl = socket.socket(fileno=os.dup(nfq_fd))    # the package's netlink socket (a second descriptor)
    drain.sock = nl
    drain.configure()
    counters["queue_rcvbuf_bytes"] = nl.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # A bare epoll, and the controller checked only when idle (PR_SET_PDEATHSIG covers its death
    # anyway): a worker woken by one packet runs as little as it can before sealing it.
    ep = select.epoll()
    ctl_fd = conn.fileno()
    ep.register(nfq_fd, select.EPOLLIN)
    ep.register(ctl_fd, select.EPOLLIN)
    run_socket = nfq.run_socket
    conn.send(("ready", index, os.getpid()))
    running = True
    try:
        while running:
            events = ep.poll(1.0)
            if not events and os.getppid() != parent:
                break  # the controller is gone: stop (the queue then drops: fail closed)
            for fd, _ in events:
                if fd == nfq_fd:
                    try:
                        run_socket(drain)
                    except OSError as exc:
                        counters["nfq_" + type(exc).__name__] += 1
                    finally:
                        drain.end()   # the runs go out, then one DROP for every packet read
                else:
                    try:
                        while conn.poll():
                            if not table.control(conn.recv()):
                                running = False
                                break
                    except (EOFError, OSError):
                        running = False  # the controller is gone: stop (the queue then drops)
    finally:
        ep.close()
        nfq.unbind()   # (what is still queued is dropped by the kernel)
        nl.close()
