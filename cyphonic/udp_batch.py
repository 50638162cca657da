"""Many tunnel datagrams per system call: UDP GSO on send, UDP GRO on receive (issue 15).

The kernel features (Linux 4.18 / 5.0, every Pi kernel has both) and how wireguard-go uses
them (``conn/gso_linux.go``, ``conn/bind_std.go``):

- **GSO** (``UDP_SEGMENT``): one ``sendmsg`` of a buffer of equal-size segments (the last may
  be shorter) to one destination; the kernel cuts it into datagrams. Every segment is a whole
  sealed datagram, so nothing changes on the wire: a peer without GRO (an old node, a NAT box)
  receives ordinary datagrams. ``GsoSender`` groups consecutive datagrams by (socket,
  destination, size) into runs of at most ``GSO_MAX_SEGMENTS`` segments and
  ``MAX_DATAGRAM_BYTES`` bytes, and sends each run with one call.
- **GRO** (``UDP_GRO``): a read may return several datagrams of one 4-tuple merged, with
  their size in a control message; ``gro_segment`` gives it, and the reader handles each
  piece as one datagram (its own AEAD check and replay-window entry, ``Device.fast_receive_staged``).

A batch never waits for a timer: the data path adds datagrams while it drains a descriptor
and calls ``flush()`` when the drain ends (EAGAIN, or its batch bound), so a lone packet (a
ping) leaves in the same wakeup it arrived in. Sealing is untouched: each datagram of a run
was sealed by ``SendStream.seal_staged`` with the next counter of its stream before it was
added; a run only moves bytes.

Fallbacks, each counted: a GSO send that the kernel refuses with EIO, EINVAL or ENOPROTOOPT
(no checksum offload on the device, an old kernel, a segment larger than the path MTU) turns
GSO off for that socket and sends the same bytes one datagram at a time (``gso_disabled``);
a peer that got part of them drops the copy by its replay window, and no plaintext is ever
sealed again under an old nonce. ``enable_gro`` returns False where the kernel has no UDP_GRO
(the reader then sees one datagram per read, as before).

Never: reorder datagrams, send a run to more than one destination, hold a datagram past
``flush()``, or let a socket error escape (counted in ``drops`` / ``errors``: a send failure
is a counted drop of the run).
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
import weakref
from collections import Counter

from . import constants as C
from .udp import INITIATION_TYPES

# <linux/udp.h>: not in Python 3.11's socket module
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GRO_ANCILLARY_BYTES = socket.CMSG_SPACE(4)     # the UDP_GRO control message carries an int
GSO_UNSUPPORTED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT})
_MSG_TRUNC = int(socket.MSG_TRUNC)   # a plain int: an IntFlag operand runs enum.py's Python per read
_pack_u16 = struct.Struct("=H").pack
_BYTEORDER = sys.byteorder


def enable_gro(sock: socket.socket, on: bool = True) -> bool:
    """Ask for merged reads on ``sock`` (``on`` False: ask for one datagram per read again).
    False where the kernel refuses it."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1 if on else 0)
    except OSError:
        return False
    return on


def gro_segment(ancdata, nbytes: int) -> int:
    """The size of each datagram in a read of ``nbytes`` (the last may be shorter), from the
    control messages of ``recvmsg``/``recvmsg_into``: ``nbytes`` for a read of one datagram."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            seg = int.from_bytes(data[:4] if len(data) >= 4 else data, _BYTEORDER)
            if 0 < seg < nbytes:
                return seg
    return nbytes


def read_merged(recvmsg_into, into: list, counts: Counter, drops: Counter):
    """One read of a UDP socket with GRO on (``recvmsg_into`` of the socket, ``into`` its
    buffer list): (bytes read, the size of each datagram in them, the sender's (host, port)),
    counting ``gro_reads`` and ``gro_pieces`` for a merged read; None for a truncated read
    (``drops["udp_truncated"]``). Raises what ``recvmsg_into`` raises (BlockingIOError...).
    The caller handles each piece of ``seg`` bytes as one datagram (the last may be shorter)."""
    n, ancdata, flags, addr = recvmsg_into(into, GRO_ANCILLARY_BYTES)
    if flags & _MSG_TRUNC:
        drops["udp_truncated"] += 1
        return None
    if len(addr) > 2:
        addr = addr[:2]
    seg = gro_segment(ancdata, n) if ancdata else n
    if seg < n:
        counts["gro_reads"] += 1
        counts["gro_pieces"] += -(-n // seg)
    return n, seg, addr


def receive_pieces(n: int, seg: int, addr, now: float, stage, fast_receive, deliver, refused,
                   counts: Counter) -> bool:
    """Carry each datagram of one read (``n`` bytes in ``stage``, ``seg`` bytes each, the last
    may be shorter) through the fast path on its own, in order: the piece is moved to the front
    of ``stage`` (later pieces lie beyond it, untouched) and ``fast_receive(size, addr, now)``
    (``Device.fast_receive_staged``: its own authentication and replay-window entry) opens it;
    ``deliver(plen)`` takes an opened packet, ``refused(size, addr, now)`` a datagram the fast
    path refused (``fast_receive`` None: all of them), which is still ``stage[:size]``. An
    initiation merged into a run of data packets (past the reuseport steering) is counted
    (``gro_initiation_on_main``) and refused like the others: the slow path handles it.
    True if any piece was refused. The node daemon's and the adapter's way back (one loop, so
    the two cannot drift)."""
    slow = False
    off = 0
    while off < n:
        size = seg if n - off > seg else n - off
        if off:
            stage[0:size] = stage[off:off + size]
        off += seg
        if fast_receive is not None:
            plen = fast_receive(size, addr, now)
            if plen is not None:
                if plen:
                    deliver(plen)
                continue
        if seg < n and stage[0] in INITIATION_TYPES:
            counts["gro_initiation_on_main"] += 1
        refused(size, addr, now)
        slow = True
    return slow


def pieces(nbytes: int, seg: int) -> int:
    """How many datagrams a read of ``nbytes`` with segment size ``seg`` holds."""
    return -(-nbytes // seg) if seg else 0


def split(data: bytes, seg: int) -> list[bytes]:
    """The datagrams of a merged read (a copy each: for the slow path)."""
    return [data[i:i + seg] for i in range(0, len(data), seg)] if seg else []


class GsoSender:
    """Sends sealed datagrams in runs: one ``sendmsg`` with ``UDP_SEGMENT`` per run.

    ``add(sock, addr, datagram)`` copies the datagram into the run (the caller's buffer is
    free again at once: the next seal may reuse it); a run ends, and is sent, when the next
    datagram goes to another socket or destination, is larger than the run's segments, after
    a shorter one (it must be the last), at ``max_segments``, or when the next segment would
    not fit ``max_bytes``; and at ``flush()``, which the data path calls at the end of every
    drain. Counters (``counters``): ``gso_sends`` and ``gso_segments`` (runs of two or more
    sent in one call, and their datagrams), ``plain_sends`` (datagrams sent alone),
    ``gso_disabled`` (sockets whose GSO the kernel refused). ``drops``: datagrams lost to a
    full send buffer or a send error (``udp_send_buffer_full``, ``udp_send_error``); ``errors``:
    the send errors by name."""

    __slots__ = ("counters", "drops", "errors", "max_segments", "max_bytes", "_arena", "_view",
                 "_sock", "_addr", "_size", "_n", "_off", "_no_gso")

    def __init__(self, *, counters: Counter | None = None, drops: Counter | None = None,
                 errors: Counter | None = None, max_segments: int = C.GSO_MAX_SEGMENTS,
                 max_bytes: int = C.MAX_DATAGRAM_BYTES) -> None:
        if not 1 <= max_segments <= C.GSO_MAX_SEGMENTS:
            raise ValueError(f"max_segments must be 1..{C.GSO_MAX_SEGMENTS}")
        self.counters: Counter = Counter() if counters is None else counters
        self.drops: Counter = Counter() if drops is None else drops
        self.errors: Counter = Counter() if errors is None else errors
        self.max_segments = max_segments
        self.max_bytes = max_bytes
        self._arena = bytearray(max_bytes)
        self._view = memoryview(self._arena)
        self._sock = None
        self._addr = None
        self._size = 0          # the run's segment size (its first datagram's)
        self._n = 0             # datagrams in the run
        self._off = 0           # bytes in the run
        self._no_gso: weakref.WeakSet = weakref.WeakSet()

    @property
    def pending(self) -> int:
        """Datagrams added and not yet sent."""
        return self._n

    def gso_enabled(self, sock) -> bool:
        return sock not in self._no_gso

    def add(self, sock, addr, datagram) -> None:
        size = len(datagram)
        if sock is None:                          # no socket of the destination's family
            self.errors["no_socket_for_family"] += 1
            self.drops["udp_send_error"] += 1
            return
        if not 0 < size <= self.max_bytes:
            self.drops["udp_send_oversize"] += 1
            return
        n = self._n
        if n and (size > self._size or sock is not self._sock or addr != self._addr):
            self._send_run()
            n = 0
        if not n:
            self._sock, self._addr, self._size = sock, addr, size
        off = self._off
        end = off + size
        self._view[off:end] = datagram
        self._off = end
        self._n = n = n + 1
        if size < self._size or n >= self.max_segments or end + self._size > self.max_bytes:
            self._send_run()   # (a shorter datagram is the run's last)

    def flush(self) -> None:
        """Send what was added (the end of a drain: never wait for more)."""
        n = self._n
        if n == 1:   # a lone datagram (a ping): the shortest way out
            sock, addr, end = self._sock, self._addr, self._off
            self._n = self._off = 0
            self._sock = self._addr = None
            self.send_now(sock, addr, self._view[:end])
        elif n:
            self._send_run()

    def send_now(self, sock, addr, datagram) -> None:
        """Send one datagram at once, counted as ``add`` + ``flush`` would (for a caller that
        knows it has a lone packet; nothing may be pending then, or the order would change)."""
        try:
            sock.sendto(datagram, addr)
        except BlockingIOError:
            self.drops["udp_send_buffer_full"] += 1
        except (OSError, TypeError) as exc:
            self._failed(exc, 1)
        except AttributeError:                    # None: no socket of the destination's family
            self.errors["no_socket_for_family"] += 1
            self.drops["udp_send_error"] += 1
        else:
            self.counters["plain_sends"] += 1

    def _send_run(self) -> None:
        n, size, sock, addr = self._n, self._size, self._sock, self._addr
        run = self._view[:self._off]
        self._n = self._off = 0
        self._sock = self._addr = None
        counters = self.counters
        if n > 1 and sock not in self._no_gso:
            try:
                sock.sendmsg([run], [(SOL_UDP, UDP_SEGMENT, _pack_u16(size))], 0, addr)
            except BlockingIOError:
                self.drops["udp_send_buffer_full"] += n
                return
            except OSError as exc:
                if exc.errno not in GSO_UNSUPPORTED:
                    self._failed(exc, n)
                    return
                self._no_gso.add(sock)            # the kernel or the device cannot: never again here
                counters["gso_disabled"] += 1
            except TypeError as exc:             # an address of the other family
                self._failed(exc, n)
                return
            else:
                counters["gso_sends"] += 1
                counters["gso_segments"] += n
                return
        # one datagram at a time: a run of one, a socket without GSO, or the fallback (same bytes)
        sendto = sock.sendto
        total = len(run)
        for off in range(0, total, size):
            try:
                sendto(run[off:off + size], addr)
            except BlockingIOError:
                self.drops["udp_send_buffer_full"] += 1
            except (OSError, TypeError) as exc:
                self._failed(exc, 1)
            else:
                counters["plain_sends"] += 1

    def _failed(self, exc: BaseException, n: int) -> None:
        self.errors[type(exc).__name__] += 1
        self.drops["udp_send_error"] += n
