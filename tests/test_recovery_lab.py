"""Recovery targets of issue 12 in namespaces, with the real processes: a `cyphonic-cloud`, a
`cyphonic-node` daemon and `cyphonic-adapter` with 16 general nodes (17 cloud links from one WAN
address).

- A cloud outage: the cloud is killed, then started again on its state (no sessions, no
  registrations). Every sample of the health during the outage, once a link's loss could be
  noticed (keepalive 5 s, then 7 s), says ``cloud-unreachable`` for that link; after the
  return, the node daemon, the adapter's own link and every general node's are ready again
  within 5 s (by design within the signaling client's retry cap, RECONNECT_MAX_S, plus what
  the cloud takes to answer), and the general node's traffic flows. The outage lasts OUTAGE_S:
  the issue's 200 s by default (CYPHONIC_OUTAGE_S=50 for a quicker run while developing).
"""

from __future__ import annotations

import os
import time

import pytest

from appliance.cyadm import ask
from cyphonic import constants as C
from lab import Lab
from lab.adapterlab import LAN_ADDRESS, dhclient, mac_of, site_topology, start_adapter
from lab.nodelab import DOMAIN

pytestmark = pytest.mark.root

OUTAGE_S = float(os.environ.get("CYPHONIC_OUTAGE_S", "200"))
GNS = 16
BACK_WITHIN_S = 5.0              # the target
NOTICED_WITHIN_S = 5 + 7 + 2     # keepalive interval (lab cloud), keepalive timeout, slack


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces); CI runs them as root")
    with Lab(prefix="cyr") as lab:
        yield lab


def links(ov, sock) -> dict[str, tuple[str, set[str]]]:
    """Every cloud link: name -> (signaling state, health codes about it)."""
    node = ov.status("srv")
    ad = ask(sock)
    out = {"srv": (node["cloud"]["state"], {h["code"] for h in node["health"]})}
    codes: dict[str, set[str]] = {}
    for h in ad["health"]:
        codes.setdefault(h.get("subject") or "adapter", set()).add(h["code"])
    out["adapter"] = (ad["cloud"]["state"], codes.get("adapter", set()))
    for row in ad["general_nodes"]:
        out[row["name"]] = (row["cloud"], codes.get(row["name"], set()))
    return out


def await_all_ready(ov, sock, timeout_s: float) -> dict[str, float]:
    """When each link was first seen ready (seconds from now); waits at most ``timeout_s``."""
    t0 = time.time()
    ready: dict[str, float] = {}
    while time.time() - t0 < timeout_s:
        now = links(ov, sock)
        for name, (state, _) in now.items():
            if state == "ready":
                ready.setdefault(name, time.time() - t0)
        if len(ready) == len(now):
            break
        time.sleep(0.05)
    return ready


def test_cloud_outage_every_link_says_unreachable_then_is_back_within_5_s(lab, tmp_path):
    t = site_topology(lab, tmp_path)
    ov, adapter, port, gn, srv_vip = t["ov"], t["adapter"], t["port"], t["gn"], t["srv_vip"]
    macs = [mac_of(lab, gn)] + [f"52:54:00:00:01:{i:02x}" for i in range(1, GNS)]
    names = ["cam1"] + [f"gn{i}" for i in range(1, GNS)]
    extra = {"general_nodes": [{"mac": m, "name": n} for m, n in zip(macs, names)]}
    proc, sock, log = start_adapter(lab, ov, adapter, port.iface, tmp_path, extra=extra)
    for mac, name in zip(macs, names):
        ov.wait_log(log, f"general node {name} ({mac}) logged in", 60)
    r, lease = dhclient(lab, gn, tmp_path, "gn")
    assert lease, r.stdout + r.stderr
    first = await_all_ready(ov, sock, 30)
    assert len(first) == GNS + 2, links(ov, sock)
    d = lab.exec(gn, ["dig", "+short", f"@{LAN_ADDRESS}", f"srv.{DOMAIN}", "+time=10", "+tries=1"], timeout=20)
    assert d.stdout.strip() == srv_vip, d.stdout                # the tunnel is up
    ping = lab.exec(gn, ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", srv_vip], timeout=20)
    assert " 0% packet loss" in ping.stdout, ping.stdout

    ov.stop_cloud(kill=True)
    down = time.time()
    samples: list[tuple[float, dict]] = []
    while (at := time.time() - down) < OUTAGE_S:
        samples.append((at, links(ov, sock)))
        time.sleep(max(0.0, len(samples) - (time.time() - down)))   # one sample a second
    back = ov.start_cloud()
    ready = await_all_ready(ov, sock, 30)
    took = time.time() - back

    # health during the outage: once a link says cloud-unreachable it says so in every later
    # sample, and every link says so from NOTICED_WITHIN_S on
    for name in samples[0][1]:
        said = [("cloud-unreachable" in s[name][1], at) for at, s in samples]
        since = next((i for i, (yes, _) in enumerate(said) if yes), None)
        assert since is not None and said[since][1] <= NOTICED_WITHIN_S, (name, said)
        assert all(yes for yes, _ in said[since:]), (name, said)
        assert all(s[name][0] != "ready" for at, s in samples if at >= NOTICED_WITHIN_S), name
    worst = max(ready.values(), default=None)
    print(f"\noutage {OUTAGE_S:.0f} s, {len(ready)}/{GNS + 2} links ready after the cloud's return: "
          f"median {sorted(ready.values())[len(ready) // 2]:.2f} s, worst {worst:.2f} s "
          f"(the node daemon {ready.get('srv', float('nan')):.2f} s, the adapter's own link "
          f"{ready.get('adapter', float('nan')):.2f} s)")
    assert len(ready) == GNS + 2, (took, links(ov, sock))
    assert worst <= BACK_WITHIN_S, sorted(ready.items(), key=lambda kv: kv[1])
    # ... and by design within the signaling client's retry cap, plus a second for the cloud to
    # answer 18 links' handshakes, logins and registrations (a fixed 5 s resend, as before,
    # makes one of 18 links miss this almost surely)
    assert worst <= C.RECONNECT_MAX_S + 1.0, sorted(ready.items(), key=lambda kv: kv[1])
    now = links(ov, sock)
    assert not any("cloud-unreachable" in codes for _, codes in now.values()), now
    # and the general node's traffic flows (its tunnel to the node daemon comes up again if needed)
    ping = lab.exec(gn, ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", srv_vip], timeout=20)
    assert " 0% packet loss" in ping.stdout, ping.stdout
    proc.terminate()
    proc.wait(15)
