"""A PostgreSQL restart under an open ``PostgresStore`` (cyphonic.cloud.store_postgres).

The server (lab/postgres.py, a server of this module's own: the
tests stop it) is stopped and started again on the same data directory while
a store object stays open:

- a call while the server is down fails within a few seconds with a
  ``StoreError`` that says the database is unavailable or cannot be
  connected to: no hang, no psycopg exception;
- once the server is back the same store object works again, without being
  reopened, and from its first call: a connection that died while the store
  was idle is replaced by itself, with nothing lost and nothing done twice;
- a write that failed during the gap changed nothing.

``fast`` is an orderly restart (``systemctl restart postgresql``: every
session ended), ``immediate`` a crash of the server (recovery at start).
"""

from __future__ import annotations

import re
import time

import pytest

from cyphonic.cloud.store import StoreError, TokenError, TokenRecord

UNREACHABLE = r"database unavailable|cannot connect to the database"
GAP_CALL_LIMIT_S = 5.0     # a call while the server is down fails within this long


@pytest.fixture
def pg_server(own_pg_server):
    """A server for this module alone (conftest): its tests stop and start it."""
    return own_pg_server


@pytest.fixture
def store(pg_server):
    from cyphonic.cloud.store_postgres import PostgresStore
    s = PostgresStore(pg_server.new_database(), connect_timeout_s=2)
    yield s
    s.close()


@pytest.fixture
def restart(pg_server):
    """Stop and start the server; the server is always running again after the test."""
    stopped = []

    def stop(mode: str) -> None:
        if mode == "immediate":
            # The test server runs synchronous_commit=off: without this, a crash
            # loses the last commits (a server setting, not the store's doing).
            import psycopg
            with psycopg.connect(pg_server.url(), autocommit=True) as db:
                db.execute("CHECKPOINT")
        pg_server.stop_server(mode)
        stopped.append(mode)

    def start() -> None:
        pg_server.start_server()
        stopped.clear()

    yield stop, start
    if stopped:
        pg_server.start_server()


def _fails_quickly(call) -> StoreError:
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        call()
    took = time.monotonic() - t0
    assert took < GAP_CALL_LIMIT_S, f"{took:.1f} s"
    assert type(e.value).__module__.startswith("cyphonic"), type(e.value)
    return e.value


def _token(token_id: str) -> TokenRecord:
    return TokenRecord(token_id=token_id, secret_hash=b"h" * 32, name="", groups=("default",),
                       reusable=False, expires_at=None, created_at=10.0, used_at=None, uses=0)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_calls_fail_while_down_and_work_again_after(store, restart, mode):
    stop, start = restart
    store.set_meta("k", "v")
    store.add_token(_token("once"))
    assert store.next_serial() == 1
    stop(mode)
    # The first call finds its connection dead, the next ones cannot connect:
    # each is a StoreError that says so, within seconds.
    for call in (lambda: store.get_meta("k"), store.next_serial,
                 lambda: store.consume_token("once", 20.0), store.list_identities):
        e = _fails_quickly(call)
        assert e.__class__ is StoreError, repr(e)
        assert re.search(UNREACHABLE, str(e)), str(e)
        assert "Traceback" not in str(e)
    start()
    # The same object, not reopened: it reconnects by itself.
    assert store.get_meta("k") == "v"
    assert store.next_serial() == 2          # the failed call during the gap consumed nothing
    assert store.consume_token("once", 30.0).uses == 1
    with pytest.raises(TokenError, match="already used"):
        store.consume_token("once", 31.0)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_while_idle_first_call_after_works(store, restart, mode):
    """No call during the gap: the store's connection died unseen; the next call must not fail."""
    stop, start = restart
    store.set_meta("k", "v")
    stop(mode)
    start()
    assert store.get_meta("k") == "v"
    store.set_meta("k", "w")               # a write on the same object, too
    assert store.get_meta("k") == "w"


def test_restart_while_idle_first_write_after_works(store, restart):
    stop, start = restart
    store.add_token(_token("once"))
    stop("fast")
    start()
    # A write is the first call: it runs exactly once (the token is spent once, not refused).
    assert store.consume_token("once", 20.0).uses == 1
    assert store.get_token("once").uses == 1


def test_connection_lost_inside_a_transaction_is_an_error_not_a_retry(store, pg_server):
    """Lost after BEGIN (here while waiting for the write lock): the outcome is the caller's to
    know, so the call fails ("database unavailable"); the next call reconnects."""
    import threading

    import psycopg
    url = store.url
    holder = psycopg.connect(url)
    holder.execute("SELECT value FROM counters WHERE name = 'write_lock' FOR UPDATE")
    pid = store._conn().info.backend_pid

    def terminate() -> None:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))

    killer = threading.Timer(0.3, terminate)
    killer.start()
    try:
        e = _fails_quickly(store.next_serial)
        assert "database unavailable" in str(e), str(e)
    finally:
        killer.join()
        holder.rollback()
        holder.close()
    assert store.next_serial() == 1      # the lost call consumed nothing
    assert store._conn().info.backend_pid != pid
