"""A floor under handshake timestamps across restarts, for a clock that can go back (sans-IO).

Why: a responder refuses an initiation whose timestamp is not newer than the last one it
took from the same key (the replay rule of docs/protocol.md 8.2, the cloud's control
channel and every peer's tunnels). Within one run, timestamps strictly increase
(``after_ns``). Across a restart they come from the wall clock alone, and a Raspberry Pi has
no real-time clock: it can boot with a clock behind the last run's (no NTP yet, NTP blocked,
a clock file from the other slot after an update). Every peer that remembers the last run then
refuses the node's handshakes until the clock passes the old timestamps, possibly for hours.

How (a reservation, as a TCP stack reserves initial sequence numbers): the edge keeps one
number on disk, ``reserved_ns``, and never lets a timestamp reach it before a larger one is
written. At start it reads the stored value (the floor: every timestamp of the last run was
below it), writes ``max(floor, now) + RESERVE_S`` *before* the engine starts, and hands the
floor to the engine, whose timestamps are then ``max(now, floor, last) + 1 ns`` at least. While
running it writes a new reservation whenever the clock comes within ``RESERVE_S / 2`` of it
(``due``): one small write per ``RESERVE_S / 2`` (5 minutes) of the clock at most. A run whose clock stays behind the floor sends timestamps just above the floor (they
still increase, one nanosecond at a time), and the next restart moves the floor up by
``RESERVE_S``: the floor stays within ``RESERVE_S`` per restart of the timestamps sent.

If the file cannot be written, the engine runs as before this module (counted and logged by the
edge): nothing is refused here, a failed write only loses the protection for the next restart.

The value on disk: ASCII decimal nanoseconds since the epoch, one line.
"""

from __future__ import annotations

RESERVE_S = 600.0          # how far ahead of the clock timestamps are reserved on disk
_NS = 1_000_000_000
MAX_FLOOR_NS = (1 << 63) - 1


def parse(data: bytes) -> int | None:
    """The stored reservation, or None for anything that is not one decimal number in range."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if value <= MAX_FLOOR_NS else None


def encode(reserved_ns: int) -> bytes:
    return b"%d\n" % reserved_ns


class TimestampReservation:
    """``floor_ns``: every timestamp of this run must be above it (the last run's reservation,
    0 when there was none). ``reserved_ns``: what is (to be) on disk; ``start_value()`` is written
    before the engine starts, ``due(now)`` answers a new value to write, or None."""

    def __init__(self, stored_ns: int | None, now: float, reserve_s: float = RESERVE_S) -> None:
        self.reserve_ns = int(reserve_s * _NS)
        self.floor_ns = stored_ns or 0
        self.reserved_ns = min(max(self.floor_ns, int(now * _NS)) + self.reserve_ns, MAX_FLOOR_NS)

    def start_value(self) -> bytes:
        return encode(self.reserved_ns)

    def due(self, now: float) -> bytes | None:
        """A new reservation to write when the clock is within half of ``RESERVE_S`` of the
        current one; None otherwise."""
        now_ns = int(now * _NS)
        if now_ns + self.reserve_ns // 2 <= self.reserved_ns:
            return None
        self.reserved_ns = min(now_ns + self.reserve_ns, MAX_FLOOR_NS)
        return encode(self.reserved_ns)
