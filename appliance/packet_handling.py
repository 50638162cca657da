"""Packet Handling: the NFQUEUE worker pool (the sealing half of the data path).

Each worker is a process bound to one NFQUEUE queue (the packet filter spreads
the general nodes' overlay-bound packets over the queues). For every queued
packet it looks up the session by (source VIP, destination VIP), seals it with
its **own stream id** of that session's key (docs/protocol.md §7: no nonce is
ever used twice across processes), sends it from the general node's UDP
socket (inherited from the controller at fork, so the source port is the one
the NMS registered), and gives the verdict DROP for the clear original. A
packet with no session is dropped (the queue fails closed) and reported to the
controller, which brings the tunnel up (a packet triggers a tunnel, as a DNS
query does).

The receiving half (open, replay window, crypto routing, injection) runs in
the controller, which owns every receive session: one replay window per
session, one owner, so no packet is ever accepted twice. See
docs/adapter-design.md for the full design and what is still to come.

Control messages (controller -> worker, over a pipe, never on the packet path):
  ("tx", gn_vip, peer_vip, key, remote_index, stream_id, endpoint, port)  install or replace
  ("untx", gn_vip, peer_vip)                                         remove
  ("stats",)                                                         answered with counters
  ("stop",)
Worker -> controller: ("miss", gn_vip, peer_vip) (rate-limited), ("stats", dict).
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections import Counter

from cyphonic.datachannel import SendStream
from cyphonic.node.packet_handling import BUSY_POLL_MIN_IDLE_CPUS
from cyphonic.wire import relay as wire_relay

MISS_REPORT_EVERY_S = 1.0
PR_SET_PDEATHSIG = 1
LONE_GAP_S = 0.001          # a packet sealed this long after the worker's previous one is lone


class ReplyWait:
    """The controller's busy polling for the answer to a lone packet that a worker sent.

    The node daemon busy-polls after a lone packet of its own (cyphonic/node/packet_handling.py).
    In the adapter the packet leaves from a worker and its answer comes back to the controller,
    so a worker about to send a lone packet (the first after LONE_GAP_S: a ping, a request)
    writes to an eventfd first, the heads-up. The controller, woken by it on an idle CPU while
    the worker sends and the peer answers, busy-polls for up to ``busy_s`` and stops when an
    answer is delivered: the answer then meets a running process on a running CPU instead of
    waking a halted one. Only while answers come within twice ``busy_s`` and at least
    BUSY_POLL_MIN_IDLE_CPUS stood idle (``idle_cpus``, kept by sample_idle_cpus).

    Measured on 2 CPUs (median ping through the adapter minus through the node daemon, in
    the same lab): +0.22..0.31 ms without a heads-up; +0.23..0.26 ms with it written after the
    send (the controller then woke where the peer needed to run); +0.17..0.20 ms with it
    written before the send; and with the NFQUEUE verdict moved after the send as well,
    +0.12 and +0.18 ms in two `make bench` runs (docs/adapter.md)."""

    def __init__(self, busy_s: float, spin, stop_spin, clock=time.time) -> None:
        self.busy_s = busy_s
        self.spin = spin            # DataPathSelector.spin / stop_spin
        self.stop_spin = stop_spin
        self.clock = clock
        self.idle_cpus = 0.0
        self.lone_at = 0.0          # the last heads-up
        self.sent_at = 0.0          # ... while its answer has not come
        self.delivered_at = 0.0
        self.quick = True           # answers came within 2 x busy_s
        self.heads_ups = 0          # heads-ups read (each a lone packet a worker sent)
        self.busy_polls = 0

    def heads_up(self) -> None:
        now = self.clock()
        self.lone_at = now
        self.heads_ups += 1
        if now - self.delivered_at < 2 * self.busy_s:
            return  # an answer was delivered just now: this heads-up was read late, nothing to wait for
        if self.sent_at:
            self.quick = False      # the one before got no answer in time
        self.sent_at = now
        if self.quick and self.idle_cpus >= BUSY_POLL_MIN_IDLE_CPUS:
            self.busy_polls += 1
            self.spin(self.busy_s)

    def delivered(self, now: float) -> None:
        """A packet went to a general node (call before injecting it: the CPU is for it now)."""
        self.delivered_at = now
        if self.sent_at:
            self.quick = now - self.sent_at < 2 * self.busy_s
            self.sent_at = 0.0
            self.stop_spin()


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the controller dies (even by kill -9), so a
    restarted controller finds its queues free."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
MAX_SESSIONS = 4096


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
    sessions: dict[tuple[bytes, bytes], tuple] = {}    # (gn vip, peer vip) -> (SendStream, endpoint, sock)
    last_miss: dict[tuple[bytes, bytes], float] = {}
    tx_bytes: Counter = Counter()                      # per session, for cyadm
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
                    if len(last_miss) > MAX_SESSIONS:
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

    def on_control(msg) -> bool:
        kind = msg[0]
        if kind == "tx":
            _, gn_vip, peer_vip, key, remote_index, stream_id, endpoint, port = msg
            sock = sockets.get(port)
            if sock is None:
                counters["install_unknown_gn"] += 1
                return True
            if len(sessions) >= MAX_SESSIONS and (gn_vip, peer_vip) not in sessions:
                counters["install_table_full"] += 1
                return True
            sessions[(gn_vip, peer_vip)] = (SendStream(key, remote_index, stream_id), endpoint, sock)
            counters["installs"] += 1
        elif kind == "untx":
            sessions.pop((msg[1], msg[2]), None)
        elif kind == "stats":
            per = {f"{'.'.join(map(str, k[0]))}>{'.'.join(map(str, k[1]))}": v for k, v in tx_bytes.items()
                   if k in sessions}
            conn.send(("stats", {"index": index, "queue": queue_num, "pid": os.getpid(),
                                 "sessions": len(sessions), **counters, "per_session": per}))
        elif kind == "stop":
            return False
        return True

    nfq = NetfilterQueue()
    for attempt in range(20):  # a worker of a crashed controller may hold the queue a moment longer
        try:
            nfq.bind(queue_num, on_packet, max_len=4096)
            break
        except OSError:
            if attempt == 19:
                os._exit(3)  # the supervisor will try again
            time.sleep(0.1)
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
                            if not on_control(conn.recv()):
                                running = False
                                break
                    except (EOFError, OSError):
                        running = False  # the controller is gone: stop (the queue then drops)
    finally:
        ep.close()
        nfq.unbind()
