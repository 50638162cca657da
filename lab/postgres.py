"""A throwaway PostgreSQL server for the tests, from Debian's ``postgresql`` package.

``PostgresServer.start()`` runs ``initdb`` into a fresh directory
``<tmp>/cyphonic-pg-XXXX`` and starts the server listening only on a Unix
socket in that directory (no TCP port). As root it runs the server as the
``postgres`` system user (``initdb`` refuses root). ``stop()`` stops it
with ``pg_ctl stop -m immediate`` and removes the directory;
``stop_server()`` and ``start_server()`` stop and start it on the same data
directory (a database restart under a running store).

A run that crashed leaves its directory behind; the next ``start()`` removes
every ``cyphonic-pg-*`` directory whose owning test process (``owner.pid``)
is gone, stopping its server first.

Durability settings are off (``fsync``, ``synchronous_commit``): these are
tests of behaviour, not of crash safety.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PREFIX = "cyphonic-pg-"
SUPERUSER = "cyphonic"


def pg_bindir() -> Path | None:
    """Newest ``/usr/lib/postgresql/<v>/bin`` that has initdb, or None."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(Path(p).parent.parent.name)
                  if Path(p).parent.parent.name.isdigit() else 0)
    return Path(dirs[-1]).parent if dirs else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PostgresServer:
    @staticmethod
    def missing() -> str:
        """Why the tests cannot start a server here ("" when they can)."""
        if pg_bindir() is None:
            return "PostgreSQL is not installed (Debian package postgresql; `make setup`)"
        if importlib.util.find_spec("psycopg") is None:
            return "psycopg is not installed (the cloud extra; `make setup`)"
        return ""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; "
                               "`make setup` installs it)")
        self.dir: Path | None = None
        self._db_numbers = itertools.count(1)

    @property
    def data(self) -> Path:
        assert self.dir is not None
        return self.dir / "data"

    def _as_server_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def _run(self, argv: list[str], timeout: float = 60) -> None:
        subprocess.run(self._as_server_user(argv), check=True, timeout=timeout,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/")

    @staticmethod
    def clean_stale() -> None:
        """Remove directories of earlier runs whose test process is gone."""
        for d in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
            owner = Path(d) / "owner.pid"
            try:
                pid = int(owner.read_text())
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                continue
            _kill_postmaster(Path(d) / "data")
            shutil.rmtree(d, ignore_errors=True)

    def start(self) -> None:
        self.clean_stale()
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        try:
            self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                       "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            self.start_server()
        except BaseException:
            self.stop()
            raise

    def start_server(self) -> None:
        """Start the server on the existing data directory (after ``stop_server``)."""
        assert self.dir is not None
        opts = (f"-k {self.dir} -c listen_addresses='' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts,
                   "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start"])

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server but keep its data directory, so ``start_server`` brings it back.

        ``fast`` ends every session (as ``systemctl restart postgresql`` does);
        ``immediate`` is a crash without a checkpoint (recovery at the next start).
        """
        assert self.dir is not None and mode in ("fast", "immediate")
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode,
                   "-w", "-t", "30", "stop"], timeout=40)

    def url(self, dbname: str = "postgres") -> str:
        assert self.dir is not None
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.dir}"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        import psycopg
        name = f"t{next(self._db_numbers)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError, TypeError):
            return "\n".join((self.dir / "server.log").read_text().splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.dir is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            if (self.data / "postmaster.pid").exists():
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                           "-w", "-t", "30", "stop"], timeout=40)
        _kill_postmaster(self.data)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


def _kill_postmaster(data: Path) -> None:
    """Stop the postmaster named in ``data/postmaster.pid`` at once, if it still runs.

    SIGQUIT is PostgreSQL's immediate shutdown: the postmaster stops its
    children and exits. Only a process whose command line names this data
    directory is signalled (a pid may have been reused since).
    """
    try:
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError, IndexError):
        return
    if b"postgres" not in cmdline or os.fsencode(str(data)) not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 10   # gone before its directory is removed
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.02)
