"""The DHCP lease table of the adapter's Address configuration (RFC 2131 section 4.3), on disk.

What it keeps: one lease per MAC (`mac -> vip, state, expires`) and the addresses a client
DECLINEd (held back until a deadline). Lease states change only through `TRANSITIONS`, a table
(`(state, event) -> new state`), like pyroute2's `dhcp/fsm.py`; `None` is "no lease".

Invariant (the reason this module exists): no two MACs ever hold one address, also across a
`kill -9` at any moment. It holds because
  * `offer()` and `bind()` refuse (`AddressUnavailable`) an address that another MAC holds
    (OFFERED or BOUND and not expired), e.g. after General Node Management moved a VIP to
    another MAC: the new MAC gets nothing (NAK) until the old lease is released or expires;
  * every change is written to disk *before* the caller answers the client (the server sends
    its ACK only after `bind()` returned), atomically (`cyphonic/atomic_file.py`): a temporary
    file in the same directory, fsync, `os.replace`, fsync of the directory. After a crash the file is the old table or the
    new one, never half of each, so an ACK that went out is always on disk;
  * a change is applied to a copy, saved, and only then becomes the table in memory, so a
    failed write (disk full) leaves memory equal to disk and the caller sends nothing.

Time (`now`, `expires`) is wall-clock seconds since the epoch, passed in by the caller: leases
outlive the process and the machine's uptime.

A lease file that cannot be read or parsed, or that breaks the invariant, gives an empty table
and ONE warning (kept in `warnings` for the health report), and is moved aside to
`<path>.corrupt` for inspection. It never crashes the appliance.

Never: write the file in place, answer for the caller, or raise on a bad file.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

from cyphonic.atomic_file import remove_stale_temps, write_atomic

from .constants import EXPIRED_KEEP_S, MAX_RECORDS

FORMAT = "cyphonic-dhcp-leases"
VERSION = 1

_log = logging.getLogger(__name__)


class State(enum.Enum):
    OFFERED = "offered"        # an OFFER went out; the address is held for the client briefly
    BOUND = "bound"            # an ACK went out
    RELEASED = "released"      # the client gave the address back (kept for the record only)


class Event(enum.Enum):
    OFFER = "offer"            # we answer a DISCOVER
    ACK = "ack"                # we answer a REQUEST with ACK
    RELEASE = "release"        # the client sent RELEASE
    WITHDRAW = "withdraw"      # the client chose another server (REQUEST with its server id)
    DECLINE = "decline"        # the client found the address in use on the LAN


# (effective state, event) -> new state. An expired OFFERED/BOUND lease counts as None.
# A pair that is missing means "not allowed in this state": the store raises InvalidTransition.
TRANSITIONS: dict[tuple[State | None, Event], State | None] = {
    (None, Event.OFFER): State.OFFERED,
    (State.OFFERED, Event.OFFER): State.OFFERED,
    (State.BOUND, Event.OFFER): State.BOUND,          # a bound client restarting DORA keeps its lease
    (State.RELEASED, Event.OFFER): State.OFFERED,
    (None, Event.ACK): State.BOUND,                   # INIT-REBOOT / REQUEST after our restart
    (State.OFFERED, Event.ACK): State.BOUND,
    (State.BOUND, Event.ACK): State.BOUND,            # renew, rebind
    (State.RELEASED, Event.ACK): State.BOUND,
    (State.OFFERED, Event.RELEASE): State.RELEASED,
    (State.BOUND, Event.RELEASE): State.RELEASED,
    (State.OFFERED, Event.WITHDRAW): None,
    (State.BOUND, Event.WITHDRAW): State.BOUND,       # its lease with us still runs until expiry
    (None, Event.DECLINE): None,
    (State.OFFERED, Event.DECLINE): None,
    (State.BOUND, Event.DECLINE): None,
    (State.RELEASED, Event.DECLINE): None,
}

HOLDING = (State.OFFERED, State.BOUND)


class AddressUnavailable(Exception):
    """The address cannot go to this MAC: `reason` is "in_use" (another MAC `holder` holds it)
    or "declined" (a client declined it; held back until `until`)."""

    def __init__(self, vip: str, reason: str, holder: str | None = None, until: float | None = None):
        super().__init__(f"{vip}: {reason}" + (f" by {holder}" if holder else ""))
        self.vip, self.reason, self.holder, self.until = vip, reason, holder, until


class InvalidTransition(Exception):
    """The event is not allowed in the lease's current state (e.g. RELEASE without a lease)."""


@dataclass(frozen=True)
class Lease:
    mac: str
    vip: str
    state: State
    expires: float

    def active(self, now: float) -> bool:
        """Does this lease hold its address at `now`?"""
        return self.state in HOLDING and self.expires > now


@dataclass(frozen=True)
class Declined:
    vip: str
    until: float
    by: str                    # the MAC that declined it


class _Corrupt(ValueError):
    pass


class LeaseStore:
    """The lease table, persisted to `path` (JSON) atomically on every change."""

    def __init__(self, path: str | os.PathLike, *, log: Callable[[str], None] | None = None):
        self.path = os.fspath(path)
        self._warn = log or _log.warning
        self.warnings: list[str] = []          # for the health report ("lease file unreadable")
        self.writes = 0
        self._leases: dict[str, Lease] = {}
        self._declined: dict[str, Declined] = {}
        self._load()

    # --- reading --------------------------------------------------------------------------

    def get(self, mac: str) -> Lease | None:
        return self._leases.get(mac)

    def leases(self) -> list[Lease]:
        return sorted(self._leases.values(), key=lambda l: l.mac)

    def holder(self, vip: str, now: float) -> str | None:
        """The MAC holding `vip` at `now` (OFFERED or BOUND, not expired), or None."""
        for lease in self._leases.values():
            if lease.vip == vip and lease.active(now):
                return lease.mac
        return None

    def declined_until(self, vip: str, now: float) -> float | None:
        d = self._declined.get(vip)
        return d.until if d and d.until > now else None

    def state(self, mac: str, now: float) -> State | None:
        """The effective state: an expired OFFERED/BOUND lease is no lease."""
        lease = self._leases.get(mac)
        if lease is None or (lease.state in HOLDING and lease.expires <= now):
            return None
        return lease.state

    # --- changes (each one saved before it returns) ----------------------------------------

    def offer(self, mac: str, vip: str, now: float, hold_s: float) -> Lease:
        """Hold `vip` for `mac` after an OFFER. A lease the MAC already holds for this address
        is kept as it is (no write: a DISCOVER storm does not turn into an fsync storm)."""
        current = self._leases.get(mac)
        if current and current.vip == vip and current.active(now):
            return current
        self._check_free(mac, vip, now)
        new = self._next(mac, Event.OFFER, now)
        return self._commit(mac, Lease(mac, vip, new, now + hold_s), now)

    def bind(self, mac: str, vip: str, now: float, lease_s: float) -> Lease:
        """Bind `vip` to `mac` until `now + lease_s` (ACK, renew, rebind)."""
        self._check_free(mac, vip, now)
        new = self._next(mac, Event.ACK, now)
        return self._commit(mac, Lease(mac, vip, new, now + lease_s), now)

    def release(self, mac: str, vip: str, now: float) -> Lease:
        lease = self._leases.get(mac)
        if lease is None or lease.vip != vip:
            raise InvalidTransition(f"RELEASE of {vip} by {mac}: no such lease")
        new = self._next(mac, Event.RELEASE, now)
        return self._commit(mac, Lease(mac, vip, new, lease.expires), now)

    def withdraw(self, mac: str, now: float) -> Lease | None:
        """The client took another server's offer: drop our pending offer (if any)."""
        lease = self._leases.get(mac)
        if lease is None:
            return None
        if self._next(mac, Event.WITHDRAW, now) is None:      # raises if not allowed
            return self._commit(mac, None, now)
        return lease

    def decline(self, mac: str, vip: str, now: float, hold_s: float) -> Declined:
        """The client found `vip` in use on the LAN: its lease ends and nobody gets `vip` before
        `now + hold_s`."""
        lease = self._leases.get(mac)
        leases = dict(self._leases)
        if lease is not None and lease.vip == vip:
            if self._next(mac, Event.DECLINE, now) is None:    # raises if not allowed
                del leases[mac]
        declined = dict(self._declined)
        declined[vip] = Declined(vip, now + hold_s, mac)
        self._save(leases, declined, now)
        return declined[vip]

    # --- internals ---------------------------------------------------------------------------

    def _next(self, mac: str, event: Event, now: float) -> State | None:
        state = self.state(mac, now)
        try:
            return TRANSITIONS[(state, event)]
        except KeyError:
            raise InvalidTransition(f"{event.value} for {mac} in state {state}") from None

    def _check_free(self, mac: str, vip: str, now: float) -> None:
        holder = self.holder(vip, now)
        if holder is not None and holder != mac:
            raise AddressUnavailable(vip, "in_use", holder=holder)
        until = self.declined_until(vip, now)
        if until is not None:
            raise AddressUnavailable(vip, "declined", until=until)

    def _commit(self, mac: str, lease: Lease | None, now: float) -> Lease | None:
        if lease == self._leases.get(mac):       # nothing changes: no write
            return lease
        leases = dict(self._leases)
        if lease is None:
            leases.pop(mac, None)
        else:
            leases[mac] = lease
            if lease.state in HOLDING:      # other MACs' expired records of this address go
                for other in [m for m, l in leases.items() if m != mac and l.vip == lease.vip]:
                    del leases[other]
        self._save(leases, dict(self._declined), now)
        return lease

    def _save(self, leases: dict[str, Lease], declined: dict[str, Declined], now: float) -> None:
        """Prune, write atomically, and only then adopt the new table (memory == disk)."""
        leases = {m: l for m, l in leases.items()
                  if l.active(now) or l.expires > now - EXPIRED_KEEP_S}
        declined = {v: d for v, d in declined.items() if d.until > now}
        if len(leases) + len(declined) > MAX_RECORDS:   # forget the oldest non-holding leases
            idle = sorted((l for l in leases.values() if not l.active(now)), key=lambda l: l.expires)
            for l in idle[:len(leases) + len(declined) - MAX_RECORDS]:
                del leases[l.mac]
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "leases": [{"mac": l.mac, "vip": l.vip, "state": l.state.value, "expires": l.expires}
                       for l in sorted(leases.values(), key=lambda l: l.mac)],
            "declined": [{"vip": d.vip, "until": d.until, "by": d.by}
                         for d in sorted(declined.values(), key=lambda d: d.vip)],
        }
        write_atomic(self.path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)
        self.writes += 1
        self._leases, self._declined = leases, declined

    def _load(self) -> None:
        self._remove_stale_temps()
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            self._corrupt(f"lease file {self.path} unreadable ({e})")
            return
        try:
            self._leases, self._declined = _parse(raw)
        except _Corrupt as e:
            self._corrupt(f"lease file {self.path} is corrupt ({e})")

    def _corrupt(self, why: str) -> None:
        aside = self.path + ".corrupt"
        try:
            os.replace(self.path, aside)     # a move aside, not a write (see tests/test_atomic_file.py)
            where = f"kept as {aside}"
        except OSError as e:
            where = f"could not move it to {aside}: {e}"
        msg = f"{why}; starting with no leases, {where}"
        self.warnings.append(msg)
        self._leases, self._declined = {}, {}
        self._warn(msg)

    def _remove_stale_temps(self) -> None:
        """The store is its file's only writer: any temporary file of it is a crash's leftover."""
        try:
            remove_stale_temps(self.path, any_owner=True)
        except OSError:
            pass


def _parse(raw: bytes) -> tuple[dict[str, Lease], dict[str, Declined]]:
    """Parse and check a lease file; any problem (syntax, types, the invariant) is _Corrupt."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _Corrupt(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise _Corrupt("not a version-1 lease file")
    entries, decl = doc.get("leases"), doc.get("declined")
    if not isinstance(entries, list) or not isinstance(decl, list):
        raise _Corrupt("leases/declined are not lists")
    leases: dict[str, Lease] = {}
    for e in entries:
        try:
            mac, vip = _mac(e["mac"]), _ip(e["vip"])
            lease = Lease(mac, vip, State(e["state"]), _num(e["expires"]))
        except (KeyError, TypeError, ValueError) as x:
            raise _Corrupt(f"bad lease entry {e!r:.80}: {x}") from None
        if mac in leases:
            raise _Corrupt(f"two leases for {mac}")
        leases[mac] = lease
    holding: dict[str, str] = {}
    for l in leases.values():     # the invariant, whatever the time: no address held twice
        if l.state in HOLDING:
            if l.vip in holding:
                raise _Corrupt(f"{l.vip} held by {holding[l.vip]} and {l.mac}")
            holding[l.vip] = l.mac
    declined: dict[str, Declined] = {}
    for e in decl:
        try:
            d = Declined(_ip(e["vip"]), _num(e["until"]), _mac(e["by"]))
        except (KeyError, TypeError, ValueError) as x:
            raise _Corrupt(f"bad declined entry {e!r:.80}: {x}") from None
        declined[d.vip] = d
    return leases, declined


def _mac(s) -> str:
    if not isinstance(s, str):
        raise TypeError("MAC is not a string")
    parts = s.split(":")
    if len(parts) != 6 or any(len(p) != 2 for p in parts):
        raise ValueError(f"bad MAC {s!r}")
    bytes.fromhex("".join(parts))
    return s.lower()


def _ip(s) -> str:
    if not isinstance(s, str):
        raise TypeError("address is not a string")
    return str(ipaddress.IPv4Address(s))


def _num(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
        raise TypeError("not a number")
    return float(x)


__all__ = ["AddressUnavailable", "Declined", "Event", "InvalidTransition", "Lease", "LeaseStore",
           "State", "TRANSITIONS"]
