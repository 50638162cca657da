"""The cloud's persistent state on PostgreSQL: ``PostgresStore``, the ``Store`` protocol.

The same behaviour as ``SQLiteStore`` (the shared store tests run against
both), on a server that several cloud processes and hosts can share:

- Every write is one transaction that first locks one row (``counters``,
  name ``write_lock``, ``SELECT ... FOR UPDATE``): writers take turns exactly
  as ``BEGIN IMMEDIATE`` makes them take turns on an SQLite file, so a
  one-time token is spent once and no two enrollments get the same virtual
  address, name, FQDN or serial, whichever connection or host they come from.
  Transactions run at READ COMMITTED, so every statement after the lock sees
  what the previous writer committed. The UNIQUE constraints stay as the last
  line of defence (a violation is a ``ConflictError``).
- A serialization failure or deadlock (CockroachDB runs SERIALIZABLE and asks
  clients to retry) is retried a few times, then reported as ``StoreError``.
- A lost or unreachable server is a ``StoreError`` within ``connect_timeout``
  / ``statement_timeout``, never a hang; the next call reconnects. A
  connection that died while the store was idle (a server restart) is found
  at BEGIN and replaced once, so the first call after a restart works.
- The schema version lives in ``meta`` under ``schema_version``; migration
  steps are ordered (``_PG_MIGRATIONS``) and applied under an advisory lock.

The SQL is kept to what CockroachDB also speaks (``docs/cloud.md`` lists
what differs). Messages name the server as host/port/database, never the
password.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict
except ImportError as _e:  # pragma: no cover - depends on the installation
    raise ImportError("the PostgreSQL store needs psycopg: pip install 'cyphonic[cloud]'") from _e

from .store import SCHEMA_VERSION, ConflictError, StoreError, _SqlStore, pending_migrations
from . import store_runtime
from .store_runtime import BUS_CHANNEL, POSTGRES_STEP_2

__all__ = ["PostgresStore", "CONNECT_TIMEOUT_S", "STATEMENT_TIMEOUT_S"]

CONNECT_TIMEOUT_S = 5              # give up connecting after this long
STATEMENT_TIMEOUT_S = 10.0         # one statement (a wait for the write lock included)
TCP_USER_TIMEOUT_MS = 15000        # a server that stops acknowledging (not just idle) is given up on
RETRY_ATTEMPTS = 5                 # serialization failures and deadlocks retried this often
MIGRATION_LOCK_KEY = 0x43595048    # pg_advisory_xact_lock key, "CYPH"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS counters (
        name TEXT PRIMARY KEY, value BIGINT NOT NULL)""",
    """INSERT INTO counters (name, value) VALUES ('write_lock', 0)
        ON CONFLICT (name) DO NOTHING""",
    """CREATE TABLE IF NOT EXISTS tokens (
        token_id TEXT PRIMARY KEY,
        secret_hash BYTEA NOT NULL,
        name TEXT NOT NULL,
        groups TEXT NOT NULL,
        reusable BOOLEAN NOT NULL,
        expires_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION,
        uses BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS identities (
        static_public BYTEA PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        fqdn TEXT NOT NULL UNIQUE,
        vip4 TEXT NOT NULL UNIQUE,
        vip4_int BIGINT NOT NULL UNIQUE,
        groups TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        serial BIGINT NOT NULL,
        cert_not_after DOUBLE PRECISION NOT NULL,
        revoked BOOLEAN NOT NULL,
        revoked_at DOUBLE PRECISION,
        token_id TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS issued_serials (
        serial BIGINT PRIMARY KEY,
        static_public BYTEA NOT NULL REFERENCES identities(static_public),
        not_after DOUBLE PRECISION NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS issued_serials_by_key ON issued_serials(static_public)""",
    """CREATE TABLE IF NOT EXISTS revoked_serials (
        serial BIGINT PRIMARY KEY,
        static_public BYTEA NOT NULL,
        revoked_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS policy (
        id INTEGER PRIMARY KEY CHECK (id = 1), document TEXT NOT NULL)""",
)

# Ordered steps, as for SQLite: append a step, raise SCHEMA_VERSION, never edit an old step.
_PG_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, _SCHEMA),
    (2, POSTGRES_STEP_2),        # the runtime tables of several instances (store_runtime)
)
assert _PG_MIGRATIONS[-1][0] == SCHEMA_VERSION

_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
# The server ended the session (shut down, crashed, restarting): the connection is gone.
_SERVER_GONE = (pg_errors.AdminShutdown, pg_errors.CrashShutdown, pg_errors.CannotConnectNow)


def describe_url(url: str) -> str:
    """The server a URL names, for messages: no password, no other parameters."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://<unparsable URL>"
    host = d.get("host") or "localhost"
    port = f":{d['port']}" if d.get("port") else ""
    user = f"{d['user']}@" if d.get("user") else ""
    return f"postgresql://{user}{host}{port}/{d.get('dbname', '')}"


class PostgresStore(_SqlStore):
    """The store in a PostgreSQL database; many processes and hosts may share it.

    The statements are ``_SqlStore``'s; this class adds the connection, the
    transactions (write lock, retries), the schema and its migrations.
    """

    _OWN_META_KEYS = ("schema_version",)   # the schema version lives in meta here

    def __init__(self, url: str, *, upgrade: bool = False,
                 connect_timeout_s: int = CONNECT_TIMEOUT_S,
                 statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        self.url = url
        self.where = describe_url(url)
        self._connect_timeout_s = max(1, int(connect_timeout_s))   # libpq: whole seconds
        self._statement_timeout_ms = max(1, int(statement_timeout_s * 1000))
        self._lock = threading.RLock()
        self._db: psycopg.Connection | None = None
        self._closed = False
        self._notify: bool | None = None
        self._rt: psycopg.Connection | None = None     # the runtime tables' connection (_rt_conn)
        self._migrate(upgrade)
        self.notify_supported    # asked once, outside any other transaction

    def __repr__(self) -> str:
        return f"PostgresStore({self.where!r})"

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s")      # psycopg's placeholder

    def _flag(self, value: bool) -> Any:
        return value                       # BOOLEAN columns; psycopg adapts a Python bool

    # Connections and transactions. Every public method is exactly one transaction.

    def _connect(self, *, runtime: bool = False) -> psycopg.Connection:
        """The store's connection, or with ``runtime`` its second one: autocommit, and commits
        that do not wait for the WAL flush (store_runtime's tables only: none of it needs to
        survive a crash of the database; each flush cost ~1 ms on every cross-instance route)."""
        options = f"-c statement_timeout={self._statement_timeout_ms}"
        if runtime:
            options += " -c synchronous_commit=off"
        try:
            return psycopg.connect(
                self.url, connect_timeout=self._connect_timeout_s, options=options, autocommit=runtime,
                application_name="cyphonic-cloud",
                keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                tcp_user_timeout=TCP_USER_TIMEOUT_MS)
        except psycopg.Error as e:
            raise StoreError(f"{self.where}: cannot connect to the database: "
                             f"{str(e).strip()}") from e

    def _conn(self) -> psycopg.Connection:
        return self._live("_db", runtime=False)

    def _rt_conn(self) -> psycopg.Connection:
        return self._live("_rt", runtime=True)

    def _live(self, attr: str, *, runtime: bool) -> psycopg.Connection:
        """The connection kept in ``attr``, (re)connected if it is missing, closed or broken."""
        if self._closed:
            raise StoreError(f"{self.where}: store is closed")
        db = getattr(self, attr)
        if db is None or db.closed or db.broken:
            if db is not None:
                with contextlib.suppress(Exception):
                    db.close()
            setattr(self, attr, None)
            db = self._connect(runtime=runtime)
            if not runtime:
                db.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            setattr(self, attr, db)
        return db

    @contextlib.contextmanager
    def _txn(self, *, write: bool) -> Iterator[psycopg.Cursor]:
        """One transaction; a write one holds the write lock from its first statement."""
        with self._lock, self._errors():
            with contextlib.ExitStack() as stack:
                db = self._begin(stack)
                cur = db.cursor()
                if write:
                    cur.execute("SELECT value FROM counters WHERE name = 'write_lock' "
                                "FOR UPDATE")
                yield cur

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """psycopg's errors as the store's: a conflict, the database away, or what it said."""
        try:
            yield
        except StoreError:
            raise
        except pg_errors.UniqueViolation as e:
            raise ConflictError(f"{self.where}: {_first_line(e)}") from e
        except psycopg.OperationalError as e:
            # Connection lost, server shut down, statement or lock timeout.
            raise StoreError(f"{self.where}: database unavailable: {_first_line(e)}") from e
        except psycopg.Error as e:
            raise StoreError(f"{self.where}: {_first_line(e)}") from e

    def _read1(self, body):
        """A read of one statement, in autocommit on the second connection: one round trip
        instead of three (BEGIN, the query, COMMIT). A read is idempotent, so a connection found
        dead (the server restarted while we were idle) is replaced and the read tried again."""
        with self._lock, self._errors():
            for attempt in (0, 1):
                db = self._rt_conn()
                try:
                    return body(db.cursor())
                except psycopg.OperationalError:
                    if attempt or not (db.closed or db.broken):
                        raise
        raise AssertionError("unreachable")

    def _begin(self, stack: contextlib.ExitStack) -> psycopg.Connection:
        """A connection with a transaction begun on it (ended by ``stack``).

        A connection that died while the store was idle (the server restarted
        or crashed, a proxy or firewall dropped it) is found by the BEGIN,
        before anything of the caller's ran on it: it is replaced once, so the
        first call after a database restart works. A connection lost later
        (COMMIT included, whose outcome is then unknown) is never retried.
        """
        db = self._conn()
        try:
            stack.enter_context(db.transaction())
        except psycopg.OperationalError as e:
            if not (db.closed or isinstance(e, _SERVER_GONE)):
                raise
            with contextlib.suppress(Exception):
                db.close()
            db = self._conn()              # a new connection, or StoreError "cannot connect"
            stack.enter_context(db.transaction())
        return db

    def _write(self, body):
        """Run ``body(cur)`` in a write transaction, retrying what the server asks to retry."""
        for attempt in range(RETRY_ATTEMPTS):
            try:
                with self._txn(write=True) as cur:
                    return body(cur)
            except StoreError as e:
                if not isinstance(e.__cause__, _RETRYABLE) or attempt == RETRY_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _read(self, body):
        with self._txn(write=False) as cur:
            return body(cur)

    def _write_runtime(self, body, *, single: bool = False):
        """A write to the runtime tables (store_runtime), on the second connection: no write
        lock (registrations and the bus never wait behind an enrollment), no wait for the WAL
        flush, and a ``single`` statement without BEGIN and COMMIT (one round trip)."""
        for attempt in range(RETRY_ATTEMPTS):
            try:
                with self._lock, self._errors():
                    db = self._rt_conn()
                    if single:
                        return body(db.cursor())
                    with db.transaction():
                        return body(db.cursor())
            except StoreError as e:
                if not isinstance(e.__cause__, _RETRYABLE) or attempt == RETRY_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def bus_send(self, target: str, payload: bytes, now: float) -> None:
        """One statement: the insert, its bound, and the NOTIFY (none on CockroachDB)."""
        notify = "SELECT pg_notify(%s, target) FROM ins" if self.notify_supported else "SELECT target FROM ins"
        bound = store_runtime.BUS_MAX_QUEUED
        params = (target, now, bytes(payload), target, bound) + ((BUS_CHANNEL,) if self.notify_supported else ())
        rows = self._write_runtime(lambda cur: cur.execute(
            "WITH ins AS (INSERT INTO bus (target, created, payload) SELECT %s, %s, %s "
            "WHERE (SELECT COUNT(*) FROM bus WHERE target = %s) < %s RETURNING target) " + notify,
            params).fetchall(), single=True)
        if not rows:
            raise StoreError(f"bus to instance {target!r} is full ({bound} messages unread)")

    @property
    def notify_supported(self) -> bool:
        """PostgreSQL has LISTEN/NOTIFY; CockroachDB does not (its instances poll the bus)."""
        if self._notify is None:
            version = self._read(lambda cur: cur.execute("SELECT version()").fetchone()[0])
            self._notify = "cockroachdb" not in str(version).lower()
        return self._notify

    def bus_listener(self) -> "BusListener":
        """A connection of its own that LISTENs on the bus channel (for the I/O edge: watch
        ``fileno()``, then ``drain()`` says whether a message came for anyone)."""
        return BusListener(self)

    def _migrate(self, upgrade: bool) -> None:
        """Create or upgrade the schema, one process at a time (advisory lock)."""
        with self._lock:
            db = self._conn()
            try:
                with db.transaction():
                    cur = db.cursor()
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                    self.schema_version_found = version = self._schema_version(cur)
                    for step_version, statements in pending_migrations(
                            _PG_MIGRATIONS, version, upgrade=upgrade, where=self.where):
                        for stmt in statements:
                            cur.execute(stmt)
                        cur.execute("INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                    (str(step_version),))
            except StoreError:
                self.close()
                raise
            except psycopg.Error as e:
                self.close()
                raise StoreError(f"{self.where}: cannot set up the schema: "
                                 f"{_first_line(e)}") from e

    def _schema_version(self, cur: psycopg.Cursor) -> int:
        cur.execute("SELECT COUNT(*) FROM information_schema.tables "
                    "WHERE table_schema = current_schema() AND table_name = 'meta'")
        if cur.fetchone()[0] == 0:
            cur.execute("SELECT COUNT(*) FROM information_schema.tables "
                        "WHERE table_schema = current_schema()")
            if cur.fetchone()[0]:
                raise StoreError(f"{self.where}: not a cyphonic-cloud database (it has tables "
                                 "but no meta table); use an empty database")
            return 0
        cur.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        row = cur.fetchone()
        if row is None or not row[0].isdigit():
            raise StoreError(f"{self.where}: not a cyphonic-cloud database "
                             f"(schema_version {None if row is None else row[0]!r})")
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for db in (self._db, self._rt):
                if db is not None:
                    with contextlib.suppress(Exception):
                        db.close()
            self._db = self._rt = None


class BusListener:
    """LISTEN on the bus channel on a separate autocommit connection. ``drain()`` never raises:
    a lost connection makes it report True (read the bus now, in case) and reconnect on the next
    ``reconnect()``; the edge polls meanwhile."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.conn: psycopg.Connection | None = None
        self.error = ""
        self.reconnect()

    def reconnect(self) -> bool:
        self.close()
        if not self.store.notify_supported:
            self.error = "the server has no LISTEN/NOTIFY (CockroachDB)"
            return False
        try:
            self.conn = psycopg.connect(self.store.url, autocommit=True,
                                        connect_timeout=self.store._connect_timeout_s,
                                        application_name="cyphonic-cloud-bus",
                                        keepalives=1, keepalives_idle=5, keepalives_interval=2,
                                        keepalives_count=3, tcp_user_timeout=TCP_USER_TIMEOUT_MS)
            self.conn.execute(f"LISTEN {BUS_CHANNEL}")
            self.error = ""
            return True
        except psycopg.Error as e:
            self.conn = None
            self.error = _first_line(e)
            return False

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed and not self.conn.broken

    def fileno(self) -> int:
        return self.conn.pgconn.socket if self.conn is not None else -1

    def drain(self, target: str) -> bool:
        """Take every pending notification; True if one was for ``target`` (every instance
        listens on the one channel; the payload names the instance a message waits for), or if
        the connection broke."""
        if self.conn is None:
            return True
        try:
            got = False
            for n in self.conn.notifies(timeout=0):
                got = got or n.payload == target
            return got
        except psycopg.Error as e:
            self.error = _first_line(e)
            self.close()
            return True

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
