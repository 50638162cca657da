"""Packet Handling for the node daemon: the data path in a tight epoll loop, asyncio on top.

The daemon's event loop is asyncio's ``SelectorEventLoop`` over a ``DataPathSelector``.
asyncio keeps everything that is not per packet (signaling timers, the DNS stub, the
status socket, worker threads, signals). The data path's descriptors (the TUN device
and the UDP sockets) are registered with ``add_fast_reader`` instead of
``loop.add_reader``: their handlers run straight from ``select()``, with no asyncio
handle, callback, ready queue or timer heap per wakeup. ``select()`` gives control
back to asyncio only when one of asyncio's own descriptors is ready, asyncio's timeout
has run out, or a handler says it left work for asyncio (it took the slow path).

A handler carries its descriptor's packets through the device's fast path
(``Device.fast_send`` / ``fast_receive``: a live, confirmed session to a known
endpoint) and straight out again (``sendto`` / a TUN write). Whatever the fast path
refuses (handshakes, new endpoints, relays, packets for peers without a tunnel,
signaling) goes to the daemon's slow path, which feeds the sans-IO engine and
flushes it, as before.

Per wakeup, the cost that matters is that of an idle process waking with cold
caches (a ping every 10 ms: each packet meets a cold interpreter), so the path
touches little: no asyncio machinery, bound locals, deadlines precomputed in the
keypair. A handler called after a pause reads one packet and goes back to
``epoll_wait`` (which it must call anyway to sleep) instead of reading on until
EAGAIN, whose exception costs more than the wait; called again within
``busy_poll.LONE_GAP_S`` (traffic is flowing: ``busy_poll.in_burst``) it drains its descriptor, up to
``READ_BATCH`` packets, so one busy side cannot starve the other.

Busy polling, only where it pays: after a lone packet of our own goes out (a ping, a
request: not an answer to a packet just delivered to the TUN, and not in a stream),
``select()`` polls without sleeping for up to ``busy_poll_s`` so the answer finds the
process awake and its caches warm, and stops as soon as the answer is delivered. When to
spin and for how long is ``cyphonic.busy_poll.BusyPoll``'s to say (shared with the adapter);
this module only tells it what happened and spins (``DataPathSelector.spin``). ``IdleCpus``
and ``sample_idle_cpus`` feed it how many CPUs stood idle (sampled every ``IDLE_SAMPLE_S``
while lone packets go out, every ``IDLE_SLOW_SAMPLE_S`` otherwise).

Batches (issue 15, ``cyphonic.udp_batch``): a TUN drain's sealed datagrams leave in UDP GSO
runs when the drain ends (a lone packet at once), and the UDP sockets read with UDP GRO,
each piece of a merged read through the fast path on its own (``PacketPath``).

TUN offloads (issue 15 step 3, ``cyphonic.offload``; ``Tun(offload="merge" | "full")``): a
TUN read starts with a virtio_net_hdr. With "full" a super-packet (up to 64 KB of one TCP
flow) is cut into MTU pieces, and a lone packet's partial checksum finished, before each is
sealed on its own (its own counter: nothing changes on the wire); with "merge" the kernel
hands over whole packets with finished checksums and the header stays zero (the same code
reads both). On the way in the opened packets of a drain
go through a ``Coalescer``, which merges the consecutive segments of one TCP flow into one
TUN write with a GSO header and writes every other packet alone with a zero header; it is
flushed before anything goes to the slow path (order) and when the drain ends. A lone
datagram is written at once. Counters in ``batch``: ``super_reads``, ``super_read_pieces``,
``merged_writes``, ``merged_segments``, ``plain_writes``, ``coalesce_bad_checksum``;
malformed offload reads are counted drops (``drops["offload_*"]``).

Never: block in a handler (every descriptor is non-blocking), let a handler's
exception out of ``select()`` (it is counted in ``handler_errors`` and the loop goes
on), keep asyncio waiting past the timeout it asked for, or hold a sealed datagram past
the end of the drain that sealed it.
"""

from __future__ import annotations

import asyncio
import os
import select
import selectors
import socket
import time
from collections import Counter
from collections.abc import Mapping
from typing import Callable

from .. import constants as C
from ..busy_poll import BusyPoll, in_burst
from ..datachannel import OPENED, RECV_BUFFER, RECV_STAGE, SEAL_BUFFER, SEAL_STAGE, SEALED
from ..offload import (F_NEEDS_CSUM, PROTO_TCP, VNET_HDR_BYTES, ZERO_HDR, Coalescer, VirtioNetHdr,
                       finish_checksum_at, split_gso)
from ..udp_batch import GRO_ANCILLARY_BYTES, GsoSender, enable_gro, gro_segment, read_merged, receive_pieces, split

from .constants import (IDLE_FAST_FOR_S, IDLE_SAMPLE_S, IDLE_SLOW_SAMPLE_S, INTAKE_BATCH, READ_BATCH,
                        RECV_BYTES)

HEADER_BYTES = C.DATA_HEADER_BYTES

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_EVENT_READ = selectors.EVENT_READ
_EVENT_WRITE = selectors.EVENT_WRITE


def _fileno(fileobj) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        fd = int(fileobj.fileno())
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd}")
    return fd


class _KeyMap(Mapping):
    def __init__(self, keys: dict) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, fileobj):
        for key in self._keys.values():
            if key.fileobj is fileobj or key.fd == fileobj:
                return key
        raise KeyError(fileobj)

    def __iter__(self):
        return (key.fileobj for key in self._keys.values())


class DataPathSelector(selectors.BaseSelector):
    """An epoll selector for asyncio whose ``select()`` also runs the data path's handlers.

    ``add_fast_reader(fd, handler)``: ``handler()`` is called whenever ``fd`` is readable; it
    drains the descriptor and returns True if it left work for asyncio (then ``select()``
    returns at once so asyncio runs it), False otherwise."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._epoll = select.epoll()
        self._keys: dict[int, selectors.SelectorKey] = {}
        self._fast: dict[int, Callable[[], bool]] = {}
        self._clock = clock
        self.handler_errors: Counter = Counter()
        self.spin_until = 0.0

    def spin(self, seconds: float) -> None:
        """Poll without sleeping for up to ``seconds`` from now (until ``stop_spin``)."""
        self.spin_until = self._clock() + seconds

    def stop_spin(self) -> None:
        self.spin_until = 0.0

    # --- the data path's descriptors ----------------------------------------------------------

    def add_fast_reader(self, fd: int, handler: Callable[[], bool]) -> None:
        """Run ``handler`` from ``select()`` when ``fd`` is readable (replaces an earlier one)."""
        if fd in self._keys:
            raise ValueError(f"fd {fd} is registered with asyncio")
        if fd not in self._fast:
            self._epoll.register(fd, _EPOLLIN)
        self._fast[fd] = handler

    def remove_fast_reader(self, fd: int) -> bool:
        if self._fast.pop(fd, None) is None:
            return False
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # closed already
            pass
        return True

    # --- selectors.BaseSelector (what asyncio uses) -----------------------------------------------

    def _lookup(self, fileobj) -> int:
        try:
            return _fileno(fileobj)
        except ValueError:
            for key in self._keys.values():  # a closed file object: find it by identity
                if key.fileobj is fileobj:
                    return key.fd
            raise

    def register(self, fileobj, events, data=None):
        if not events or events & ~(_EVENT_READ | _EVENT_WRITE):
            raise ValueError(f"invalid events: {events!r}")
        fd = _fileno(fileobj)
        if fd in self._keys or fd in self._fast:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._epoll.register(fd, self._mask(events))
        self._keys[fd] = key
        return key

    def unregister(self, fileobj):
        fd = self._lookup(fileobj)
        try:
            key = self._keys.pop(fd)
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # the fd was closed since it was registered
            pass
        return key

    def modify(self, fileobj, events, data=None):
        fd = self._lookup(fileobj)
        try:
            key = self._keys[fd]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        if events != key.events:
            if not events or events & ~(_EVENT_READ | _EVENT_WRITE):
                raise ValueError(f"invalid events: {events!r}")
            self._epoll.modify(fd, self._mask(events))
        if events != key.events or data != key.data:
            key = self._keys[fd] = key._replace(events=events, data=data)
        return key

    def get_key(self, fileobj):
        try:
            return self._keys[self._lookup(fileobj)]
        except (KeyError, ValueError):
            raise KeyError(f"{fileobj!r} is not registered") from None

    def get_map(self):
        return _KeyMap(self._keys)

    def close(self) -> None:
        self._keys.clear()
        self._fast.clear()
        self._epoll.close()

    @staticmethod
    def _mask(events: int) -> int:
        m = 0
        if events & _EVENT_READ:
            m |= _EPOLLIN
        if events & _EVENT_WRITE:
            m |= _EPOLLOUT
        return m

    def select(self, timeout=None):
        """asyncio's wait. Runs the data path's handlers for as long as only they have work,
        and returns asyncio's ready keys, or nothing once its ``timeout`` has run out."""
        poll = self._epoll.poll
        fast = self._fast
        keys = self._keys
        clock = self._clock
        if timeout is None:
            deadline = None
            wait = -1.0
        elif timeout <= 0:
            deadline = 0.0
            wait = 0.0
        else:
            wait = timeout
            deadline = clock() + timeout
        while True:
            try:
                events = poll(wait, len(keys) + len(fast) or 1)
            except InterruptedError:
                return []
            ready = []
            more = False
            carried = False
            for fd, ev in events:
                handler = fast.get(fd)
                if handler is not None:
                    carried = True
                    try:
                        if handler():
                            more = True
                    except Exception as exc:  # noqa: BLE001 - the loop outlives any one handler
                        self.handler_errors[type(exc).__name__] += 1
                        more = True
                    continue
                key = keys.get(fd)
                if key is not None:
                    mask = 0
                    if ev & ~_EPOLLIN:
                        mask |= _EVENT_WRITE
                    if ev & ~_EPOLLOUT:
                        mask |= _EVENT_READ
                    ready.append((key, mask & key.events))
            if ready or more:
                return ready
            now = clock()
            if not carried and now >= self.spin_until and (wait != 0.0 or deadline == 0.0):
                return ready  # asyncio's timeout ran out (or it asked not to wait at all)
            # Only the data path had work (or a busy poll goes on): wait again, for what is left
            # of asyncio's timeout, and not at all while busy polling.
            if deadline is not None and now >= deadline:
                return ready
            if now < self.spin_until:
                wait = 0.0
            elif deadline is None:
                wait = -1.0
            else:
                wait = deadline - now


def run_on_data_path(make_daemon: Callable[[DataPathSelector], object]) -> int:
    """Run a daemon (``make_daemon(selector).run()``) on asyncio's selector loop over a
    ``DataPathSelector``, so its data path runs straight from ``select()``: the node daemon's
    and the adapter's ``main``."""
    selector = DataPathSelector()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        return runner.run(make_daemon(selector).run())


async def sample_idle_cpus(target, stop) -> None:
    """Keep ``target.idle_cpus`` current for busy polling: every IDLE_SAMPLE_S while lone
    packets go out (``target.lone_at``, time.time()), every IDLE_SLOW_SAMPLE_S when none did for
    IDLE_FAST_FOR_S (fewer wakeups on an idle machine). Ends when ``stop`` (an asyncio.Event) is set."""
    import asyncio
    meter = IdleCpus()
    while not stop.is_set():
        recent = time.time() - target.lone_at < IDLE_FAST_FOR_S
        await asyncio.sleep(IDLE_SAMPLE_S if recent else IDLE_SLOW_SAMPLE_S)
        idle = meter.sample()
        if idle is not None:
            target.idle_cpus = idle


class IdleCpus:
    """How many CPUs stood idle between two samples of /proc/stat (None before the second)."""

    def __init__(self, path: str = "/proc/stat", cpus: int | None = None) -> None:
        self.path = path
        self.cpus = cpus or os.cpu_count() or 1
        self._last: tuple[int, int] | None = None

    def sample(self) -> float | None:
        try:
            with open(self.path) as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        idle, total = ticks[3] + ticks[4], sum(ticks)  # idle + iowait, of user..steal
        last, self._last = self._last, (idle, total)
        if last is None or total <= last[1]:
            return None
        return (idle - last[0]) / (total - last[1]) * self.cpus


class PacketPath:
    """TUN <-> UDP through the device's fast path, with the slow path handed to the daemon.

    ``slow_datagram(data, addr, now)`` and ``slow_packet(packet, now)`` take what the fast
    path refuses; ``flush()`` runs once after a batch that used them. Counters:
    ``errors`` (socket and TUN errors by name), ``drops`` and ``batch`` (how many datagrams
    each system call moved, ``cyphonic.udp_batch``: ``gso_sends``, ``gso_segments``,
    ``plain_sends``, ``gso_disabled``, ``gro_reads``, ``gro_pieces``, ``gro_initiation_on_main``).

    Batches (issue 15): the TUN handler adds each sealed datagram to a ``GsoSender`` and
    flushes it when its drain ends, so a burst leaves in runs of up to 64 datagrams per
    ``sendmsg`` and a lone packet in the same wakeup; the UDP handler reads with UDP GRO and
    carries each piece of a merged read through the fast path on its own (its own
    authentication and replay-window entry), moving it to the front of ``RECV_STAGE``."""

    def __init__(self, add_reader: Callable[[int, Callable[[], bool]], object],
                 remove_reader: Callable[[int], object], *, slow_datagram, slow_packet, flush,
                 errors: Counter | None = None, drops: Counter | None = None,
                 clock: Callable[[], float] = time.time, busy_poll_s: float = 0.0,
                 spin: Callable[[float], None] | None = None, stop_spin: Callable[[], None] | None = None) -> None:
        self.add_reader = add_reader          # DataPathSelector.add_fast_reader, or loop.add_reader
        self.remove_reader = remove_reader
        # busy polling (DataPathSelector.spin / stop_spin); ``idle_cpus`` is fed by the daemon
        self.busy_poll_s = busy_poll_s if spin is not None and stop_spin is not None else 0.0
        self.spin = spin
        self.stop_spin = stop_spin
        self.busy = BusyPoll(self.busy_poll_s)
        self.slow_datagram = slow_datagram
        self.slow_packet = slow_packet
        self.flush = flush
        self.clock = clock
        self.errors: Counter = Counter() if errors is None else errors
        self.drops: Counter = Counter() if drops is None else drops
        self.batch: Counter = Counter()
        self.sender = GsoSender(counters=self.batch, drops=self.drops, errors=self.errors)
        self.socks: dict[int, socket.socket] = {}
        self.device = None
        self.tun_fd = -1
        self.vnet_hdr = False
        self.coalescer: Coalescer | None = None
        self._fds: list[int] = []

    # the busy-poll policy's state, read by the status and fed by sample_idle_cpus
    idle_cpus = property(lambda self: self.busy.idle_cpus, lambda self, v: setattr(self.busy, "idle_cpus", v))
    sent_at = property(lambda self: self.busy.sent_at, lambda self, v: setattr(self.busy, "sent_at", v))
    lone_at = property(lambda self: self.busy.lone_at)
    quick = property(lambda self: self.busy.quick)
    busy_polls = property(lambda self: self.busy.busy_polls)

    def attach(self, socks: dict[int, socket.socket], device=None, tun_fd: int = -1, *,
               intake: dict[int, socket.socket] | None = None, vnet_hdr: bool = False) -> None:
        """(Re)install the handlers: the sockets alone (all to the slow path) until a device
        and a TUN exist. ``intake``: the sockets the kernel steers initiations to
        (``cyphonic.udp.steered_udp_sockets``), read ``INTAKE_BATCH`` at a time. ``vnet_hdr``:
        the TUN reads and writes virtio_net_hdr first (``Tun.vnet_hdr``: offload "merge" or "full")."""
        self.detach()
        self.socks = dict(socks)
        self.device = device
        self.tun_fd = tun_fd
        self.vnet_hdr = vnet_hdr
        self.coalescer = Coalescer(counters=self.batch) if vnet_hdr else None
        fast = device is not None and tun_fd >= 0
        for s in self.socks.values():
            if fast and not enable_gro(s):
                self.batch["gro_unavailable"] += 1
            self._install(s.fileno(), self._udp_handler(s, fast))
        for s in (intake or {}).values():
            self._install(s.fileno(), self._slow_udp_handler(s, INTAKE_BATCH))
        if fast:
            self._install(tun_fd, self._tun_handler())

    def _install(self, fd: int, handler: Callable[[], bool]) -> None:
        self.add_reader(fd, handler)
        self._fds.append(fd)

    def detach(self) -> None:
        """Remove the handlers (before the descriptors are closed)."""
        for fd in self._fds:
            self.remove_reader(fd)
        self._fds.clear()
        self.device = None
        self.tun_fd = -1

    def _udp_handler(self, sock: socket.socket, fast: bool) -> Callable[[], bool]:
        return self._fast_udp_handler(sock) if fast else self._slow_udp_handler(sock)

    def _slow_udp_handler(self, sock: socket.socket, batch: int = READ_BATCH) -> Callable[[], bool]:
        """Every datagram to the slow path: a socket before the device and the TUN exist, and
        an intake socket always (a small ``batch``: under a flood the data path is looked at
        again after a few initiations)."""
        recvmsg = sock.recvmsg
        clock = self.clock
        slow_datagram = self.slow_datagram
        errors = self.errors

        def on_udp() -> bool:
            now = clock()
            n = 0
            for _ in range(batch):
                try:
                    data, ancdata, _flags, addr = recvmsg(RECV_BYTES, GRO_ANCILLARY_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ICMP errors surface here; never fatal
                    errors[type(exc).__name__] += 1
                    continue
                # (GRO is on only with the fast handler, but a merged read may still be queued)
                for piece in split(data, gro_segment(ancdata, len(data))) if ancdata else (data,):
                    slow_datagram(piece, addr[:2], now)
                n += 1
            if n:
                self.flush()
            return n > 0

        return on_udp

    def _fast_udp_handler(self, sock: socket.socket) -> Callable[[], bool]:
        recvmsg_into = sock.recvmsg_into
        clock = self.clock
        slow_datagram = self.slow_datagram
        flush = self.flush
        errors = self.errors
        drops = self.drops
        counts = self.batch
        into = [RECV_STAGE]
        read = read_merged
        pieces = receive_pieces
        write = os.write
        writev = os.writev
        tun_fd = self.tun_fd
        fast_receive = self.device.fast_receive_staged
        busy = self.busy_poll_s
        delivered = self.busy.delivered
        stop_spin = self.stop_spin
        stage = RECV_STAGE
        stage_bytes = RECV_BUFFER
        opened = OPENED
        batch = range(READ_BATCH)
        coalescer = self.coalescer
        push = coalescer.push if coalescer is not None else None
        zero = ZERO_HDR
        last = 0.0
        now = 0.0

        def write_out(packets) -> None:
            for w in packets:
                try:
                    write(tun_fd, w)
                except OSError as exc:
                    errors["tun_write_" + type(exc).__name__] += 1

        def deliver(plen: int) -> None:    # no offloads: one write per packet
            if busy and delivered(now):
                stop_spin()  # the CPU is for whoever reads the TUN now
            try:
                write(tun_fd, opened[:plen])
            except OSError as exc:
                errors["tun_write_" + type(exc).__name__] += 1

        def deliver_lone(plen: int) -> None:   # offloads, a lone datagram: at once, zero header
            if busy and delivered(now):
                stop_spin()
            try:
                writev(tun_fd, (zero, opened[:plen]))
            except OSError as exc:
                errors["tun_write_" + type(exc).__name__] += 1

        def deliver_merged(plen: int) -> None:   # offloads, a burst: runs of one flow merge
            if busy and delivered(now):
                stop_spin()
            if opened[9] != PROTO_TCP or opened[0] != 0x45:   # (only IPv4 TCP merges: the rest at once)
                if coalescer.pending:
                    write_out(coalescer.flush())   # (what came before goes first)
                counts["plain_writes"] += 1
                try:
                    writev(tun_fd, (zero, opened[:plen]))
                except OSError as exc:
                    errors["tun_write_" + type(exc).__name__] += 1
                return
            for w in push(opened[:plen]):
                try:
                    write(tun_fd, w)
                except OSError as exc:
                    errors["tun_write_" + type(exc).__name__] += 1

        def refused(size: int, addr, at: float) -> None:
            if push is not None and coalescer.pending:
                write_out(coalescer.flush())   # (what came before goes first)
            slow_datagram(stage_bytes[0:size], addr, at)

        def on_udp() -> bool:
            nonlocal last, now
            now = clock()
            drain = in_burst(now, last)
            last = now
            slow = False
            try:
                for _ in batch:
                    try:
                        got = read(recvmsg_into, into, counts, drops)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:  # ICMP errors surface here; never fatal
                        errors[type(exc).__name__] += 1
                        continue
                    if got is None:
                        continue
                    n, seg, addr = got
                    if push is None:
                        out = deliver
                    elif drain or seg < n:
                        out = deliver_merged
                    else:
                        out = deliver_lone
                    if pieces(n, seg, addr, now, stage, fast_receive, out, refused, counts):
                        slow = True
                    if not drain:
                        break
            finally:
                if push is not None and coalescer.pending:
                    write_out(coalescer.flush())   # the drain ended: nothing is held past it
            if slow:
                flush()
            return slow

        return on_udp

    def _tun_handler(self) -> Callable[[], bool]:
        readv = os.readv
        tun_fd = self.tun_fd
        clock = self.clock
        fast_send = self.device.fast_send_staged
        slow_packet = self.slow_packet
        flush = self.flush
        errors = self.errors
        drops = self.drops
        counts = self.batch
        s4 = self.socks.get(socket.AF_INET)
        s6 = self.socks.get(socket.AF_INET6)
        add = self.sender.add
        send_now = self.sender.send_now
        send_run = self.sender.flush
        stage = SEAL_STAGE
        staged = SEAL_BUFFER
        first = HEADER_BYTES
        most = len(stage)
        sealed = SEALED
        busy = self.busy_poll_s
        lone_sent = self.busy.lone_sent
        spin = self.spin
        vnet = self.vnet_hdr
        # with offloads: [vnet header, the stage, the rest of a super-packet]; a super-packet is
        # made whole in ``whole`` (its first ``most`` bytes copied over from the stage)
        head = bytearray(VNET_HDR_BYTES)
        whole = bytearray(most + 65536)
        into = [head, stage, memoryview(whole)[most:]] if vnet else [stage]
        skip = VNET_HDR_BYTES if vnet else 0
        parse = VirtioNetHdr.parse
        finish = finish_checksum_at
        last = 0.0
        now = 0.0
        slow = False

        def send(size: int, drain: bool) -> None:
            """The packet staged in ``stage[:size]``: sealed and added to the run, or to the slow path."""
            nonlocal slow
            out = fast_send(size, now) if stage[0] >> 4 == 4 else None
            if out is None:
                slow_packet(staged[first:first + size], now)
                slow = True
            elif out:
                length, ep = out
                if drain:
                    add(s6 if ":" in ep[0] else s4, ep, sealed[:length])   # (copied: the stage is free)
                else:   # after a pause: one packet and back to sleep, so no run to wait for
                    send_now(s6 if ":" in ep[0] else s4, ep, sealed[:length])
                    if busy:
                        # a lone packet of our own: wait for its answer awake, if the policy says so
                        spin_s = lone_sent(now)
                        if spin_s:
                            spin(spin_s)

        def on_tun() -> bool:
            nonlocal last, now, slow
            now = clock()
            drain = in_burst(now, last)
            last = now
            slow = False
            budget = READ_BATCH   # packets (a super-packet's pieces each count), so the other side gets its turn
            try:
                while budget > 0:
                    budget -= 1
                    try:
                        size = readv(tun_fd, into) - skip
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        errors["tun_" + type(exc).__name__] += 1
                        break
                    if size <= 0:
                        drops["tun_short"] += 1
                    elif vnet and head[1]:   # a super-packet: cut, each piece on its own
                        hdr = parse(head)
                        if size > most:
                            whole[:most] = stage
                            packet = memoryview(whole)[:size]
                        else:
                            packet = stage[:size]
                        parts = split_gso(packet, hdr, drops)
                        del packet
                        counts["super_reads"] += 1
                        counts["super_read_pieces"] += len(parts)
                        for part in parts:
                            n = len(part)
                            if n > most:
                                drops["tun_oversize"] += 1
                                continue
                            stage[:n] = part
                            send(n, True)
                        budget -= len(parts) - 1
                    elif size > most:  # larger than any sealed packet can be (a TUN MTU near 64 KiB)
                        drops["tun_oversize"] += 1
                    else:
                        if vnet and head[0] & F_NEEDS_CSUM and not finish(stage, size, head[6] | head[7] << 8,
                                                                          head[8] | head[9] << 8, drops):
                            continue   # (counted)
                        send(size, drain)
                    if not drain:
                        break
            finally:
                send_run()   # the drain ended: what was sealed leaves now, in this wakeup
            if slow:
                flush()
            return slow

        return on_tun
