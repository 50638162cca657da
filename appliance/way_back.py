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

Injection in batches (issue 15, step 4): with a ``batch_injector`` whose packet socket takes
``PACKET_VNET_HDR`` (``Injector.enable_batches``), each general node's reader feeds what it
opened to its own ``cyphonic.offload.Coalescer`` (``link_header_bytes`` 14): consecutive
segments of one TCP flow leave as ONE frame (vnet header GSO TCPV4 + Ethernet header to the
general node's MAC + the merged packet), every other packet at once as one frame with a zero
header, on the same socket, in order. A run is sent when it ends and at the latest when the
drain ends (in the wakeup that read it: no timer, no extra wakeup). A lone datagram (the first
read of a wakeup that is not part of a burst by ``busy_poll.in_burst``, the node daemon's
rule, and not a GRO read) goes out at once with a zero header, uncopied. A TCP SYN
keeps ``inject``: the raw IP socket passes the output hook, whose ``clamp_out`` chain clamps
its MSS (``nft/adapter.nft.in``); a packet socket's frames bypass netfilter. ``batch`` counts ``merged_writes`` (merged
frames), ``merged_segments``, ``plain_writes`` (frames of one packet), ``coalesce_bad_checksum``.
Fallback to ``inject`` (one packet per ``sendto`` on the raw IP socket, as before), counted in
``batch``: ``inject_batches_refused`` (the kernel refused the socket option), ``inject_gso_refused``
(it refused a GSO frame: that run is cut by ``split_gso`` and injected packet by packet, and
every later packet takes ``inject``).

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

from cyphonic.busy_poll import in_burst
from cyphonic.datachannel import OPENED, RECV_BUFFER, RECV_STAGE
from cyphonic.node.constants import INTAKE_BATCH, READ_BATCH, RECV_BYTES
from cyphonic.offload import PROTO_TCP, TCP_SYN, VNET_HDR_BYTES, Coalescer, VirtioNetHdr, split_gso
from cyphonic.udp_batch import enable_gro, read_merged, receive_pieces

from .interface_handling import ETH_HEADER_BYTES, mac_bytes

from .packet_handling import ReplyWait


class WayBack:
    """``selector``: the event loop's DataPathSelector (None: plain asyncio readers, slower,
    no busy polling). ``busy_poll_s``: 0 = never. ``batch_injector``: an ``Injector`` to inject
    in batches with (None: one packet at a time through ``inject``)."""

    def __init__(self, inject: Callable[[bytes], bool], *, selector=None, busy_poll_s: float = 0.0,
                 drops: Counter | None = None, clock: Callable[[], float] = time.time,
                 batch_injector=None) -> None:
        self.inject = inject
        self.selector = selector
        self.clock = clock
        self.drops: Counter = drops if drops is not None else Counter()
        self.batch: Counter = Counter()   # gro_reads, gro_pieces, gro_initiation_on_main, gro_unavailable;
        #                                   merged_writes, merged_segments, plain_writes, inject_*_refused
        self.batch_injector = None
        if batch_injector is not None:
            if batch_injector.enable_batches():
                self.batch_injector = batch_injector
            else:
                self.batch["inject_batches_refused"] += 1
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
        senders = self._frame_senders(link) if to_general_node else None
        send, send_plain = senders if senders is not None else (None, None)
        coalescer = Coalescer(counters=counts, link_header_bytes=ETH_HEADER_BYTES) if send is not None else None
        push = coalescer.push if coalescer is not None else None
        co = None                      # the coalescer while batches are on
        opened = OPENED
        last = 0.0

        def deliver(plen: int) -> None:   # the common case: opened and checked; inject it
            if delivered is not None and delivered(now):
                stop_spin()   # the CPU is for the general node's packet now
            if not inject(opened[:plen]):
                drops["inject_failed"] += 1

        def deliver_lone(plen: int) -> None:   # batches on, a lone datagram: at once, one frame
            if delivered is not None and delivered(now):
                stop_spin()
            if opened[9] == PROTO_TCP and opened[(opened[0] & 15) * 4 + 13] & TCP_SYN:
                if not inject(opened[:plen]):   # (a SYN passes the output hook: its MSS is clamped)
                    drops["inject_failed"] += 1
                return
            counts["plain_writes"] += 1
            send_plain(opened[:plen])

        def deliver_merged(plen: int) -> None:   # batches on, a burst: runs of one TCP flow merge
            if delivered is not None and delivered(now):
                stop_spin()
            b0 = opened[0]
            tcp = opened[9] == PROTO_TCP
            if tcp and b0 == 0x45 and not opened[33] & TCP_SYN:
                for w in push(opened[:plen]):   # (copied: OPENED is free again)
                    send(w)
                return
            if co.pending:                    # the rest at once; what came before goes first
                for w in co.flush():
                    send(w)
            if tcp and opened[(b0 & 15) * 4 + 13] & TCP_SYN:
                if not inject(opened[:plen]):
                    drops["inject_failed"] += 1
                return
            counts["plain_writes"] += 1
            send_plain(opened[:plen])

        def refused(size: int, addr, at: float) -> None:
            if co is not None and co.pending:
                for w in co.flush():          # (what came before goes first)
                    send(w)
            receive_datagram(RECV_BUFFER[0:size], addr, at)

        def on_udp() -> bool:
            nonlocal now, co, last
            now = clock()
            burst = in_burst(now, last)
            last = now
            co = coalescer if self.batch_injector is not None else None
            reads = 0
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
                if co is None:
                    out = deliver
                elif burst or reads or seg < n:
                    out = deliver_merged
                else:
                    out = deliver_lone        # the first datagram of a quiet socket: no copy, no wait
                reads += 1
                if pieces(n, seg, addr, now, stage, fast_receive, out, refused, counts):
                    slow = True
            if co is not None and co.pending:
                for w in co.flush():
                    send(w)
            if slow:
                flush()
            return slow

        return on_udp

    def _frame_senders(self, link) -> tuple[Callable, Callable] | None:
        """The general node's frame senders, for ``Coalescer`` writes and for one packet, or None
        when batches are off or its MAC is unusable (then ``inject``, which resolves it by ARP)."""
        injector = self.batch_injector
        gn = getattr(link, "gn", None)
        if injector is None or gn is None:
            return None
        try:
            mac = mac_bytes(gn.mac)
        except (ValueError, AttributeError, TypeError):
            return None
        if mac[0] & 1 or mac == bytes(6):
            return None
        inject_write = injector.inject_write
        inject_plain = injector.inject_plain
        drops = self.drops

        def send(write) -> None:
            if inject_write(write, mac):
                return
            if write[1] and injector.gso_refused:   # a merged run the kernel refused: its packets one by one
                if self.batch_injector is not None:
                    self._gso_refused()
                for p in split_gso(bytearray(memoryview(write)[VNET_HDR_BYTES:]), VirtioNetHdr.parse(write), drops):
                    self.deliver(p)
                return
            drops["inject_failed"] += 1

        def send_plain(packet) -> None:
            if not inject_plain(packet, mac):
                drops["inject_failed"] += 1

        return send, send_plain

    def _gso_refused(self) -> None:
        """The kernel refused a GSO frame: every later packet takes ``inject`` (counted)."""
        self.batch_injector = None
        self.batch["inject_gso_refused"] += 1
