"""One node engine on its UDP sockets: what the node daemon runs once and the adapter once per
general node (and once for itself).

An ``EngineHost`` owns a ``NodeEngine`` (the sans-IO node: signaling, tunnels, relay paths),
the sockets its datagrams leave by (one per address family), a ``CoreDriver`` (time in,
datagrams out, one timer at the engine's next deadline) and what every host of an engine
does with its events, written once:
- a delivered packet goes to ``deliver(packet)`` (the TUN, or the injector toward a general
  node);
- the common events are logged in one wording (``who`` names the general node, empty for
  the node daemon), tunnel paths are remembered for the status, the Resolver hears of tunnels
  that came up or failed (the DNS answer waiting for one goes out), a failed tunnel is a
  health event; every event then goes on to the owner's ``on_event`` for what only it does;
- ``conditions(now)`` says what is wrong with the cloud link (``cyphonic.health``), and
  ``tunnel_rows(now)`` is the status table of its tunnels.

The receive side is not here: the node daemon's ``PacketPath`` and the adapter's way back
each read their sockets on their own fast path and hand the rest to ``receive()``.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import time
from collections import Counter
from typing import Callable

from .. import events as ev
from .. import signaling as sg
from .. import timestamp_floor as tsf
from ..atomic_file import write_atomic
from ..driver import CoreDriver
from ..health import Health, Warning
from ..wire import cert as wire_cert
from .engine import NodeEngine, RelayPath, TunnelFailed, TunnelUp

from ..constants import MAX_CLOCK_SKEW_S
from .constants import CERT_EXPIRY_WARNING_S

TIMESTAMP_FLOOR_FILE = "timestamp-floor"   # beside the peer records (cyphonic.timestamp_floor)


class TimestampFloorFile:
    """The handshake timestamps' reservation on disk (``cyphonic.timestamp_floor``): the edge of
    a ``TimestampReservation``. One per process is enough however many engines it runs (their
    identities share one clock); the node daemon's host makes its own, the adapter gives one to
    all of its hosts. ``start()`` reads the last run's value and writes this run's, once (later
    calls answer the same floor); ``poke()`` writes a new one when due. A missing file is a first
    run; an unreadable one is logged and replaced; one that cannot be written is logged and
    counted (``timestamps_unwritable``), and the engines run without the protection."""

    def __init__(self, path: str, *, clock: Callable[[], float], log: Callable[[str], None],
                 drops: Counter, merge_glob: str | None = None) -> None:
        self.path = path
        self.clock = clock
        self.log = log
        self.drops = drops
        # files of an earlier layout to fold in once (the adapter kept one per general node):
        # the floor is the highest of them all, and they are removed once this one is written
        self.merge_glob = merge_glob
        self.reservation: tsf.TimestampReservation | None = None

    def start(self) -> int:
        if self.reservation is not None:
            return self.reservation.floor_ns
        stored = self._read(self.path)
        merged = sorted(p for p in glob.glob(self.merge_glob) if p != self.path) if self.merge_glob else []
        for p in merged:
            other = self._read(p)
            if other is not None and (stored is None or other > stored):
                stored = other
        self.reservation = tsf.TimestampReservation(stored, self.clock())
        if self._write(self.reservation.start_value()):   # (failing, only the next run loses)
            for p in merged:
                try:
                    os.unlink(p)
                except OSError:
                    pass
        return self.reservation.floor_ns

    def _read(self, path: str) -> int | None:
        """The reservation in ``path``; None when there is none (logged when unreadable)."""
        try:
            with open(path, "rb") as f:
                raw = f.read(64)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.log(f"timestamp reservation {path} unreadable ({exc}); replacing it")
            return None
        stored = tsf.parse(raw)
        if stored is None:
            self.log(f"timestamp reservation {path} unreadable ({raw[:20]!r}); replacing it")
        return stored

    def poke(self) -> None:
        if self.reservation is not None:
            data = self.reservation.due(self.clock())
            if data is not None:
                self._write(data)

    def _write(self, data: bytes) -> bool:
        try:
            write_atomic(self.path, data)
            return True
        except OSError as exc:
            self.drops["timestamps_unwritable"] += 1
            if self.drops["timestamps_unwritable"] == 1:
                self.log(f"cannot write the timestamp reservation {self.path}: {exc}")
            return False


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} s"


def ptr_name(vip: str) -> str:
    """The reverse-DNS name the engine resolves when a packet, not a query, names a peer."""
    return ".".join(reversed(vip.split("."))) + ".in-addr.arpa"


def endpoint_text(ep) -> str | None:
    """A peer's endpoint as the status shows it: ``host:port``, or the relay session."""
    if ep is None:
        return None
    if isinstance(ep, RelayPath):
        return str(ep)
    return f"{ep[0]}:{ep[1]}"


class EngineHost:
    def __init__(self, engine: NodeEngine, socks: dict[int, socket.socket], *,
                 deliver: Callable[[bytes], None], on_event: Callable[[object], None],
                 log: Callable[[str], None], health: Health, who: str = "", subject: str | None = None,
                 after_round: Callable[[], int] | None = None, records_path: str | None = None,
                 clock: Callable[[], float] = time.time, timestamps: "TimestampFloorFile | None" = None) -> None:
        self.engine = engine
        # Where the engine's peer records live (a restart without the cloud reaches the peers
        # it had, docs/protocol.md 11.6); None: not kept.
        self.records_path = records_path
        self._records_written = b""
        # Beside them, the handshake timestamps' reservation (cyphonic.timestamp_floor): a
        # restart with a clock that went back is still taken by peers that remember this run.
        # ``timestamps`` is given when several engines of one process share one file (the
        # adapter: one clock, so one reservation serves every identity it runs).
        self.drops: Counter = Counter()
        if timestamps is None and records_path:
            timestamps = TimestampFloorFile(os.path.join(os.path.dirname(records_path) or ".", TIMESTAMP_FLOOR_FILE),
                                            clock=clock, log=self.log, drops=self.drops)
        self.timestamps = timestamps
        self.socks = socks
        self.deliver = deliver
        self.on_event = on_event
        self._log = log
        self.health = health
        self.who = who                    # "" for the node daemon; "general node cam1 (<mac>)" on the adapter
        self.subject = who if subject is None else subject   # health entries are about this ("cam1")
        self.paths: dict[str, str] = {}   # peer fqdn -> how its tunnel came up ("direct", "relay", ...)
        self.resolver = None              # the Resolver (cyphonic.resolver), once DNS runs: told of tunnels
        self.asker = None                 # whose queries this engine answers (the adapter: the general node)
        self.clock_warning = True         # say `clock-off` (the adapter: only its own link, one clock)
        self.driver = CoreDriver(engine, self._send, self._event, clock=clock, after_round=after_round)
        self.clock = clock

    def log(self, line: str) -> None:
        self._log(f"{self.who} {line}" if self.who else line)

    # --- driving ------------------------------------------------------------------------

    def start(self) -> None:
        self.reserve_timestamps()
        self.restore_records()
        self.engine.start(self.clock())
        self.driver.flush()

    def reserve_timestamps(self) -> None:
        """Before the engine starts: the floor under its handshake timestamps
        (``TimestampFloorFile.start``); nothing without a file."""
        if self.timestamps is not None:
            self.engine.set_timestamp_floor(self.timestamps.start())

    def restore_records(self) -> int:
        """Before the first login: the peers of the records a previous run wrote. A missing
        file is nothing to restore; an unreadable one is logged and left for the next write."""
        if not self.records_path:
            return 0
        try:
            with open(self.records_path, "rb") as f:
                raw = f.read()
            records = json.loads(raw).get("peers", [])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, AttributeError) as exc:
            self.log(f"peer records {self.records_path} unreadable ({exc}); starting without them")
            return 0
        n = self.engine.restore(records, self.clock())
        self._records_written = raw
        if n:
            self.log(f"restored {n} peer{'s' if n != 1 else ''} from {self.records_path}")
        return n

    def save_records(self) -> None:
        """Write the engine's peer records if they changed (at most once per tunnel event)."""
        if not self.records_path:
            return
        data = json.dumps({"peers": self.engine.peer_records()}, indent=1).encode()
        if data == self._records_written:
            return
        try:
            write_atomic(self.records_path, data)
            self._records_written = data
        except OSError as exc:
            self.drops["records_unwritable"] += 1
            self.log(f"cannot write peer records {self.records_path}: {exc}")

    def stop(self) -> None:
        """Say goodbye to the cloud (what can be sent now), then no more timers."""
        self.engine.stop(self.clock())
        self.driver.send_out()
        self.driver.close()

    def receive(self, data: bytes, addr) -> None:
        self.driver.receive(data, addr)

    def flush(self) -> None:
        self.driver.flush()

    def poke(self) -> bool:
        """The periodic tick: deadlines due, and the timestamp reservation renewed when due."""
        if self.timestamps is not None:
            self.timestamps.poke()
        return self.driver.poke()

    def _send(self, data: bytes, addr) -> None:
        s = self.socks.get(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        if s is None:
            self.drops["no_socket_for_family"] += 1
            return
        s.sendto(data, addr)

    @property
    def errors(self) -> Counter:
        return self.driver.errors

    # --- events ---------------------------------------------------------------------------

    def _event(self, e) -> None:
        if isinstance(e, ev.PacketReceived):
            self.deliver(e.packet)
            return
        if isinstance(e, sg.LoggedIn):
            self.log(f"logged in as {e.fqdn} ({e.vip4}/{e.prefix_len})" + (" (enrolled)" if e.enrolled else ""))
        elif isinstance(e, sg.LoginFailed):
            self.log(f"login refused: {e.code.name}: {e.text}")
        elif isinstance(e, sg.Registered):
            self.log(f"registered: observed {e.observed.host}:{e.observed.port}{' (behind NAT)' if e.nat else ''}")
        elif isinstance(e, sg.CloudLost):
            self.log(f"cloud link lost: {e.reason}; reconnecting")
        elif isinstance(e, TunnelUp):
            self.paths[e.fqdn] = e.path
            self.save_records()
            self.log(f"tunnel up: {e.fqdn} ({e.vip4}) path {e.path} via {endpoint_text(e.endpoint)}")
            if self.resolver is not None:
                self.resolver.tunnel_up(e.fqdn, e.vip4, self.clock(), asker=self.asker)
        elif isinstance(e, TunnelFailed):
            self.log(f"tunnel to {e.fqdn} failed: {e.code.name} {e.text}")
            self.health.record(self.clock(), Warning("tunnel-failed", self._about(f"{e.fqdn}: {e.code.name} {e.text}"),
                                                     subject=self.subject))
            if self.resolver is not None:
                self.resolver.tunnel_failed(e.fqdn, e.code, self.clock(), asker=self.asker)
        elif isinstance(e, ev.EndpointChanged):
            self.log(f"{e.fqdn} moved: {endpoint_text(e.old)} -> {endpoint_text(e.new)}")
            self.save_records()
        elif isinstance(e, ev.HandshakeFailed):
            self.log(f"handshake with {e.fqdn} failed: {e.reason} ({e.packets_dropped} packets dropped)")
        self.on_event(e)

    def _about(self, text: str) -> str:
        return f"{self.subject}: {text}" if self.subject else text

    # --- status ---------------------------------------------------------------------------

    def conditions(self, now: float) -> list[Warning]:
        """What is wrong with this engine's cloud link and identity, now."""
        s = self.engine.signaling
        out = []
        link = s.link_health()
        if link is not None:
            out.append(Warning(link[0], self._about(link[1]), subject=self.subject))
        if s.identity.certificate:
            left = wire_cert.decode(s.identity.certificate).not_after - (now + s.clock_offset_s)
            if left < CERT_EXPIRY_WARNING_S:
                out.append(Warning("certificate-expiring", self._about(f"certificate expires in {int(left)} s"),
                                   subject=self.subject))
        if self.clock_warning and s.login_info is not None and abs(s.clock_offset_s) > MAX_CLOCK_SKEW_S:
            off = s.clock_offset_s
            out.append(Warning("clock-off", self._about(
                f"this clock is {_duration(abs(off))} {'behind' if off > 0 else 'ahead of'} the cloud's "
                "(no NTP?): certificates are checked on the cloud's time; set up NTP"), subject=self.subject))
        return out

    def tunnel_rows(self, now: float, tx_extra: Callable[[str], tuple[int, int]] | None = None) -> list[dict]:
        """The status table of this engine's tunnels. ``tx_extra(peer_vip4)``: (bytes, packets)
        sent outside the engine (the adapter's workers seal on their own)."""
        device = self.engine.device
        if device is None:
            return []
        rows = []
        for p in device.peers_by_fqdn.values():
            ps = p.status(now)
            xb, xp = tx_extra(ps["vip4"]) if tx_extra is not None else (0, 0)
            rows.append({"peer": p.fqdn, "vip4": ps["vip4"], "path": self.paths.get(p.fqdn, "-"),
                         "endpoint": endpoint_text(p.endpoint),
                         "up": ps["session"], "last_handshake_age_s": ps["last_handshake_age_s"],
                         "rx_bytes": ps["rx_bytes"], "tx_bytes": ps["tx_bytes"] + xb,
                         "rx_packets": ps["rx_packets"], "tx_packets": ps["tx_packets"] + xp})
        return rows

    def counters(self) -> dict:
        """Drops and errors of this host and its engine, one flat table for the status: the
        engine's, its device's and its signaling channels' (``ControlClient``, summed over the
        cloud's addresses)."""
        eng = self.engine
        signaling: Counter = Counter(eng.signaling.drops)   # the client's own (not the cloud's address)
        for ch in eng.signaling.channels.values():
            signaling.update(ch.drops)
        return {**dict(self.drops), **{f"send_{k}": v for k, v in self.errors.items()},
                **{f"engine_{k}": v for k, v in eng.drops.items()},
                **{f"device_{k}": v for k, v in (eng.device.drops.items() if eng.device else ())},
                **{f"signaling_{k}": v for k, v in signaling.items()}}
