"""A real `cyphonic-cloud` process in a temporary directory (`python -m cyphonic.cloud.cli` with
this interpreter): the one runner the tests, the loopback demo (`lab.demo.loopback`) and the
cloud benchmark (`lab.bench.cloud`) share.

`CloudProcess(dir)` runs ``init`` (config, CA and service keys), puts free loopback ports and the
caller's settings into the config; `start()` runs ``serve`` and waits for its "cloud key" line;
`stop()` always reaps it. It never touches anything outside ``dir``.
"""

from __future__ import annotations

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
    ``profile``: run ``serve`` under cProfile, its stats to that file.
    ``die_with_parent``: the cloud gets SIGTERM when this process dies (for long runs).
    """

    # Defaults at class level too: a test may build one with __new__ and set only its paths.
    profile: str | None = None
    die_with_parent = False
    logf = None

    def __init__(self, tmpdir: str, *, domain: str | None = "ov.test", prefix: str | None = "100.64.0.0/16",
                 listen6: str = "::1", keepalive_s: int | None = 2, lifetime_s: int | None = 8,
                 extra: dict | None = None, profile: str | None = None, die_with_parent: bool = False):
        self.dir = tmpdir
        self.config = os.path.join(tmpdir, "cloud.toml")
        self.state = os.path.join(tmpdir, "state")
        self.env = dict(os.environ, CYPHONIC_CLOUD_CONFIG=self.config)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(tmpdir, "cloud.log")
        self.profile = profile
        self.die_with_parent = die_with_parent
        args = ["init", "--state-dir", self.state, "--listen4", "127.0.0.1", "--listen6", listen6]
        for option, value in (("--domain", domain), ("--prefix", prefix)):
            if value is not None:
                args += [option, value]
        out = self.cli(*args)
        self.cloud_key = re.search(r"cloud key \(nodes pin this\): (\S+)", out).group(1)
        self.signaling_port = free_port(ipv6=bool(listen6))
        self.relay_port = free_port(ipv6=bool(listen6))
        values = {"signaling_port": self.signaling_port, "relay_port": self.relay_port,
                  "keepalive_interval_s": keepalive_s, "registration_lifetime_s": lifetime_s}
        values.update(extra or {})
        with open(self.config) as f:
            text = f.read()
        for k, v in values.items():
            if v is None:
                continue
            text, n = re.subn(rf"(?m)^{k} = .*$", f"{k} = {v}", text)
            if n != 1:
                raise CloudFailed(f"no {k} line in {self.config}")
        with open(self.config, "w") as f:
            f.write(text)

    def cli(self, *args, check=True) -> str:
        p = subprocess.run([sys.executable, "-m", "cyphonic.cloud.cli", *args], env=self.env,
                           capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise CloudFailed(f"cyphonic-cloud {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout if check else p

    def start(self, timeout_s: float = 15) -> "CloudProcess":
        self.logf = open(self.log_path, "a")
        wrap = ["-m", "cProfile", "-o", os.path.abspath(self.profile)] if self.profile else []
        self.proc = subprocess.Popen([sys.executable, *wrap, "-m", "cyphonic.cloud.cli", "serve"], env=self.env,
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent if self.die_with_parent else None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "cloud key" in self.log():
                return self
            if self.proc.poll() is not None:
                raise CloudFailed(f"the cloud exited ({self.proc.returncode}): {self.log()[-4000:]}")
            time.sleep(0.05)
        raise CloudFailed(f"the cloud did not start within {timeout_s:.0f} s: {self.log()[-4000:]}")

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
        """The counters the cloud last wrote to stats*.json (every 2 s, and when it stops): read
        from the files, so also after it stopped; {} if there are none."""
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
