"""Fixtures shared by several test files.

``pg_server``: one real PostgreSQL server for the whole session (Debian's package,
``initdb`` in a temporary directory, lab/postgres.py), removed at the end;
``pg_url``: a new, empty database on it for one test.
"""

import pytest

from lab.postgres import PostgresServer


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the session (lab/postgres.py), removed at the end."""
    missing = PostgresServer.missing()
    if missing:   # never skipped: `make setup` installs both (apt postgresql, the venv's cloud extra)
        pytest.fail(f"the PostgreSQL store tests need {missing}; run `make setup`")
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server):
    """A new, empty database on the session's server."""
    return pg_server.new_database()
