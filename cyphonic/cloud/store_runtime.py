"""What cloud instances share at run time: who is up, where each node is registered, and the bus.

Schema version 2 of the store (``store.py`` and ``store_postgres.py`` run the
statements; ``_RuntimeSql`` is mixed into ``_SqlStore``, ``_RuntimeMemory``
into ``MemoryStore``). None of it needs to survive a restart of the whole cloud
(nodes register again by themselves), so ``cyphonic-cloud db copy`` leaves it
behind, and none of it is written under the store's write lock except an
instance joining (it takes a tag).

- ``instances``: one row per cloud process (``instance_id``, from the config or
  ``<host>:<signaling port>``), with the services it runs, the addresses nodes
  and relays reach it at, and a heartbeat it renews every
  ``INSTANCE_HEARTBEAT_S``. An instance whose heartbeat is older than
  ``INSTANCE_DEAD_S`` is dead to the others. Its ``tag`` (1..65535, unique,
  kept across restarts of the same id) is the top 16 bits of every route id it
  mints, so any instance knows which one owns a route.
- ``registrations``: where each node is registered (its instance, observed and
  local endpoints, NAT, certificate). Written on register and when the node
  moves, not on every keepalive: a row is good while its instance is alive, and
  the instance removes it when the registration ends there.
- ``bus``: messages from one instance to another (``cyphonic.wire.bus``),
  deleted when read; at most ``BUS_MAX_QUEUED`` wait for one target and none
  older than ``BUS_MAX_AGE_S`` is kept. PostgreSQL also sends a NOTIFY so the
  target reads at once; on SQLite the target polls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

INSTANCE_HEARTBEAT_S = 1.0         # an instance renews its row this often
INSTANCE_DEAD_S = 3.0              # ... and is dead to the others after this much silence
MAX_INSTANCE_TAG = 0xFFFF          # route ids carry the owner's tag in their top 16 bits
BUS_MAX_QUEUED = 10_000            # messages waiting for one target (a dead one's pile is bounded)
BUS_MAX_AGE_S = 30.0               # older messages are deleted unread (no route waits that long)
BUS_READ_BATCH = 256               # messages read per call
BUS_CHANNEL = "cyphonic_bus"       # PostgreSQL LISTEN/NOTIFY channel; the payload is the target id


@dataclass(frozen=True)
class InstanceRecord:
    instance_id: str
    tag: int
    services: tuple[str, ...]
    signaling: tuple[str, ...]     # "host:port" nodes reach its AS/NMS at
    relay: tuple[str, ...]         # "host:port" nodes reach its TRS at (IPv4 first, then IPv6)
    host: str
    pid: int
    started: float
    heartbeat: float               # 0: stopped cleanly

    def alive(self, now: float) -> bool:
        return self.heartbeat > 0 and now - self.heartbeat < INSTANCE_DEAD_S


@dataclass(frozen=True)
class RegistrationRecord:
    static_public: bytes
    instance_id: str
    observed: str                  # "host:port"
    local: tuple[str, ...]
    nat: bool
    certificate: bytes
    updated: float


_INSTANCE_COLS = "instance_id, tag, services, signaling, relay, host, pid, started, heartbeat"
_REG_COLS = "static_public, instance_id, observed, local_endpoints, nat, certificate, updated"


def _instance_from_row(row: tuple) -> InstanceRecord:
    iid, tag, services, signaling, relay, host, pid, started, heartbeat = row
    return InstanceRecord(iid, int(tag), tuple(json.loads(services)), tuple(json.loads(signaling)),
                          tuple(json.loads(relay)), host, int(pid), float(started), float(heartbeat))


def _registration_from_row(row: tuple) -> RegistrationRecord:
    sp, iid, observed, local, nat, cert, updated = row
    return RegistrationRecord(bytes(sp), iid, observed, tuple(json.loads(local)), bool(nat),
                              bytes(cert), float(updated))


def _check_instance_args(instance_id: Any, services: Any, signaling: Any, relay: Any) -> None:
    from .store import StoreError
    if not isinstance(instance_id, str) or not instance_id or len(instance_id) > 200:
        raise StoreError(f"instance_id must be a non-empty string of at most 200 characters, not {instance_id!r}")
    for what, v in (("services", services), ("signaling", signaling), ("relay", relay)):
        if isinstance(v, (str, bytes)) or not all(isinstance(x, str) for x in v):
            raise StoreError(f"{what} must be a sequence of strings, not {v!r}")


def _check_registration(rec: Any) -> RegistrationRecord:
    from .store import StoreError, _check_static
    if not isinstance(rec, RegistrationRecord):
        raise StoreError(f"put_registration needs a RegistrationRecord, not {type(rec).__name__}")
    _check_static(rec.static_public)
    if not rec.instance_id or not isinstance(rec.certificate, (bytes, bytearray)):
        raise StoreError("a registration needs an instance id and a certificate")
    return rec


class _RuntimeSql:
    """The runtime tables' SQL, for both engines (mixed into ``_SqlStore``).

    ``_write_runtime(body)`` is a write transaction that does not take the
    store's write lock (runtime rows are upserts and deletes of one key; the
    lock is for allocation); an engine without a lighter transaction uses
    ``_write``. ``_after_bus_send(cur, target)`` lets PostgreSQL NOTIFY.
    """

    def _write_runtime(self, body, *, single: bool = False):
        return self._write(body)          # type: ignore[attr-defined]

    def _after_bus_send(self, cur: Any, target: str) -> None:
        return None

    # instances

    def join_instance(self, instance_id: str, *, services, signaling, relay, host: str, pid: int,
                      now: float) -> InstanceRecord:
        """Add or renew this instance's row and forget what a previous run of it left behind
        (its registrations: those nodes register again; messages waiting for it)."""
        from .store import StoreError
        _check_instance_args(instance_id, services, signaling, relay)

        def body(cur: Any) -> InstanceRecord:
            row = self._exec(cur, "SELECT tag FROM instances WHERE instance_id = ?", (instance_id,)).fetchone()
            if row is not None:
                tag = int(row[0])
            else:
                used = {int(r[0]) for r in self._exec(cur, "SELECT tag FROM instances").fetchall()}
                tag = next((t for t in range(1, MAX_INSTANCE_TAG + 1) if t not in used), 0)
                if not tag:
                    raise StoreError(f"no free instance tag: {len(used)} instances known; "
                                     "`cyphonic-cloud instances --forget ID` the dead ones")
            rec = InstanceRecord(instance_id, tag, tuple(services), tuple(signaling), tuple(relay),
                                 host, int(pid), now, now)
            self._exec(cur, f"INSERT INTO instances ({_INSTANCE_COLS}) VALUES (?,?,?,?,?,?,?,?,?) "
                       "ON CONFLICT (instance_id) DO UPDATE SET services = excluded.services, "
                       "signaling = excluded.signaling, relay = excluded.relay, host = excluded.host, "
                       "pid = excluded.pid, started = excluded.started, heartbeat = excluded.heartbeat",
                       (instance_id, tag, json.dumps(rec.services), json.dumps(rec.signaling),
                        json.dumps(rec.relay), host, int(pid), now, now))
            self._exec(cur, "DELETE FROM registrations WHERE instance_id = ?", (instance_id,))
            self._exec(cur, "DELETE FROM bus WHERE target = ?", (instance_id,))
            return rec
        return self._write(body)         # type: ignore[attr-defined]

    def heartbeat_instance(self, instance_id: str, now: float) -> None:
        """Renew the heartbeat; NotFoundError when the row is gone (forgotten: join again)."""
        from .store import NotFoundError

        def body(cur: Any) -> None:
            if self._exec(cur, "UPDATE instances SET heartbeat = ? WHERE instance_id = ?",
                          (now, instance_id)).rowcount == 0:
                raise NotFoundError(f"instance {instance_id!r} is not in the instances table")
            self._exec(cur, "DELETE FROM bus WHERE created < ?", (now - BUS_MAX_AGE_S,))
        self._write_runtime(body)

    def leave_instance(self, instance_id: str) -> None:
        """A clean stop: heartbeat 0 (stopped, not dead), its registrations and messages gone."""
        def body(cur: Any) -> None:
            self._exec(cur, "UPDATE instances SET heartbeat = 0 WHERE instance_id = ?", (instance_id,))
            self._exec(cur, "DELETE FROM registrations WHERE instance_id = ?", (instance_id,))
            self._exec(cur, "DELETE FROM bus WHERE target = ?", (instance_id,))
        self._write_runtime(body)

    def forget_instance(self, instance_id: str) -> None:
        from .store import NotFoundError

        def body(cur: Any) -> None:
            if self._exec(cur, "DELETE FROM instances WHERE instance_id = ?", (instance_id,)).rowcount == 0:
                raise NotFoundError(f"no instance {instance_id!r}")
            self._exec(cur, "DELETE FROM registrations WHERE instance_id = ?", (instance_id,))
            self._exec(cur, "DELETE FROM bus WHERE target = ?", (instance_id,))
        self._write(body)                # type: ignore[attr-defined]

    def list_instances(self) -> list[InstanceRecord]:
        rows = self._read1(lambda cur: self._exec(  # type: ignore[attr-defined]
            cur, f"SELECT {_INSTANCE_COLS} FROM instances ORDER BY tag").fetchall())
        return [_instance_from_row(r) for r in rows]

    # registrations

    def _upsert_registration(self, cur: Any, rec: RegistrationRecord) -> None:
        self._exec(  # type: ignore[attr-defined]
            cur, f"INSERT INTO registrations ({_REG_COLS}) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT (static_public) DO UPDATE SET instance_id = excluded.instance_id, "
            "observed = excluded.observed, local_endpoints = excluded.local_endpoints, "
            "nat = excluded.nat, certificate = excluded.certificate, updated = excluded.updated",
            (rec.static_public, rec.instance_id, rec.observed, json.dumps(rec.local),
             self._flag(rec.nat), bytes(rec.certificate), rec.updated))  # type: ignore[attr-defined]

    def put_registration(self, rec: RegistrationRecord) -> None:
        rec = _check_registration(rec)
        self._write_runtime(lambda cur: self._upsert_registration(cur, rec), single=True)

    def replace_registrations(self, instance_id: str, recs: list[RegistrationRecord]) -> None:
        """All of this instance's rows at once, in one transaction (an instance that was alone
        and kept them to itself shares them when another instance appears)."""
        recs = [_check_registration(r) for r in recs]

        def body(cur: Any) -> None:
            self._exec(cur, "DELETE FROM registrations WHERE instance_id = ?", (instance_id,))  # type: ignore
            for r in recs:
                self._upsert_registration(cur, r)
        self._write_runtime(body)

    def get_registration(self, static_public: bytes) -> RegistrationRecord | None:
        row = self._read1(lambda cur: self._exec(  # type: ignore[attr-defined]
            cur, f"SELECT {_REG_COLS} FROM registrations WHERE static_public = ?",
            (bytes(static_public),)).fetchone())
        return None if row is None else _registration_from_row(row)

    def drop_registration(self, static_public: bytes, instance_id: str) -> None:
        """Remove the row only if it is still this instance's (the node may have moved on)."""
        self._write_runtime(lambda cur: self._exec(
            cur, "DELETE FROM registrations WHERE static_public = ? AND instance_id = ?",
            (bytes(static_public), instance_id)), single=True)

    def list_registrations(self) -> list[RegistrationRecord]:
        rows = self._read1(lambda cur: self._exec(  # type: ignore[attr-defined]
            cur, f"SELECT {_REG_COLS} FROM registrations").fetchall())
        return [_registration_from_row(r) for r in rows]

    def count_registrations(self) -> dict[str, int]:
        rows = self._read1(lambda cur: self._exec(  # type: ignore[attr-defined]
            cur, "SELECT instance_id, COUNT(*) FROM registrations GROUP BY instance_id").fetchall())
        return {r[0]: int(r[1]) for r in rows}

    # the bus

    def bus_send(self, target: str, payload: bytes, now: float) -> None:
        from .store import StoreError

        def body(cur: Any) -> None:
            # The bound, in the statement that inserts (one round trip, not two)
            if self._exec(cur, "INSERT INTO bus (target, created, payload) SELECT ?, ?, ? "
                          "WHERE (SELECT COUNT(*) FROM bus WHERE target = ?) < ?",
                          (target, now, bytes(payload), target, BUS_MAX_QUEUED)).rowcount == 0:
                raise StoreError(f"bus to instance {target!r} is full ({BUS_MAX_QUEUED} messages unread)")
            self._after_bus_send(cur, target)
        self._write_runtime(body)

    def bus_receive(self, target: str, limit: int = BUS_READ_BATCH) -> list[bytes]:
        def body(cur: Any) -> list[bytes]:
            rows = self._exec(cur, "DELETE FROM bus WHERE id IN (SELECT id FROM bus WHERE target = ? "
                              "ORDER BY id LIMIT ?) RETURNING id, payload", (target, int(limit))).fetchall()
            return [bytes(p) for _, p in sorted(rows)]
        return self._write_runtime(body, single=True)


class _RuntimeMemory:
    """The same, in dicts (mixed into ``MemoryStore``; it provides ``_txn``)."""

    def _runtime_init(self) -> None:
        self._instances: dict[str, InstanceRecord] = {}
        self._registrations: dict[bytes, RegistrationRecord] = {}
        self._bus: list[tuple[int, str, float, bytes]] = []
        self._bus_id = 0

    def join_instance(self, instance_id: str, *, services, signaling, relay, host: str, pid: int,
                      now: float) -> InstanceRecord:
        from .store import StoreError
        _check_instance_args(instance_id, services, signaling, relay)
        with self._txn():  # type: ignore[attr-defined]
            old = self._instances.get(instance_id)
            used = {i.tag for i in self._instances.values()}
            tag = old.tag if old else next((t for t in range(1, MAX_INSTANCE_TAG + 1) if t not in used), 0)
            if not tag:
                raise StoreError("no free instance tag")
            rec = InstanceRecord(instance_id, tag, tuple(services), tuple(signaling), tuple(relay),
                                 host, int(pid), now, now)
            self._instances[instance_id] = rec
            self._drop_instance_state(instance_id)
            return rec

    def _drop_instance_state(self, instance_id: str) -> None:
        self._registrations = {k: r for k, r in self._registrations.items() if r.instance_id != instance_id}
        self._bus = [m for m in self._bus if m[1] != instance_id]

    def heartbeat_instance(self, instance_id: str, now: float) -> None:
        from dataclasses import replace

        from .store import NotFoundError
        with self._txn():  # type: ignore[attr-defined]
            rec = self._instances.get(instance_id)
            if rec is None:
                raise NotFoundError(f"instance {instance_id!r} is not in the instances table")
            self._instances[instance_id] = replace(rec, heartbeat=now)
            self._bus = [m for m in self._bus if m[2] >= now - BUS_MAX_AGE_S]

    def leave_instance(self, instance_id: str) -> None:
        from dataclasses import replace
        with self._txn():  # type: ignore[attr-defined]
            rec = self._instances.get(instance_id)
            if rec is not None:
                self._instances[instance_id] = replace(rec, heartbeat=0.0)
            self._drop_instance_state(instance_id)

    def forget_instance(self, instance_id: str) -> None:
        from .store import NotFoundError
        with self._txn():  # type: ignore[attr-defined]
            if self._instances.pop(instance_id, None) is None:
                raise NotFoundError(f"no instance {instance_id!r}")
            self._drop_instance_state(instance_id)

    def list_instances(self) -> list[InstanceRecord]:
        with self._txn():  # type: ignore[attr-defined]
            return sorted(self._instances.values(), key=lambda i: i.tag)

    def put_registration(self, rec: RegistrationRecord) -> None:
        rec = _check_registration(rec)
        with self._txn():  # type: ignore[attr-defined]
            self._registrations[rec.static_public] = rec

    def replace_registrations(self, instance_id: str, recs: list[RegistrationRecord]) -> None:
        recs = [_check_registration(r) for r in recs]
        with self._txn():  # type: ignore[attr-defined]
            self._registrations = {k: r for k, r in self._registrations.items() if r.instance_id != instance_id}
            for r in recs:
                self._registrations[r.static_public] = r

    def get_registration(self, static_public: bytes) -> RegistrationRecord | None:
        with self._txn():  # type: ignore[attr-defined]
            return self._registrations.get(bytes(static_public))

    def drop_registration(self, static_public: bytes, instance_id: str) -> None:
        with self._txn():  # type: ignore[attr-defined]
            rec = self._registrations.get(bytes(static_public))
            if rec is not None and rec.instance_id == instance_id:
                del self._registrations[bytes(static_public)]

    def list_registrations(self) -> list[RegistrationRecord]:
        with self._txn():  # type: ignore[attr-defined]
            return list(self._registrations.values())

    def count_registrations(self) -> dict[str, int]:
        with self._txn():  # type: ignore[attr-defined]
            out: dict[str, int] = {}
            for r in self._registrations.values():
                out[r.instance_id] = out.get(r.instance_id, 0) + 1
            return out

    def bus_send(self, target: str, payload: bytes, now: float) -> None:
        from .store import StoreError
        with self._txn():  # type: ignore[attr-defined]
            if sum(1 for m in self._bus if m[1] == target) >= BUS_MAX_QUEUED:
                raise StoreError(f"bus to instance {target!r} is full")
            self._bus_id += 1
            self._bus.append((self._bus_id, target, now, bytes(payload)))

    def bus_receive(self, target: str, limit: int = BUS_READ_BATCH) -> list[bytes]:
        with self._txn():  # type: ignore[attr-defined]
            mine = [m for m in self._bus if m[1] == target][:limit]
            ids = {m[0] for m in mine}
            self._bus = [m for m in self._bus if m[0] not in ids]
            return [m[3] for m in mine]


# Statements of schema step 2, written once; each engine fills in its own column types.
_STEP_2 = (
    """CREATE TABLE IF NOT EXISTS instances (
        instance_id TEXT PRIMARY KEY,
        tag INTEGER NOT NULL UNIQUE,
        services TEXT NOT NULL,
        signaling TEXT NOT NULL,
        relay TEXT NOT NULL,
        host TEXT NOT NULL,
        pid {INT64} NOT NULL,
        started {REAL} NOT NULL,
        heartbeat {REAL} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS registrations (
        static_public {BLOB} PRIMARY KEY,
        instance_id TEXT NOT NULL,
        observed TEXT NOT NULL,
        local_endpoints TEXT NOT NULL,
        nat {BOOL} NOT NULL,
        certificate {BLOB} NOT NULL,
        updated {REAL} NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS registrations_by_instance ON registrations(instance_id)""",
    """CREATE TABLE IF NOT EXISTS bus (
        id {SERIAL_ID},
        target TEXT NOT NULL,
        created {REAL} NOT NULL,
        payload {BLOB} NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS bus_by_target ON bus(target, id)""",
)

SQLITE_STEP_2 = tuple(t.format(INT64="INTEGER", REAL="REAL", BLOB="BLOB", BOOL="INTEGER",
                               SERIAL_ID="INTEGER PRIMARY KEY AUTOINCREMENT") for t in _STEP_2)
POSTGRES_STEP_2 = tuple(t.format(INT64="BIGINT", REAL="DOUBLE PRECISION", BLOB="BYTEA", BOOL="BOOLEAN",
                                 SERIAL_ID="BIGSERIAL PRIMARY KEY") for t in _STEP_2)
