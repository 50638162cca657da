"""A real `cyphonic-cloud` process in a temporary directory (`python -m cyphonic.cloud.cli` with
this interpreter): the one runner the tests, the loopback demo (`lab.demo.loopback`) and the
cloud benchmark (`lab.bench.cloud`) share.

`CloudProcess(dir)` runs ``init`` (config, CA and service keys), puts free loopback ports and the
caller's settings into the config; `start()` runs ``serve`` and waits for its "cloud key" line;
`stop()` always reaps it. It never touches anything outside ``dir`` (and the ``database`` it is
given).

Several instances (issue 13; docs/cloud.md, "Several instances"): `CloudProcess.sibling(id)` is
one more process on the same state directory (the keys nodes pin) and database, with its own
config file, ports, ``instance_id``, log and stats file; `CloudInstances(dir, n, database)` starts
``n`` of them at once and stops them all.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time


class CloudFailed(RuntimeError):
    """A `cyphonic-cloud` command failed, or `serve` exited or did not come up."""


def free_port(family=socket.AF_INET, host="127.0.0.1", *, ipv6: bool = True) -> int:
    """A port free for UDP on ``host`` and, unless ``ipv6`` is False, on ::1 too (a cloud that
    listens on both families binds both on it)."""
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not ipv6:
            return port
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
                s6.bind(("::1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free UDP port")


def _die_with_parent() -> None:
    """In the cloud child: get SIGTERM when the parent dies, even by SIGKILL (Linux; best effort)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class CloudProcess:
    """`cyphonic-cloud` (the services its config names) in ``tmpdir``.

    ``domain``, ``prefix`` and ``listen6`` go to ``init`` (None: the example config's value;
    ``listen6=""`` disables IPv6); ``keepalive_s`` and ``lifetime_s`` set
    ``keepalive_interval_s`` and ``registration_lifetime_s`` (None: leave them); ``extra`` sets
    further config keys to TOML values (``{"services": '["as", "nms"]'}``).
    ``database``: the ``database`` key (a ``postgresql://`` URL; None: the state directory's
    SQLite file); ``instance_id``: the ``instance_id`` key (None: the default, host:port).
    ``profile``: run ``serve`` under cProfile, its stats to that file.
    ``die_with_parent``: the cloud gets SIGTERM when this process dies (for long runs).
    """

    # Defaults at class level too: a test may build one with __new__ and set only its paths.
    profile: str | None = None
    die_with_parent = False
    logf = None
    instance_id = ""

    def __init__(self, tmpdir: str, *, domain: str | None = "ov.test", prefix: str | None = "100.64.0.0/16",
                 listen6: str = "::1", keepalive_s: int | None = 2, lifetime_s: int | None = 8,
                 extra: dict | None = None, profile: str | None = None, die_with_parent: bool = False,
                 database: str | None = None, instance_id: str | None = None):
        self.dir = tmpdir
        self.config = os.path.join(tmpdir, "cloud.toml")
        self.state = os.path.join(tmpdir, "state")
        self.env = dict(os.environ, CYPHONIC_CLOUD_CONFIG=self.config)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(tmpdir, "cloud.log")
        self.profile = profile
        self.die_with_parent = die_with_parent
        self.instance_id = instance_id or ""
        args = ["init", "--state-dir", self.state, "--listen4", "127.0.0.1", "--listen6", listen6]
        for option, value in (("--domain", domain), ("--prefix", prefix)):
            if value is not None:
                args += [option, value]
        out = self.cli(*args)
        self.cloud_key = re.search(r"cloud key \(nodes pin this\): (\S+)", out).group(1)
        self.signaling_port = free_port(ipv6=bool(listen6))
        self.relay_port = free_port(ipv6=bool(listen6))
        values = {"signaling_port": self.signaling_port, "relay_port": self.relay_port,
                  "keepalive_interval_s": keepalive_s, "registration_lifetime_s": lifetime_s,
                  "database": json.dumps(database) if database else None,
                  "instance_id": json.dumps(instance_id) if instance_id else None}
        values.update(extra or {})
        with open(self.config) as f:
            text = f.read()
        _write_config(self.config, _set_keys(self.config, text, values))

    def sibling(self, instance_id: str, *, extra: dict | None = None) -> "CloudProcess":
        """One more instance of this cloud, not started: the same state directory (keys) and
        database, its own config file ``cloud-<id>.toml`` (this one's, with free ports, the
        ``instance_id`` and ``extra``), log ``cloud-<id>.log`` and stats file. This process must
        have an ``instance_id`` too (two instances cannot share one)."""
        if not self.instance_id or instance_id == self.instance_id:
            raise ValueError("siblings need an instance_id each, different from this process's")
        safe = _safe_name(instance_id)
        other = CloudProcess.__new__(CloudProcess)
        other.dir, other.state, other.cloud_key = self.dir, self.state, self.cloud_key
        other.config = os.path.join(self.dir, f"cloud-{safe}.toml")
        other.log_path = os.path.join(self.dir, f"cloud-{safe}.log")
        other.env = dict(self.env, CYPHONIC_CLOUD_CONFIG=other.config)
        other.proc = None
        other.die_with_parent = self.die_with_parent
        other.instance_id = instance_id
        ipv6 = not re.search(r'(?m)^listen6 = ""$', open(self.config).read())
        other.signaling_port = free_port(ipv6=ipv6)
        other.relay_port = free_port(ipv6=ipv6)
        values = {"signaling_port": other.signaling_port, "relay_port": other.relay_port,
                  "instance_id": json.dumps(instance_id)}
        values.update(extra or {})
        with open(self.config) as f:
            text = f.read()
        _write_config(other.config, _set_keys(other.config, text, values))
        return other

    def cli(self, *args, check=True) -> str:
        p = subprocess.run([sys.executable, "-m", "cyphonic.cloud.cli", *args], env=self.env,
                           capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise CloudFailed(f"cyphonic-cloud {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout if check else p

    @property
    def address(self) -> tuple[str, int]:
        """Where nodes reach its AS/NMS over IPv4 (``init`` put 127.0.0.1 in the config)."""
        return ("127.0.0.1", self.signaling_port)

    def start(self, timeout_s: float = 15) -> "CloudProcess":
        self.spawn()
        return self.wait_started(timeout_s)

    def spawn(self) -> None:
        """Run ``serve`` and return at once (``wait_started`` waits for it)."""
        self.logf = open(self.log_path, "a")
        self._started_marks = self.log().count("cloud key")   # a restart appends to the same log
        wrap = ["-m", "cProfile", "-o", os.path.abspath(self.profile)] if self.profile else []
        self.proc = subprocess.Popen([sys.executable, *wrap, "-m", "cyphonic.cloud.cli", "serve"], env=self.env,
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent if self.die_with_parent else None)

    def wait_started(self, timeout_s: float = 15) -> "CloudProcess":
        """Wait for the "cloud key" line of the ``serve`` that ``spawn`` ran."""
        marks = getattr(self, "_started_marks", 0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log().count("cloud key") > marks:
                return self
            if self.proc.poll() is not None:
                raise CloudFailed(f"the cloud {self.instance_id or ''} exited ({self.proc.returncode}): "
                                  f"{self.log()[-4000:]}")
            time.sleep(0.05)
        raise CloudFailed(f"the cloud {self.instance_id or ''} did not start within {timeout_s:.0f} s: "
                          f"{self.log()[-4000:]}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        """Terminate (SIGKILL after 10 s), close the log; the exit code (None: never started)."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.logf is not None:
            self.logf.close()
            self.logf = None
        return self.proc.returncode if self.proc else None

    def stats(self) -> dict:
        """The running cloud's counters (`cyphonic-cloud stats --json`)."""
        return json.loads(self.cli("stats", "--json"))

    def last_stats(self) -> dict:
        """The counters the cloud last wrote to its stats file (every 2 s, and when it stops):
        read from the file, so also after it stopped; {} if there is none. Without an
        ``instance_id``: the newest stats*.json of the state directory."""
        if self.instance_id:
            paths = [os.path.join(self.state, f"stats-{_safe_name(self.instance_id)}.json")]
        else:
            paths = sorted(glob.glob(os.path.join(self.state, "stats*.json")), key=os.path.getmtime)
        for path in reversed(paths):
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, ValueError):
                continue
        return {}

    def nodes(self) -> list:
        return json.loads(self.cli("nodes", "--json"))


class CloudInstances:
    """``n`` cloud instances (AS+NMS unless ``extra`` says otherwise) on loopback that share one
    state directory (one ``init``: the CA and signaling keys nodes pin) and one ``database``:
    instance ids ``c1`` .. ``c<n>``, each with its own config file, signaling port, log and
    stats file (`CloudProcess.sibling`). ``database`` None: the state directory's SQLite file
    (several instances on it poll the bus; PostgreSQL is the engine for more than one). The
    other arguments go to `CloudProcess`.

    ``start()`` runs them all at once and waits for each; a failure stops all of them.
    ``stop()`` always stops all of them. A context manager that starts and stops them.
    """

    def __init__(self, tmpdir: str, n: int, database: str | None, **kwargs) -> None:
        if n < 1:
            raise ValueError("at least one instance")
        first = CloudProcess(tmpdir, database=database, instance_id="c1", **kwargs)
        # The siblings copy c1's config: ``extra`` is in it already.
        self.members: list[CloudProcess] = [first, *(first.sibling(f"c{k}") for k in range(2, n + 1))]
        self.database = database
        self.cloud_key = first.cloud_key

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self):
        return iter(self.members)

    def __getitem__(self, i: int) -> CloudProcess:
        return self.members[i]

    def __enter__(self) -> "CloudInstances":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Each instance's IPv4 signaling address, in order."""
        return [m.address for m in self.members]

    def pids(self) -> list[int]:
        return [m.proc.pid for m in self.members if m.proc is not None]

    def start(self, timeout_s: float = 20) -> "CloudInstances":
        try:
            for m in self.members:
                m.spawn()
            deadline = time.monotonic() + timeout_s
            for m in self.members:
                m.wait_started(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return all(m.alive() for m in self.members)

    def stop(self) -> list[int | None]:
        """Stop every instance (SIGTERM, SIGKILL after 10 s); their exit codes."""
        codes = []
        for m in self.members:   # SIGTERM to all first: they stop side by side
            if m.alive():
                with contextlib.suppress(OSError):
                    m.proc.terminate()
        for m in self.members:
            codes.append(m.stop())
        return codes

    def cli(self, *args, check=True) -> str:
        """An admin command (`cyphonic-cloud ...`) against the shared database."""
        return self.members[0].cli(*args, check=check)

    def nodes(self) -> list:
        return self.members[0].nodes()

    def instances(self) -> list:
        return json.loads(self.cli("instances", "--json"))

    def logs(self) -> str:
        """Every instance's log, each under its id (for failure messages)."""
        return "\n".join(f"--- {m.instance_id} ---\n{m.log()[-3000:]}" for m in self.members)


def _safe_name(instance_id: str) -> str:
    """As the server names ``stats-<id>.json`` (``cyphonic.cloud.server.stats_path``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in instance_id)


def _set_keys(path: str, text: str, values: dict) -> str:
    """``text`` with each ``key = ...`` line set to ``values[key]`` (a TOML value; None: left)."""
    for k, v in values.items():
        if v is None:
            continue
        text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {v}", text)
        if n != 1:
            raise CloudFailed(f"no {k} line in {path}")
    return text


def _write_config(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
