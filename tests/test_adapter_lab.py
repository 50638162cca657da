"""The adapter end to end in namespaces: a general node with stock tools only (dhclient,
dig, ping, iperf3) behind cyphonic-adapter, a cloud and a cyphonic-node daemon."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from lab import Lab
from lab.nodelab import DOMAIN, Overlay
from lab.adapterlab import LAN_ADDRESS, adapter_site, site_topology, add_gn, cyadm, dhclient, mac_of, start_adapter

pytestmark = pytest.mark.root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces); CI runs them as root")
    with Lab(prefix="cya") as lab:
        yield lab


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
    proc, sock, log = start_adapter(lab, ov, adapter, port.iface, tmp_path)
    mac = mac_of(lab, gn)
    # an unenrolled MAC gets no lease
    r, lease = dhclient(lab, gn, tmp_path, "gn0", timeout_s=4)
    assert not lease and "No DHCPOFFERS received" in r.stdout + r.stderr, r.stdout + r.stderr
    # ... and is listed as an unknown device asking for one
    unknown = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)["dhcp"]["unknown_macs"]
    [row] = [m for m in unknown["macs"] if m["mac"] == mac]
    assert row["count"] >= 1 and unknown["total"] >= row["count"] and time.time() - row["last_seen"] < 10, unknown
    assert f"{mac}  {row['count']} requests" in cyadm(lab, adapter, sock, "status").stdout
    add_gn(lab, adapter, sock, log, ov, mac, "cam1")
    unknown = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)["dhcp"]["unknown_macs"]
    assert mac not in {m["mac"] for m in unknown["macs"]} and unknown["total"] >= row["count"]   # enrolled now
    r, lease = dhclient(lab, gn, tmp_path, "gn")
    assert lease, r.stdout + r.stderr + open(log).read()[-3000:]
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
    assert st["identity"]["fqdn"] == f"adapter.{DOMAIN}" and st["cloud"]["state"] == "ready"  # its own identity
    assert st["general_nodes"][0]["vip4"] == gn_vip and st["general_nodes"][0]["lease_expires_in_s"] > 0
    assert any(t["peer"] == f"srv.{DOMAIN}" and t["up"] for t in st["tunnels"])
    assert sum(w.get("sealed", 0) for w in st["workers"]) > 100
    # every ping above was a lone packet: its worker told the controller before sending it
    assert st["data_path"]["busy_poll_us"] == 500 and st["data_path"]["heads_ups"] >= 10, st["data_path"]
    assert not any(w.get("heads_up_failed") for w in st["workers"]) and not st["data_path"]["handler_errors"]
    proc.terminate()
    proc.wait(15)
    assert "packet filter removed" in open(log).read()
    assert "cyphonic" not in lab.exec(adapter, ["nft", "list", "tables"]).stdout


def test_two_adapters_behind_their_own_nats_and_two_general_nodes_behind_one(lab, tmp_path):
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet, v6=False)
    ra = lab.nat_router("ra", inet, lan="10.1.0.0/24", kind="easy")
    rb = lab.nat_router("rb", inet, lan="10.2.0.0/24", kind="easy")
    ad_a = lab.host("ada", ra.lan, v6=False)
    ad_b = lab.host("adb", rb.lan, v6=False)
    lan_a = lab.switch("lana", gateway=False)
    lan_b = lab.switch("lanb", gateway=False)
    pa = lab.attach(ad_a, lan_a, v4=False, v6=False)
    pb = lab.attach(ad_b, lan_b, v4=False, v6=False)
    g1 = lab.host("g1", lan_a, v4=False, v6=False)
    g2 = lab.host("g2", lan_a, v4=False, v6=False)
    g3 = lab.host("g3", lan_b, v4=False, v6=False)
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    _, sock_a, log_a = start_adapter(lab, ov, ad_a, pa.iface, tmp_path, name="ada")
    _, sock_b, log_b = start_adapter(lab, ov, ad_b, pb.iface, tmp_path, name="adb")
    for host, sock, log, name in ((g1, sock_a, log_a, "g1"), (g2, sock_a, log_a, "g2"), (g3, sock_b, log_b, "g3")):
        add_gn(lab, ad_a if sock == sock_a else ad_b, sock, log, ov, mac_of(lab, host), name)
    vips = {}
    for host, name in ((g1, "g1"), (g2, "g2"), (g3, "g3")):
        r, lease = dhclient(lab, host, tmp_path, name)
        assert lease, r.stdout + r.stderr
        vips[name] = lease["new_ip_address"]
    # across the two adapters, both behind NAT: hole punching
    d = lab.exec(g1, ["dig", "+short", f"@{LAN_ADDRESS}", f"g3.{DOMAIN}", "+time=10", "+tries=1"], timeout=20)
    assert d.stdout.strip() == vips["g3"], d.stdout + open(log_a).read()[-2000:]
    p = lab.exec(g1, ["ping", "-n", "-c", "5", "-i", "0.1", "-W", "2", vips["g3"]], timeout=20)
    assert " 0% packet loss" in p.stdout, p.stdout + open(log_a).read()[-2000:]
    st = json.loads(cyadm(lab, ad_a, sock_a, "status", "--json").stdout)
    assert any(t["peer"] == f"g3.{DOMAIN}" and t["path"] == "punched" for t in st["tunnels"]), st["tunnels"]
    # two general nodes behind one adapter: the name resolves, the LAN carries them
    d = lab.exec(g1, ["dig", "+short", f"@{LAN_ADDRESS}", f"g2.{DOMAIN}", "+time=10", "+tries=1"], timeout=20)
    assert d.stdout.strip() == vips["g2"], d.stdout
    p = lab.exec(g1, ["ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", vips["g2"]], timeout=20)
    assert " 0% packet loss" in p.stdout, p.stdout


def test_worker_killed_during_iperf3_and_no_clear_packet_on_the_wan(lab, tmp_path):
    import signal as _signal
    site = adapter_site(lab, tmp_path, workers=1)
    adapter, gn, srv_host, srv_vip = site["adapter"], site["gn"], site["srv_host"], site["srv_vip"]
    sock, gn_vip = site["sock"], site["gn_vip"]
    assert lab.exec(gn, ["dig", "+short", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "+time=10"], timeout=20) \
        .stdout.strip() == srv_vip
    # capture the WAN port: nothing may leave with the general node's address as source
    cap = lab.spawn(adapter, ["tcpdump", "-i", "eth0", "-n", "-U", "-w", str(tmp_path / "wan.pcap"),
                              f"host {gn_vip} or host {srv_vip}"], log=tmp_path / "tcpdump.log")
    lab.spawn(srv_host, ["iperf3", "-s", "-1", "-B", srv_vip], log=tmp_path / "iperf-s.log")
    time.sleep(0.7)
    client = lab.spawn(gn, ["iperf3", "-c", srv_vip, "-u", "-b", "20M", "-l", "1200", "-t", "4", "-J"],
                       log=tmp_path / "iperf-c.json")
    time.sleep(1.5)
    st = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    victim = st["workers"][0]["pid"]
    os.kill(victim, _signal.SIGKILL)
    client.wait(30)
    time.sleep(0.5)
    cap.terminate()
    cap.wait(10)
    res = json.loads(open(tmp_path / "iperf-c.json").read())["end"]["sum"]
    print(f"\nworker killed mid-iperf3: {res['lost_percent']:.1f}% of 4 s lost")
    assert res["lost_percent"] < 25, res          # only what was in flight (and queued) while it died
    st = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    assert st["worker_restarts"] >= 1 and all(w["alive"] for w in st["workers"])
    assert st["workers"][0]["pid"] != victim
    assert any(h["code"] == "worker-restarted" for h in st["health"])
    p = lab.exec(gn, ["ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", srv_vip], timeout=20)
    assert " 0% packet loss" in p.stdout, p.stdout
    dump = lab.exec(adapter, ["tcpdump", "-n", "-r", str(tmp_path / "wan.pcap")], timeout=20)
    assert dump.stdout.strip() == "", dump.stdout[:2000]   # no clear packet of the GN on the WAN


def test_gn_add_and_remove_disturb_no_other_general_node(lab, tmp_path):
    """cam1 pings the node every 10 ms while cam2 is added (and gets its lease and a tunnel) and
    removed with cyadm: not one of cam1's pings is lost and no worker restarts (adding used to
    fork the pool again, losing what was in its queues)."""
    site = adapter_site(lab, tmp_path, extra_gns=("gn2",))
    adapter, gn, gn2, ov = site["adapter"], site["gn"], site["others"]["gn2"], site["ov"]
    sock, log, srv_vip = site["sock"], site["log"], site["srv_vip"]
    assert lab.exec(gn, ["dig", "+short", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "+time=10"], timeout=20) \
        .stdout.strip() == srv_vip                                 # cam1's tunnel is up
    workers = [w["pid"] for w in json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)["workers"]]
    count = 800                                                    # 8 s at 10 ms; the rest takes ~3 s
    pinger = lab.spawn(gn, ["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "2", srv_vip],
                       log=tmp_path / "ping.log")
    t0 = time.monotonic()
    time.sleep(0.5)
    mac2 = mac_of(lab, gn2)
    add_gn(lab, adapter, sock, log, ov, mac2, "cam2")
    r, lease = dhclient(lab, gn2, tmp_path, "gn2")
    assert lease, r.stdout + r.stderr
    assert lab.exec(gn2, ["dig", "+short", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "+time=10"], timeout=20) \
        .stdout.strip() == srv_vip                                 # cam2's own tunnel
    p = lab.exec(gn2, ["ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", srv_vip], timeout=20)
    assert " 0% packet loss" in p.stdout, p.stdout + open(log).read()[-3000:]   # sealed by the same workers
    removed = cyadm(lab, adapter, sock, "gn", "remove", mac2)
    assert removed.returncode == 0, removed.stderr
    p = lab.exec(gn2, ["ping", "-n", "-c", "3", "-i", "0.1", "-W", "1", srv_vip], timeout=20)
    assert " 100% packet loss" in p.stdout, p.stdout               # its socket and sessions are gone
    time.sleep(0.5)
    assert pinger.poll() is None, "the ping ended before cam2 was removed: raise the count"
    print(f"\ncam2 added, leased, pinged and removed within {time.monotonic() - t0:.1f} s of cam1's ping")
    pinger.wait(40)
    out = open(tmp_path / "ping.log").read()
    assert f"{count} packets transmitted, {count} received, 0% packet loss" in out, out[-600:]
    st = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    assert [w["pid"] for w in st["workers"]] == workers and st["worker_restarts"] == 0
    # cam1 and cam2 both came over the pipes (cam1 was added after the workers started too)
    assert all(w.get("ports_added") == 2 and w.get("ports") == 1 for w in st["workers"]), st["workers"]


def test_malformed_input_from_the_lan_and_the_wan_is_counted_and_changes_nothing(lab, tmp_path):
    site = adapter_site(lab, tmp_path)
    adapter, gn, srv_host, srv_vip = site["adapter"], site["gn"], site["srv_host"], site["srv_vip"]
    sock, log = site["sock"], site["log"]
    before = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    garbage = (
        "import os, socket\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "u.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n"
        "for i in range(200):\n"
        "    u.sendto(os.urandom(i % 300), ('255.255.255.255', 67))\n"
        f"    u.sendto(os.urandom(i % 100), ('{LAN_ADDRESS}', 53))\n"
        "r = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "r.bind(('eth0', 0))\n"
        "for i in range(200):\n"
        "    r.send(b'\\xff' * 6 + os.urandom(6) + b'\\x08\\x06' + os.urandom(i % 40))\n")
    assert lab.exec(gn, [PY, "-c", garbage], timeout=20).returncode == 0
    wan = (
        "import os, socket\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for i in range(300):\n"
        f"    u.sendto(bytes([i % 10]) + os.urandom(i % 200), ('{adapter.addr4}', 47200))\n")
    assert lab.exec(srv_host, [PY, "-c", wan], timeout=20).returncode == 0
    time.sleep(1.0)
    after = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    assert sum(after["dhcp"]["drops"].values()) > sum(before["dhcp"]["drops"].values())
    assert sum(after["arp"]["drops"].values()) >= sum(before["arp"]["drops"].values()) + 50, after["arp"]
    assert sum(after["dns"].values()) > sum(before["dns"].values())          # the DNS garbage was seen
    # ... and every drop is in the one table of `cyadm status --json` (it said `drops: {}`), the
    # WAN junk at cam1's socket too; the kernel's drops of each socket and NFQUEUE are read
    def part(st, prefix):
        return sum(v for k, v in st["drops"].items() if k.startswith(prefix))
    assert part(after, "dhcp_") > part(before, "dhcp_") and part(after, "arp_") >= part(before, "arp_") + 50
    # (types 0-8 of the 300: 270, control types 6-8 from a stranger's address as
    # signaling_unknown_source; 9 is a punch, counted apart)
    assert part(after, "engine_") + part(after, "device_") + part(after, "signaling_") >= \
        part(before, "engine_") + part(before, "device_") + part(before, "signaling_") + 270, after["drops"]
    assert part(after, "signaling_unknown_source") >= 90
    rows = {r["socket"]: r for r in after["sockets"]}
    assert {"adapter", "cam1", "dhcp", "arp", "nfqueue 0", "nfqueue 1"} <= set(rows), rows
    assert all(isinstance(r["kernel_drops"], int) for r in rows.values()), rows
    metrics = cyadm(lab, adapter, sock, "metrics")
    assert metrics.returncode == 0 and 'cyphonic_socket_kernel_drops_total{daemon="adapter",socket="cam1"' \
        in metrics.stdout, metrics.stdout[-2000:] + metrics.stderr
    with open(tmp_path / "metrics" / "adapter.prom") as f:                    # the textfile, every 5 s
        assert 'cyphonic_info{daemon="adapter"' in f.read()
    assert [(g["mac"], g["vip4"]) for g in after["general_nodes"]] == \
        [(g["mac"], g["vip4"]) for g in before["general_nodes"]]
    # still serving: resolve and ping
    assert lab.exec(gn, ["dig", "+short", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "+time=10"], timeout=20) \
        .stdout.strip() == srv_vip
    p = lab.exec(gn, ["ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", srv_vip], timeout=20)
    assert " 0% packet loss" in p.stdout, p.stdout
    assert open(log).read().count("Traceback") == 0


def test_controller_kill_9_keeps_leases_and_identities_and_auto_enroll(lab, tmp_path):
    import signal as _signal
    site = adapter_site(lab, tmp_path, extra_gns=("gn2",))
    adapter, gn, gn2, ov = site["adapter"], site["gn"], site["others"]["gn2"], site["ov"]
    proc, srv_vip, vip = site["proc"], site["srv_vip"], site["gn_vip"]
    _, none = dhclient(lab, gn2, tmp_path, "gn2-unknown", timeout_s=3)   # not enrolled (yet): no lease
    assert not none
    mac2 = mac_of(lab, gn2)
    time.sleep(0.5)                                   # (the first sighting is written at once, the rest every 5 s)
    proc.send_signal(_signal.SIGKILL)                 # the controller dies at once
    proc.wait(10)
    conf = tmp_path / "adapter.toml"
    conf.write_text(conf.read_text() + "auto_enroll = true\n")
    proc = lab.spawn(adapter, [sys.executable, "-m", "appliance.controller", "--config", str(conf)],
                     log=tmp_path / "adapter2.log", cwd=ROOT)
    ov.wait_log(str(tmp_path / "adapter2.log"), "logged in as cam1", 20)
    _, lease2 = dhclient(lab, gn, tmp_path, "gn-again")  # the same address: lease and identity kept
    assert lease2["new_ip_address"] == vip
    assert "(enrolled)" not in open(tmp_path / "adapter2.log").read().split("cam1")[1].splitlines()[0]
    assert lab.exec(gn, ["dig", "+short", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "+time=10"], timeout=20) \
        .stdout.strip() == srv_vip
    assert " 0% packet loss" in lab.exec(gn, ["ping", "-n", "-c", "3", "-i", "0.1", srv_vip], timeout=20).stdout
    # the unknown MAC that asked before the kill is still listed
    sock2 = str(tmp_path / "adapter.sock")
    unknown = json.loads(cyadm(lab, adapter, sock2, "status", "--json").stdout)["dhcp"]["unknown_macs"]
    assert [m["mac"] for m in unknown["macs"]] == [mac2] and unknown["total"] >= 1, unknown
    # auto-enrollment (configured on now): an unknown MAC is enrolled and served on a later try
    _, first = dhclient(lab, gn2, tmp_path, "gn2a", timeout_s=4)
    ov.wait_log(str(tmp_path / "adapter2.log"), "auto-enrolled", 10)
    ov.wait_log(str(tmp_path / "adapter2.log"), "logged in as gn-", 20)
    _, second = dhclient(lab, gn2, tmp_path, "gn2b")
    assert second.get("new_ip_address") and second["new_ip_address"] != vip
    check = lab.exec(adapter, [sys.executable, "-m", "appliance.cyadm", "config", "check", str(conf)], timeout=15)
    assert check.returncode == 0 and "ok" in check.stdout
    proc.terminate()
    proc.wait(15)


def test_general_nodes_from_the_config_with_the_token_in_a_file(lab, tmp_path):
    """What the appliance's provisioning writes: no token in the config (gn_token_file) and the
    general nodes listed in it (general_nodes), enrolled at start without `cyadm gn add`, once;
    with the appliance's guard table loaded behind the adapter's own, as on the Pi."""
    t = site_topology(lab, tmp_path)
    ov, adapter, port, gn, srv_vip = t["ov"], t["adapter"], t["port"], t["gn"], t["srv_vip"]
    token_file = tmp_path / "token"
    token_file.write_text(ov.cli("enroll", "site-gns", "--reusable").strip() + "\n")
    token_file.chmod(0o600)
    state = tmp_path / "state"
    state.mkdir()
    # a MAC already enrolled as cam2: the config's cam2 (another MAC) cannot be, and says so
    (state / "general_nodes.json").write_text(json.dumps(
        {"general_nodes": [{"mac": "52:54:00:00:00:99", "name": "cam2"}]}))
    from appliance.provision import guard_ruleset
    guard = tmp_path / "guard.nft"
    guard.write_text(guard_ruleset(port.iface, "eth0", LAN_ADDRESS, passthrough=False))
    assert lab.exec(adapter, ["nft", "-f", str(guard)]).returncode == 0
    mac = mac_of(lab, gn)
    extra = {"gn_token_file": str(token_file), "state_dir": str(state),
             "general_nodes": [{"mac": mac, "name": "cam1"}, {"mac": "52:54:00:00:00:98", "name": "cam2"}]}
    proc, sock, log = start_adapter(lab, ov, adapter, port.iface, tmp_path, gn_token="", extra=extra)
    assert token_file.read_text().strip() not in open(tmp_path / "adapter.toml").read()
    ov.wait_log(log, f"general node cam1 ({mac}) logged in", 20)
    r, lease = dhclient(lab, gn, tmp_path, "gn")
    assert lease, r.stdout + r.stderr + open(log).read()[-3000:]
    d = lab.exec(gn, ["dig", "+short", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "+time=10", "+tries=1"], timeout=20)
    assert d.stdout.strip() == srv_vip, d.stdout + open(log).read()[-3000:]
    p = lab.exec(gn, ["ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", srv_vip], timeout=20)
    assert " 0% packet loss" in p.stdout, p.stdout
    ov.wait_log(log, "adapter logged in as", 20)            # the adapter's own identity: the same token
    st = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    assert st["cloud"]["state"] == "ready"
    warn = [h for h in st["health"] if h["code"] == "gn-config"]
    assert len(warn) == 1 and "52:54:00:00:00:98" in warn[0]["text"] and "taken" in warn[0]["text"], st["health"]
    assert open(log).read().count("added from the config") == 1
    proc.terminate()
    proc.wait(15)
    # started again with the same config: nothing is enrolled twice, the lease comes back
    proc, sock, log = start_adapter(lab, ov, adapter, port.iface, tmp_path, name="adapter-again", gn_token="",
                                    extra=extra)
    ov.wait_log(log, "logged in as cam1", 20)
    assert "added from the config" not in open(log).read()
    _, again = dhclient(lab, gn, tmp_path, "gn-again")
    assert again.get("new_ip_address") == lease["new_ip_address"]
    proc.terminate()
    proc.wait(15)
    # the adapter is gone, the guard holds: ping to its LAN address, but no other port (as SSH)
    assert " 0% packet loss" in lab.exec(gn, ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", LAN_ADDRESS],
                                         timeout=20).stdout
    probe = ("import socket\n"
             "s = socket.socket(); s.settimeout(2)\n"
             f"try:\n    s.connect(('{LAN_ADDRESS}', 22)); print('open')\n"
             "except socket.timeout:\n    print('dropped')\n"
             "except OSError as e:\n    print('answered', e)\n")
    assert lab.exec(gn, [sys.executable, "-c", probe], timeout=20).stdout.strip() == "dropped"


def _queue_row(lab, host, queue: int) -> dict:
    """/proc/net/netfilter/nfnetlink_queue's row of ``queue`` in ``host``'s namespace."""
    text = lab.exec(host, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    for line in text.splitlines():
        f = [int(x) for x in line.split()[:8]]
        if f[0] == queue:
            return {"total": f[2], "copy_range": f[4], "queue_dropped": f[5], "user_dropped": f[6]}
    raise AssertionError(f"queue {queue} not held: {text!r}")


def _nft_counter(lab, host, name: str) -> int:
    import re
    out = lab.exec(host, ["nft", "list", "counter", "inet", "cyphonic", name]).stdout
    return int(re.search(r"packets (\d+) bytes", out).group(1))


def test_bulk_traffic_moves_in_batches_and_a_stopped_worker_drops_its_full_queue_never_fails_open(lab, tmp_path):
    """Issue 15 on real parts: TCP both ways through the adapter shows GSO runs from the worker
    (gso_segments / gso_sends > 1), GRO reads on the way back and batched DROP verdicts; then,
    the worker stopped (SIGSTOP), the general node overflows its queue: the overflow is dropped
    by the kernel (queue_dropped), none comes back through fail-open (the nft counter of
    overlay-bound packets that were not queued stays still) and nothing leaves in clear."""
    import signal as _signal
    site = adapter_site(lab, tmp_path, workers=1)
    adapter, gn, srv_host, srv_vip = site["adapter"], site["gn"], site["srv_host"], site["srv_vip"]
    sock, gn_vip = site["sock"], site["gn_vip"]
    assert lab.exec(gn, ["dig", "+short", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "+time=10"], timeout=20) \
        .stdout.strip() == srv_vip
    lab.spawn(srv_host, ["iperf3", "-s", "-B", srv_vip], log=tmp_path / "iperf-s.log")
    time.sleep(0.7)
    for extra in ([], ["-R"]):                                 # gn -> srv (the worker), srv -> gn (the way back)
        r = lab.exec(gn, ["iperf3", "-c", srv_vip, "-t", "2", "-J", *extra], timeout=30)
        assert json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] > 5e6, r.stdout[-500:]
    st = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    [w] = st["workers"]
    b = st["data_path"]["batches"]
    print(f"\nworker: {w.get('gso_segments')} datagrams in {w.get('gso_sends')} GSO sends, "
          f"{w.get('plain_sends')} alone; {w.get('verdicts')} packets in {w.get('verdict_batches')} verdicts; "
          f"way back: {b.get('gro_pieces')} datagrams in {b.get('gro_reads')} GRO reads")
    assert w["gso_sends"] > 0 and w["gso_segments"] / w["gso_sends"] > 1, w
    assert w["verdict_batches"] > 0 and w["verdicts"] > w["verdict_batches"], w
    assert b["gso_sends"] == w["gso_sends"] and b["verdict_batches"] == w["verdict_batches"], b
    assert b.get("gro_reads", 0) > 0 and b["gro_pieces"] / b["gro_reads"] > 1, b
    assert w["config_acked"] == 1 and w["queue_rcvbuf_bytes"] >= 8 << 20, w
    assert not w.get("gso_disabled") and not w.get("nfq_config_refused") and not w.get("nfq_enobufs"), w
    assert not [k for k in st["drops"] if k.startswith("worker_send_")], st["drops"]

    # fail-open is off: a full queue drops, it never lets a packet by
    cap = lab.spawn(adapter, ["tcpdump", "-i", "eth0", "-n", "-U", "-w", str(tmp_path / "wan.pcap"),
                              f"host {gn_vip} or host {srv_vip}"], log=tmp_path / "tcpdump.log")
    time.sleep(0.7)
    queue = w["queue"]
    unqueued = _nft_counter(lab, adapter, "overlay_unqueued")
    before = _queue_row(lab, adapter, queue)
    os.kill(w["pid"], _signal.SIGSTOP)
    try:
        flood = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 f"for i in range(6000): s.sendto(b'x' * 64, ('{srv_vip}', 9))")
        lab.exec(gn, [PY, "-c", flood], timeout=60, check=True)
        time.sleep(0.3)
        full = _queue_row(lab, adapter, queue)
        assert full["total"] == 4096, full                     # NFQ_MAX_LEN packets held, unjudged
        assert full["queue_dropped"] - before["queue_dropped"] >= 6000 - 4096 - 50, (before, full)
        assert _nft_counter(lab, adapter, "overlay_unqueued") == unqueued   # none came back (fail-open)
    finally:
        os.kill(w["pid"], _signal.SIGCONT)
    deadline = time.time() + 20
    while _queue_row(lab, adapter, queue)["total"] and time.time() < deadline:
        time.sleep(0.2)                                        # the worker judges the backlog in batches
    assert _queue_row(lab, adapter, queue)["total"] == 0
    p = lab.exec(gn, ["ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", srv_vip], timeout=20)
    assert " 0% packet loss" in p.stdout, p.stdout
    time.sleep(0.3)
    cap.terminate()
    cap.wait(10)
    dump = lab.exec(adapter, ["tcpdump", "-n", "-r", str(tmp_path / "wan.pcap")], timeout=20)
    assert dump.stdout.strip() == "", dump.stdout[:2000]      # no clear packet of the GN on the WAN
