"""General Node Management: the unknown devices that asked for a lease, kept for the operator.

A device behind the adapter whose MAC is not enrolled gets no DHCP answer at all
(``appliance.address_config``). So that the operator sees it, and can enroll it with
``cyadm gn add``, the controller records each such request here: the last few distinct MACs,
each with when it was first and last seen and how often it asked, and the total of such
requests. ``cyadm status`` shows them (``dhcp.unknown_macs`` in ``--json``); they are kept in
``<state_dir>/unknown_macs.json`` across restarts. A MAC that is enrolled leaves the list (the
total keeps its requests).

Bounded whatever the LAN sends: at most ``UNKNOWN_MACS_KEPT`` MACs (the least recently seen is
forgotten first), and the file is written at most every ``UNKNOWN_MACS_WRITE_EVERY_S``, by
``flush(now)`` from the controller's periodic work and at its stop, never per packet: a flood of
DISCOVERs from random MACs costs a few hundred bytes of memory and one small write every few
seconds. A ``kill -9`` loses at most that interval's sightings.

The file goes through ``cyphonic.atomic_file``. One that cannot be read or parsed, or is too
large, is reported (a log line, and ``warning`` in the status) and ignored: the record starts
empty and the next write replaces it. It is a diagnostic, never a reason not to start.

Time (``now``) is wall-clock seconds, passed in by the caller. Never: raise on a bad file or a
failed write, write on ``seen``, grow with the input.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from cyphonic.atomic_file import remove_stale_temps, write_json_atomic

from .constants import UNKNOWN_MACS_FILE_MAX_BYTES, UNKNOWN_MACS_KEPT, UNKNOWN_MACS_WRITE_EVERY_S

FORMAT = "cyphonic-unknown-macs"
VERSION = 1
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass
class Sighting:
    first_seen: float
    last_seen: float
    count: int


class UnknownMacs:
    """The record, kept in ``path``. ``load()`` once at start; ``seen`` per request;
    ``flush(now)`` often (it writes only when something changed and the interval has passed)."""

    def __init__(self, path: str | os.PathLike, *, log: Callable[[str], None],
                 keep: int = UNKNOWN_MACS_KEPT, write_every_s: float = UNKNOWN_MACS_WRITE_EVERY_S,
                 write: Callable = write_json_atomic) -> None:
        self.path = os.fspath(path)
        self.log = log
        self.keep = keep
        self.write_every_s = write_every_s
        self.write = write
        self.macs: OrderedDict[str, Sighting] = OrderedDict()   # least recently seen first
        self.total = 0               # requests from unknown MACs, ever (also from those forgotten)
        self.warning = ""            # the file could not be read, or written
        self.writes = 0
        self.dirty = False
        self.next_write = 0.0

    # --- the record ----------------------------------------------------------------------------

    def seen(self, mac: str, now: float) -> None:
        """A request from ``mac`` (lower case, colon separated), which is not enrolled."""
        self.total += 1
        s = self.macs.get(mac)
        if s is None:
            self.macs[mac] = Sighting(now, now, 1)
            while len(self.macs) > self.keep:
                self.macs.popitem(last=False)
        else:
            s.last_seen = max(s.last_seen, now)
            s.count += 1
            self.macs.move_to_end(mac)
        self.dirty = True

    def forget(self, mac: str) -> None:
        """``mac`` is enrolled now: it is no longer unknown."""
        if self.macs.pop(mac, None) is not None:
            self.dirty = True

    def status(self) -> dict:
        """For ``cyadm status``: the MACs most recently seen first."""
        rows = [{"mac": mac, "first_seen": round(s.first_seen, 1), "last_seen": round(s.last_seen, 1),
                 "count": s.count} for mac, s in reversed(self.macs.items())]
        out = {"total": self.total, "last_seen": rows[0]["last_seen"] if rows else None, "macs": rows}
        if self.warning:
            out["warning"] = self.warning
        return out

    # --- the file ------------------------------------------------------------------------------

    def flush(self, now: float, *, force: bool = False) -> bool:
        """Write the record if it changed and the last write is ``write_every_s`` old (``force``:
        whatever the time, at stop). True if written; a failed write is logged once, shown as
        ``warning`` and tried again after the interval."""
        if not self.dirty or (now < self.next_write and not force):
            return False
        self.next_write = now + self.write_every_s
        doc = {"format": FORMAT, "version": VERSION, "total": self.total,
               "macs": [{"mac": mac, "first_seen": s.first_seen, "last_seen": s.last_seen, "count": s.count}
                        for mac, s in self.macs.items()]}
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            self.write(self.path, doc, indent=None)
        except OSError as exc:
            warning = f"cannot write {self.path}: {exc.strerror or exc}"
            if warning != self.warning:
                self.log(warning)
            self.warning = warning
            return False
        self.writes += 1
        self.dirty = False
        if self.warning.startswith("cannot write"):
            self.warning = ""
        return True

    def load(self) -> None:
        """The record as the last run left it; a file that is missing starts it empty, one that
        is unreadable or corrupt too, reported."""
        try:
            remove_stale_temps(self.path, any_owner=True)     # the only writer: leftovers of a crash
        except OSError:
            pass
        try:
            with open(self.path, "rb") as f:
                raw = f.read(UNKNOWN_MACS_FILE_MAX_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._ignore(f"unreadable ({exc.strerror or exc})")
            return
        try:
            total, macs = _parse(raw, self.keep)
        except ValueError as exc:
            self._ignore(f"corrupt ({exc})")
            return
        self.total, self.macs = total, macs

    def _ignore(self, why: str) -> None:
        self.warning = f"{self.path} {why}; ignored, the list of unknown MACs starts empty"
        self.log(self.warning)


def _parse(raw: bytes, keep: int) -> tuple[int, OrderedDict[str, Sighting]]:
    """A file's record, checked; ValueError for anything amiss."""
    if len(raw) > UNKNOWN_MACS_FILE_MAX_BYTES:
        raise ValueError(f"larger than {UNKNOWN_MACS_FILE_MAX_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError("not an unknown-MACs file of this version")
    total, items = doc.get("total"), doc.get("macs")
    if not _count(total, 0) or not isinstance(items, list):
        raise ValueError("bad total or list")
    rows = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("bad entry")
        mac, first, last, count = (item.get(k) for k in ("mac", "first_seen", "last_seen", "count"))
        if not (isinstance(mac, str) and MAC_RE.match(mac) and _time(first) and _time(last)
                and first <= last and _count(count, 1)):
            raise ValueError(f"bad entry {str(item)[:80]}")
        rows.append((mac, Sighting(float(first), float(last), count)))
    rows.sort(key=lambda r: r[1].last_seen)
    macs = OrderedDict(rows[-keep:] if keep else [])
    return max(total, sum(s.count for s in macs.values())), macs


def _time(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _count(x, least: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least
