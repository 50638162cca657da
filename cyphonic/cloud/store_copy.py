"""Copy a cloud's persistent state from one database to another (``cyphonic-cloud db copy``).

Issue 13: an existing cloud moves from SQLite to PostgreSQL (or back, or
between two servers) without re-enrolling a node. Every persistent table is
copied row for row, all columns included (``PERSISTENT_TABLES``): meta
(without the keys a store keeps for itself, such as PostgreSQL's
``schema_version``), counters (the certificate serial counter: no serial is
ever issued twice after the move), tokens (hashes only, their uses too),
identities (virtual addresses, revocations), issued and revoked serials, the
policy. The runtime tables (``RUNTIME_TABLES``: instances, registrations, the
bus) are not: they describe processes of the old cloud, and nodes register
again by themselves.

Rules:

- Both databases must be at this program's schema version (an older one:
  ``cyphonic-cloud db upgrade`` first); a new, empty destination gets its
  schema when it is opened. The source must exist: a missing SQLite file is
  an error, never a new empty file.
- The destination holds no cloud yet: every persistent table empty apart from
  the store's own rows, and meta keys only where the source has the same value
  (``init`` run against the new database). Anything else is refused, naming
  what is there; nothing is merged or overwritten.
- The source is read in one read transaction (a consistent snapshot); the
  destination is written in one write transaction (the store's own write lock
  held), row counts are checked before COMMIT: all or nothing.
- Column names come from the source (``SELECT *``), and the destination must
  have the same columns; values are converted by the destination column's
  type (SQLite keeps booleans as 0/1 integers, PostgreSQL as BOOLEAN; BLOB and
  BYTEA both come back as bytes). A table the source has that is in neither
  list is refused: a new persistent table must be added here, not lost.

Never: write to the source, leave a half-copied destination, or copy a
runtime table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .store import SCHEMA_VERSION, SQLiteStore, StoreError, _SqlStore, is_postgres_url, open_store

__all__ = ["PERSISTENT_TABLES", "RUNTIME_TABLES", "CopyReport", "parse_target", "copy_store",
           "copy_database"]

# In insertion order (issued_serials refers to identities).
PERSISTENT_TABLES = ("meta", "counters", "tokens", "identities", "issued_serials",
                     "revoked_serials", "policy")
# Schema version 2 (store_runtime): what running instances share; never copied.
RUNTIME_TABLES = ("instances", "registrations", "bus")

# Rows a store keeps for itself, by table: (key column, values). The destination
# has its own; the source's are not copied.
_OWN_COUNTERS = ("write_lock",)    # PostgresStore's write lock row


@dataclass(frozen=True)
class CopyReport:
    source: str                    # where, as messages name it (no password)
    destination: str
    schema_version: int
    rows: dict[str, int]           # table -> rows copied, in PERSISTENT_TABLES order
    meta_already_there: tuple[str, ...]   # destination meta keys that had the source's value
    not_copied: tuple[str, ...]    # runtime tables the source has


def parse_target(text: str) -> str:
    """A ``db copy`` argument as ``open_store`` takes it: ``sqlite:PATH``, a path or a URL."""
    if not isinstance(text, str) or not text:
        raise StoreError("a database is a path, sqlite:PATH or a postgresql:// URL")
    if is_postgres_url(text):
        return text
    if text.startswith("sqlite:"):
        path = text[len("sqlite:"):]
        if path.startswith("//"):          # sqlite:///abs/path, as in SQLAlchemy URLs
            path = path[2:]
        if not path:
            raise StoreError(f"{text!r}: no path after sqlite:")
        return path
    if "://" in text:
        raise StoreError(f"{text!r}: not a database (use a path, sqlite:PATH or postgresql://...)")
    return text


def _where(store: Any) -> str:
    return store.path if isinstance(store, SQLiteStore) else store.where


def _own_meta_keys(*stores: Any) -> set[str]:
    return {k for s in stores for k in s._OWN_META_KEYS}


def _open(target: str, role: str, *, must_exist: bool) -> _SqlStore:
    if not is_postgres_url(target) and must_exist and not os.path.isfile(target):
        raise StoreError(f"{role} {target}: no such file")
    try:
        store = open_store(target)
    except StoreError as e:
        raise StoreError(f"{role}: {e}") from e
    if not isinstance(store, _SqlStore):   # pragma: no cover - open_store gives SQL stores
        store.close()
        raise StoreError(f"{role}: {store!r} is not an SQL store")
    found = store.schema_version_found     # type: ignore[attr-defined]
    if must_exist and found == 0:
        store.close()
        raise StoreError(f"{role} {_where(store)}: no cyphonic-cloud database in it (it was "
                         "empty); name the database the cloud uses now")
    return store


def _tables(store: _SqlStore, cur: Any) -> set[str]:
    if isinstance(store, SQLiteStore):
        sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    else:
        sql = ("SELECT table_name FROM information_schema.tables "
               "WHERE table_schema = current_schema()")
    return {r[0] for r in store._exec(cur, sql).fetchall()}


def _column_types(store: _SqlStore, cur: Any, table: str) -> dict[str, str]:
    """Column name -> declared type, lower case (SQLite: ``integer``; PostgreSQL: ``boolean``)."""
    if isinstance(store, SQLiteStore):
        rows = store._exec(cur, f"PRAGMA table_info({table})").fetchall()
        return {r[1]: str(r[2]).lower() for r in rows}
    rows = store._exec(cur, "SELECT column_name, data_type FROM information_schema.columns "
                       "WHERE table_schema = current_schema() AND table_name = ?",
                       (table,)).fetchall()
    return {r[0]: str(r[1]).lower() for r in rows}


def _converter(column_type: str):
    """How a value from either engine is written into a column of ``column_type``."""
    if column_type == "boolean":
        return bool                                # SQLite's 0/1
    if column_type in ("bytea", "blob"):
        return bytes                               # memoryview or bytes
    if column_type in ("double precision", "real"):
        return float
    if column_type in ("bigint", "integer", "smallint"):
        return int                                 # PostgreSQL's True/False into SQLite
    return lambda v: v


def _own_row(table: str, row: dict[str, Any], own_meta: set[str]) -> bool:
    return ((table == "meta" and row["key"] in own_meta)
            or (table == "counters" and row["name"] in _OWN_COUNTERS))


def _count(store: _SqlStore, cur: Any, table: str, own_meta: set[str]) -> int:
    """Rows in ``table``, the store's own rows not counted."""
    own = sorted(own_meta) if table == "meta" else _OWN_COUNTERS if table == "counters" else ()
    column = "key" if table == "meta" else "name"
    where = f" WHERE {column} NOT IN ({', '.join('?' * len(own))})" if own else ""
    return store._exec(cur, f"SELECT COUNT(*) FROM {table}{where}", tuple(own)).fetchone()[0]


def _read_source(src: _SqlStore, own_meta: set[str]) -> tuple[dict, tuple[str, ...]]:
    """Every persistent table's (columns, rows), own rows left out, from one snapshot."""
    def body(cur: Any) -> tuple[dict, tuple[str, ...]]:
        tables = _tables(src, cur)
        unknown = tables - set(PERSISTENT_TABLES) - set(RUNTIME_TABLES)
        if unknown:
            raise StoreError(f"source {_where(src)}: table(s) {', '.join(sorted(unknown))} "
                             "unknown to `db copy` (store_copy.PERSISTENT_TABLES or "
                             "RUNTIME_TABLES must name every table)")
        missing = set(PERSISTENT_TABLES) - tables
        if missing:
            raise StoreError(f"source {_where(src)}: table(s) {', '.join(sorted(missing))} "
                             "missing: not a complete cyphonic-cloud database")
        data = {}
        for table in PERSISTENT_TABLES:
            c = src._exec(cur, f"SELECT * FROM {table}")
            columns = tuple(d[0] for d in c.description)
            rows = [dict(zip(columns, r)) for r in c.fetchall()]
            data[table] = (columns, [r for r in rows if not _own_row(table, r, own_meta)])
        return data, tuple(t for t in RUNTIME_TABLES if t in tables)
    return src._read(body)


def _refuse_unless_empty(dst: _SqlStore, cur: Any, data: dict,
                         own_meta: set[str]) -> tuple[str, ...]:
    """Raise StoreError naming what the destination already holds; return agreeing meta keys."""
    there = []
    for table in PERSISTENT_TABLES:
        if table == "meta":
            continue
        n = _count(dst, cur, table, own_meta)
        if n:
            there.append(f"{n} row(s) in {table}")
    source_meta = {r["key"]: r["value"] for r in data["meta"][1]}
    agreeing = []
    for k, v in dst._exec(cur, "SELECT key, value FROM meta").fetchall():
        if k in own_meta:
            continue
        if source_meta.get(k) == v:
            agreeing.append(k)
        else:
            there.append(f"meta {k!r} = {v!r} (the source has "
                         f"{source_meta[k]!r})" if k in source_meta else f"meta {k!r} = {v!r}")
    if there:
        raise StoreError(f"destination {_where(dst)} is not empty: {'; '.join(there)}. "
                         "Copy into a new, empty database; nothing was changed")
    return tuple(sorted(agreeing))


def _write_destination(dst: _SqlStore, data: dict, own_meta: set[str]) -> tuple[str, ...]:
    def body(cur: Any) -> tuple[str, ...]:
        agreeing = _refuse_unless_empty(dst, cur, data, own_meta)
        for table in PERSISTENT_TABLES:
            columns, rows = data[table]
            types = _column_types(dst, cur, table)
            if set(types) != set(columns):
                raise StoreError(
                    f"destination {_where(dst)}: table {table} has columns "
                    f"{sorted(types)}, the source {sorted(columns)}")
            if table == "meta":
                rows = [r for r in rows if r["key"] not in agreeing]
            convert = [_converter(types[c]) for c in columns]
            values = [tuple(None if r[c] is None else f(r[c]) for c, f in zip(columns, convert))
                      for r in rows]
            if values:
                cur.executemany(dst._q(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                       f"({', '.join('?' * len(columns))})"), values)
        # Row counts before COMMIT: a difference rolls everything back.
        for table in PERSISTENT_TABLES:
            n = _count(dst, cur, table, own_meta)
            if n != len(data[table][1]):
                raise StoreError(f"destination {_where(dst)}: {table} has {n} row(s) after the "
                                 f"copy, the source {len(data[table][1])}; nothing was changed")
        return agreeing
    return dst._write(body)


def copy_store(src: _SqlStore, dst: _SqlStore) -> CopyReport:
    """Copy every persistent table of ``src`` into the empty ``dst`` (both open, same schema)."""
    for role, store in (("source", src), ("destination", dst)):
        if not isinstance(store, _SqlStore):
            raise StoreError(f"{role} {store!r}: only SQLite and PostgreSQL stores can be copied")
    if (isinstance(src, SQLiteStore) and isinstance(dst, SQLiteStore)
            and os.path.realpath(src.path) == os.path.realpath(dst.path)):
        raise StoreError(f"source and destination are the same file: {src.path}")
    own_meta = _own_meta_keys(src, dst)
    data, not_copied = _read_source(src, own_meta)
    agreeing = _write_destination(dst, data, own_meta)
    return CopyReport(source=_where(src), destination=_where(dst), schema_version=SCHEMA_VERSION,
                      rows={t: len(data[t][1]) for t in PERSISTENT_TABLES},
                      meta_already_there=agreeing, not_copied=not_copied)


def copy_database(source: str, destination: str) -> CopyReport:
    """Open both databases (``parse_target`` forms), copy, close. Errors are ``StoreError``."""
    source, destination = parse_target(source), parse_target(destination)
    src = _open(source, "source", must_exist=True)
    try:
        dst = _open(destination, "destination", must_exist=False)
        try:
            return copy_store(src, dst)
        finally:
            dst.close()
    finally:
        src.close()
