"""Packet Handling and Interface Handling, the way back: a peer's packet to a general node.

The controller owns every receive session (one replay window per session, one owner, so
no packet is accepted twice), so the way back runs here, not in the workers. Each general
node's WAN socket is read straight from ``select()`` (a fast reader of the event loop's
``DataPathSelector``: no asyncio machinery per packet) and the common case is carried
through at once, as the node daemon's ``PacketPath`` does toward its TUN:
- open: the device's fast path (``Device.fast_receive_staged``: a live session from its
  known endpoint) authenticates, checks the replay window and crypto routing (the inner
  source is the peer's virtual IP, the destination the general node's), nothing copied;
- inject: the packet goes to the general node on the LAN (``interface_handling.Injector``).
Everything else (signaling, handshakes, relays, new endpoints, the adapter's own link) goes
to the general node's engine and its ``EngineHost`` is flushed once per batch.

Batches (issue 15): each general node's socket reads with UDP GRO, so a burst from one peer
arrives as one read of up to 64 datagrams; every piece is moved to the front of ``RECV_STAGE``
and goes through the fast path on its own (its own authentication, replay-window entry and
crypto routing), and a piece the fast path refuses goes to the engine, as a lone datagram
would (``cyphonic.udp_batch.receive_pieces``: the node daemon's loop too). ``batch`` counts ``gro_reads``, ``gro_pieces`` and ``gro_initiation_on_main`` (an
initiation merged into a run of data packets, past the reuseport steering: still handled).

Busy polling for answers: the workers write a heads-up (an eventfd) before sending a lone
packet; ``ReplyWait`` (``appliance.packet_handling``, on ``cyphonic.busy_poll``) then keeps
the controller awake for the answer, which this path tells it about before injecting.

Never: let a socket error end the reader (counted in ``drops``), or block: every socket is
non-blocking.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Callable

from cyphonic.datachannel import OPENED, RECV_BUFFER, RECV_STAGE
from cyphonic.node.constants import INTAKE_BATCH, READ_BATCH, RECV_BYTES
from cyphonic.udp_batch import enable_gro, read_merged, receive_pieces

from .packet_handling import ReplyWait


class WayBack:
    """``selector``: the event loop's DataPathSelector (None: plain asyncio readers, slower,
    no busy polling). ``busy_poll_s``: 0 = never."""

    def __init__(self, inject: Callable[[bytes], bool], *, selector=None, busy_poll_s: float = 0.0,
                 drops: Counter | None = None, clock: Callable[[], float] = time.time) -> None:
        self.inject = inject
        self.selector = selector
        self.clock = clock
        self.drops: Counter = drops if drops is not None else Counter()
        self.batch: Counter = Counter()   # gro_reads, gro_pieces, gro_initiation_on_main, gro_unavailable
        self.heads_up = -1          # the eventfd the workers write before a lone packet
        self.reply_wait: ReplyWait | None = None
        if selector is not None and busy_poll_s:
            self.heads_up = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.reply_wait = ReplyWait(busy_poll_s, selector.spin, selector.stop_spin)
            selector.add_fast_reader(self.heads_up, self._on_heads_up)

    # --- descriptors ---------------------------------------------------------------------

    def watch(self, link, *, to_general_node: bool = True) -> None:
        """Read ``link``'s socket. ``to_general_node`` False: the adapter's own link, whose
        data packets are not for anyone on the LAN (all to its engine)."""
        if not enable_gro(link.sock):
            self.batch["gro_unavailable"] += 1
        readers = [(link.sock, self._handler(link, to_general_node))]
        if link.intake is not None:
            readers.append((link.intake, self._intake_handler(link)))
        for sock, handler in readers:
            if self.selector is not None:
                self.selector.add_fast_reader(sock.fileno(), handler)
            else:
                asyncio.get_running_loop().add_reader(sock.fileno(), handler)

    def unwatch(self, link) -> None:
        for sock in (link.sock, link.intake):
            if sock is None:
                continue
            if self.selector is not None:
                self.selector.remove_fast_reader(sock.fileno())
            else:
                asyncio.get_running_loop().remove_reader(sock.fileno())

    def close(self) -> None:
        if self.heads_up >= 0:
            self.selector.remove_fast_reader(self.heads_up)
            os.close(self.heads_up)
            self.heads_up = -1

    def _on_heads_up(self) -> bool:
        try:
            os.eventfd_read(self.heads_up)
        except BlockingIOError:
            return False
        self.reply_wait.heads_up()
        return False

    # --- packets ------------------------------------------------------------------------------

    def deliver(self, packet: bytes) -> None:
        """A packet the engine opened on its slow path (``EngineHost``'s ``deliver``)."""
        if not self.inject(packet):
            self.drops["inject_failed"] += 1

    def _intake_handler(self, link) -> Callable[[], bool]:
        """The reader of a link's intake socket (initiations only): ``INTAKE_BATCH`` at a
        time to its engine, so under a flood the general nodes' packets wait for no more."""
        receive_datagram = link.host.engine.receive_datagram
        flush = link.host.flush
        recvfrom = link.intake.recvfrom
        clock = self.clock
        drops = self.drops
        batch = range(INTAKE_BATCH)

        def on_intake() -> bool:
            now = clock()
            n = 0
            for _ in batch:
                try:
                    data, addr = recvfrom(RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    drops["udp_error"] += 1
                    continue
                receive_datagram(data, addr[:2], now)
                n += 1
            if n:
                flush()
            return n > 0

        return on_intake

    def _handler(self, link, to_general_node: bool) -> Callable[[], bool]:
        """The reader of one general node's socket: open, check and inject the common case;
        True when the engine was used (asyncio has work then)."""
        engine = link.host.engine
        receive_datagram = engine.receive_datagram
        flush = link.host.flush
        recvmsg_into = link.sock.recvmsg_into
        into = [RECV_STAGE]
        read = read_merged
        pieces = receive_pieces
        stage = RECV_STAGE
        inject = self.inject
        clock = self.clock
        drops = self.drops
        counts = self.batch
        wait = self.reply_wait
        delivered = wait.policy.delivered if wait is not None else None   # (ReplyWait.delivered, inline)
        stop_spin = wait.stop_spin if wait is not None else None
        batch = range(READ_BATCH)
        now = 0.0

        def deliver(plen: int) -> None:   # the common case: opened and checked; inject it
            if delivered is not None and delivered(now):
                stop_spin()   # the CPU is for the general node's packet now
            if not inject(OPENED[:plen]):
                drops["inject_failed"] += 1

        def refused(size: int, addr, at: float) -> None:
            receive_datagram(RECV_BUFFER[0:size], addr, at)

        def on_udp() -> bool:
            nonlocal now
            now = clock()
            device = engine.device if to_general_node else None   # made at the first login
            fast_receive = device.fast_receive_staged if device is not None else None
            slow = False
            for _ in batch:
                try:
                    got = read(recvmsg_into, into, counts, drops)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    drops["udp_error"] += 1
                    continue
                if got is None:
                    continue
                n, seg, addr = got
                if pieces(n, seg, addr, now, stage, fast_receive, deliver, refused, counts):
                    slow = True
            if slow:
                flush()
            return slow

        return on_udp
