"""cyphonic-node daemons in network namespaces (the lab, lab/): real TUN, real UDP, stock dig,
ping and iperf3; the NAT grid; roaming; underlay loss. Needs root (CI runs as root)."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest

from lab import Lab
from lab.nodelab import DOMAIN, Overlay

pytestmark = pytest.mark.root


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces); CI runs them as root")
    with Lab(prefix="cyn") as lab:
        yield lab


def test_two_nodes_resolve_ping_iperf_and_clean_stop(lab, tmp_path):
    inet = lab.switch("inet", "198.18.0.0/24", v6="fd00:18::/64")
    cloud = lab.host("cloud", inet)
    h1 = lab.host("n1", inet)
    h2 = lab.host("n2", inet)
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("alpha", h1)
    ov.add_node("beta", h2)
    ov.wait_ready("alpha")
    st = ov.wait_ready("beta")
    vip_b = st["identity"]["vip4"]
    # the stock dig resolves the peer's FQDN; the answer comes once the tunnel is up
    d = ov.dig("alpha", f"beta.{DOMAIN}")
    assert "status: NOERROR" in d.stdout and vip_b in d.stdout, d.stdout
    assert ov.dig("alpha", f"nobody.{DOMAIN}").stdout.count("status: NXDOMAIN") == 1
    sent, got, out = ov.ping("alpha", vip_b, count=10, interval=0.05)
    assert got == sent == 10, out
    assert ov.path("alpha", "beta") == "direct"
    # iperf3 over the tunnel, both protocols, short and bounded
    lab.spawn(h2, ["iperf3", "-s", "-1", "-B", vip_b], log=tmp_path / "iperf-s.log")
    time.sleep(0.5)
    r = lab.exec(h1, ["iperf3", "-c", vip_b, "-t", "2", "-J"], timeout=30)
    bps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
    assert bps > 10e6, r.stdout[-500:]
    lab.spawn(h2, ["iperf3", "-s", "-1", "-B", vip_b], log=tmp_path / "iperf-s2.log")
    time.sleep(0.5)
    r = lab.exec(h1, ["iperf3", "-c", vip_b, "-u", "-b", "20M", "-l", "1300", "-t", "2", "-J"], timeout=30)
    udp = json.loads(r.stdout)["end"]["sum"]
    assert udp["lost_percent"] < 5, udp
    # status over the socket, as cyadm shows it
    st = ov.status("alpha")
    t = st["tunnels"][0]
    assert t["peer"] == f"beta.{DOMAIN}" and t["up"] and t["tx_bytes"] > 1e6
    # issue 15: the bulk left alpha in GSO runs and reached beta in GRO reads, nothing fell back
    sent, got = st["data_path"]["batches"], ov.status("beta")["data_path"]["batches"]
    print(f"\nalpha: {sent.get('gso_segments')} datagrams in {sent.get('gso_sends')} GSO sends, "
          f"{sent.get('plain_sends')} alone; beta: {got.get('gro_pieces')} in {got.get('gro_reads')} GRO reads")
    assert sent["gso_sends"] > 0 and sent["gso_segments"] / sent["gso_sends"] > 1, sent
    assert got["gro_reads"] > 0 and got["gro_pieces"] / got["gro_reads"] > 1, got
    assert not sent.get("gso_disabled") and not sent.get("gro_unavailable") and not got.get("gro_unavailable")
    assert not [h for h in st["health"] if h["severity"] == "error"]
    # the kernel's drops on each socket (SO_MEMINFO reads here), and the metrics textfile
    rows = {r["socket"]: r for r in st["sockets"]}
    assert isinstance(rows["udp4"]["kernel_drops"], int) and isinstance(rows["dns"]["kernel_drops"], int), rows
    from test_metrics import parse, value
    node = ov.nodes["alpha"]
    with open(node["metrics_file"]) as f:
        fams = parse(f.read())
    assert value(fams, "cyphonic_info", daemon="node", fqdn=f"alpha.{DOMAIN}") == 1
    assert value(fams, "cyphonic_cloud_link_up") == 1
    # a clean stop removes the TUN interface (and the metrics file: stopped, not frozen)
    node["proc"].terminate()
    node["proc"].wait(10)
    assert "removed cy0" in open(node["log"]).read()
    assert not os.path.exists(node["metrics_file"])
    assert lab.exec(h1, ["ip", "link", "show", "cy0"]).returncode != 0
    # and a crash leaves nothing that blocks the next start (the TUN is non-persistent)
    ov.nodes["beta"]["proc"].kill()
    ov.nodes["beta"]["proc"].wait(10)
    assert lab.exec(h2, ["ip", "link", "show", "cy0"]).returncode != 0


# initiator, responder, expected path
GRID = [
    ("pub1", "pub2", "direct"),
    ("easy1", "pub1", "direct"),
    ("pub2", "easy1", "reversed"),
    ("pub1", "hard1", "reversed"),
    ("easy1", "easy2", "punched"),
    ("easy1", "lan1", "local"),
    ("easy2", "hard1", "relay"),
    ("hard1", "hard2", "relay"),
    ("pub1", "six", "relay"),
]


def test_nat_grid(lab, tmp_path, capsys):
    inet = lab.switch("inet", "198.18.0.0/24", v6="fd00:18::/64")
    cloud = lab.host("cloud", inet)
    re1 = lab.nat_router("re1", inet, lan="10.1.0.0/24", kind="easy")
    re2 = lab.nat_router("re2", inet, lan="10.2.0.0/24", kind="easy")
    rh1 = lab.nat_router("rh1", inet, lan="10.3.0.0/24", kind="hard")
    rh2 = lab.nat_router("rh2", inet, lan="10.4.0.0/24", kind="hard")
    hosts = {
        "pub1": lab.host("pub1", inet, v6=False), "pub2": lab.host("pub2", inet, v6=False),
        "easy1": lab.host("easy1", re1.lan), "lan1": lab.host("lan1", re1.lan),
        "easy2": lab.host("easy2", re2.lan), "hard1": lab.host("hard1", rh1.lan),
        "hard2": lab.host("hard2", rh2.lan), "six": lab.host("six", inet, v4=False),
    }
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    for name, h in hosts.items():
        ov.add_node(name, h)
    vips = {name: ov.wait_ready(name)["identity"]["vip4"] for name in hosts}
    results = []
    for a, b, expect in GRID:
        vip = ov.resolve(a, f"{b}.{DOMAIN}")
        sent, got, _ = ov.ping(a, vips[b], count=5, interval=0.1) if vip == vips[b] else (5, 0, "")
        results.append((a, b, expect, ov.path(a, b), got, sent, vip == vips[b]))
    with capsys.disabled():
        print("\nNAT grid (initiator -> responder): expected path, got path, pings")
        for a, b, expect, got_path, got, sent, resolved in results:
            mark = "ok" if got_path == expect and got == sent else "FAIL"
            print(f"  {a:6} -> {b:6} {expect:9} {str(got_path):9} {got}/{sent} {mark}")
    bad = [r for r in results if r[3] != r[2] or r[4] != r[5] or not r[6]]
    assert not bad, (bad, open(ov.cloud_log).read()[-3000:])


def test_roaming_keeps_the_tunnel_and_the_virtual_ip(lab, tmp_path):
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet)
    h1 = lab.host("m1", inet)
    h2 = lab.host("m2", inet)
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("mover", h1)
    ov.add_node("fixed", h2)
    vip_before = ov.wait_ready("mover")["identity"]["vip4"]
    vip_fixed = ov.wait_ready("fixed")["identity"]["vip4"]
    assert ov.resolve("fixed", f"mover.{DOMAIN}") == vip_before
    pinger = lab.spawn(h2, ["ping", "-n", "-i", "0.1", "-c", "60", "-W", "1", vip_before],
                       log=tmp_path / "ping.log")
    time.sleep(2)
    lab.move(h1, "198.18.0.77")          # the mover's address changes mid-ping
    pinger.wait(30)
    out = open(tmp_path / "ping.log").read()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    lost = int(m.group(1)) - int(m.group(2))
    assert lost <= 10, out[-400:]        # a few packets, while the address poll notices the move
    st = ov.status("mover")
    assert st["identity"]["vip4"] == vip_before
    assert "addresses changed" in open(ov.nodes["mover"]["log"]).read()
    assert "198.18.0.77" in open(ov.cloud_log).read()
    assert ov.ping("mover", vip_fixed, count=3)[1] == 3


def test_tunnels_come_up_and_carry_traffic_over_a_lossy_underlay(lab, tmp_path):
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet)
    r = lab.nat_router("lossy", inet, lan="10.9.0.0/24", kind="easy")
    h1 = lab.host("l1", r.lan)
    h2 = lab.host("l2", inet)
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("behind", h1)
    ov.add_node("out", h2)
    ov.wait_ready("behind")
    vip = ov.wait_ready("out")["identity"]["vip4"]
    lab.set_loss(r, 20)                  # 20 % each way through the router, signaling and tunnel alike
    # The resolver holds a query 5 s for its tunnel; with a datagram in five lost each way, the
    # route request and the handshake are retried (initiations after ~1, 2, 4 s) and usually make
    # it in time, not always (a few % of runs: 4 initiations lost). An application asks again
    # after a SERVFAIL, and then the tunnel being set up answers it: so do we, once.
    got = ov.resolve("behind", f"out.{DOMAIN}") or ov.resolve("behind", f"out.{DOMAIN}")
    assert got == vip
    sent, got, out = ov.ping("behind", vip, count=40, interval=0.05)
    assert got >= 15, out                # about 64 % expected through two 20 % drops


def test_make_demo_runs_end_to_end_and_leaves_nothing_behind():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "lab.demo"], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "part 1 result: OK" in p.stdout
    assert "part 2 result: OK (path punched)" in p.stdout
    assert "part 4 result: OK" in p.stdout
    assert p.stdout.count("torn down: no namespace left") == 3
    assert "result: OK" in p.stdout.split("Part 3")[1]
    assert not [n for n in os.listdir("/var/run/netns") if n.startswith("cyd-")]
    assert not os.path.exists("/etc/netns/cyd-alpha")


def test_tunnels_come_up_and_carry_traffic_over_a_reordering_underlay(lab, tmp_path):
    import sys
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet)
    r = lab.nat_router("swap", inet, lan="10.8.0.0/24", kind="easy")
    h1 = lab.host("o1", r.lan)
    h2 = lab.host("o2", inet)
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("inside", h1)
    ov.add_node("outside", h2)
    ov.wait_ready("inside")
    vip = ov.wait_ready("outside")["identity"]["vip4"]
    # every 3rd UDP packet the router forwards is swapped with the next one (signaling and tunnel)
    assert lab.exec(r, ["iptables-nft", "-I", "FORWARD", "-p", "udp", "-j", "NFQUEUE", "--queue-num", "7"]).returncode == 0
    imp = lab.spawn(r, [sys.executable, "-m", "lab.impair", "--queue", "7", "--swap-every", "3",
                        "--seconds", "60"], log=tmp_path / "impair.log")
    time.sleep(0.5)
    assert ov.resolve("inside", f"outside.{DOMAIN}") == vip
    sent, got, out = ov.ping("inside", vip, count=40, interval=0.02)
    assert got == sent, out
    imp.terminate()
    imp.wait(10)
    log = open(tmp_path / "impair.log").read()
    swapped = int(re.search(r"(\d+) swapped", log).group(1))
    assert swapped >= 10, log          # the underlay really reordered
    st = ov.status("outside")
    assert st["drops"].get("device_replay", 0) == 0, st["drops"]   # reordered packets are not replays


def test_a_restart_without_the_cloud_reaches_the_peers_it_had(lab, tmp_path):
    """The cloud is gone and a node daemon is killed and started again: from its peer records
    (docs/protocol.md 11.6) it answers DNS for the peer it had at once, SERVFAIL at once for a
    name it never had, and the tunnel carries pings both ways again, without any login."""
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet)
    h1 = lab.host("r1", inet)
    h2 = lab.host("r2", inet)
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("alpha", h1)
    ov.add_node("beta", h2)
    vip_a = ov.wait_ready("alpha")["identity"]["vip4"]
    vip_b = ov.wait_ready("beta")["identity"]["vip4"]
    assert ov.resolve("alpha", f"beta.{DOMAIN}") == vip_b
    assert ov.ping("alpha", vip_b, count=3, interval=0.1)[1] == 3
    ov.wait_log(ov.nodes["alpha"]["log"], "tunnel up", 5)
    assert os.path.exists(os.path.join(str(tmp_path), "alpha", "peers.json"))
    ov.stop_cloud()
    node = ov.nodes["alpha"]
    node["proc"].kill()
    node["proc"].wait(10)
    node["proc"] = lab.spawn(h1, [sys.executable, "-m", "cyphonic.node.daemon", "--config", node["config"]],
                             log=node["log"])
    ov.wait_log(node["log"], "restored 1 peer", 15)
    ov.wait_log(node["log"], "DNS on", 15, count=2)
    ov.wait_log(node["log"], "interface cy0", 15, count=2)
    t0 = time.time()
    d = ov.dig("alpha", f"beta.{DOMAIN}")
    assert "status: NOERROR" in d.stdout and vip_b in d.stdout, d.stdout
    d = ov.dig("alpha", f"nobody.{DOMAIN}")
    assert "status: SERVFAIL" in d.stdout, d.stdout
    assert time.time() - t0 < 2.0, "both answers come at once, not after a timeout"
    sent, got, out = ov.ping("alpha", vip_b, count=10, interval=0.2)
    assert got >= 9, out
    sent, got, out = ov.ping("beta", vip_a, count=10, interval=0.2)
    assert got >= 9, out
    assert ov.status("alpha")["cloud"]["state"] != "ready"   # all of it without the cloud
