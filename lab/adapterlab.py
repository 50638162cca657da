"""An adapter in a lab topology: shared by the adapter tests, the demo and the bench."""

from __future__ import annotations

import os
import re
import sys

from appliance.provision import toml_document

from .nodelab import Overlay

# The general nodes' dhclient-script (configures the lease, writes its values for the caller).
DHCLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dhclient-script.sh")
PY = sys.executable
LAN_ADDRESS = "100.127.255.254"


def cyadm(lab, host, sock, *args):
    return lab.exec(host, [PY, "-m", "appliance.cyadm", "--socket", sock, *args], timeout=15)


def start_adapter(lab, ov, adapter, lan_iface, tmp_path, name="adapter", workers=2, gn_token=None, extra=None):
    """`extra`: more adapter.toml keys (or replacements); gn_token "" enrolls no token."""
    gn_token = ov.cli("enroll", f"{name}-gns", "--reusable").strip() if gn_token is None else gn_token
    sock = str(tmp_path / f"{name}.sock")
    conf = tmp_path / f"{name}.toml"
    conf.write_text(toml_document({
        "cloud": f"{ov.cloud_host.addr4}:47101", "cloud_key": ov.cloud_key, "gn_token": gn_token,
        "state_dir": str(tmp_path / name), "lan_interface": lan_iface, "wan_interface": "eth0",
        "lan_address": LAN_ADDRESS, "prefix": "100.64.0.0/10", "workers": workers, "name": name,
        "status_socket": sock, "metrics_file": str(tmp_path / "metrics" / f"{name}.prom"),   # not the host's /run
        **(extra or {})}))
    log = tmp_path / f"{name}.log"
    proc = lab.spawn(adapter, [PY, "-m", "appliance.controller", "--config", str(conf)], log=log)
    ov.wait_log(str(log), "started:", 20)
    return proc, sock, str(log)


def tunnel_up(lab, gn, vip: str, log: str) -> None:
    """The general node's tunnel to ``vip`` comes up (its first pings may be lost while it
    does), then carries 5 pings of 5; the adapter's log in the failure."""
    lab.exec(gn, ["ping", "-n", "-c", "3", "-i", "0.3", "-W", "2", vip], timeout=30)
    p = lab.exec(gn, ["ping", "-n", "-c", "5", "-i", "0.1", "-W", "2", vip], timeout=30)
    assert " 0% packet loss" in p.stdout, p.stdout + open(log).read()[-3000:]


def mac_of(lab, host, iface="eth0"):
    return re.search(r"link/ether ([0-9a-f:]+)", lab.exec(host, ["ip", "link", "show", iface]).stdout).group(1)


def dhclient(lab, gn, tmp_path, name, timeout_s=15):
    cf = tmp_path / f"{name}.conf"
    cf.write_text(f"timeout {timeout_s};\nretry 1;\n"
                  "request subnet-mask, routers, domain-name-servers, domain-name, interface-mtu;\n")
    env_file = f"/tmp/cyl-dhclient-{gn.name}.env"
    if os.path.exists(env_file):
        os.unlink(env_file)
    r = lab.exec(gn, ["dhclient", "-1", "-v", "-cf", str(cf), "-sf", DHCLIENT_SCRIPT,
                      "-lf", str(tmp_path / f"{name}.leases"), "-pf", str(tmp_path / f"{name}.pid"), "eth0"],
                 timeout=timeout_s + 20)
    lease = {}
    if os.path.exists(env_file):
        lease = dict(l.split("=", 1) for l in open(env_file).read().splitlines() if "=" in l)
        os.unlink(env_file)
    return r, lease


def add_gn(lab, adapter, sock, log, ov, mac, name):
    out = cyadm(lab, adapter, sock, "gn", "add", mac, "--name", name)
    assert out.returncode == 0, out.stdout + out.stderr
    ov.wait_log(log, f"general node {name} ({mac}) logged in", 20)


def site_topology(lab, tmp_path, extra_gns: tuple[str, ...] = ()) -> dict:
    """An "internet" segment with the cloud (running), a node daemon "srv" (ready) and the
    adapter's host (WAN eth0); a bare LAN port on the adapter with general node "gn" (plus
    ``extra_gns``) behind it. No adapter yet. Returns a dict of the parts."""
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet, v6=False)
    srv_host = lab.host("srv", inet, v6=False)
    adapter = lab.host("adapter", inet, v6=False)
    lan = lab.switch("lan", gateway=False)
    port = lab.attach(adapter, lan, v4=False, v6=False)
    gn = lab.host("gn", lan, v4=False, v6=False)
    others = {name: lab.host(name, lan, v4=False, v6=False) for name in extra_gns}
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("srv", srv_host)
    srv_vip = ov.wait_ready("srv")["identity"]["vip4"]
    return {"ov": ov, "adapter": adapter, "port": port, "gn": gn, "srv_host": srv_host,
            "srv_vip": srv_vip, "others": others}


def adapter_site(lab, tmp_path, *, workers: int = 2, extra_gns: tuple[str, ...] = (), extra: dict | None = None):
    """The usual site (site_topology) with the adapter running (``extra``: more adapter.toml
    keys) and "gn"'s MAC enrolled as cam1, its lease taken. Returns a dict of the parts."""
    t = site_topology(lab, tmp_path, extra_gns)
    ov, adapter, port, gn, srv_host, srv_vip, others = (
        t["ov"], t["adapter"], t["port"], t["gn"], t["srv_host"], t["srv_vip"], t["others"])
    proc, sock, log = start_adapter(lab, ov, adapter, port.iface, tmp_path, workers=workers, extra=extra)
    add_gn(lab, adapter, sock, log, ov, mac_of(lab, gn), "cam1")
    r, lease = dhclient(lab, gn, tmp_path, "gn")
    assert lease, r.stdout + r.stderr
    return {"ov": ov, "adapter": adapter, "gn": gn, "srv_host": srv_host, "srv_vip": srv_vip,
            "proc": proc, "sock": sock, "log": log, "gn_vip": lease["new_ip_address"], "others": others}
