"""The cloud's persistent state (cyphonic.cloud.store).

- One suite, run against ``MemoryStore``, ``SQLiteStore`` and ``PostgresStore``
  (a real PostgreSQL server started for the session, lab/postgres.py):
  the fake must behave exactly as the real stores, errors included.
- Address allocation is checked against an obviously right model (the lowest
  host address that is neither reserved nor ever allocated), driven by
  Hypothesis.
- Durability: a separate process writes and is killed with SIGKILL right after
  the write returns; a fresh store sees everything.
- Concurrency: two processes allocate addresses from one file at the same time
  and never get the same one; two processes enrolling with one one-time token
  at the same time: exactly one gets an identity.
- ``enroll`` is all or nothing: a refused token, a full address pool or no free
  name leaves the token as it was and creates no identity.
- A corrupt file, a newer schema and another program's database are refused
  with a ``StoreError`` that names the path.
- PostgreSQL: one one-time token raced from 4 connections (consume and
  enroll): exactly one success; 150 enrollments from 6 connections at once:
  150 distinct addresses, FQDNs and serials; a lost connection, an
  unreachable server and a held write lock are clear errors within the
  timeouts; schema versions, ``db upgrade``, pg_dump/pg_restore; a server left
  by a crashed test run is removed by the next.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.cloud.store import (
    SCHEMA_VERSION, ConflictError, Identity, MemoryStore, NotFoundError, SQLiteStore, Store,
    StoreError, TokenError, TokenRecord,
)
from cyphonic.errors import CyphonicError
from lab.postgres import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
NET24 = ipaddress.IPv4Network("10.9.8.0/24")


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def token(token_id: str = "t1", *, reusable: bool = False, expires_at: float | None = None,
          groups: tuple[str, ...] = ("default",), name: str = "") -> TokenRecord:
    return TokenRecord(token_id=token_id, secret_hash=b"h" * 32, name=name, groups=groups,
                       reusable=reusable, expires_at=expires_at, created_at=10.0,
                       used_at=None, uses=0)


def enroll(store: Store, i: int, *, prefix: ipaddress.IPv4Network = NET24,
           reserved: set[str] | None = None, now: float = 100.0) -> Identity:
    return store.create_identity(key(i), f"n{i}", f"n{i}.overlay.example", ("default",),
                                 "t1", now, prefix, reserved or set())


@pytest.fixture
def store(any_store):
    return any_store


def test_both_implement_the_protocol(store):
    assert isinstance(store, Store)


def test_errors_are_cyphonic_errors():
    for cls in (ConflictError, NotFoundError, TokenError):
        assert issubclass(cls, StoreError)
    assert issubclass(StoreError, CyphonicError)


# --- meta -------------------------------------------------------------------------

def test_meta(store):
    assert store.get_meta("ca_public") is None
    store.set_meta("ca_public", "abcd")
    store.set_meta("other", "")
    assert store.get_meta("ca_public") == "abcd"
    store.set_meta("ca_public", "ef01")
    assert store.get_meta("ca_public") == "ef01"
    assert store.get_meta("other") == ""
    with pytest.raises(StoreError, match="meta key"):
        store.set_meta("", "x")
    with pytest.raises(StoreError, match="meta value"):
        store.set_meta("k", 5)  # type: ignore[arg-type]


# --- tokens -----------------------------------------------------------------------

def test_token_round_trip_and_duplicate(store):
    rec = token("t1", groups=("cams", "lab"), name="cam1", expires_at=500)
    store.add_token(rec)
    got = store.get_token("t1")
    assert got == rec and isinstance(got.groups, tuple) and got.expires_at == 500.0
    assert store.get_token("nope") is None
    with pytest.raises(ConflictError, match="t1"):
        store.add_token(replace(rec, name="other"))
    assert store.get_token("t1") == rec


def test_one_time_token_consumed_once(store):
    store.add_token(token("t1"))
    used = store.consume_token("t1", now=20.0)
    assert (used.uses, used.used_at) == (1, 20.0)
    assert store.get_token("t1") == used
    with pytest.raises(TokenError) as e:
        store.consume_token("t1", now=21.0)
    assert e.value.reason == "used" and "t1" in str(e.value)
    assert store.get_token("t1") == used  # a refused consume changes nothing


def test_reusable_token_counts_uses(store):
    store.add_token(token("multi", reusable=True, expires_at=1000.0))
    for n in range(1, 6):
        rec = store.consume_token("multi", now=float(n))
        assert (rec.uses, rec.used_at) == (n, float(n))
    assert store.get_token("multi").uses == 5


def test_expired_token(store):
    store.add_token(token("old", expires_at=100.0))
    store.add_token(token("old-reusable", reusable=True, expires_at=100.0))
    assert store.consume_token("old-reusable", now=99.9).uses == 1
    for tid in ("old", "old-reusable"):
        with pytest.raises(TokenError) as e:
            store.consume_token(tid, now=100.0)
        assert e.value.reason == "expired"
    assert store.get_token("old").uses == 0
    assert store.get_token("old-reusable").uses == 1


def test_used_wins_over_expired(store):
    store.add_token(token("t", expires_at=100.0))
    store.consume_token("t", now=50.0)
    with pytest.raises(TokenError) as e:
        store.consume_token("t", now=200.0)
    assert e.value.reason == "used"


def test_unknown_token(store):
    with pytest.raises(TokenError) as e:
        store.consume_token("ghost", now=1.0)
    assert e.value.reason == "unknown"


def test_list_and_delete_tokens(store):
    store.add_token(replace(token("b"), created_at=2.0))
    store.add_token(replace(token("a"), created_at=3.0))
    store.add_token(replace(token("c"), created_at=1.0))
    assert [t.token_id for t in store.list_tokens()] == ["c", "b", "a"]
    store.delete_token("b")
    assert store.get_token("b") is None
    assert [t.token_id for t in store.list_tokens()] == ["c", "a"]
    with pytest.raises(NotFoundError, match="'b'"):
        store.delete_token("b")
    with pytest.raises(TokenError):
        store.consume_token("b", now=5.0)


@pytest.mark.parametrize("bad", [
    dict(token_id=""), dict(groups="default"), dict(groups=("ok", 3)), dict(reusable=1),
    dict(uses=-1), dict(expires_at="soon"), dict(created_at=float("nan")), dict(secret_hash=b""),
])
def test_bad_token_record_refused(store, bad):
    with pytest.raises(StoreError):
        store.add_token(replace(token("t1"), **bad))
    assert store.list_tokens() == []


# --- identities and addresses --------------------------------------------------------

def test_identity_round_trip_and_lookups(store):
    a = store.create_identity(key(1), "cam1", "cam1.overlay.example", ("cams", "lab"), "t1",
                              100.0, NET24, set())
    assert a == Identity(key(1), "cam1", "cam1.overlay.example", "10.9.8.1", ("cams", "lab"),
                         100.0, 0, 0.0, False, "t1")
    assert store.get_identity(key(1)) == a
    assert store.get_identity_by_name("cam1") == a
    assert store.get_identity_by_fqdn("cam1.overlay.example") == a
    assert store.get_identity_by_vip("10.9.8.1") == a
    assert store.get_identity(key(2)) is None
    assert store.get_identity_by_name("cam2") is None
    assert store.get_identity_by_fqdn("cam2.overlay.example") is None
    assert store.get_identity_by_vip("10.9.8.2") is None
    assert store.list_identities() == [a]


def test_lowest_free_address(store):
    reserved = {"10.9.8.1", "10.9.8.3"}
    vips = [enroll(store, i, reserved=reserved).vip4 for i in range(4)]
    assert vips == ["10.9.8.2", "10.9.8.4", "10.9.8.5", "10.9.8.6"]
    # A reservation lifted: its address is now the lowest free one.
    assert enroll(store, 10, reserved={"10.9.8.3"}).vip4 == "10.9.8.1"
    assert enroll(store, 11).vip4 == "10.9.8.3"
    assert enroll(store, 12).vip4 == "10.9.8.7"
    assert [i.vip4 for i in store.list_identities()] == [
        f"10.9.8.{n}" for n in (1, 2, 3, 4, 5, 6, 7)]


def test_long_runs_are_skipped(store):
    net = ipaddress.IPv4Network("10.20.0.0/16")
    vips = [enroll(store, i, prefix=net, reserved={"10.20.1.0"}).vip4 for i in range(300)]
    want = [str(a) for a in list(net.hosts())[:301] if str(a) != "10.20.1.0"]
    assert vips == want


def test_duplicates_conflict_and_allocate_nothing(store):
    enroll(store, 1)
    with pytest.raises(ConflictError, match="static key"):
        store.create_identity(key(1), "other", "other.overlay.example", (), "t", 1.0, NET24, set())
    with pytest.raises(ConflictError, match="name 'n1'"):
        store.create_identity(key(2), "n1", "x.overlay.example", (), "t", 1.0, NET24, set())
    with pytest.raises(ConflictError, match="fqdn 'n1.overlay.example'"):
        store.create_identity(key(2), "x", "n1.overlay.example", (), "t", 1.0, NET24, set())
    assert enroll(store, 2).vip4 == "10.9.8.2"
    assert len(store.list_identities()) == 2


def test_revoked_identity_keeps_its_address(store):
    net = ipaddress.IPv4Network("10.0.0.0/29")
    a = enroll(store, 1, prefix=net)
    store.revoke("n1", now=200.0)
    assert enroll(store, 2, prefix=net).vip4 == "10.0.0.2"
    assert store.get_identity_by_vip(a.vip4).revoked
    # Its name, FQDN and key stay taken too: an identity is never recycled.
    with pytest.raises(ConflictError):
        store.create_identity(key(3), "n1", "n1b.overlay.example", (), "t", 1.0, net, set())
    with pytest.raises(ConflictError):
        store.create_identity(key(1), "n1b", "n1b.overlay.example", (), "t", 1.0, net, set())


def test_pool_exhausted_with_a_30(store):
    net = ipaddress.IPv4Network("192.0.2.0/30")
    assert [enroll(store, i, prefix=net).vip4 for i in range(2)] == ["192.0.2.1", "192.0.2.2"]
    with pytest.raises(StoreError, match="address pool exhausted.*192.0.2.0/30"):
        enroll(store, 3, prefix=net)
    assert store.get_identity(key(3)) is None
    other = ipaddress.IPv4Network("192.0.2.4/30")
    assert enroll(store, 4, prefix=other, reserved={"192.0.2.5"}).vip4 == "192.0.2.6"
    with pytest.raises(StoreError, match="exhausted"):
        enroll(store, 5, prefix=other, reserved={"192.0.2.5"})


# --- enroll: token and identity in one transaction ------------------------------------

DOMAIN = "overlay.example"
NET30 = ipaddress.IPv4Network("192.0.2.0/30")


def enroll_tok(store: Store, tid: str, i: int, names: list[str] | None = None, *,
               prefix: ipaddress.IPv4Network = NET24, now: float = 100.0,
               reserved: set[str] | None = None) -> tuple[Identity, TokenRecord]:
    return store.enroll(tid, key(i), names if names is not None else [f"n{i}"], DOMAIN, now,
                        prefix, reserved or set())


def _snapshot(store: Store) -> tuple:
    return store.list_tokens(), store.list_identities()


def test_enroll_creates_identity_and_consumes_token(store):
    store.add_token(token("t1", groups=("cams", "lab"), name="cam1"))
    ident, rec = enroll_tok(store, "t1", 1, ["cam1"], now=50.0)
    assert ident == Identity(key(1), "cam1", "cam1.overlay.example", "10.9.8.1", ("cams", "lab"),
                             50.0, 0, 0.0, False, "t1")
    assert (rec.uses, rec.used_at) == (1, 50.0)
    assert store.get_token("t1") == rec
    assert store.get_identity(key(1)) == ident
    assert store.get_identity_by_fqdn("cam1.overlay.example") == ident
    # Reserved addresses are skipped exactly as create_identity skips them.
    store.add_token(token("t2"))
    ident2, _ = enroll_tok(store, "t2", 2, reserved={"10.9.8.2"})
    assert ident2.vip4 == "10.9.8.3" and ident2.groups == ("default",) and ident2.token_id == "t2"


def test_enroll_reusable_token_counts_uses(store):
    store.add_token(token("multi", reusable=True, groups=("g",)))
    for i in range(1, 4):
        ident, rec = enroll_tok(store, "multi", i, now=float(i))
        assert (ident.name, ident.vip4, ident.groups) == (f"n{i}", f"10.9.8.{i}", ("g",))
        assert (rec.uses, rec.used_at) == (i, float(i))
    assert store.get_token("multi").uses == 3


def test_enroll_token_reasons_change_nothing(store):
    store.add_token(token("old", expires_at=100.0))
    store.add_token(token("once"))
    enroll_tok(store, "once", 1)
    before = _snapshot(store)
    for tid, i, now, reason in (("ghost", 2, 1.0, "unknown"), ("old", 3, 100.0, "expired"),
                                ("once", 4, 101.0, "used")):
        with pytest.raises(TokenError) as e:
            enroll_tok(store, tid, i, now=now)
        assert e.value.reason == reason and tid in str(e.value)
        assert _snapshot(store) == before
    assert enroll_tok(store, "old", 3, now=99.0)[1].uses == 1  # not yet expired: works


def test_enroll_pool_exhausted_keeps_the_token(store):
    for i in range(2):
        store.add_token(token(f"t{i}"))
        assert enroll_tok(store, f"t{i}", i, prefix=NET30)[0].vip4 == f"192.0.2.{i + 1}"
    store.add_token(token("t2"))
    store.add_token(token("multi", reusable=True))
    before = _snapshot(store)
    for tid in ("t2", "multi", "t2"):
        with pytest.raises(StoreError, match="address pool exhausted.*192.0.2.0/30"):
            enroll_tok(store, tid, 2, prefix=NET30)
        assert _snapshot(store) == before
    assert store.get_token("t2").uses == 0 and store.get_token("t2").used_at is None
    assert store.get_token("multi").uses == 0
    assert store.get_identity(key(2)) is None and store.get_identity_by_name("n2") is None
    # The token was not lost: with room in the pool it enrolls.
    ident, rec = enroll_tok(store, "t2", 2, prefix=ipaddress.IPv4Network("192.0.2.0/29"))
    assert (ident.vip4, rec.uses) == ("192.0.2.3", 1)


def test_enroll_name_conflicts_fall_through(store):
    store.create_identity(key(1), "cam", "cam.overlay.example", (), "x", 1.0, NET24, set())
    store.create_identity(key(2), "other", "cam-1.overlay.example", (), "x", 1.0, NET24, set())
    store.add_token(token("multi", reusable=True))
    # "cam" is taken as a name, "cam-1" as an FQDN: the third candidate wins.
    ident, rec = enroll_tok(store, "multi", 3, ["cam", "cam-1", "cam-2", "cam-3"])
    assert (ident.name, ident.fqdn, ident.vip4) == ("cam-2", "cam-2.overlay.example", "10.9.8.3")
    assert rec.uses == 1
    ident, _ = enroll_tok(store, "multi", 4, ["cam", "cam-1", "cam-2", "cam-3"])
    assert ident.name == "cam-3"


def test_enroll_all_names_taken_changes_nothing(store):
    store.create_identity(key(1), "cam", "cam.overlay.example", (), "x", 1.0, NET24, set())
    store.create_identity(key(2), "cam-1", "cam-1.overlay.example", (), "x", 1.0, NET24, set())
    store.add_token(token("t1"))
    before = _snapshot(store)
    with pytest.raises(ConflictError, match="no free name.*'cam' .. 'cam-1'"):
        enroll_tok(store, "t1", 3, ["cam", "cam-1"])
    assert _snapshot(store) == before
    # A static key that already has an identity is a conflict, not a new identity.
    with pytest.raises(ConflictError, match="static key .* already enrolled as 'cam'"):
        enroll_tok(store, "t1", 1, ["fresh"])
    assert _snapshot(store) == before
    assert store.get_token("t1").uses == 0
    assert enroll_tok(store, "t1", 3, ["cam", "cam-1", "cam-2"])[0].name == "cam-2"


@pytest.mark.parametrize("bad", [
    dict(names=[]), dict(names="n"), dict(names=["n", ""]), dict(domain=""),
    dict(static_public=b"short"), dict(prefix="10.0.0.0/24"), dict(reserved={"nope"}),
    dict(now=float("nan")), dict(token_id=""),
])
def test_enroll_bad_arguments_change_nothing(store, bad):
    store.add_token(token("t1"))
    args = dict(token_id="t1", static_public=key(1), names=["n"], domain=DOMAIN, now=1.0,
                prefix=NET24, reserved=set())
    args.update(bad)
    before = _snapshot(store)
    with pytest.raises(StoreError):
        store.enroll(**args)
    assert _snapshot(store) == before


@pytest.mark.parametrize("bad", [
    dict(static_public=b"short"), dict(name=""), dict(fqdn=7), dict(groups="g"),
    dict(prefix="10.0.0.0/24"), dict(reserved={"not-an-ip"}), dict(now=None),
])
def test_bad_identity_arguments(store, bad):
    args = dict(static_public=key(1), name="n", fqdn="n.example", groups=(), token_id="t",
                now=1.0, prefix=NET24, reserved=set())
    args.update(bad)
    with pytest.raises(StoreError):
        store.create_identity(**args)
    assert store.list_identities() == []


def _fresh_stores():
    d = tempfile.mkdtemp(prefix="cyphonic-store-")
    return MemoryStore(), SQLiteStore(os.path.join(d, "cloud.sqlite3"))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.frozensets(st.integers(1, 14), max_size=8), min_size=1, max_size=20))
def test_allocation_matches_model(reserved_per_call):
    """Both stores hand out exactly the lowest host neither reserved nor ever allocated."""
    net = ipaddress.IPv4Network("10.1.2.0/28")  # hosts .1 .. .14
    stores = _fresh_stores()
    try:
        allocated: set[int] = set()
        for i, res in enumerate(reserved_per_call):
            reserved = {f"10.1.2.{n}" for n in res}
            free = [n for n in range(1, 15) if n not in res and n not in allocated]
            if i % 3 == 2 and allocated:
                victim = sorted(allocated)[0]
                for s in stores:
                    s.revoke(s.get_identity_by_vip(f"10.1.2.{victim}").name, now=1.0)
            results = []
            for s in stores:
                try:
                    results.append(enroll(s, i, prefix=net, reserved=reserved).vip4)
                except StoreError as e:
                    assert "exhausted" in str(e)
                    results.append(None)
            want = f"10.1.2.{free[0]}" if free else None
            assert results == [want, want]
            if free:
                allocated.add(free[0])
        assert stores[0].list_identities() == stores[1].list_identities()
    finally:
        for s in stores:
            s.close()


# --- serials, certificates, revocation ------------------------------------------------

def test_serials_are_monotonic(store):
    assert [store.next_serial() for _ in range(5)] == [1, 2, 3, 4, 5]
    enroll(store, 1)
    store.set_certificate(key(1), 40, not_after=1000.0)
    # Never hands out a serial that was already issued.
    assert store.next_serial() == 41


def test_set_certificate(store):
    enroll(store, 1)
    enroll(store, 2)
    s = store.next_serial()
    store.set_certificate(key(1), s, not_after=86500)
    ident = store.get_identity(key(1))
    assert (ident.serial, ident.cert_not_after) == (s, 86500.0)
    with pytest.raises(NotFoundError):
        store.set_certificate(key(9), store.next_serial(), 1.0)
    with pytest.raises(ConflictError, match=f"serial {s}"):
        store.set_certificate(key(2), s, 1.0)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(StoreError, match="serial"):
            store.set_certificate(key(2), bad, 1.0)
    assert store.get_identity(key(2)).serial == 0


def test_revocation_collects_every_serial(store):
    enroll(store, 1)
    enroll(store, 2)
    issued = []
    for _ in range(3):
        issued.append(store.next_serial())
        store.set_certificate(key(1), issued[-1], not_after=float(issued[-1]) * 100)
    other = store.next_serial()
    store.set_certificate(key(2), other, not_after=1.0)
    assert store.revoked_serials() == set()
    ident = store.revoke("n1", now=500.0)
    assert ident.revoked and ident.serial == issued[-1]
    assert store.get_identity(key(1)) == ident
    assert store.revoked_serials() == set(issued)
    # Idempotent; a revoked identity gets no new certificate.
    assert store.revoke("n1", now=600.0) == ident
    with pytest.raises(StoreError, match="revoked"):
        store.set_certificate(key(1), store.next_serial(), 1.0)
    store.revoke("n2", now=700.0)
    assert store.revoked_serials() == set(issued) | {other}
    with pytest.raises(NotFoundError, match="ghost"):
        store.revoke("ghost", now=1.0)


def test_revoking_without_certificate(store):
    enroll(store, 1)
    assert store.revoke("n1", now=1.0).revoked
    assert store.revoked_serials() == set()


# --- policy and lifecycle -------------------------------------------------------

def test_policy_round_trip(store):
    assert store.get_policy() is None
    policy = {"default": "same-group",
              "rules": [{"from": ["group:cams"], "to": ["group:nvr"], "action": "allow"}]}
    store.set_policy(policy)
    got = store.get_policy()
    assert got == policy and got is not policy
    got["rules"].clear()  # the caller's copy, not the store's
    assert store.get_policy() == policy
    store.set_policy({"default": "deny", "rules": []})
    assert store.get_policy() == {"default": "deny", "rules": []}
    for bad in (["not", "a", "dict"], {"x": {1, 2}}, {"x": float("inf")}):
        with pytest.raises(StoreError, match="policy"):
            store.set_policy(bad)
    assert store.get_policy() == {"default": "deny", "rules": []}


def test_closed_store_refuses(store):
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get_meta("x")
    with pytest.raises(StoreError, match="closed"):
        store.next_serial()


# --- SQLite only: files, durability, concurrency -----------------------------------------

def _fill(store: Store) -> None:
    store.set_meta("ca_public", "00ff")
    store.add_token(token("t1", reusable=True))
    store.consume_token("t1", now=11.0)
    a = enroll(store, 1)
    store.set_certificate(a.static_public, store.next_serial(), 5000.0)
    enroll(store, 2)
    store.set_certificate(key(2), store.next_serial(), 6000.0)
    store.revoke("n2", now=300.0)
    store.set_policy({"default": "deny", "rules": []})


def _check_filled(store: Store) -> None:
    assert store.get_meta("ca_public") == "00ff"
    assert store.get_token("t1").uses == 1
    idents = store.list_identities()
    assert [(i.name, i.vip4, i.serial, i.revoked) for i in idents] == [
        ("n1", "10.9.8.1", 1, False), ("n2", "10.9.8.2", 2, True)]
    assert store.revoked_serials() == {2}
    assert store.get_policy() == {"default": "deny", "rules": []}
    assert store.next_serial() == 3


def test_reopen_sees_everything(tmp_path):
    path = tmp_path / "cloud.sqlite3"
    s = SQLiteStore(path)
    _fill(s)
    s.close()
    s = SQLiteStore(path)
    _check_filled(s)
    s.close()


def test_file_settings(tmp_path):
    path = tmp_path / "cloud.sqlite3"
    s = SQLiteStore(path)
    db = s._conn()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    s.close()
    SQLiteStore(path).close()  # creating the schema again is harmless


def _child(script: str, *args: str) -> subprocess.Popen:
    code = "import sys\n" + textwrap.dedent(script)
    # run from tests/: `python -c` looks in its working directory first, so the child imports
    # this module as pytest does (tests/ is not a package)
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=os.path.join(ROOT, "tests"), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


_WRITER = """
    import time
    from test_cloud_store import _fill
    from cyphonic.cloud.store import SQLiteStore
    store = SQLiteStore(sys.argv[1])
    _fill(store)
    print("written", flush=True)
    time.sleep(60)
"""


def test_sigkill_after_write_loses_nothing(tmp_path):
    path = tmp_path / "cloud.sqlite3"
    proc = _child(_WRITER, str(path))
    try:
        line = proc.stdout.readline()
        assert line == "written\n", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    s = SQLiteStore(path)
    _check_filled(s)
    s.close()


_ALLOCATOR = """
    import ipaddress, json
    from cyphonic.cloud.store import SQLiteStore
    path, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = SQLiteStore(path)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    net = ipaddress.IPv4Network("10.50.0.0/16")
    vips = []
    for i in range(n):
        name = f"w{worker}-{i}"
        ident = store.create_identity(bytes([worker, i]) * 16, name, name + ".example",
                                      (), "t", 1.0, net, {"10.50.0.1"})
        vips.append(ident.vip4)
        store.set_certificate(ident.static_public, store.next_serial(), 9.0)
    store.close()
    print(json.dumps(vips), flush=True)
"""


def test_two_processes_never_share_an_address(tmp_path):
    path = tmp_path / "cloud.sqlite3"  # created by whichever child gets there first
    n = 50
    procs = [_child(_ALLOCATOR, str(path), str(w), str(n)) for w in (1, 2)]
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    vips = results[0] + results[1]
    assert len(vips) == len(set(vips)) == 2 * n
    # Serialised allocation: together they took exactly the lowest free addresses.
    net = ipaddress.IPv4Network("10.50.0.0/16")
    assert sorted(vips, key=ipaddress.IPv4Address) == [
        str(a) for a in list(net.hosts())[1:2 * n + 1]]
    s = SQLiteStore(path)
    assert len(s.list_identities()) == 2 * n
    assert sorted(i.serial for i in s.list_identities()) == list(range(1, 2 * n + 1))
    s.close()


_ENROLLER = """
    import ipaddress
    from cyphonic.cloud.store import SQLiteStore, StoreError, TokenError
    path, worker = sys.argv[1], int(sys.argv[2])
    store = SQLiteStore(path)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    try:
        ident, rec = store.enroll("once", bytes([worker]) * 32, ["node", f"node-{worker}"],
                                  "example", 5.0, ipaddress.IPv4Network("10.60.0.0/24"), set())
        print(f"ok {ident.name} {ident.vip4} {rec.uses}", flush=True)
    except TokenError as e:
        print(f"token {e.reason}", flush=True)
    store.close()
"""


def test_two_processes_enroll_one_time_token_once(tmp_path):
    for r in range(3):  # a few races, each on a fresh file
        path = tmp_path / f"cloud{r}.sqlite3"
        s = SQLiteStore(path)
        s.add_token(token("once"))
        s.close()
        procs = [_child(_ENROLLER, str(path), str(w)) for w in (1, 2)]
        try:
            for p in procs:
                assert p.stdout.readline() == "ready\n", p.stderr.read()
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = []
            for p in procs:
                out, err = p.communicate(timeout=60)
                assert p.returncode == 0, err
                outs.append(out.strip())
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert "token used" in outs and sum(o == "ok node 10.60.0.1 1" for o in outs) == 1, outs
        s = SQLiteStore(path)
        assert s.get_token("once").uses == 1
        [ident] = s.list_identities()
        assert (ident.name, ident.token_id) == ("node", "once")
        s.close()


@pytest.mark.parametrize("garbage", [b"garbage" * 1000, b"x", os.urandom(8192)])
def test_corrupt_file_names_the_path(tmp_path, garbage):
    path = tmp_path / "broken.sqlite3"
    path.write_bytes(garbage)
    with pytest.raises(StoreError, match="broken.sqlite3"):
        SQLiteStore(path)


@pytest.mark.parametrize("keep", [10, 16, 99, 4096])
def test_truncated_file_refused(tmp_path, keep):
    """SQLite would take a file shorter than its header for a new, empty database."""
    path = tmp_path / "cloud.sqlite3"
    s = SQLiteStore(path)
    _fill(s)
    s.close()
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(StoreError, match=str(path)):
        SQLiteStore(path)


def test_damaged_pages_refused(tmp_path):
    path = tmp_path / "cloud.sqlite3"
    s = SQLiteStore(path)
    for i in range(200):
        enroll(s, i, prefix=ipaddress.IPv4Network("10.0.0.0/16"))
    s.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[2 * page:len(data)] = os.urandom(len(data) - 2 * page)  # keep the header, ruin the rest
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=str(path)):
        s = SQLiteStore(path)
        s.list_identities()


def test_unopenable_path_names_it(tmp_path):
    path = tmp_path / "no-such-dir" / "cloud.sqlite3"
    with pytest.raises(StoreError, match="no-such-dir"):
        SQLiteStore(path)


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "cloud.sqlite3"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=f"{path}.*newer"):
        SQLiteStore(path)


def test_other_programs_database_refused(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA application_id = 12345")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="other.db.*not a cyphonic-cloud database"):
        SQLiteStore(path)


def test_busy_database_times_out_cleanly(tmp_path):
    path = tmp_path / "cloud.sqlite3"
    SQLiteStore(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    s = SQLiteStore(path, busy_timeout_s=0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            s.next_serial()
        assert time.monotonic() - t0 >= 0.15
        assert s.get_meta("x") is None  # readers are not blocked by a writer (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert s.next_serial() == 1  # the failed call consumed nothing
    s.close()


# --- Schema versions (both engines) ------------------------------------------------------

_STEPS = ((1, ("create",)), (2, ("alter",)))


def test_migration_steps_in_order():
    from cyphonic.cloud.store import pending_migrations
    assert pending_migrations(_STEPS, 0, upgrade=False, where="db") == list(_STEPS)
    assert pending_migrations(_STEPS, 1, upgrade=True, where="db") == [_STEPS[1]]
    assert pending_migrations(_STEPS, 2, upgrade=False, where="db") == []
    # An existing older schema changes only on `db upgrade`; a newer one is refused.
    with pytest.raises(StoreError, match="db: schema version 1 is older.*db upgrade"):
        pending_migrations(_STEPS, 1, upgrade=False, where="db")
    with pytest.raises(StoreError, match="db: schema version 3 is newer"):
        pending_migrations(_STEPS, 3, upgrade=True, where="db")


def test_open_store_picks_the_engine(tmp_path, pg_url):
    from cyphonic.cloud.store import open_store
    from cyphonic.cloud.store_postgres import PostgresStore
    s = open_store(str(tmp_path / "c.sqlite3"))
    assert isinstance(s, SQLiteStore)
    s.close()
    s = open_store(pg_url)
    assert isinstance(s, PostgresStore) and s.schema_version_found == 0
    s.close()


# --- PostgreSQL only: versions, failures, concurrency from several connections ---------------

def _pg(url: str, **kw):
    from cyphonic.cloud.store_postgres import PostgresStore
    return PostgresStore(url, **kw)


def _sql(url: str, *statements: str) -> None:
    import psycopg
    with psycopg.connect(url, autocommit=True) as db:
        for stmt in statements:
            db.execute(stmt)


def test_pg_reopen_sees_everything_and_records_the_version(pg_url):
    s = _pg(pg_url)
    _fill(s)
    s.close()
    s = _pg(pg_url)
    assert s.schema_version_found == SCHEMA_VERSION
    assert s.get_meta("schema_version") == str(SCHEMA_VERSION)
    with pytest.raises(StoreError, match="schema_version.*db upgrade"):
        s.set_meta("schema_version", "0")
    _check_filled(s)
    s.close()


def test_pg_newer_schema_refused(pg_url):
    _pg(pg_url).close()
    _sql(pg_url, f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="newer than this program"):
        _pg(pg_url)
    with pytest.raises(StoreError, match="newer than this program"):
        _pg(pg_url, upgrade=True)


def test_pg_other_programs_database_refused(pg_url):
    _sql(pg_url, "CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreError, match="not a cyphonic-cloud database"):
        _pg(pg_url)


def test_pg_messages_never_show_the_password(pg_server):
    url = pg_server.url("no_such_db").replace("cyphonic@", "cyphonic:s3cret@")
    with pytest.raises(StoreError) as e:
        _pg(url)
    assert "no_such_db" in str(e.value) and "s3cret" not in str(e.value)


def test_pg_no_server_is_a_clear_error_not_a_hang(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect"):
        _pg(f"postgresql://cyphonic@/x?host={tmp_path}", connect_timeout_s=2)
    assert time.monotonic() - t0 < 5


def test_pg_lost_connection_is_replaced_by_the_next_call(pg_url):
    """A connection that died while idle is found at BEGIN and replaced: the call works.
    (Lost inside a transaction it is an error: tests/test_store_postgres_restart.py.)"""
    s = _pg(pg_url)
    s.set_meta("k", "v")
    pid = s._conn().info.backend_pid
    _sql(pg_url, f"SELECT pg_terminate_backend({pid})")
    s.set_meta("k", "w")                                   # a write, on the store's connection
    assert s._conn().info.backend_pid != pid
    pid = s._rt_conn().info.backend_pid                    # reads and runtime rows: the second one
    _sql(pg_url, f"SELECT pg_terminate_backend({pid})")
    assert s.get_meta("k") == "w"
    assert s._rt_conn().info.backend_pid != pid
    s.close()


def test_pg_held_write_lock_times_out_cleanly(pg_url):
    import psycopg
    s = _pg(pg_url, statement_timeout_s=0.3)
    holder = psycopg.connect(pg_url)
    try:
        holder.execute("SELECT value FROM counters WHERE name = 'write_lock' FOR UPDATE")
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="database unavailable.*statement timeout"):
            s.next_serial()
        assert 0.25 <= time.monotonic() - t0 < 3
        assert s.get_meta("x") is None   # readers do not wait for the writer
    finally:
        holder.rollback()
        holder.close()
    assert s.next_serial() == 1          # the failed call consumed nothing
    s.close()


def _at_once(n: int, work) -> list:
    """Run ``work(i)`` in n threads released together; results or exceptions, in order."""
    import threading
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = work(i)
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_pg_one_time_token_consumed_once_from_several_connections(pg_url):
    conns = [_pg(pg_url) for _ in range(4)]
    try:
        for r in range(5):
            conns[0].add_token(token(f"once{r}"))
            conns[0].add_token(token(f"enroll{r}"))
            got = _at_once(4, lambda i: conns[i].consume_token(f"once{r}", now=20.0))
            ok = [g for g in got if isinstance(g, TokenRecord)]
            refused = [g for g in got if isinstance(g, TokenError)]
            assert len(ok) == 1 and len(refused) == 3, got
            assert all(e.reason == "used" for e in refused)
            assert conns[1].get_token(f"once{r}").uses == 1
            # The same race through enroll: one identity, the others refused, nothing half-done.
            got = _at_once(4, lambda i: conns[i].enroll(
                f"enroll{r}", key(1000 * r + i), [f"node{r}", f"node{r}-{i}"], DOMAIN, 5.0,
                NET24, set()))
            ok = [g for g in got if isinstance(g, tuple)]
            assert len(ok) == 1 and all(isinstance(g, TokenError) and g.reason == "used"
                                        for g in got if not isinstance(g, tuple)), got
            assert ok[0][0].name == f"node{r}" and ok[0][1].uses == 1
        assert len(conns[2].list_identities()) == 5
    finally:
        for c in conns:
            c.close()


def test_pg_concurrent_enrollments_get_distinct_addresses_names_serials(pg_url):
    workers, per_worker = 6, 25
    conns = [_pg(pg_url) for _ in range(workers)]
    try:
        conns[0].add_token(token("fleet", reusable=True))

        def work(w: int) -> list[tuple[Identity, int]]:
            done = []
            for i in range(per_worker):
                # Every worker proposes the same names: the store must pick free ones.
                ident, _ = conns[w].enroll("fleet", key(10_000 + 100 * w + i),
                                           [f"cam-{n}" for n in range(workers * per_worker)],
                                           DOMAIN, 5.0, ipaddress.IPv4Network("10.70.0.0/16"),
                                           {"10.70.0.1"})
                serial = conns[w].next_serial()
                conns[w].set_certificate(ident.static_public, serial, 99.0)
                done.append((ident, serial))
            return done

        results = _at_once(workers, work)
        for r in results:
            assert isinstance(r, list), r
        idents = [ident for r in results for ident, _ in r]
        serials = [serial for r in results for _, serial in r]
        n = workers * per_worker
        assert len({i.vip4 for i in idents}) == len({i.fqdn for i in idents}) == n
        assert sorted(serials) == list(range(1, n + 1))
        net = ipaddress.IPv4Network("10.70.0.0/16")
        assert sorted((i.vip4 for i in idents), key=ipaddress.IPv4Address) == [
            str(a) for a in list(net.hosts())[1:n + 1]]
        assert conns[0].get_token("fleet").uses == n
        assert len(conns[0].list_identities()) == n
    finally:
        for c in conns:
            c.close()


def test_pg_several_connections_create_the_schema_at_once(pg_url):
    got = _at_once(4, lambda i: _pg(pg_url))
    assert all(not isinstance(g, Exception) for g in got), got
    assert sorted(g.schema_version_found for g in got) == [0] + [SCHEMA_VERSION] * 3
    for g in got:
        g.close()


# --- Configuration and `cyphonic-cloud db upgrade`, both engines ----------------------------

@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_db_upgrade_command(tmp_path, request, engine):
    from click.testing import CliRunner
    from cyphonic.cloud.cli import main
    from cyphonic.cloud.config import load_config
    from cyphonic.cloud.store import open_store
    database = (request.getfixturevalue("pg_url") if engine == "postgres"
                else str(tmp_path / "cloud.sqlite3"))
    conf = tmp_path / "cloud.toml"
    conf.write_text(f"state_dir = {json.dumps(str(tmp_path))}\n"
                    f"database = {json.dumps(database)}\n")
    assert load_config(conf).database_target == database
    run = lambda: CliRunner().invoke(main, ["--config", str(conf), "db", "upgrade"])  # noqa: E731
    r = run()
    assert r.exit_code == 0 and r.output == f"schema version 0 -> {SCHEMA_VERSION}\n", r.output
    r = run()
    assert r.exit_code == 0 and r.output == f"schema version {SCHEMA_VERSION}: up to date\n"
    if engine == "postgres":
        _sql(database, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    else:
        db = sqlite3.connect(database)
        db.execute("PRAGMA user_version = 99")
        db.commit()
        db.close()
    r = run()
    assert r.exit_code == 1 and "schema version 99 is newer" in r.output, r.output
    with pytest.raises(StoreError, match="newer"):
        open_store(load_config(conf).database_target)   # what the server opens at start


def test_config_rejects_other_url_schemes(tmp_path):
    from cyphonic.cloud.config import ConfigError, load_config
    conf = tmp_path / "cloud.toml"
    conf.write_text('database = "mysql://db.example/cloud"\n')
    with pytest.raises(ConfigError, match="database: 'mysql' is not a database URL scheme"):
        load_config(conf)
    conf.write_text('database = "postgres://u@db.example:5433/cloud"\n')
    c = load_config(conf)
    assert c.database_is_postgres and c.database_target == "postgres://u@db.example:5433/cloud"


_CRASHING_RUN = """
    from lab.postgres import PostgresServer
    server = PostgresServer()
    server.start()
    print(server.dir, flush=True)
    sys.stdin.readline()  # killed here, before any cleanup
"""


def test_pg_server_left_by_a_crashed_run_is_removed_by_the_next(pg_server):
    """A test run killed with SIGKILL leaves a running server; the next start removes it."""
    proc = _child(_CRASHING_RUN)
    try:
        line = proc.stdout.readline().strip()
        assert line, proc.stderr.read()
        left = Path(line)
        pid = int((left / "data" / "postmaster.pid").read_text().splitlines()[0])
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    def running(pid: int) -> bool:   # a zombie left for init to reap counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    assert left.is_dir() and running(pid)
    PostgresServer.clean_stale()
    assert not left.exists()
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(pid), "the crashed run's postmaster still runs"
    # The running session's own server (its owner is alive) was left alone.
    assert pg_server.dir.is_dir() and _pg(pg_server.new_database()).close() is None


def test_pg_backup_and_restore_with_pg_dump(pg_server, pg_url, tmp_path):
    """The backup recipe of docs/cloud.md: pg_dump, pg_restore into an empty database."""
    s = _pg(pg_url)
    _fill(s)
    dump = tmp_path / "cloud.dump"
    subprocess.run([str(pg_server.bindir / "pg_dump"), "--format=custom", f"--file={dump}",
                    f"--dbname={pg_url}"], check=True, timeout=60, capture_output=True)
    s.close()
    restored = pg_server.new_database()
    subprocess.run([str(pg_server.bindir / "pg_restore"), f"--dbname={restored}", str(dump)],
                   check=True, timeout=60, capture_output=True)
    s = _pg(restored)
    assert s.schema_version_found == SCHEMA_VERSION
    _check_filled(s)
    s.close()


def test_issue_serial_is_next_serial_and_set_certificate_in_one(store):
    enroll(store, 1)
    s1 = store.issue_serial(key(1), 1000.0)
    s2 = store.issue_serial(key(1), 2000.0)
    assert s2 == s1 + 1
    ident = store.get_identity(key(1))
    assert ident.serial == s2 and ident.cert_not_after == 2000.0
    with pytest.raises(NotFoundError):
        store.issue_serial(key(9), 1000.0)
    store.revoke("n1", 3000.0)
    with pytest.raises(StoreError):
        store.issue_serial(key(1), 1000.0)
    assert store.next_serial() == s2 + 1          # the refused calls consumed no serial
    assert {s1, s2} <= store.revoked_serials()
