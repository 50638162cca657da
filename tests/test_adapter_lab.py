"""The adapter end to end in namespaces: a general node with stock tools only (dhclient,
dig, ping, iperf3) behind cyphonic-adapter, a cloud and a cyphonic-node daemon."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from lab import Lab
from nodelab import DOMAIN, Overlay

pytestmark = pytest.mark.root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
LAN_ADDRESS = "100.127.255.254"


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces); CI runs them as root")
    with Lab(prefix="cya") as lab:
        yield lab


def cyadm(lab, host, sock, *args):
    return lab.exec(host, [PY, "-m", "appliance.cyadm", "--socket", sock, *args], timeout=15)


def test_general_node_gets_a_lease_resolves_pings_and_runs_iperf3(lab, tmp_path):
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet, v6=False)
    srv_host = lab.host("srv", inet, v6=False)
    adapter = lab.host("adapter", inet, v6=False)           # eth0: WAN
    lan = lab.switch("lan", gateway=False)
    port = lab.attach(adapter, lan, v4=False, v6=False)     # LAN port, no address yet
    gn = lab.host("gn", lan, v4=False, v6=False)            # stock tools only
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("srv", srv_host)
    srv_vip = ov.wait_ready("srv")["identity"]["vip4"]
    gn_token = ov.cli("enroll", "gns", "--reusable").strip()
    sock = str(tmp_path / "adapter.sock")
    conf = tmp_path / "adapter.toml"
    conf.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {
        "cloud": f"{cloud.addr4}:47101", "cloud_key": ov.cloud_key, "gn_token": gn_token,
        "state_dir": str(tmp_path / "adapter"), "lan_interface": port.iface, "wan_interface": "eth0",
        "lan_address": LAN_ADDRESS, "prefix": "100.64.0.0/10", "workers": 2,
        "status_socket": sock}.items()) + "\n")
    log = tmp_path / "adapter.log"
    proc = lab.spawn(adapter, [PY, "-m", "appliance.controller", "--config", str(conf)], log=log, cwd=ROOT)
    ov.wait_log(str(log), "started:", 20)
    mac = re.search(r"link/ether ([0-9a-f:]+)", lab.exec(gn, ["ip", "link", "show", "eth0"]).stdout).group(1)
    def dhclient(name: str, timeout_s: int):
        cf = tmp_path / f"{name}.conf"
        cf.write_text(f"timeout {timeout_s};\nretry 1;\n"
                      "request subnet-mask, routers, domain-name-servers, domain-name, interface-mtu;\n")
        return lab.exec(gn, ["dhclient", "-1", "-v", "-cf", str(cf), "-sf", f"{ROOT}/tests/lab/dhclient-script.sh",
                             "-lf", str(tmp_path / f"{name}.leases"), "-pf", str(tmp_path / f"{name}.pid"),
                             "eth0"], timeout=timeout_s + 20)

    # an unenrolled MAC gets no lease
    r = dhclient("gn0", 4)
    assert r.returncode != 0 and "bound to" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert "No DHCPOFFERS received" in r.stdout + r.stderr
    out = cyadm(lab, adapter, sock, "gn", "add", mac, "--name", "cam1")
    assert out.returncode == 0, out.stdout + out.stderr
    ov.wait_log(str(log), "general node cam1", 20)
    ov.wait_log(str(log), "registered", 20)
    env_file = f"/tmp/cyl-dhclient-{gn.name}.env"
    if os.path.exists(env_file):
        os.unlink(env_file)
    r = dhclient("gn", 15)
    lease_line = [l for l in (r.stdout + r.stderr).splitlines() if "bound to" in l]
    assert lease_line, r.stdout + r.stderr + open(log).read()[-3000:]
    lease = dict(l.split("=", 1) for l in open(env_file).read().splitlines() if "=" in l)
    gn_vip = lease["new_ip_address"]
    assert lease["new_routers"] == LAN_ADDRESS and lease["new_domain_name_servers"] == LAN_ADDRESS
    assert int(lease["new_interface_mtu"]) <= 1420
    # the stock dig resolves the node's FQDN through the adapter (the tunnel comes up meanwhile)
    d = lab.exec(gn, ["dig", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "A", "+tries=1", "+time=10"], timeout=20)
    assert srv_vip in d.stdout and "status: NOERROR" in d.stdout, d.stdout + open(log).read()[-3000:]
    p = lab.exec(gn, ["ping", "-n", "-c", "10", "-i", "0.1", "-W", "2", srv_vip], timeout=30)
    assert " 0% packet loss" in p.stdout, p.stdout + open(log).read()[-3000:]
    # the node reaches the general node by its FQDN too
    assert ov.resolve("srv", f"cam1.{DOMAIN}") == gn_vip
    assert ov.ping("srv", gn_vip, count=3)[1] == 3
    # iperf3 both ways, bounded
    lab.spawn(srv_host, ["iperf3", "-s", "-1", "-B", srv_vip], log=tmp_path / "i1.log")
    time.sleep(0.5)
    r = lab.exec(gn, ["iperf3", "-c", srv_vip, "-t", "2", "-J"], timeout=30)
    up = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
    lab.spawn(gn, ["iperf3", "-s", "-1", "-B", gn_vip], log=tmp_path / "i2.log")
    time.sleep(0.5)
    r = lab.exec(srv_host, ["iperf3", "-c", gn_vip, "-t", "2", "-J"], timeout=30)
    down = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
    assert up > 5e6 and down > 5e6, (up, down)
    st = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    assert st["general_nodes"][0]["vip4"] == gn_vip and st["general_nodes"][0]["lease_expires_in_s"] > 0
    assert any(t["peer"] == f"srv.{DOMAIN}" and t["up"] for t in st["tunnels"])
    assert sum(w.get("sealed", 0) for w in st["workers"]) > 100
    proc.terminate()
    proc.wait(15)
    assert "packet filter removed" in open(log).read()
