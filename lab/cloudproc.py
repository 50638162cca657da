"""A real `cyphonic-cloud` process in a temporary directory (`python -m cyphonic.cloud.cli` with
this interpreter), for the tests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time


def free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    """A port free for UDP on both 127.0.0.1 and ::1 (we bind both families on it)."""
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
                s6.bind(("::1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free UDP port")


class CloudProcess:
    def __init__(self, tmpdir: str, *, keepalive_s: int = 2, lifetime_s: int = 8, extra: dict | None = None):
        self.dir = tmpdir
        self.config = os.path.join(tmpdir, "cloud.toml")
        self.state = os.path.join(tmpdir, "state")
        self.env = dict(os.environ, CYPHONIC_CLOUD_CONFIG=self.config)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(tmpdir, "cloud.log")
        out = self.cli("init", "--state-dir", self.state, "--domain", "ov.test",
                       "--listen4", "127.0.0.1", "--listen6", "::1")
        self.cloud_key = re.search(r"cloud key \(nodes pin this\): (\S+)", out).group(1)
        self.signaling_port = free_port()
        self.relay_port = free_port()
        text = open(self.config).read()
        values = {"signaling_port": self.signaling_port, "relay_port": self.relay_port,
                  "keepalive_interval_s": keepalive_s, "registration_lifetime_s": lifetime_s,
                  "prefix": '"100.64.0.0/16"'}
        values.update(extra or {})
        for k, v in values.items():
            text = re.sub(rf"(?m)^{k} = .*$", f"{k} = {v}", text)
        open(self.config, "w").write(text)

    def cli(self, *args, check=True) -> str:
        p = subprocess.run([sys.executable, "-m", "cyphonic.cloud.cli", *args], env=self.env,
                           capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"cyphonic-cloud {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p.stdout if check else p

    def start(self) -> "CloudProcess":
        self.logf = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "cyphonic.cloud.cli", "serve"], env=self.env,
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        while time.time() < deadline:
            if "cloud key" in self.log():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"cloud exited: {self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"cloud did not start: {self.log()}")

    def log(self) -> str:
        try:
            return open(self.log_path).read()
        except OSError:
            return ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "logf"):
            self.logf.close()
        return self.proc.returncode if self.proc else None

    def stats(self) -> dict:
        return json.loads(self.cli("stats", "--json"))

    def nodes(self) -> list:
        return json.loads(self.cli("nodes", "--json"))
