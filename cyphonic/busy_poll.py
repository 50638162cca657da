"""Busy polling for the answer to a lone packet: the one policy, for the node daemon's data
path (``cyphonic.node.packet_handling.PacketPath``) and the adapter's way back
(``appliance.packet_handling.ReplyWait``, told by the workers).

Why: a process that sends a lone packet (a ping, a request: not one of a stream, not an
answer to a packet it just delivered) and goes to sleep is woken for the answer on a halted
CPU with cold caches, and on a virtual machine that wakeup is most of the round trip. So
after a lone packet it polls without sleeping for up to ``budget_s`` and stops as soon as
the answer is delivered (the CPU is then for whoever reads it).

When not: spinning holds a CPU. It pays only while another CPU is free for the peer that
produces the answer, hence only while at least ``BUSY_POLL_MIN_IDLE_CPUS`` stood idle over
the last sample (``idle_cpus``, fed by the edge from /proc/stat); and only while answers come
within ``QUICK_FACTOR`` x the budget (``quick``): a lone packet whose answer did not come in
time ends busy polling until an answer comes quickly again.

The policy is told three things and answers one:
- ``lone_sent(now)``: a lone packet of ours went out; answers how long to spin (0.0: do not).
  A packet sent within ``answer_gap_s`` of a delivery answers that delivery and is not waited
  for (the node: ANSWER_GAP_S; the adapter, whose workers' heads-up may be read after the
  answer came back: twice the budget);
- ``delivered(now)``: a packet was delivered; answers whether a lone packet's answer was
  awaited (then the edge stops spinning: the CPU is for the reader now);
- ``idle_cpus``: set by the edge's sampler (``lone_at`` tells it to sample often).

What a lone packet is, is one rule, ``in_burst``, asked where packets are read and sent: a
packet within ``LONE_GAP_S`` of the one before is part of a burst (the edge drains its
descriptor and batches: the node's TUN and UDP handlers, the adapter's way back); the first
after ``LONE_GAP_S`` of quiet is lone (it goes out at once, uncopied, and the answer to one of
our own may be busy-polled: the node's TUN handler, the adapter's workers).

Pure: time is an argument; no clocks, sockets or files.
"""

from __future__ import annotations

BUSY_POLL_MIN_IDLE_CPUS = 0.75   # busy-poll only while this many CPUs stood idle
ANSWER_GAP_S = 0.0005            # a packet sent this soon after a delivery answers that delivery
LONE_GAP_S = 0.001               # a packet this long after the previous one is lone; sooner: a burst
QUICK_FACTOR = 2.0               # answers within this many budgets count as quick
BUSY_POLL_US_DEFAULT = 500       # `busy_poll_us` of the node daemon and the adapter: about two LAN round trips
BUSY_POLL_US_MAX = 5000          # ... and never longer than this: a longer spin only wastes a CPU


def in_burst(now: float, last: float) -> bool:
    """True if a packet at ``now`` is part of a burst: within ``LONE_GAP_S`` of the one before,
    at ``last``; False if it is lone (the first after a pause)."""
    return now - last < LONE_GAP_S


class BusyPoll:
    """The busy-poll state of one data path (one process's event loop)."""

    __slots__ = ("budget_s", "answer_gap_s", "idle_cpus", "sent_at", "lone_at", "delivered_at", "quick",
                 "busy_polls")

    def __init__(self, budget_s: float, *, answer_gap_s: float = ANSWER_GAP_S) -> None:
        self.budget_s = budget_s
        self.answer_gap_s = answer_gap_s
        self.idle_cpus = 0.0
        self.sent_at = 0.0          # our last lone packet, while its answer has not come
        self.lone_at = 0.0          # our last lone packet
        self.delivered_at = 0.0     # the last packet delivered
        self.quick = True           # answers to lone packets came within QUICK_FACTOR x budget_s
        self.busy_polls = 0

    def lone_sent(self, now: float) -> float:
        """A lone packet went out at ``now``: seconds to spin for its answer (0.0: do not)."""
        if now - self.delivered_at < self.answer_gap_s:
            return 0.0              # it answers what was just delivered: nothing to wait for
        if self.sent_at:
            self.quick = False      # the one before got no answer in time
        self.sent_at = self.lone_at = now
        if self.quick and self.idle_cpus >= BUSY_POLL_MIN_IDLE_CPUS:
            self.busy_polls += 1
            return self.budget_s
        return 0.0

    def delivered(self, now: float) -> bool:
        """A packet was delivered at ``now``. True: it is the answer a lone packet awaited, so
        the edge stops spinning (every spin starts with one awaited: nothing else is running)."""
        self.delivered_at = now
        if self.sent_at:
            self.quick = now - self.sent_at < QUICK_FACTOR * self.budget_s
            self.sent_at = 0.0
            return True
        return False
