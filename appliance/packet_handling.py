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
from cyphonic.busy_poll import LONE_GAP_S, BusyPoll
from cyphonic.datachannel import SEAL_STAGE, SEALED, SendStream
from cyphonic.udp_batch import GsoSender
from cyphonic.wire import relay as wire_relay

from . import nfqueue_wire as nfw
from .constants import (MISS_REPORT_EVERY_S, NFQ_CONFIG_SEQ, NFQ_DRAIN_PACKETS, NFQ_MAX_LEN, NFQ_RECV_BYTES,
                        NFQ_SOCKET_BYTES, WORKER_BIND_ATTEMPTS, WORKER_BIND_RETRY_S, WORKER_MAX_SESSIONS,
                        WORKER_SOCKET_WAIT_S)

PR_SET_PDEATHSIG = 1        # prctl(2)
_MAX_INNER = C.MAX_INNER_PACKET_BYTES


class ReplyWait:
    """The controller's busy polling for the answer to a lone packet that a worker sent.

    The node daemon waits for the answer to a lone packet of its own. Here the packet leaves
    from a worker and its answer comes back to the controller, so a worker about to send a
    lone packet (the first after ``busy_poll.LONE_GAP_S``: a ping, a request) writes to an
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
    drain (then EAGAIN, so the batch is bounded and the epoll loop comes back), with the ACK
    of our configuration taken out of the stream (``config_acked``, or ``nfq_config_refused``)
    and the kernel's ENOBUFS (packets it could not queue to us: dropped, fail-open being off)
    counted as ``nfq_enobufs``. The packet callback calls ``seen(id)`` first thing. ``end()``
    closes the drain: the sender's runs go out, then one DROP verdict for every packet read
    (``verdict_batches``; ``verdicts``: the packets they covered). Counters in ``counters``."""

    def __init__(self, sock, queue_num: int, counters: Counter, sender: GsoSender | None = None,
                 limit: int = NFQ_DRAIN_PACKETS) -> None:
        self.sock = sock
        self.queue_num = queue_num
        self.counters = counters
        self.sender = sender
        self.limit = limit
        self.left = limit
        self.last_id: int | None = None
        self.count = 0

    def configure(self) -> None:
        """Fail-open explicitly off (mask bit set, value 0), asked with an ACK."""
        try:
            self.sock.send(nfw.config(self.queue_num, flags=0, mask=nfw.F_FAIL_OPEN, seq=NFQ_CONFIG_SEQ))
        except OSError as exc:
            self.counters["nfq_config_" + (errno.errorcode.get(exc.errno, "") or type(exc).__name__)] += 1

    def recv(self, _bufsize: int = NFQ_RECV_BYTES) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "drain bound reached")
        while True:
            try:
                data = self.sock.recv(NFQ_RECV_BYTES, socket.MSG_DONTWAIT)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.counters["nfq_enobufs"] += 1
                raise
            ack = nfw.parse_ack(data)
            if ack is None:
                self.left -= 1
                return data
            if ack.error:
                self.counters["nfq_config_refused"] += 1
            else:
                self.counters["config_acked"] += 1

    def seen(self, packet_id: int) -> None:
        self.last_id = packet_id
        self.count += 1

    def end(self) -> None:
        """The drain is over: send what was sealed, then DROP every packet read (fail closed)."""
        self.left = self.limit
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
                   clock=time.monotonic):
    """The NFQUEUE callback of a worker: seal each packet with its session's stream and add it
    to ``sender``; no verdict here (``drain.end`` drops them all). Never raises."""
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

    def on_packet(pkt) -> None:
        nonlocal last_sent
        try:
            seen(pkt.id)   # first: whatever happens below, the drain's verdict (DROP) covers it
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
            if size > _MAX_INNER:
                counters["drop_oversize"] += 1
                return
            stream, endpoint, sock = s
            stage[0:size] = payload
            length = stream.seal_staged(size)      # the stream's next counter, never another
            now = clock()
            lone = now - last_sent > LONE_GAP_S    # the first packet after a pause (a ping, a request)
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
        except OSError as exc:  # e.g. the miss report's pipe: never end the loop
            counters["send_" + (os.strerror(exc.errno) if exc.errno else type(exc).__name__)] += 1
        except Exception as exc:  # noqa: BLE001 - no-throw boundary of the packet path
            counters["internal_" + type(exc).__name__] += 1

    return on_packet


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the controller dies (even by kill -9), so a
    restarted controller finds its queues free."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def worker_main(index: int, queue_num: int, conn, sockets: dict, heads_up: int = -1) -> None:
    """Run worker ``index`` on NFQUEUE ``queue_num`` until told to stop (in a forked child).
    ``heads_up``: the controller's eventfd, written before each lone packet is sent (ReplyWait),
    or -1 (no busy polling)."""
    from netfilterqueue import NetfilterQueue

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    parent = os.getppid()
    counters: Counter = Counter()
    send_drops: Counter = Counter()                    # the sender's drops and errors, as send_*
    table = SealTable(index, queue_num, conn, sockets, counters, prefixed={"send_": send_drops})
    sender = GsoSender(counters=counters, drops=send_drops, errors=send_drops)
    drain = QueueDrain(None, queue_num, counters, sender)
    on_packet = packet_handler(table, sender, drain, heads_up)

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
