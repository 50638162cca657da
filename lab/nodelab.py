"""A cloud and cyphonic-node daemons in a lab topology: for the tests, the demo and the bench.

The daemons run as `python -m ...` with this interpreter (`sys.executable`, the venv's), so they
find `cyphonic` and `appliance` through the installed packages, whatever the working directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from appliance.cyadm import ask

PY = sys.executable
DOMAIN = "ov.test"


class Overlay:
    """Runs `cyphonic-cloud` on a lab host and `cyphonic-node` daemons on others."""

    def __init__(self, lab, cloud_host, workdir: str, *, keepalive_s: int = 5, lifetime_s: int = 30) -> None:
        self.lab = lab
        self.cloud_host = cloud_host
        self.dir = workdir
        self.config = os.path.join(workdir, "cloud.toml")
        self.env = dict(os.environ, CYPHONIC_CLOUD_CONFIG=self.config)
        out = self.cli("init", "--state-dir", os.path.join(workdir, "cloud"), "--domain", DOMAIN,
                       "--listen4", cloud_host.addr4 or "", "--listen6", cloud_host.addr6 or "")
        self.cloud_key = re.search(r"cloud key \(nodes pin this\): (\S+)", out).group(1)
        text = open(self.config).read()
        for k, v in (("keepalive_interval_s", keepalive_s), ("registration_lifetime_s", lifetime_s)):
            text = re.sub(rf"(?m)^{k} = .*$", f"{k} = {v}", text)
        open(self.config, "w").write(text)
        self.cloud_log = os.path.join(workdir, "cloud.log")
        self.nodes: dict[str, dict] = {}

    def cli(self, *args: str) -> str:
        p = subprocess.run([PY, "-m", "cyphonic.cloud.cli", *args], env=self.env,
                           capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise AssertionError(f"cyphonic-cloud {' '.join(args)}: {p.stderr}")
        return p.stdout

    def start_cloud(self) -> float:
        """Start the cloud, or start it again on its state after `stop_cloud`; returns the time
        (time.time()) it was seen listening: its "cloud key" line, logged once its sockets are bound."""
        seen = self._read(self.cloud_log).count("cloud key")
        self.cloud_proc = self.lab.spawn(self.cloud_host, [PY, "-m", "cyphonic.cloud.cli", "--config",
                                                           self.config, "serve"], log=self.cloud_log)
        self.wait_log(self.cloud_log, "cloud key", 15, count=seen + 1, poll=0.01)
        return time.time()

    def stop_cloud(self, kill: bool = True) -> None:
        """The cloud goes away: SIGKILL (a crash) or SIGTERM (a clean stop). Its state stays."""
        (self.cloud_proc.kill if kill else self.cloud_proc.terminate)()
        self.cloud_proc.wait(15)

    @staticmethod
    def _read(path: str) -> str:
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_log(self, path: str, needle: str, timeout: float, *, count: int = 1, poll: float = 0.05) -> None:
        """Wait until ``needle`` is in the log at ``path`` (``count`` times)."""
        end = time.time() + timeout
        while time.time() < end:
            if self._read(path).count(needle) >= count:
                return
            time.sleep(poll)
        raise AssertionError(f"{needle!r} not in {path} after {timeout}s:\n{self._read(path)[-3000:]}")

    def add_node(self, name: str, host, *, group: str = "default", cloud: list | None = None,
                 extra: dict | None = None) -> dict:
        token = self.cli("enroll", name, "--group", group).strip()
        if cloud is None:
            addr = self.cloud_host.addr4 if host.addr4 else f"[{self.cloud_host.addr6}]"
            cloud = f"{addr}:47101"
        conf = {
            "cloud": cloud, "cloud_key": self.cloud_key, "token": token, "name": name,
            "state_dir": os.path.join(self.dir, name), "interface": "cy0",
            "listen4": "0.0.0.0" if host.addr4 else "", "listen6": "::" if host.addr6 else "",
            "dns_listen": "127.0.0.1:53", "dns_upstream": "none",
            "status_socket": os.path.join(self.dir, f"{name}.sock"),
            "metrics_file": os.path.join(self.dir, "metrics", f"{name}.prom"),   # not the host's /run
            **(extra or {}),
        }
        path = os.path.join(self.dir, f"{name}.toml")
        with open(path, "w") as f:
            for k, v in conf.items():
                f.write(f"{k} = {json.dumps(v)}\n")
        log = os.path.join(self.dir, f"{name}.log")
        proc = self.lab.spawn(host, [PY, "-m", "cyphonic.node.daemon", "--config", path], log=log)
        node = {"name": name, "host": host, "config": path, "log": log, "proc": proc,
                "socket": conf["status_socket"], "metrics_file": conf["metrics_file"], "fqdn": f"{name}.{DOMAIN}"}
        self.nodes[name] = node
        return node

    def wait_ready(self, name: str, timeout: float = 20) -> dict:
        node = self.nodes[name]
        self.wait_log(node["log"], "registered:", timeout)
        self.wait_log(node["log"], "interface cy0", timeout)
        self.wait_log(node["log"], "DNS on", timeout)
        return self.status(name)

    def status(self, name: str) -> dict:
        return ask(self.nodes[name]["socket"])

    def dig(self, name: str, fqdn: str, *extra: str) -> subprocess.CompletedProcess:
        return self.lab.exec(self.nodes[name]["host"], ["dig", "@127.0.0.1", fqdn, "A", "+tries=1",
                                                          "+time=8", *extra], timeout=15)

    def resolve(self, name: str, fqdn: str) -> str:
        out = self.dig(name, fqdn, "+short").stdout.strip().splitlines()
        return out[-1] if out else ""

    def ping(self, name: str, target: str, count: int = 5, interval: float = 0.2) -> tuple[int, int, str]:
        p = self.lab.exec(self.nodes[name]["host"], ["ping", "-n", "-c", str(count), "-i", str(interval),
                                                     "-W", "2", target], timeout=count * interval + 15)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", p.stdout)
        return (int(m.group(1)), int(m.group(2)), p.stdout) if m else (count, 0, p.stdout + p.stderr)

    def path(self, name: str, peer: str) -> str | None:
        for t in self.status(name).get("tunnels", []):
            if t["peer"] == f"{peer}.{DOMAIN}" or t["peer"] == peer:
                return t["path"]
        return None


def ping_background(lab, host, target: str, seconds: float, interval: float = 0.05) -> subprocess.Popen:
    """A stock ping running in the background, its stdout piped (for ``ping_result``)."""
    return lab.spawn(host, ["ping", "-n", "-D", "-c", str(int(seconds / interval)), "-i", str(interval),
                            "-W", "1", target], stdout=subprocess.PIPE)


def ping_result(p: subprocess.Popen) -> tuple[int, int, float]:
    """(sent, received, the longest gap between two answers in seconds) of a finished ping."""
    out = p.communicate(timeout=120)[0].decode(errors="replace")
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    stamps = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]
    gap = max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)
    return (int(m.group(1)), int(m.group(2)), gap) if m else (0, 0, 0.0)


class ClusterOverlay(Overlay):
    """Several cloud instances (AS+NMS) and relays (TRS alone), each on its own lab host, on one
    PostgreSQL database (issue 13; docs/cloud.md, "Several instances"). They share the state
    directory (keys) and the database; each has its own config (``instance_id``, addresses).
    Nodes get every instance's address, starting with the one ``add_node(first=...)`` names."""

    def __init__(self, lab, instance_hosts: dict, relay_hosts: dict, workdir: str, database: str, *,
                 keepalive_s: int = 5, lifetime_s: int = 30) -> None:
        first = next(iter(instance_hosts.values()))
        super().__init__(lab, first, workdir, keepalive_s=keepalive_s, lifetime_s=lifetime_s)
        self.instance_hosts = dict(instance_hosts)
        self.relay_hosts = dict(relay_hosts)
        self.database = database
        base = open(self.config).read()
        self.configs: dict[str, str] = {}
        for name, host in [*instance_hosts.items(), *relay_hosts.items()]:
            services = '["trs"]' if name in relay_hosts else '["as", "nms"]'
            text = base
            for k, v in (("listen4", json.dumps(host.addr4 or "")), ("listen6", json.dumps(host.addr6 or "")),
                         ("services", services), ("database", json.dumps(database)),
                         ("instance_id", json.dumps(name))):
                text, n = re.subn(rf"(?m)^#? ?{k} = .*$", f"{k} = {v}", text, count=1)
                if n != 1:
                    raise AssertionError(f"no {k} line in {self.config}")
            path = os.path.join(workdir, f"cloud-{name}.toml")
            with open(path, "w") as f:
                f.write(text)
            self.configs[name] = path
        self.env["CYPHONIC_CLOUD_CONFIG"] = self.configs[next(iter(instance_hosts))]
        self.procs: dict[str, subprocess.Popen] = {}

    def log_of(self, name: str) -> str:
        return os.path.join(self.dir, f"cloud-{name}.log")

    def start_cloud(self) -> float:
        for name in [*self.relay_hosts, *self.instance_hosts]:
            self.start_instance(name)
        return time.time()

    def start_instance(self, name: str) -> None:
        host = self.instance_hosts.get(name) or self.relay_hosts[name]
        log = self.log_of(name)
        seen = self._read(log).count("cloud key")
        self.procs[name] = self.lab.spawn(host, [PY, "-m", "cyphonic.cloud.cli", "--config", self.configs[name],
                                                 "serve"], log=log)
        self.wait_log(log, "cloud key", 20, count=seen + 1, poll=0.02)

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(15)

    def stop_cloud(self, kill: bool = True) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                (p.kill if kill else p.terminate)()
                p.wait(15)

    def instances(self) -> list:
        return json.loads(self.cli("instances", "--json"))

    def address(self, name: str, v6: bool = False) -> str:
        h = self.instance_hosts[name]
        return f"[{h.addr6}]:47101" if v6 else f"{h.addr4}:47101"

    def add_node(self, name: str, host, *, group: str = "default", first: str | None = None) -> dict:
        order = list(self.instance_hosts)
        if first is not None:
            i = order.index(first)
            order = order[i:] + order[:i]
        cloud = [self.address(n, v6=not host.addr4) for n in order]
        node = super().add_node(name, host, group=group, cloud=cloud, extra={"cloud_order": "listed"})
        node["first"] = order[0]
        return node
