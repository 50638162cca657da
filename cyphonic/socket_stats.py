"""What the kernel dropped on our sockets, read when a status is asked for (an edge: no
sans-IO core here, no cost per packet).

- A socket's own drop counter: ``getsockopt(SOL_SOCKET, SO_MEMINFO)`` answers the kernel's
  ``u32 sk_meminfo[SK_MEMINFO_VARS]`` (``include/uapi/linux/sock_diag.h``, Linux 4.6 and
  later); index ``SK_MEMINFO_DROPS`` is ``sk_drops``: datagrams that reached the socket and
  were dropped there, above all receive-buffer overflows (what ``SO_RXQ_OVFL`` would report
  per datagram, and the ``drops`` column of ``/proc/net/udp``). Also read: the bytes queued
  for reading and the receive buffer's size. Works for UDP, raw and packet sockets alike, and
  for asyncio's ``TransportSocket`` wrappers.
- An NFQUEUE's drops (the adapter's workers): ``/proc/net/netfilter/nfnetlink_queue`` of the
  current network namespace, one line per bound queue: ``queue_dropped`` (the queue was full)
  and ``user_dropped`` (the netlink socket toward the worker overflowed).

When a counter cannot be read (an old kernel, a closed socket, no such file) the row says
``"kernel_drops": "unavailable"`` and why, never 0: a 0 would claim that nothing was dropped.
Never: raise to the caller (a status must answer), or read on the packet path.
"""

from __future__ import annotations

import socket
import struct
from typing import Iterable

SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)   # asm-generic (x86, arm, arm64) value
SK_MEMINFO_VARS = 9                               # the kernel answers this many u32 ...
SK_MEMINFO_RMEM_ALLOC = 0                         # bytes queued for reading
SK_MEMINFO_RCVBUF = 1                             # the receive buffer's size (SO_RCVBUF, doubled)
SK_MEMINFO_DROPS = 8                              # ... and this one is sk_drops
_MEMINFO = struct.Struct(f"={SK_MEMINFO_VARS}I")

NFQUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"
UNAVAILABLE = "unavailable"


def local_name(sock) -> str:
    """Where the socket listens, as a status shows it: ``host:port``, ``[v6]:port``, an
    interface's name (a packet socket), ``-`` if unknown."""
    try:
        name = sock.getsockname()
        family = sock.family
    except (OSError, ValueError, AttributeError):
        return "-"
    if family == socket.AF_INET:
        return f"{name[0]}:{name[1]}"
    if family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    if family == getattr(socket, "AF_PACKET", -1):
        return str(name[0])           # (ifname, protocol, packet type, hardware type, address)
    return str(name) or "-"


def socket_row(name: str, sock) -> dict:
    """One socket's kernel counters: ``{"socket", "local", "kernel_drops", "rx_queued_bytes",
    "rcvbuf_bytes"}``, or ``"kernel_drops": "unavailable"`` with the ``reason``."""
    row: dict = {"socket": name, "local": local_name(sock)}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except (OSError, ValueError, AttributeError) as exc:
        return {**row, "kernel_drops": UNAVAILABLE, "reason": f"SO_MEMINFO: {exc}"}
    if len(raw) < _MEMINFO.size:
        return {**row, "kernel_drops": UNAVAILABLE,
                "reason": f"SO_MEMINFO answered {len(raw)} bytes (a kernel without sk_drops)"}
    info = _MEMINFO.unpack_from(raw)
    return {**row, "kernel_drops": info[SK_MEMINFO_DROPS], "rx_queued_bytes": info[SK_MEMINFO_RMEM_ALLOC],
            "rcvbuf_bytes": info[SK_MEMINFO_RCVBUF]}


def socket_rows(named: Iterable[tuple[str, object]]) -> list[dict]:
    """``socket_row`` of each ``(name, socket)``; ``None`` sockets are left out."""
    return [socket_row(name, sock) for name, sock in named if sock is not None]


def kernel_drops(sock) -> int | None:
    """The socket's ``sk_drops``, or None when it cannot be read."""
    n = socket_row("", sock)["kernel_drops"]
    return n if isinstance(n, int) else None


def nfqueue_rows(queues: Iterable[int], path: str = NFQUEUE_PROC) -> list[dict]:
    """One row per queue number in ``queues``, in the shape of ``socket_row``: ``kernel_drops``
    is ``queue_dropped + user_dropped``; a queue that no process holds now is unavailable."""
    wanted = list(queues)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        why = f"{path}: {exc.strerror or exc}"
        return [{"socket": f"nfqueue {q}", "local": f"queue {q}", "kernel_drops": UNAVAILABLE, "reason": why}
                for q in wanted]
    seen: dict[int, list[int]] = {}
    for line in text.splitlines():
        # queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
        fields = line.split()
        try:
            values = [int(x) for x in fields[:8]]
        except ValueError:
            continue
        if len(values) == 8:
            seen[values[0]] = values
    rows = []
    for q in wanted:
        v = seen.get(q)
        if v is None:
            rows.append({"socket": f"nfqueue {q}", "local": f"queue {q}", "kernel_drops": UNAVAILABLE,
                         "reason": "no process holds this queue"})
        else:
            rows.append({"socket": f"nfqueue {q}", "local": f"queue {q}", "kernel_drops": v[5] + v[6],
                         "queue_dropped": v[5], "user_dropped": v[6], "queued": v[2]})
    return rows


def total_kernel_drops(rows: Iterable[dict]) -> int:
    """The sum over the rows that could be read (an unavailable one adds nothing)."""
    return sum(r["kernel_drops"] for r in rows if isinstance(r.get("kernel_drops"), int))


def kernel_drop_counts(rows: Iterable[dict]) -> dict[str, int]:
    """``{socket name: drops}`` of the rows that could be read (what ``health.LoadWatch`` compares)."""
    return {f"{r['socket']} {r['local']}": r["kernel_drops"] for r in rows if isinstance(r.get("kernel_drops"), int)}
