"""Fixtures shared by several test files.

``pg_server``: one real PostgreSQL server for the whole session (Debian's package,
``initdb`` in a temporary directory, lab/postgres.py), removed at the end;
``pg_url``: a new, empty database on it for one test; ``own_pg_server``: a server for one
module that stops and starts it; ``any_store``: a new store on each engine in turn
(memory, SQLite, PostgreSQL).
"""

import pytest

from lab.postgres import PostgresServer


def _a_server():
    missing = PostgresServer.missing()
    if missing:   # never skipped: `make setup` installs both (apt postgresql, the venv's cloud extra)
        pytest.fail(f"the PostgreSQL store tests need {missing}; run `make setup`")
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the session (lab/postgres.py), removed at the end."""
    yield from _a_server()


@pytest.fixture(scope="module")
def own_pg_server():
    """A server for one test module alone (its tests stop and start it)."""
    yield from _a_server()


@pytest.fixture
def pg_url(pg_server):
    """A new, empty database on the session's server."""
    return pg_server.new_database()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_store(request, tmp_path):
    from cyphonic.cloud.store import MemoryStore, SQLiteStore
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = SQLiteStore(tmp_path / "cloud.sqlite3")
    else:
        from cyphonic.cloud.store_postgres import PostgresStore
        s = PostgresStore(request.getfixturevalue("pg_url"))
    yield s
    s.close()
