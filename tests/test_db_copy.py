"""`cyphonic-cloud db copy`: a cloud moves from SQLite to PostgreSQL (cyphonic.cloud.store_copy).

Against a real PostgreSQL (lab/postgres.py, the session's server from
conftest.py; never skipped):

- A cloud on SQLite (identities enrolled with a one-time and a reusable token,
  certificates, a revoked node, the policy, meta, a serial allocated but not
  used, runtime rows) is copied; the PostgreSQL store then holds every record
  equal, column for column; ``next_serial`` continues above every serial ever
  allocated; a used one-time token stays used; the reusable one still enrolls,
  never on a revoked node's address. Runtime tables are not copied. The way
  back (PostgreSQL to SQLite) gives the same rows.
- Refused, with the database unchanged: a destination that holds a cloud (or
  a meta value that differs), a missing source file (not created either), a
  database at another schema version; a failure part way leaves the
  destination empty (one transaction).
- The CLI end to end: exit 0 and the summary; exit 1 and the reason.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from cyphonic.cloud import store_copy
from cyphonic.cloud.cli import main
from cyphonic.cloud.store import (
    SCHEMA_VERSION, SQLiteStore, StoreError, TokenError, TokenRecord, open_store,
)
from cyphonic.cloud.store_copy import PERSISTENT_TABLES, copy_database, parse_target

DOMAIN = "overlay.example"
NET = ipaddress.IPv4Network("10.20.0.0/24")
POLICY = {"default": "deny", "rules": [{"from": ["group:cams"], "to": ["group:nvr"],
                                        "action": "allow"}]}


def key(i: int) -> bytes:
    return bytes([i]) * 32


def _token(token_id: str, *, reusable: bool, expires_at: float | None = None,
           groups: tuple[str, ...] = ("cams",)) -> TokenRecord:
    return TokenRecord(token_id=token_id, secret_hash=bytes(range(32)) + token_id.encode(),
                       name="cam", groups=groups, reusable=reusable, expires_at=expires_at,
                       created_at=1000.5, used_at=None, uses=0)


def make_cloud(path: Path) -> SQLiteStore:
    """A small cloud with something in every persistent table (and in the runtime ones)."""
    s = SQLiteStore(path)
    s.set_meta("domain", DOMAIN)
    s.set_meta("prefix", str(NET))
    s.add_token(_token("once", reusable=False))
    s.add_token(_token("fleet", reusable=True, groups=("cams", "lab")))
    s.add_token(_token("unused", reusable=False, expires_at=99999.25, groups=("nvr",)))
    s.enroll("once", key(1), ["cam"], DOMAIN, 1001.0, NET, {"10.20.0.1"})
    for i in (2, 3, 4):
        s.enroll("fleet", key(i), [f"cam-{i}"], DOMAIN, 1002.0 + i, NET, {"10.20.0.1"})
    s.create_identity(key(5), "nvr", f"nvr.{DOMAIN}", ("nvr",), "", 1010.0, NET, {"10.20.0.1"})
    for i in (1, 2, 3, 4, 5, 2, 3):              # 2 and 3 renewed: two serials each
        s.set_certificate(key(i), s.next_serial(), 5000.0 + i)
    s.revoke("cam-3", 2000.75)                   # both of its serials are revoked
    s.next_serial()                              # allocated, never used: must not come back
    s.set_policy(POLICY)
    # Runtime rows (schema version 2): a running instance and a registration.
    s.join_instance("cloud-a", services=("as", "nms"), signaling=("192.0.2.1:47101",),
                    relay=(), host="a", pid=123, now=1500.0)
    return s


def raw_rows(store) -> dict[str, list[tuple]]:
    """Every persistent table's rows, engine differences (0/1 vs BOOLEAN) evened out."""
    own = store_copy._own_meta_keys(store)

    def norm(v):
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, memoryview):
            return bytes(v)
        return v

    def body(cur):
        out = {}
        for t in PERSISTENT_TABLES:
            c = store._exec(cur, f"SELECT * FROM {t}")
            cols = [d[0] for d in c.description]
            rows = [dict(zip(cols, (norm(v) for v in r))) for r in c.fetchall()]
            rows = [r for r in rows if not store_copy._own_row(t, r, own)]
            out[t] = sorted((tuple(sorted(r.items())) for r in rows), key=repr)
        return out
    return store._read(body)


def _pg(url: str):
    from cyphonic.cloud.store_postgres import PostgresStore
    return PostgresStore(url)


def test_sqlite_to_postgres_keeps_every_record(tmp_path, pg_url):
    src = make_cloud(tmp_path / "cloud.sqlite3")
    before = raw_rows(src)
    idents, tokens = src.list_identities(), src.list_tokens()
    revoked, highest = src.revoked_serials(), 8   # 7 issued + 1 allocated
    src.close()

    report = copy_database(f"sqlite:{tmp_path / 'cloud.sqlite3'}", pg_url)
    assert report.rows == {"meta": 2, "counters": 1, "tokens": 3, "identities": 5,
                           "issued_serials": 7, "revoked_serials": 2, "policy": 1}
    assert report.not_copied == ("instances", "registrations", "bus")
    assert report.schema_version == SCHEMA_VERSION

    dst = _pg(pg_url)
    try:
        assert raw_rows(dst) == before           # column for column, vip4_int and revoked_at too
        assert dst.list_identities() == idents
        assert dst.list_tokens() == tokens
        assert dst.revoked_serials() == revoked == {3, 7}
        assert dst.get_policy() == POLICY
        assert dst.get_meta("domain") == DOMAIN and dst.get_meta("prefix") == str(NET)
        assert dst.get_meta("schema_version") == str(SCHEMA_VERSION)   # its own, not copied
        cam3 = dst.get_identity_by_name("cam-3")
        assert cam3.revoked and cam3.vip4 == "10.20.0.4"
        # Serials continue above everything ever allocated.
        assert dst.next_serial() == highest + 1
        # A used one-time token stays used; nothing half-done by the refusal.
        with pytest.raises(TokenError, match="already used"):
            dst.consume_token("once", 1100.0)
        with pytest.raises(TokenError, match="already used"):
            dst.enroll("once", key(9), ["late"], DOMAIN, 1100.0, NET, {"10.20.0.1"})
        assert dst.get_token("once").uses == 1
        # The reusable token still enrolls: the next free address, no revoked one reused.
        ident, rec = dst.enroll("fleet", key(6), ["cam-6"], DOMAIN, 1100.0, NET, {"10.20.0.1"})
        assert ident.vip4 == "10.20.0.7" and rec.uses == 4
        with pytest.raises(StoreError, match="revoked"):
            dst.set_certificate(key(3), dst.next_serial(), 9000.0)
        # Runtime state stayed behind: nodes register again with the new cloud.
        assert dst.list_instances() == []
    finally:
        dst.close()


def test_postgres_back_to_sqlite_gives_the_same_rows(tmp_path, pg_url):
    src = make_cloud(tmp_path / "a.sqlite3")
    before = raw_rows(src)
    src.close()
    copy_database(str(tmp_path / "a.sqlite3"), pg_url)
    report = copy_database(pg_url, f"sqlite:{tmp_path / 'b.sqlite3'}")
    assert report.rows["identities"] == 5 and report.not_copied == ("instances", "registrations",
                                                                      "bus")
    back = SQLiteStore(tmp_path / "b.sqlite3")
    try:
        assert raw_rows(back) == before
        assert back.next_serial() == 9
    finally:
        back.close()


def test_a_destination_with_a_cloud_is_refused_and_left_unchanged(tmp_path, pg_url):
    make_cloud(tmp_path / "a.sqlite3").close()
    copy_database(str(tmp_path / "a.sqlite3"), pg_url)
    dst = _pg(pg_url)
    kept = raw_rows(dst)
    other = SQLiteStore(tmp_path / "b.sqlite3")
    other.add_token(_token("x", reusable=False))
    other.close()
    for source in (tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"):
        with pytest.raises(StoreError) as e:
            copy_database(str(source), pg_url)
        msg = str(e.value)
        assert "is not empty" in msg and "5 row(s) in identities" in msg, msg
        assert "3 row(s) in tokens" in msg and "new, empty database" in msg, msg
    assert raw_rows(dst) == kept
    dst.close()


def test_destination_meta_must_agree(tmp_path, pg_url):
    make_cloud(tmp_path / "a.sqlite3").close()
    dst = _pg(pg_url)
    dst.set_meta("domain", "other.example")      # `init` run with another domain
    dst.close()
    with pytest.raises(StoreError, match="meta 'domain' = 'other.example' .*'overlay.example'"):
        copy_database(str(tmp_path / "a.sqlite3"), pg_url)
    dst = _pg(pg_url)
    dst.set_meta("domain", DOMAIN)               # `init` run with the same config: fine
    dst.close()
    report = copy_database(str(tmp_path / "a.sqlite3"), pg_url)
    assert report.meta_already_there == ("domain",) and report.rows["meta"] == 2
    dst = _pg(pg_url)
    assert dst.get_meta("prefix") == str(NET) and len(dst.list_identities()) == 5
    dst.close()


def test_a_failure_part_way_leaves_the_destination_empty(tmp_path, pg_url, monkeypatch):
    make_cloud(tmp_path / "a.sqlite3").close()
    real = store_copy._column_types

    def broken(store, cur, table):               # the last table fails, after the others went in
        return {"nope": "text"} if table == "policy" else real(store, cur, table)
    monkeypatch.setattr(store_copy, "_column_types", broken)
    with pytest.raises(StoreError, match="table policy has columns"):
        copy_database(str(tmp_path / "a.sqlite3"), pg_url)
    dst = _pg(pg_url)
    assert dst.list_identities() == [] and dst.list_tokens() == []
    assert dst.get_meta("domain") is None
    dst.close()
    monkeypatch.setattr(store_copy, "_column_types", real)
    assert copy_database(str(tmp_path / "a.sqlite3"), pg_url).rows["identities"] == 5


def test_a_missing_source_is_a_clear_error_and_is_not_created(tmp_path, pg_url):
    missing = tmp_path / "nope.sqlite3"
    with pytest.raises(StoreError, match=f"source {missing}: no such file"):
        copy_database(f"sqlite:{missing}", pg_url)
    assert not missing.exists()
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    with pytest.raises(StoreError, match="no cyphonic-cloud database in it"):
        copy_database(str(empty), pg_url)


def test_other_schema_versions_are_refused(tmp_path, pg_url):
    make_cloud(tmp_path / "a.sqlite3").close()
    db = sqlite3.connect(tmp_path / "a.sqlite3")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=r"^source: .*older.*db upgrade"):
        copy_database(str(tmp_path / "a.sqlite3"), pg_url)
    make_cloud(tmp_path / "b.sqlite3").close()
    _pg(pg_url).close()
    import psycopg
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'",
                  (str(SCHEMA_VERSION - 1),))
    with pytest.raises(StoreError, match=r"^destination: .*older.*db upgrade"):
        copy_database(str(tmp_path / "b.sqlite3"), pg_url)
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'",
                  (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match=r"^destination: .*newer"):
        copy_database(str(tmp_path / "b.sqlite3"), pg_url)


def test_every_table_is_either_copied_or_runtime(tmp_path):
    """A new table must be added to PERSISTENT_TABLES or RUNTIME_TABLES, never silently left."""
    s = SQLiteStore(tmp_path / "a.sqlite3")
    tables = s._read(lambda cur: store_copy._tables(s, cur))
    s.close()
    assert tables == set(store_copy.PERSISTENT_TABLES) | set(store_copy.RUNTIME_TABLES)
    db = sqlite3.connect(tmp_path / "a.sqlite3")
    db.execute("CREATE TABLE surprise (x INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="table.s. surprise unknown to `db copy`"):
        copy_database(str(tmp_path / "a.sqlite3"), str(tmp_path / "b.sqlite3"))


def test_parse_target():
    assert parse_target("sqlite:/var/lib/c.sqlite3") == "/var/lib/c.sqlite3"
    assert parse_target("sqlite:///var/lib/c.sqlite3") == "/var/lib/c.sqlite3"
    assert parse_target("rel/c.sqlite3") == "rel/c.sqlite3"
    assert parse_target("postgres://u@h/db") == "postgres://u@h/db"
    for bad in ("", "sqlite:", "mysql://h/db"):
        with pytest.raises(StoreError):
            parse_target(bad)


def test_cli_db_copy(tmp_path, pg_url):
    make_cloud(tmp_path / "cloud.sqlite3").close()
    # No config file exists: `db copy` reads none.
    secret_url = pg_url.replace("cyphonic@", "cyphonic:s3cret@")   # the test server trusts
    args = ["--config", str(tmp_path / "absent.toml"), "db", "copy",
            "--from", f"sqlite:{tmp_path / 'cloud.sqlite3'}", "--to", secret_url]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"copied {tmp_path / 'cloud.sqlite3'} -> " in r.output
    assert "identities            5 row(s)" in r.output
    assert "issued_serials        7 row(s)" in r.output
    assert "not copied (runtime; nodes register again): instances, registrations, bus" in r.output
    assert "s3cret" not in r.output
    s = open_store(pg_url)
    assert len(s.list_identities()) == 5
    s.close()
    # Again: refused, exit 1, the reason on stderr.
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "is not empty: " in r.output, r.output
    assert "s3cret" not in r.output
    r = CliRunner().invoke(main, ["db", "copy", "--from", str(tmp_path / "x.sqlite3"),
                                  "--to", pg_url])
    assert r.exit_code == 1 and "no such file" in r.output, r.output
    r = CliRunner().invoke(main, ["db", "copy", "--from", str(tmp_path / "x.sqlite3")])
    assert r.exit_code == 2 and "--to" in r.output


def test_cli_db_copy_as_a_process(tmp_path, pg_url):
    """The installed entry point, as an operator runs it."""
    import subprocess
    import sys
    make_cloud(tmp_path / "cloud.sqlite3").close()
    r = subprocess.run([sys.executable, "-m", "cyphonic.cloud.cli", "db", "copy",
                        "--from", str(tmp_path / "cloud.sqlite3"), "--to", pg_url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "identities            5 row(s)" in r.stdout and r.stderr == ""
