"""The cloud's persistent state: enrollment tokens, identities, serials, revocations, policy.

One interface (``Store``, a ``typing.Protocol``) and three implementations that
pass the same test suite (``open_store`` picks the engine from the ``database``
setting; schema versions and their ordered migration steps are shared rules,
``pending_migrations``):

- ``PostgresStore(url)`` in ``store_postgres``: several processes and hosts on
  one PostgreSQL (or CockroachDB) database; imported only when configured.

- ``SQLiteStore(path)``: the real one. One SQLite file, WAL journal,
  ``synchronous=FULL`` (a write that returned survives ``kill -9`` and power
  loss), a busy timeout, and ``BEGIN IMMEDIATE`` around every read-modify-write
  so several cloud processes can share one file.
- ``MemoryStore()``: a fake in dicts for fast unit tests, with the same
  behaviour, errors included.

The two SQL engines run the same statements (``_SqlStore``, written with ``?``
placeholders); each adds only its connection, transactions and schema.

Every write is one transaction: it happens completely or not at all. Misuse
raises a ``StoreError`` subclass whose message says what was wrong. ``enroll``
spends a one-time token and creates the identity in one transaction, so a
failed enrollment (no free address or name) leaves the token usable.

Time is an argument (``now``); the store never reads the wall clock (only a
monotonic deadline while it waits for another process's lock).

Never: reuse a virtual address (a revoked identity keeps its address for
ever), let two processes allocate the same address, or forget a serial that
was issued to an identity that is later revoked.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from ..errors import CyphonicError
from .store_runtime import (SQLITE_STEP_2, InstanceRecord, RegistrationRecord, _RuntimeMemory,
                            _RuntimeSql)

__all__ = [
    "SCHEMA_VERSION", "TOKEN_REASONS",
    "StoreError", "ConflictError", "NotFoundError", "TokenError",
    "TokenRecord", "Identity", "InstanceRecord", "RegistrationRecord", "Store", "SQLiteStore", "MemoryStore",
    "pending_migrations", "is_postgres_url", "open_store",
]

SCHEMA_VERSION = 2                 # PRAGMA user_version of the database this code writes
APPLICATION_ID = 0x43595048        # PRAGMA application_id, "CYPH": refuse other programs' databases
BUSY_TIMEOUT_S = 5.0               # wait this long for another process's write lock
STATIC_KEY_BYTES = 32              # X25519 public key
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file

TOKEN_REASONS = ("unknown", "expired", "used")
_TOKEN_TEXT = {
    "unknown": "unknown token",
    "expired": "token expired",
    "used": "one-time token already used",
}


# --- Errors -------------------------------------------------------------------

class StoreError(CyphonicError):
    """The store was misused or cannot work (unreadable file, newer schema, pool exhausted)."""


class ConflictError(StoreError):
    """A unique value (token id, static key, name, FQDN, serial) is already taken."""


class NotFoundError(StoreError):
    """The record the operation needs does not exist."""


class TokenError(StoreError):
    """An enrollment token cannot be consumed; ``reason`` is one of ``TOKEN_REASONS``."""

    def __init__(self, reason: str, token_id: str = "") -> None:
        if reason not in TOKEN_REASONS:
            raise ValueError(f"TokenError reason must be one of {TOKEN_REASONS}, not {reason!r}")
        self.reason = reason
        self.token_id = token_id
        super().__init__(f"enrollment token {token_id!r}: {_TOKEN_TEXT[reason]}"
                         if token_id else _TOKEN_TEXT[reason])


# --- Records ------------------------------------------------------------------

@dataclass(frozen=True)
class TokenRecord:
    """An enrollment token. Only a hash of its secret is stored."""

    token_id: str
    secret_hash: bytes
    name: str                      # the name the enrolling node gets ("" lets the node propose one)
    groups: tuple[str, ...]
    reusable: bool                 # False: one enrollment only
    expires_at: float | None       # None: never expires
    created_at: float
    used_at: float | None          # time of the last successful consume
    uses: int                      # successful consumes so far


@dataclass(frozen=True)
class Identity:
    """An enrolled node. ``vip4`` and ``fqdn`` never change for a static key."""

    static_public: bytes
    name: str
    fqdn: str
    vip4: str
    groups: tuple[str, ...]
    created_at: float
    serial: int                    # serial of the current certificate, 0 before the first
    cert_not_after: float          # 0.0 before the first certificate
    revoked: bool
    token_id: str                  # the token it enrolled with


# --- The interface ------------------------------------------------------------

@runtime_checkable
class Store(Protocol):
    """What the AS, NMS and CLI need from persistent state. Every call is atomic."""

    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...

    def add_token(self, rec: TokenRecord) -> None: ...
    def get_token(self, token_id: str) -> TokenRecord | None: ...
    def consume_token(self, token_id: str, now: float) -> TokenRecord: ...
    def list_tokens(self) -> list[TokenRecord]: ...
    def delete_token(self, token_id: str) -> None: ...

    def create_identity(self, static_public: bytes, name: str, fqdn: str,
                        groups: tuple[str, ...], token_id: str, now: float,
                        prefix: ipaddress.IPv4Network, reserved: set[str]) -> Identity: ...
    def enroll(self, token_id: str, static_public: bytes, names: list[str], domain: str,
               now: float, prefix: ipaddress.IPv4Network,
               reserved: set[str]) -> tuple[Identity, TokenRecord]: ...
    def get_identity(self, static_public: bytes) -> Identity | None: ...
    def get_identity_by_name(self, name: str) -> Identity | None: ...
    def get_identity_by_fqdn(self, fqdn: str) -> Identity | None: ...
    def get_identity_by_vip(self, vip4: str) -> Identity | None: ...
    def list_identities(self) -> list[Identity]: ...

    def next_serial(self) -> int: ...
    def set_certificate(self, static_public: bytes, serial: int, not_after: float) -> None: ...
    def issue_serial(self, static_public: bytes, not_after: float) -> int: ...

    def revoke(self, name: str, now: float) -> Identity: ...
    def revoked_serials(self) -> set[int]: ...

    def get_policy(self) -> dict | None: ...
    def set_policy(self, policy: dict) -> None: ...

    # What instances share at run time (``store_runtime``, schema version 2).
    def join_instance(self, instance_id: str, *, services, signaling, relay, host: str, pid: int,
                      now: float) -> InstanceRecord: ...
    def heartbeat_instance(self, instance_id: str, now: float) -> None: ...
    def leave_instance(self, instance_id: str) -> None: ...
    def forget_instance(self, instance_id: str) -> None: ...
    def list_instances(self) -> list[InstanceRecord]: ...
    def put_registration(self, rec: RegistrationRecord) -> None: ...
    def replace_registrations(self, instance_id: str, recs: list[RegistrationRecord]) -> None: ...
    def get_registration(self, static_public: bytes) -> RegistrationRecord | None: ...
    def drop_registration(self, static_public: bytes, instance_id: str) -> None: ...
    def list_registrations(self) -> list[RegistrationRecord]: ...
    def count_registrations(self) -> dict[str, int]: ...
    def bus_send(self, target: str, payload: bytes, now: float) -> None: ...
    def bus_receive(self, target: str, limit: int = ...) -> list[bytes]: ...

    def close(self) -> None: ...


# --- Argument checks shared by both implementations -----------------------------

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_str(value: Any, what: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not empty_ok and not value):
        raise StoreError(f"{what} must be a{'' if empty_ok else ' non-empty'} string, not {value!r}")
    return value


def _check_time(value: Any, what: str, *, none_ok: bool = False) -> float | None:
    if value is None and none_ok:
        return None
    if not _is_number(value):
        raise StoreError(f"{what} must be a finite number of seconds, not {value!r}")
    return float(value)


def _check_groups(groups: Any) -> tuple[str, ...]:
    if isinstance(groups, (str, bytes)) or not isinstance(groups, (tuple, list)):
        raise StoreError(f"groups must be a tuple of strings, not {groups!r}")
    for g in groups:
        _check_str(g, "each group")
    return tuple(groups)


def _check_static(static_public: Any) -> bytes:
    if not isinstance(static_public, (bytes, bytearray)) or len(static_public) != STATIC_KEY_BYTES:
        raise StoreError(f"static_public must be {STATIC_KEY_BYTES} bytes, not {static_public!r}")
    return bytes(static_public)


def _check_serial(serial: Any) -> int:
    if not isinstance(serial, int) or isinstance(serial, bool) or not 1 <= serial < 1 << 63:
        raise StoreError(f"serial must be an integer from 1 to 2**63-1, not {serial!r}")
    return serial


def _normalize_token(rec: Any) -> TokenRecord:
    if not isinstance(rec, TokenRecord):
        raise StoreError(f"add_token needs a TokenRecord, not {type(rec).__name__}")
    if not isinstance(rec.secret_hash, (bytes, bytearray)) or not rec.secret_hash:
        raise StoreError(f"token {rec.token_id!r}: secret_hash must be non-empty bytes")
    if not isinstance(rec.reusable, bool):
        raise StoreError(f"token {rec.token_id!r}: reusable must be a bool, not {rec.reusable!r}")
    if not isinstance(rec.uses, int) or isinstance(rec.uses, bool) or rec.uses < 0:
        raise StoreError(f"token {rec.token_id!r}: uses must be an integer >= 0, not {rec.uses!r}")
    return TokenRecord(
        token_id=_check_str(rec.token_id, "token_id"),
        secret_hash=bytes(rec.secret_hash),
        name=_check_str(rec.name, "token name", empty_ok=True),
        groups=_check_groups(rec.groups),
        reusable=rec.reusable,
        expires_at=_check_time(rec.expires_at, "expires_at", none_ok=True),
        created_at=_check_time(rec.created_at, "created_at"),  # type: ignore[arg-type]
        used_at=_check_time(rec.used_at, "used_at", none_ok=True),
        uses=rec.uses,
    )


def _consume(rec: TokenRecord | None, token_id: str, now: float) -> TokenRecord:
    """The token rule, one place for both stores: a used one-time token stays used."""
    if rec is None:
        raise TokenError("unknown", token_id)
    if not rec.reusable and rec.uses > 0:
        raise TokenError("used", token_id)
    if rec.expires_at is not None and now >= rec.expires_at:
        raise TokenError("expired", token_id)
    return replace(rec, used_at=now, uses=rec.uses + 1)


def _host_range(prefix: Any) -> tuple[int, int]:
    """First and last host address of ``prefix`` as integers (network and broadcast excluded)."""
    if not isinstance(prefix, ipaddress.IPv4Network):
        raise StoreError(f"prefix must be an ipaddress.IPv4Network, not {prefix!r}")
    return int(prefix.network_address) + 1, int(prefix.broadcast_address) - 1


def _reserved_ints(reserved: Any) -> set[int]:
    if isinstance(reserved, (str, bytes)):
        raise StoreError(f"reserved must be a set of IPv4 address strings, not {reserved!r}")
    out = set()
    for r in reserved or ():
        try:
            out.add(int(ipaddress.IPv4Address(r)))
        except (ipaddress.AddressValueError, ValueError, TypeError):
            raise StoreError(f"reserved address {r!r} is not an IPv4 address") from None
    return out


def _lowest_free(first: int, last: int, reserved: set[int], used: Callable[[int], bool],
                 end_of_run: Callable[[int], int], prefix: ipaddress.IPv4Network) -> str:
    """Lowest address in [first, last] neither reserved nor used.

    ``end_of_run(c)`` is called with a used ``c`` and returns the first
    address after the run of used addresses that starts at ``c``, so a
    long run of allocated addresses is skipped in one step.
    """
    c = first
    while c <= last:
        if c in reserved:
            c += 1
        elif used(c):
            c = end_of_run(c)
        else:
            return str(ipaddress.IPv4Address(c))
    raise StoreError(f"address pool exhausted: no free address in {prefix}")


@dataclass(frozen=True)
class _NewIdentity:
    """Checked arguments of a new identity, apart from its name and FQDN."""

    static_public: bytes
    groups: tuple[str, ...]
    token_id: str
    now: float
    prefix: ipaddress.IPv4Network
    first: int
    last: int
    reserved: set[int]

    def identity(self, name: str, fqdn: str, vip4: str) -> Identity:
        return Identity(self.static_public, name, fqdn, vip4, self.groups, self.now,
                        0, 0.0, False, self.token_id)


def _check_new_identity(static_public: Any, groups: Any, token_id: Any, now: Any,
                        prefix: Any, reserved: Any) -> _NewIdentity:
    static_public = _check_static(static_public)
    groups = _check_groups(groups)
    _check_str(token_id, "token_id", empty_ok=True)
    now = _check_time(now, "now")
    first, last = _host_range(prefix)
    return _NewIdentity(static_public, groups, token_id, now, prefix, first, last,
                        _reserved_ints(reserved))


def _check_candidates(names: Any, domain: Any) -> list[str]:
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)) or not names:
        raise StoreError(f"names must be a non-empty list of strings, not {names!r}")
    for n in names:
        _check_str(n, "each candidate name")
    _check_str(domain, "domain")
    return list(names)


def _pick_name(lookup: Callable[[str, Any], Identity | None], token_id: str,
               static_public: bytes, names: list[str], domain: str) -> tuple[str, str]:
    """The first candidate whose name and FQDN are both free, as (name, fqdn).

    A static key that is already enrolled is a ``ConflictError``, and so is a
    list in which every name or FQDN is taken.
    """
    if (other := lookup("static_public", static_public)) is not None:
        raise ConflictError(f"static key {static_public.hex()} is already enrolled "
                            f"as {other.name!r}")
    for name in names:
        fqdn = f"{name}.{domain}"
        if lookup("name", name) is None and lookup("fqdn", fqdn) is None:
            return name, fqdn
    shown = repr(names[0]) if len(names) == 1 else f"{names[0]!r} .. {names[-1]!r}"
    raise ConflictError(f"enrollment token {token_id!r}: no free name: all {len(names)} "
                        f"candidate name(s) ({shown}) in {domain!r} are taken")


def _policy_json(policy: Any) -> str:
    if not isinstance(policy, dict):
        raise StoreError(f"policy must be a dict, not {type(policy).__name__}")
    try:
        return json.dumps(policy, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"policy cannot be stored as JSON: {e}") from None


# --- Schema versions, shared by both engines ------------------------------------

def pending_migrations(steps: tuple[tuple[int, tuple[str, ...]], ...], version: int, *,
                       upgrade: bool, where: str) -> list[tuple[int, tuple[str, ...]]]:
    """The migration steps to run on a database at ``version``, in order.

    An empty database (version 0) is always created: starting the cloud on a
    new database needs no extra command. An existing database older than this
    program is changed only with ``upgrade`` (``cyphonic-cloud db upgrade``),
    so a new binary never rewrites the schema under instances still running the
    old one. A newer database is refused.
    """
    latest = steps[-1][0]
    if [v for v, _ in steps] != list(range(1, latest + 1)):
        raise AssertionError("migration steps must be numbered 1, 2, 3, ... without gaps")
    if version > latest:
        raise StoreError(f"{where}: schema version {version} is newer than this program "
                         f"understands ({latest}); upgrade cyphonic")
    if 0 < version < latest and not upgrade:
        raise StoreError(f"{where}: schema version {version} is older than this program's "
                         f"({latest}); run `cyphonic-cloud db upgrade` first")
    return [(v, stmts) for v, stmts in steps if v > version]


def is_postgres_url(database: str) -> bool:
    """True when ``database`` names a PostgreSQL (or CockroachDB) server, not a file."""
    return database.startswith(("postgresql://", "postgres://"))


def open_store(database: str | os.PathLike[str], *, upgrade: bool = False) -> "Store":
    """The store for a ``database`` setting: a ``postgresql://`` URL or an SQLite file path."""
    if isinstance(database, str) and is_postgres_url(database):
        try:
            from .store_postgres import PostgresStore   # psycopg only where it is used
        except ImportError as e:
            raise StoreError(f"{e} (needed for database = \"postgresql://...\")") from e
        return PostgresStore(database, upgrade=upgrade)
    return SQLiteStore(database, upgrade=upgrade)


# --- SQLite --------------------------------------------------------------------

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS counters (
        name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS tokens (
        token_id TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL,
        name TEXT NOT NULL,
        groups TEXT NOT NULL,
        reusable INTEGER NOT NULL,
        expires_at REAL,
        created_at REAL NOT NULL,
        used_at REAL,
        uses INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS identities (
        static_public BLOB PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        fqdn TEXT NOT NULL UNIQUE,
        vip4 TEXT NOT NULL UNIQUE,
        vip4_int INTEGER NOT NULL UNIQUE,
        groups TEXT NOT NULL,
        created_at REAL NOT NULL,
        serial INTEGER NOT NULL,
        cert_not_after REAL NOT NULL,
        revoked INTEGER NOT NULL,
        revoked_at REAL,
        token_id TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS issued_serials (
        serial INTEGER PRIMARY KEY,
        static_public BLOB NOT NULL REFERENCES identities(static_public),
        not_after REAL NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS issued_serials_by_key ON issued_serials(static_public)""",
    """CREATE TABLE IF NOT EXISTS revoked_serials (
        serial INTEGER PRIMARY KEY,
        static_public BLOB NOT NULL,
        revoked_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS policy (
        id INTEGER PRIMARY KEY CHECK (id = 1), document TEXT NOT NULL)""",
)

# Ordered steps: (version it leaves the database at, statements). Step 1 creates the schema;
# a later change appends a step and raises SCHEMA_VERSION, never edits an older step.
_SQLITE_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, _SCHEMA),
    (2, SQLITE_STEP_2),          # the runtime tables of several instances (store_runtime)
)

_TOKEN_COLS = "token_id, secret_hash, name, groups, reusable, expires_at, created_at, used_at, uses"
_IDENTITY_COLS = ("static_public, name, fqdn, vip4, groups, created_at, serial, "
                  "cert_not_after, revoked, token_id")


def _token_from_row(row: tuple) -> TokenRecord:
    tid, sh, name, groups, reusable, exp, created, used, uses = row
    return TokenRecord(tid, bytes(sh), name, tuple(json.loads(groups)), bool(reusable),
                       exp, created, used, uses)


def _identity_from_row(row: tuple) -> Identity:
    sp, name, fqdn, vip4, groups, created, serial, not_after, revoked, tid = row
    return Identity(bytes(sp), name, fqdn, vip4, tuple(json.loads(groups)), created,
                    serial, not_after, bool(revoked), tid)


def _rollback(db: sqlite3.Connection) -> None:
    """End an open transaction without committing; a failure to do so changes nothing."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


# --- The SQL both engines share -------------------------------------------------

class _SqlStore(_RuntimeSql):
    """The store's SQL, written once for both engines (``SQLiteStore``, ``PostgresStore``).

    Statements use sqlite3's ``?`` placeholders; ``_q`` turns them into the
    engine's own (no SQL text here contains a literal ``?``). An engine class
    provides the rest:

    - ``_write(body)`` / ``_read(body)``: run ``body(cur)`` in one write (write
      lock taken up front) or read transaction and return what it returns;
    - ``_flag(b)``: a boolean as the engine stores it (SQLite 0/1, PostgreSQL BOOLEAN);
    - schema creation and migrations, connections, ``close``.
    """

    _OWN_META_KEYS: tuple[str, ...] = ()   # meta keys the store keeps for itself

    def _q(self, sql: str) -> str:
        return sql

    def _flag(self, value: bool) -> Any:
        return int(value)

    def _write(self, body: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def _read(self, body: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def _read1(self, body: Callable[[Any], Any]) -> Any:
        """A read of one statement (no snapshot across statements needed); engines may run it
        cheaper than ``_read``."""
        return self._read(body)

    def _exec(self, cur: Any, sql: str, params: tuple = ()) -> Any:
        return cur.execute(self._q(sql), params)

    # meta

    def get_meta(self, key: str) -> str | None:
        _check_str(key, "meta key")
        row = self._read1(lambda cur: self._exec(
            cur, "SELECT value FROM meta WHERE key = ?", (key,)).fetchone())
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        _check_str(key, "meta key")
        _check_str(value, f"meta value for {key!r}", empty_ok=True)
        if key in self._OWN_META_KEYS:
            raise StoreError(f"meta key {key!r} is the store's own; "
                             "use `cyphonic-cloud db upgrade`")
        self._write(lambda cur: self._exec(
            cur, "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value)))

    # tokens

    def add_token(self, rec: TokenRecord) -> None:
        rec = _normalize_token(rec)

        def body(cur: Any) -> None:
            if self._exec(cur, "SELECT 1 FROM tokens WHERE token_id = ?",
                          (rec.token_id,)).fetchone():
                raise ConflictError(f"token {rec.token_id!r} already exists")
            self._exec(cur, f"INSERT INTO tokens ({_TOKEN_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                       (rec.token_id, rec.secret_hash, rec.name, json.dumps(rec.groups),
                        self._flag(rec.reusable), rec.expires_at, rec.created_at, rec.used_at,
                        rec.uses))
        self._write(body)

    def _get_token(self, cur: Any, token_id: str) -> TokenRecord | None:
        row = self._exec(cur, f"SELECT {_TOKEN_COLS} FROM tokens WHERE token_id = ?",
                         (token_id,)).fetchone()
        return None if row is None else _token_from_row(row)

    def _spend_token(self, cur: Any, rec: TokenRecord) -> None:
        self._exec(cur, "UPDATE tokens SET used_at = ?, uses = ? WHERE token_id = ?",
                   (rec.used_at, rec.uses, rec.token_id))

    def get_token(self, token_id: str) -> TokenRecord | None:
        _check_str(token_id, "token_id")
        return self._read1(lambda cur: self._get_token(cur, token_id))

    def consume_token(self, token_id: str, now: float) -> TokenRecord:
        _check_str(token_id, "token_id")
        now = _check_time(now, "now")  # type: ignore[assignment]

        def body(cur: Any) -> TokenRecord:
            rec = _consume(self._get_token(cur, token_id), token_id, now)
            self._spend_token(cur, rec)
            return rec
        return self._write(body)

    def list_tokens(self) -> list[TokenRecord]:
        rows = self._read1(lambda cur: self._exec(
            cur, f"SELECT {_TOKEN_COLS} FROM tokens ORDER BY created_at, token_id").fetchall())
        return [_token_from_row(r) for r in rows]

    def delete_token(self, token_id: str) -> None:
        _check_str(token_id, "token_id")

        def body(cur: Any) -> None:
            if self._exec(cur, "DELETE FROM tokens WHERE token_id = ?",
                          (token_id,)).rowcount == 0:
                raise NotFoundError(f"token {token_id!r} does not exist")
        self._write(body)

    # identities

    def _identity_where(self, cur: Any, column: str, value: Any) -> Identity | None:
        assert column in ("static_public", "name", "fqdn", "vip4")
        row = self._exec(cur, f"SELECT {_IDENTITY_COLS} FROM identities WHERE {column} = ?",
                         (value,)).fetchone()
        return None if row is None else _identity_from_row(row)

    def _insert_identity(self, cur: Any, new: _NewIdentity, name: str, fqdn: str, *,
                         checked: bool = False) -> Identity:
        """Allocate the lowest free address and insert the identity, in ``cur``'s transaction.
        ``checked``: the key, name and FQDN were found free in this transaction already
        (``_pick_name``, under the write lock); the UNIQUE constraints stay the last word."""
        if not checked:
            _check_unique(lambda col, v: self._identity_where(cur, col, v),
                          new.static_public, name, fqdn)

        def used(c: int) -> bool:
            return self._exec(cur, "SELECT 1 FROM identities WHERE vip4_int = ?",
                              (c,)).fetchone() is not None

        def end_of_run(c: int) -> int:
            return self._exec(
                cur, "SELECT MIN(i.vip4_int) + 1 FROM identities i WHERE i.vip4_int >= ? "
                "AND NOT EXISTS (SELECT 1 FROM identities j WHERE j.vip4_int = i.vip4_int + 1)",
                (c,)).fetchone()[0]

        vip4 = _lowest_free(new.first, new.last, new.reserved, used, end_of_run, new.prefix)
        ident = new.identity(name, fqdn, vip4)
        self._exec(
            cur, "INSERT INTO identities (static_public, name, fqdn, vip4, vip4_int, groups, "
            "created_at, serial, cert_not_after, revoked, revoked_at, token_id) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (ident.static_public, name, fqdn, vip4, int(ipaddress.IPv4Address(vip4)),
             json.dumps(ident.groups), ident.created_at, 0, 0.0, self._flag(False), None,
             ident.token_id))
        return ident

    def create_identity(self, static_public: bytes, name: str, fqdn: str,
                        groups: tuple[str, ...], token_id: str, now: float,
                        prefix: ipaddress.IPv4Network, reserved: set[str]) -> Identity:
        new = _check_new_identity(static_public, groups, token_id, now, prefix, reserved)
        _check_str(name, "name")
        _check_str(fqdn, "fqdn")
        return self._write(lambda cur: self._insert_identity(cur, new, name, fqdn))

    def enroll(self, token_id: str, static_public: bytes, names: list[str], domain: str,
               now: float, prefix: ipaddress.IPv4Network,
               reserved: set[str]) -> tuple[Identity, TokenRecord]:
        _check_str(token_id, "token_id")
        new = _check_new_identity(static_public, (), token_id, now, prefix, reserved)
        names = _check_candidates(names, domain)

        def body(cur: Any) -> tuple[Identity, TokenRecord]:
            rec = _consume(self._get_token(cur, token_id), token_id, new.now)
            name, fqdn = _pick_name(lambda col, v: self._identity_where(cur, col, v),
                                    token_id, new.static_public, names, domain)
            ident = self._insert_identity(cur, replace(new, groups=rec.groups), name, fqdn, checked=True)
            self._spend_token(cur, rec)
            return ident, rec
        return self._write(body)

    def get_identity(self, static_public: bytes) -> Identity | None:
        static_public = _check_static(static_public)
        return self._read1(lambda cur: self._identity_where(cur, "static_public", static_public))

    def get_identity_by_name(self, name: str) -> Identity | None:
        _check_str(name, "name")
        return self._read1(lambda cur: self._identity_where(cur, "name", name))

    def get_identity_by_fqdn(self, fqdn: str) -> Identity | None:
        _check_str(fqdn, "fqdn")
        return self._read1(lambda cur: self._identity_where(cur, "fqdn", fqdn))

    def get_identity_by_vip(self, vip4: str) -> Identity | None:
        _check_str(vip4, "vip4")
        return self._read1(lambda cur: self._identity_where(cur, "vip4", vip4))

    def list_identities(self) -> list[Identity]:
        rows = self._read1(lambda cur: self._exec(
            cur, f"SELECT {_IDENTITY_COLS} FROM identities ORDER BY vip4_int").fetchall())
        return [_identity_from_row(r) for r in rows]

    # serials and certificates

    def _next_serial(self, cur: Any) -> int:
        row = self._exec(cur, "SELECT value FROM counters WHERE name = 'serial'").fetchone()
        highest = self._exec(cur, "SELECT MAX(serial) FROM issued_serials").fetchone()[0]
        serial = max(row[0] if row else 0, highest or 0) + 1
        self._exec(cur, "INSERT INTO counters (name, value) VALUES ('serial', ?) "
                   "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (serial,))
        return serial

    def next_serial(self) -> int:
        return self._write(self._next_serial)

    def issue_serial(self, static_public: bytes, not_after: float) -> int:
        """``next_serial`` and ``set_certificate`` in one transaction (one commit per login):
        the serial is recorded as the identity's before its certificate is signed."""
        static_public = _check_static(static_public)
        not_after = _check_time(not_after, "not_after")  # type: ignore[assignment]

        def body(cur: Any) -> int:
            serial = self._next_serial(cur)
            self._set_certificate(cur, static_public, serial, not_after)
            return serial
        return self._write(body)

    def set_certificate(self, static_public: bytes, serial: int, not_after: float) -> None:
        static_public = _check_static(static_public)
        serial = _check_serial(serial)
        not_after = _check_time(not_after, "not_after")  # type: ignore[assignment]
        self._write(lambda cur: self._set_certificate(cur, static_public, serial, not_after))

    def _set_certificate(self, cur: Any, static_public: bytes, serial: int, not_after: float) -> None:
        ident = self._identity_where(cur, "static_public", static_public)
        row = self._exec(cur, "SELECT static_public FROM issued_serials WHERE serial = ?",
                         (serial,)).fetchone()
        revoked = self._exec(cur, "SELECT 1 FROM revoked_serials WHERE serial = ?",
                             (serial,)).fetchone() is not None
        _check_certificate(ident, static_public, serial,
                           None if row is None else bytes(row[0]), revoked)
        self._exec(cur, "INSERT INTO issued_serials (serial, static_public, not_after) "
                   "VALUES (?,?,?) ON CONFLICT (serial) DO UPDATE SET not_after = "
                   "excluded.not_after", (serial, static_public, not_after))
        self._exec(cur, "UPDATE identities SET serial = ?, cert_not_after = ? "
                   "WHERE static_public = ?", (serial, not_after, static_public))

    # revocation

    def revoke(self, name: str, now: float) -> Identity:
        _check_str(name, "name")
        now = _check_time(now, "now")  # type: ignore[assignment]

        def body(cur: Any) -> Identity:
            ident = self._identity_where(cur, "name", name)
            if ident is None:
                raise NotFoundError(f"no identity named {name!r}")
            serials = {r[0] for r in self._exec(
                cur, "SELECT serial FROM issued_serials WHERE static_public = ?",
                (ident.static_public,)).fetchall()}
            if ident.serial:
                serials.add(ident.serial)
            for s in sorted(serials):
                self._exec(cur, "INSERT INTO revoked_serials (serial, static_public, revoked_at) "
                           "VALUES (?,?,?) ON CONFLICT (serial) DO NOTHING",
                           (s, ident.static_public, now))
            self._exec(cur, "UPDATE identities SET revoked = ?, "
                       "revoked_at = COALESCE(revoked_at, ?) WHERE static_public = ?",
                       (self._flag(True), now, ident.static_public))
            return replace(ident, revoked=True)
        return self._write(body)

    def revoked_serials(self) -> set[int]:
        rows = self._read1(lambda cur: self._exec(
            cur, "SELECT serial FROM revoked_serials").fetchall())
        return {r[0] for r in rows}

    # policy

    def get_policy(self) -> dict | None:
        row = self._read1(lambda cur: self._exec(
            cur, "SELECT document FROM policy WHERE id = 1").fetchone())
        return None if row is None else json.loads(row[0])

    def set_policy(self, policy: dict) -> None:
        doc = _policy_json(policy)
        self._write(lambda cur: self._exec(
            cur, "INSERT INTO policy (id, document) VALUES (1, ?) "
            "ON CONFLICT (id) DO UPDATE SET document = excluded.document", (doc,)))


# --- SQLite: the file, transactions, schema ------------------------------------

class SQLiteStore(_SqlStore):
    """The store in one SQLite file; several processes may open the same file."""

    def __init__(self, path: str | os.PathLike[str], *,
                 busy_timeout_s: float = BUSY_TIMEOUT_S, upgrade: bool = False) -> None:
        self.path = os.fspath(path)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        try:
            if not os.path.exists(self.path):
                # Create it private: it holds token hashes and the node inventory.
                # SQLite gives the -wal and -shm files the same permissions.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            else:
                # SQLite takes a file shorter than its header for an empty database
                # and would silently start over; a truncated file is refused here.
                with open(self.path, "rb") as f:
                    head = f.read(len(SQLITE_MAGIC))
                if head and head != SQLITE_MAGIC:
                    raise StoreError(f"{self.path}: not a usable cyphonic-cloud database: "
                                     "not an SQLite file (corrupt or truncated?)")
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s,
                                       isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{self.path}: cannot open the database: {e}") from e
        try:
            self._open(busy_timeout_s, upgrade)
        except BaseException as e:
            self._db.close()
            self._db = None
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"{self.path}: not a usable cyphonic-cloud database: {e}") from e
            raise

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def _open(self, busy_timeout_s: float, upgrade: bool) -> None:
        db = self._db
        assert db is not None
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        # The first read of the header: garbage fails here with "file is not a database".
        version = db.execute("PRAGMA user_version").fetchone()[0]
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if app_id not in (0, APPLICATION_ID):
            raise StoreError(f"{self.path}: not a cyphonic-cloud database "
                             f"(application_id {app_id:#x})")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is newer than this "
                             f"program understands ({SCHEMA_VERSION}); upgrade cyphonic")
        mode = self._enable_wal(busy_timeout_s)
        if mode != "wal":
            raise StoreError(f"{self.path}: cannot use the WAL journal (got {mode!r})")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreError(f"{self.path}: database is corrupt: {check}")
        self.schema_version_found = version
        if version < SCHEMA_VERSION:
            with self._write_txn() as cur:
                # Another process may have created it while we waited for the lock.
                version = cur.execute("PRAGMA user_version").fetchone()[0]
                self.schema_version_found = version
                if version > SCHEMA_VERSION:
                    raise StoreError(f"{self.path}: schema version {version} is newer than "
                                     f"this program understands ({SCHEMA_VERSION})")
                for step_version, statements in pending_migrations(
                        _SQLITE_MIGRATIONS, version, upgrade=upgrade, where=self.path):
                    for stmt in statements:
                        cur.execute(stmt)
                    cur.execute(f"PRAGMA user_version = {step_version}")
                cur.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _enable_wal(self, busy_timeout_s: float) -> str:
        """Switch the file to WAL (persistent, so once is enough) and return the mode.

        Changing the journal mode needs an exclusive lock and SQLite does not
        call the busy handler for it: when another process is opening the same
        new file at this moment we retry here, within the busy timeout.
        """
        db = self._db
        assert db is not None
        deadline = time.monotonic() + busy_timeout_s
        delay = 0.005
        while True:
            mode = str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode == "wal":
                return mode
            try:
                return str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    # Transactions. Every public method is exactly one of these.

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"{self.path}: store is closed")
        return self._db

    @contextlib.contextmanager
    def _write_txn(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction, taking the database's write lock up front."""
        with self._lock:
            db = self._conn()
            try:
                cur = db.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    _rollback(db)
                    raise
                cur.execute("COMMIT")
            except StoreError:
                raise
            except sqlite3.IntegrityError as e:
                raise ConflictError(f"{self.path}: {e}") from e
            except sqlite3.Error as e:
                _rollback(db)
                raise StoreError(f"{self.path}: {e}") from e

    @contextlib.contextmanager
    def _read_txn(self) -> Iterator[sqlite3.Cursor]:
        """One read transaction: a consistent snapshot for several statements."""
        with self._lock:
            db = self._conn()
            try:
                cur = db.cursor()
                cur.execute("BEGIN")
                try:
                    yield cur
                finally:
                    _rollback(db)
            except StoreError:
                raise
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: {e}") from e

    def _write(self, body: Callable[[sqlite3.Cursor], Any]) -> Any:
        with self._write_txn() as cur:
            return body(cur)

    def _read(self, body: Callable[[sqlite3.Cursor], Any]) -> Any:
        with self._read_txn() as cur:
            return body(cur)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _check_unique(lookup: Callable[[str, Any], Identity | None],
                  static_public: bytes, name: str, fqdn: str) -> None:
    """Raise ConflictError naming the first of static key, name, FQDN already enrolled."""
    if (other := lookup("static_public", static_public)) is not None:
        raise ConflictError(f"static key {static_public.hex()} is already enrolled "
                            f"as {other.name!r}")
    if lookup("name", name) is not None:
        raise ConflictError(f"name {name!r} is already taken")
    if lookup("fqdn", fqdn) is not None:
        raise ConflictError(f"fqdn {fqdn!r} is already taken")


def _check_certificate(ident: Identity | None, static_public: bytes, serial: int,
                       issued_to: bytes | None, serial_revoked: bool) -> None:
    if ident is None:
        raise NotFoundError(f"no identity with static key {static_public.hex()}")
    if ident.revoked:
        raise StoreError(f"identity {ident.name!r} is revoked: no new certificate")
    if issued_to is not None and issued_to != static_public:
        raise ConflictError(f"serial {serial} was already issued to another identity")
    if serial_revoked:
        raise ConflictError(f"serial {serial} is revoked")


# --- Memory --------------------------------------------------------------------

class MemoryStore(_RuntimeMemory):
    """The store in dicts: the same behaviour as ``SQLiteStore``, gone at exit."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self._meta: dict[str, str] = {}
        self._tokens: dict[str, TokenRecord] = {}
        self._identities: dict[bytes, Identity] = {}
        self._used_vips: set[int] = set()
        self._serial = 0
        self._issued: dict[int, tuple[bytes, float]] = {}   # serial -> (static key, not_after)
        self._revoked: set[int] = set()
        self._policy: str | None = None
        self._runtime_init()

    def __repr__(self) -> str:
        return "MemoryStore()"

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise StoreError("memory store is closed")
            yield

    def get_meta(self, key: str) -> str | None:
        _check_str(key, "meta key")
        with self._txn():
            return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        _check_str(key, "meta key")
        _check_str(value, f"meta value for {key!r}", empty_ok=True)
        with self._txn():
            self._meta[key] = value

    def add_token(self, rec: TokenRecord) -> None:
        rec = _normalize_token(rec)
        with self._txn():
            if rec.token_id in self._tokens:
                raise ConflictError(f"token {rec.token_id!r} already exists")
            self._tokens[rec.token_id] = rec

    def get_token(self, token_id: str) -> TokenRecord | None:
        _check_str(token_id, "token_id")
        with self._txn():
            return self._tokens.get(token_id)

    def consume_token(self, token_id: str, now: float) -> TokenRecord:
        _check_str(token_id, "token_id")
        now = _check_time(now, "now")  # type: ignore[assignment]
        with self._txn():
            rec = _consume(self._tokens.get(token_id), token_id, now)
            self._tokens[token_id] = rec
            return rec

    def list_tokens(self) -> list[TokenRecord]:
        with self._txn():
            return sorted(self._tokens.values(), key=lambda t: (t.created_at, t.token_id))

    def delete_token(self, token_id: str) -> None:
        _check_str(token_id, "token_id")
        with self._txn():
            if self._tokens.pop(token_id, None) is None:
                raise NotFoundError(f"token {token_id!r} does not exist")

    def _find(self, attr: str, value: Any) -> Identity | None:
        if attr == "static_public":
            return self._identities.get(value)
        return next((i for i in self._identities.values() if getattr(i, attr) == value), None)

    def _insert_identity(self, new: _NewIdentity, name: str, fqdn: str) -> Identity:
        """Allocate the lowest free address and add the identity; the caller holds the lock.

        Nothing changes until every check has passed, so a failure leaves no trace.
        """
        _check_unique(self._find, new.static_public, name, fqdn)

        def end_of_run(c: int) -> int:
            while c in self._used_vips:
                c += 1
            return c

        vip4 = _lowest_free(new.first, new.last, new.reserved, self._used_vips.__contains__,
                            end_of_run, new.prefix)
        ident = new.identity(name, fqdn, vip4)
        self._identities[ident.static_public] = ident
        self._used_vips.add(int(ipaddress.IPv4Address(vip4)))
        return ident

    def create_identity(self, static_public: bytes, name: str, fqdn: str,
                        groups: tuple[str, ...], token_id: str, now: float,
                        prefix: ipaddress.IPv4Network, reserved: set[str]) -> Identity:
        new = _check_new_identity(static_public, groups, token_id, now, prefix, reserved)
        _check_str(name, "name")
        _check_str(fqdn, "fqdn")
        with self._txn():
            return self._insert_identity(new, name, fqdn)

    def enroll(self, token_id: str, static_public: bytes, names: list[str], domain: str,
               now: float, prefix: ipaddress.IPv4Network,
               reserved: set[str]) -> tuple[Identity, TokenRecord]:
        _check_str(token_id, "token_id")
        new = _check_new_identity(static_public, (), token_id, now, prefix, reserved)
        names = _check_candidates(names, domain)
        with self._txn():
            rec = _consume(self._tokens.get(token_id), token_id, new.now)
            name, fqdn = _pick_name(self._find, token_id, new.static_public, names, domain)
            # Allocation, the last step that can fail, comes before the token is spent.
            ident = self._insert_identity(replace(new, groups=rec.groups), name, fqdn)
            self._tokens[token_id] = rec
            return ident, rec

    def get_identity(self, static_public: bytes) -> Identity | None:
        static_public = _check_static(static_public)
        with self._txn():
            return self._identities.get(static_public)

    def get_identity_by_name(self, name: str) -> Identity | None:
        _check_str(name, "name")
        with self._txn():
            return self._find("name", name)

    def get_identity_by_fqdn(self, fqdn: str) -> Identity | None:
        _check_str(fqdn, "fqdn")
        with self._txn():
            return self._find("fqdn", fqdn)

    def get_identity_by_vip(self, vip4: str) -> Identity | None:
        _check_str(vip4, "vip4")
        with self._txn():
            return self._find("vip4", vip4)

    def list_identities(self) -> list[Identity]:
        with self._txn():
            return sorted(self._identities.values(),
                          key=lambda i: int(ipaddress.IPv4Address(i.vip4)))

    def next_serial(self) -> int:
        with self._txn():
            self._serial = max(self._serial, max(self._issued, default=0)) + 1
            return self._serial

    def issue_serial(self, static_public: bytes, not_after: float) -> int:
        static_public = _check_static(static_public)
        not_after = _check_time(not_after, "not_after")  # type: ignore[assignment]
        with self._txn():
            ident = self._identities.get(static_public)
            _check_certificate(ident, static_public, self._serial + 1, None, False)
            serial = self.next_serial()
            self.set_certificate(static_public, serial, not_after)
            return serial

    def set_certificate(self, static_public: bytes, serial: int, not_after: float) -> None:
        static_public = _check_static(static_public)
        serial = _check_serial(serial)
        not_after = _check_time(not_after, "not_after")  # type: ignore[assignment]
        with self._txn():
            ident = self._identities.get(static_public)
            issued = self._issued.get(serial)
            _check_certificate(ident, static_public, serial,
                               None if issued is None else issued[0], serial in self._revoked)
            assert ident is not None
            self._issued[serial] = (static_public, not_after)
            self._identities[static_public] = replace(ident, serial=serial,
                                                      cert_not_after=not_after)

    def revoke(self, name: str, now: float) -> Identity:
        _check_str(name, "name")
        _check_time(now, "now")
        with self._txn():
            ident = self._find("name", name)
            if ident is None:
                raise NotFoundError(f"no identity named {name!r}")
            serials = {s for s, (key, _) in self._issued.items() if key == ident.static_public}
            if ident.serial:
                serials.add(ident.serial)
            self._revoked |= serials
            ident = replace(ident, revoked=True)
            self._identities[ident.static_public] = ident
            return ident

    def revoked_serials(self) -> set[int]:
        with self._txn():
            return set(self._revoked)

    def get_policy(self) -> dict | None:
        with self._txn():
            return None if self._policy is None else json.loads(self._policy)

    def set_policy(self, policy: dict) -> None:
        doc = _policy_json(policy)
        with self._txn():
            self._policy = doc

    def close(self) -> None:
        with self._lock:
            self._closed = True
