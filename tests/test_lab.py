"""The lab itself (lab/): segments, hosts, easy and hard NAT, loss, roaming, cleanup.

Needs root and network namespaces: fails (never skips) without them, as CI runs as root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from lab import Lab, LabError
from lab import reflector

pytestmark = pytest.mark.root

PREFIX = "cyl"


def _require_root():
    if os.geteuid() != 0:
        pytest.fail("tests/test_lab.py needs root (network namespaces, nftables); CI runs as root")


def _our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [l.split()[0] for l in out.splitlines() if l.split() and l.split()[0].startswith(PREFIX + "-")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"    # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.fixture
def lab():
    _require_root()
    with Lab(prefix=PREFIX) as lab:
        yield lab


@pytest.fixture
def world(lab):
    """The NAT grid in small: cloud and cloud2 on the internet, n1 and n2 behind an easy NAT,
    n3 behind a hard NAT, n6 IPv6-only on the internet."""
    inet = lab.switch("inet", "198.18.0.0/24", v6="fd00:18::/64")
    w = SimpleNamespace(lab=lab, inet=inet)
    w.cloud = lab.host("cloud", inet)
    w.cloud2 = lab.host("cloud2", inet)
    w.easy = lab.nat_router("easy", inet, lan="10.1.0.0/24", kind="easy")
    w.hard = lab.nat_router("hard", inet, lan="10.2.0.0/24", kind="hard")
    w.n1 = lab.host("n1", w.easy.lan)
    w.n2 = lab.host("n2", w.easy.lan)
    w.n3 = lab.host("n3", w.hard.lan)
    w.n6 = lab.host("n6", inet, v4=False)
    return w


def ping(lab, node, addr, count=1, wait_s=2) -> bool:
    return lab.exec(node, ["ping", "-c", str(count), "-i", "0.2", "-W", str(wait_s), addr],
                    timeout=count * wait_s + 5).returncode == 0


def test_addresses_and_names(world):
    w = world
    assert w.cloud.name == "cyl-cloud" and w.cloud.iface == "eth0"
    assert w.cloud.addr4.startswith("198.18.0.") and w.cloud.addr6.startswith("fd00:18::")
    assert w.easy.wan_addr4.startswith("198.18.0.") and w.easy.lan.gateway4 == "10.1.0.1"
    assert w.n1.addr4.startswith("10.1.0.") and w.n1.addr6 is None
    assert w.n6.addr4 is None and w.n6.addr6.startswith("fd00:18::")
    for r in (w.easy, w.hard):
        got = w.lab.exec(r, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"])
        assert got.stdout.split() == ["1", "1"]


def test_ping_on_the_internet_segment_v4_and_v6(world):
    w = world
    assert ping(w.lab, w.cloud, w.cloud2.addr4)
    assert ping(w.lab, w.cloud, w.cloud2.addr6)
    assert ping(w.lab, w.n6, w.cloud.addr6)


def test_easy_nat_keeps_one_mapping_hard_nat_one_per_destination(world):
    w = world
    for srv in (w.cloud, w.cloud2):
        reflector.serve(w.lab, srv, srv.addr4, [7001, 7002])
    targets = [f"{w.cloud.addr4}:7001", f"{w.cloud.addr4}:7002", f"{w.cloud2.addr4}:7001"]

    easy = reflector.probe(w.lab, w.n1, targets, bind_port=40001)
    assert all(easy.values()), easy
    assert {ip for ip, _ in easy.values()} == {w.easy.wan_addr4}
    assert len({port for _, port in easy.values()}) == 1, f"easy NAT: one mapping expected: {easy}"

    hard = reflector.probe(w.lab, w.n3, targets, bind_port=40001)
    assert all(hard.values()), hard
    assert {ip for ip, _ in hard.values()} == {w.hard.wan_addr4}
    assert len({port for _, port in hard.values()}) == 3, f"hard NAT: one mapping per destination: {hard}"


def test_hosts_behind_the_same_nat_see_each_other_directly(world):
    w = world
    assert ping(w.lab, w.n1, w.n2.addr4)
    reflector.serve(w.lab, w.n2, w.n2.addr4, [7001])
    got = reflector.probe(w.lab, w.n1, [f"{w.n2.addr4}:7001"], bind_port=40002)
    assert got[f"{w.n2.addr4}:7001"] == (w.n1.addr4, 40002)   # no NAT on the LAN


def test_v6_only_host_has_no_ipv4_route(world):
    w = world
    routes = w.lab.exec(w.n6, ["ip", "-4", "route", "show", "table", "all"], check=True).stdout
    assert [r for r in routes.splitlines() if "dev lo" not in r] == [], routes   # loopback only
    assert w.lab.exec(w.n6, ["ip", "-4", "addr", "show", "scope", "global"], check=True).stdout.strip() == ""
    assert not ping(w.lab, w.n6, w.cloud.addr4, wait_s=1)
    assert "default via" in w.lab.exec(w.n6, ["ip", "-6", "route"], check=True).stdout


def test_set_loss_100_drops_everything_and_0_restores(world):
    w = world
    assert ping(w.lab, w.n1, w.cloud.addr4)
    w.lab.set_loss(w.easy, 100)
    assert not ping(w.lab, w.n1, w.cloud.addr4, count=3, wait_s=1)
    assert ping(w.lab, w.n1, w.n2.addr4)                 # the LAN does not cross the router
    w.lab.set_loss(w.easy, 0)
    assert ping(w.lab, w.n1, w.cloud.addr4)
    w.lab.set_loss(w.cloud, 100)                          # a host: its input and output
    assert not ping(w.lab, w.cloud2, w.cloud.addr4, count=2, wait_s=1)
    w.lab.set_loss(w.cloud, 0)
    assert ping(w.lab, w.cloud2, w.cloud.addr4)


def test_move_changes_the_address_and_traffic_uses_the_new_one(world):
    w = world
    lab = w.lab
    reflector.serve(lab, w.cloud, w.cloud.addr4, [7001])
    reflector.serve(lab, w.cloud, w.cloud.addr6, [7006])
    t4, t6 = f"{w.cloud.addr4}:7001", f"[{w.cloud.addr6}]:7006"
    roamer = lab.host("roamer", w.inet)
    old4, old6 = roamer.addr4, roamer.addr6

    lab.move(roamer, "198.18.0.200")                     # explicit v4 address
    assert roamer.addr4 == "198.18.0.200" and roamer.addr6 == old6
    assert reflector.probe(lab, roamer, [t4], 40003)[t4] == ("198.18.0.200", 40003)
    shown = lab.exec(roamer, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert "198.18.0.200/24" in shown and old4 not in shown

    lab.move(roamer)                                     # next free address, both families
    assert roamer.addr6 != old6
    assert reflector.probe(lab, roamer, [t4], 40004)[t4] == (roamer.addr4, 40004)
    assert reflector.probe(lab, roamer, [t6], 40005)[t6] == (roamer.addr6, 40005)

    lab.move(w.n1, w.hard.lan)                           # roam to another network: re-plugged
    assert w.n1.addr4.startswith("10.2.0.") and w.n1.iface == "eth0"
    assert reflector.probe(lab, w.n1, [t4], 40006)[t4][0] == w.hard.wan_addr4


def test_lab_removes_stale_namespaces_and_their_processes():
    _require_root()
    subprocess.run(["ip", "netns", "add", f"{PREFIX}-stale"], check=True, timeout=10)
    orphan = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-stale", "sleep", "300"],
                              start_new_session=True)
    try:
        with Lab(prefix=PREFIX):
            assert f"{PREFIX}-stale" not in _our_namespaces()
            assert orphan.wait(timeout=5) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(timeout=5)
    assert _our_namespaces() == []


def test_teardown_after_an_exception_leaves_nothing(tmp_path):
    _require_root()
    pidfile = tmp_path / "grandchild.pid"
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(prefix=PREFIX) as lab:
            inet = lab.switch("inet", "198.18.0.0/24")
            h = lab.host("h", inet)
            plain = lab.spawn(h, ["sleep", "300"])
            stubborn = lab.spawn(h, [sys.executable, "-c",
                                     "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                     "print('up', flush=True); time.sleep(300)"], log=tmp_path / "stubborn.log")
            # a grandchild in its own session escapes the process group: the namespace sweep gets it
            lab.spawn(h, ["sh", "-c", f"setsid sleep 300 & echo $! > {pidfile}; sleep 300"])
            deadline = time.monotonic() + 5
            while not (pidfile.exists() and pidfile.read_text().strip()
                       and "up" in (tmp_path / "stubborn.log").read_text()):
                assert time.monotonic() < deadline, "spawned processes did not start"
                time.sleep(0.05)
            raise RuntimeError("boom")
    assert _our_namespaces() == []
    grandchild = int(pidfile.read_text())
    for pid in (plain.pid, stubborn.pid, grandchild):
        assert not _alive(pid), f"process {pid} survived the teardown"
    assert plain.returncode == -signal.SIGTERM and stubborn.returncode == -signal.SIGKILL


def test_misuse_is_reported():
    _require_root()
    with Lab(prefix=PREFIX) as lab:
        inet = lab.switch("inet", "198.18.0.0/24")
        with pytest.raises(LabError, match="NAT kind"):
            lab.nat_router("r", inet, lan="10.9.0.0/24", kind="full-cone")
        lab.host("a", inet)
        with pytest.raises(LabError, match="already exists"):
            lab.host("a", inet)
        with pytest.raises(LabError, match="not in segment"):
            lab.move(lab.hosts["a"], "10.0.0.1")
