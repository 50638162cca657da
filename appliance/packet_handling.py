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

import os
import select
import signal
import socket
import time
from collections import Counter

from cyphonic.busy_poll import LONE_GAP_S, BusyPoll
from cyphonic.datachannel import SendStream
from cyphonic.wire import relay as wire_relay

from .constants import (MISS_REPORT_EVERY_S, WORKER_BIND_ATTEMPTS, WORKER_BIND_RETRY_S, WORKER_MAX_SESSIONS,
                        WORKER_SOCKET_WAIT_S)

PR_SET_PDEATHSIG = 1        # prctl(2)


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

    def __init__(self, index: int, queue_num: int, conn, sockets: dict, counters: Counter) -> None:
        self.index = index
        self.queue_num = queue_num
        self.conn = conn
        self.sockets: dict[int, socket.socket] = dict(sockets)
        self.counters = counters
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
            self.conn.send(("stats", {"index": self.index, "queue": self.queue_num, "pid": os.getpid(),
                                      "sessions": len(sessions), "ports": len(self.sockets), **counters,
                                      "per_session": per}))
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
    table = SealTable(index, queue_num, conn, sockets, counters)
    sessions = table.sessions                          # (gn vip, peer vip) -> (SendStream, endpoint, sock)
    tx_bytes = table.tx_bytes
    last_miss: dict[tuple[bytes, bytes], float] = {}
    last_sent = 0.0
    monotonic = time.monotonic
    eventfd_write = os.eventfd_write

    def on_packet(pkt) -> None:
        nonlocal last_sent
        verdict = False
        try:
            payload = pkt.get_payload()
            if len(payload) < 20 or payload[0] >> 4 != 4:
                counters["drop_not_ipv4"] += 1
                pkt.drop()
                return
            key = (payload[12:16], payload[16:20])
            s = sessions.get(key)
            if s is None:
                counters["drop_no_session"] += 1
                pkt.drop()
                now = time.monotonic()
                if now - last_miss.get(key, 0.0) >= MISS_REPORT_EVERY_S:
                    if len(last_miss) > WORKER_MAX_SESSIONS:
                        last_miss.clear()
                    last_miss[key] = now
                    conn.send(("miss", key[0], key[1]))
                return
            stream, endpoint, sock = s
            sealed = stream.seal(payload)
            if heads_up >= 0:  # a lone packet: tell the controller to wait awake (ReplyWait)
                now = monotonic()
                if now - last_sent > LONE_GAP_S:
                    try:
                        eventfd_write(heads_up, 1)
                    except OSError:
                        counters["heads_up_failed"] += 1
                last_sent = now
            if endpoint[0] == "relay":
                sock.sendto(wire_relay.encode_data(endpoint[2], sealed), endpoint[1])
            else:
                sock.sendto(sealed, endpoint)
            pkt.drop()  # after the send: the verdict is not on the way to the peer
            verdict = True
            counters["sealed"] += 1
            counters["sealed_bytes"] += len(payload)
            tx_bytes[key] += len(payload)
        except OSError as exc:  # e.g. ECONNREFUSED after an ICMP error: never end the loop
            counters["send_" + (os.strerror(exc.errno) if exc.errno else type(exc).__name__)] += 1
            if not verdict:
                pkt.drop()
        except Exception as exc:  # noqa: BLE001 - no-throw boundary of the packet path
            counters["internal_" + type(exc).__name__] += 1
            if not verdict:
                pkt.drop()

    nfq = NetfilterQueue()
    for attempt in range(WORKER_BIND_ATTEMPTS):  # a dying predecessor may hold the queue a moment longer
        try:
            nfq.bind(queue_num, on_packet, max_len=4096)
            break
        except OSError:
            if attempt == WORKER_BIND_ATTEMPTS - 1:
                os._exit(3)  # the supervisor will try again
            time.sleep(WORKER_BIND_RETRY_S)
    # A bare epoll, and the controller checked only when idle (PR_SET_PDEATHSIG covers its death
    # anyway): a worker woken by one packet runs as little as it can before sealing it.
    ep = select.epoll()
    nfq_fd = nfq.get_fd()
    ctl_fd = conn.fileno()
    ep.register(nfq_fd, select.EPOLLIN)
    ep.register(ctl_fd, select.EPOLLIN)
    run_queue = nfq.run
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
                        run_queue(block=False)
                    except OSError as exc:
                        counters["nfq_" + type(exc).__name__] += 1
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
        nfq.unbind()
