"""The store's runtime tables (schema version 2, cyphonic/cloud/store_runtime.py) on all three
engines: instances, registrations, the bus; and the migration from version 1."""

from __future__ import annotations

import sqlite3

import pytest

from cyphonic.cloud import store_runtime as rt
from cyphonic.cloud.store import (SCHEMA_VERSION, NotFoundError, RegistrationRecord, SQLiteStore,
                                  StoreError)


@pytest.fixture
def store(any_store):
    return any_store


def join(store, iid, now=100.0, services=("as", "nms")):
    return store.join_instance(iid, services=services, signaling=(f"{iid}:47101",), relay=(), host="h",
                               pid=1, now=now)


def reg(i: int, instance: str, observed: str = "192.0.2.1:1000") -> RegistrationRecord:
    return RegistrationRecord(bytes([i]) * 32, instance, observed, ("10.0.0.2:1000",), True, b"cert", 100.0)


def test_instances_get_distinct_tags_that_survive_a_restart(store):
    a, b = join(store, "a"), join(store, "b")
    assert {a.tag, b.tag} == {1, 2}
    again = join(store, "a", now=200.0)
    assert again.tag == a.tag and again.started == 200.0
    assert [i.instance_id for i in store.list_instances()] == ["a", "b"]
    store.forget_instance("a")
    assert join(store, "c").tag == a.tag                 # a forgotten tag is given again
    with pytest.raises(NotFoundError):
        store.forget_instance("nobody")


def test_heartbeat_liveness_and_a_clean_stop(store):
    join(store, "a", now=100.0)
    store.heartbeat_instance("a", 101.0)
    rec = store.list_instances()[0]
    assert rec.alive(101.0 + rt.INSTANCE_DEAD_S - 0.1) and not rec.alive(101.0 + rt.INSTANCE_DEAD_S)
    store.leave_instance("a")
    assert not store.list_instances()[0].alive(101.0)      # stopped: heartbeat 0
    with pytest.raises(NotFoundError):
        store.heartbeat_instance("ghost", 1.0)


def test_instance_arguments_are_checked(store):
    with pytest.raises(StoreError):
        join(store, "")
    with pytest.raises(StoreError):
        store.join_instance("x", services="as", signaling=(), relay=(), host="h", pid=1, now=1.0)


def test_registrations_are_per_node_and_removed_only_by_their_instance(store):
    join(store, "a"), join(store, "b")
    store.put_registration(reg(1, "a"))
    store.put_registration(reg(2, "a"))
    assert store.get_registration(bytes([1]) * 32) == reg(1, "a")
    store.put_registration(reg(1, "b", "192.0.2.9:9"))      # the node moved to b
    assert store.get_registration(bytes([1]) * 32).instance_id == "b"
    store.drop_registration(bytes([1]) * 32, "a")           # a's late removal does not undo the move
    assert store.get_registration(bytes([1]) * 32).observed == "192.0.2.9:9"
    assert store.count_registrations() == {"a": 1, "b": 1}
    assert len(store.list_registrations()) == 2
    join(store, "a", now=300.0)                              # a restarts: what it had is gone
    assert store.count_registrations() == {"b": 1}
    with pytest.raises(StoreError):
        store.put_registration("not a record")


def test_the_bus_delivers_in_order_once_bounded_and_expiring(store):
    join(store, "a"), join(store, "b")
    for i in range(5):
        store.bus_send("b", bytes([i]) * 50, 100.0)
    assert store.bus_receive("a") == []
    assert store.bus_receive("b", limit=3) == [bytes([i]) * 50 for i in range(3)]
    assert store.bus_receive("b") == [bytes([i]) * 50 for i in range(3, 5)]
    assert store.bus_receive("b") == []
    store.bus_send("b", b"old", 100.0)
    store.heartbeat_instance("a", 100.0 + rt.BUS_MAX_AGE_S + 1)    # a heartbeat sweeps old messages
    assert store.bus_receive("b") == []


def test_a_full_bus_refuses_more(store, monkeypatch):
    monkeypatch.setattr(rt, "BUS_MAX_QUEUED", 3)
    join(store, "a")
    for _ in range(3):
        store.bus_send("a", b"x", 1.0)
    with pytest.raises(StoreError, match="full"):
        store.bus_send("a", b"x", 1.0)


def test_a_version_1_sqlite_database_needs_db_upgrade_and_keeps_its_data(tmp_path):
    path = tmp_path / "v1.sqlite3"
    s = SQLiteStore(path)
    s.set_meta("ca_public", "k")
    s.close()
    db = sqlite3.connect(path)
    for t in ("instances", "registrations", "bus"):
        db.execute(f"DROP TABLE {t}")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="db upgrade"):
        SQLiteStore(path)
    s = SQLiteStore(path, upgrade=True)
    assert s.get_meta("ca_public") == "k" and s.list_instances() == []
    s.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_a_version_1_postgres_database_needs_db_upgrade_and_keeps_its_data(pg_url):
    import psycopg

    from cyphonic.cloud.store_postgres import PostgresStore
    s = PostgresStore(pg_url)
    s.set_meta("ca_public", "k")
    s.close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("DROP TABLE instances, registrations, bus")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="db upgrade"):
        PostgresStore(pg_url)
    s = PostgresStore(pg_url, upgrade=True)
    assert s.get_meta("ca_public") == "k" and s.list_instances() == [] and s.notify_supported
    s.close()
