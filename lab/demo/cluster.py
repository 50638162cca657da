"""Part 4 of `make demo` (`python -m lab.demo`, as root): the cloud as several instances.

A PostgreSQL server from Debian's package (``initdb`` into a temporary
directory, a Unix socket, no systemd: ``lab.postgres``), three cloud instances
(AS + NMS) and two relays (TRS alone), each a ``cyphonic-cloud serve`` on its
own host of the lab, all on that one database (docs/cloud.md, "Several
instances"). Three cyphonic-node daemons each start at a different instance;
a fourth, IPv6-only, reaches an IPv4 node through a relay. Then ``kill -9`` of
the instance one node uses while it pings another, and of the relay in use
while the relayed ping runs: the tunnels carry on, the node moves to another
instance, and a new route selection works again within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from ..nodelab import DOMAIN, ClusterOverlay, ping_background, ping_result
from ..postgres import PostgresServer
from ..topology import Lab

PREFIX = "cyc"


def _instance_of(ov: ClusterOverlay, name: str) -> str:
    addr = ov.status(name)["cloud"].get("instance")
    return next((n for n in ov.instance_hosts if addr in (ov.address(n), ov.address(n, v6=True))), str(addr))


def _show_instances(ov: ClusterOverlay) -> None:
    print("\n$ cyphonic-cloud instances")
    print("  " + ov.cli("instances").rstrip().replace("\n", "\n  "))


def run() -> int:
    print("Part 4: the cloud as three instances and two relays on PostgreSQL; kill -9 of one of each\n")
    missing = PostgresServer.missing()
    if missing:
        print(f"  cannot run: {missing}")
        return 1
    workdir = tempfile.mkdtemp(prefix="cyphonic-demo-cluster-")
    pg = PostgresServer()
    rc = 1
    try:
        pg.start()
        url = pg.new_database()
        print(f"  PostgreSQL {pg.bindir.parent.name} in {pg.dir} (initdb, Unix socket only): database {url}")
        with Lab(prefix=PREFIX) as lab:
            inet = lab.switch("inet", "198.18.0.0/24", v6="fd00:18::/64")
            inst = {n: lab.host(n, inet) for n in ("c1", "c2", "c3")}
            rel = {n: lab.host(n, inet) for n in ("t1", "t2")}
            ov = ClusterOverlay(lab, inst, rel, workdir, url)
            ov.start_cloud()
            hosts = {"alpha": lab.host("alpha", inet, v6=False), "beta": lab.host("beta", inet, v6=False),
                     "gamma": lab.host("gamma", inet, v6=False), "six": lab.host("six", inet, v4=False)}
            for name, first in (("alpha", "c1"), ("beta", "c2"), ("gamma", "c3"), ("six", "c2")):
                ov.add_node(name, hosts[name], first=first)
            vips = {}
            for name in hosts:
                st = ov.wait_ready(name)
                vips[name] = st["identity"]["vip4"]
                print(f"  {name}: {st['identity']['fqdn']} {vips[name]}, logged in at instance "
                      f"{_instance_of(ov, name)}")
            _show_instances(ov)

            print(f"\n$ alpha: ping beta.{DOMAIN}   # alpha is at c1, beta at c2: beta was told through c2")
            ok_direct = ov.resolve("alpha", f"beta.{DOMAIN}") == vips["beta"]
            sent, got, _ = ov.ping("alpha", vips["beta"], count=3, interval=0.1)
            print(f"  {got}/{sent} answered, path {ov.path('alpha', 'beta')}")
            print(f"$ beta: ping six.{DOMAIN}   # IPv4 meets IPv6: through a relay the NMS picked")
            ok_relay = ov.resolve("beta", f"six.{DOMAIN}") == vips["six"]
            sent2, got2, _ = ov.ping("beta", vips["six"], count=3, interval=0.1)
            relay_before = next((t["endpoint"] for t in ov.status("beta")["tunnels"]
                                 if t["peer"] == f"six.{DOMAIN}"), "")
            print(f"  {got2}/{sent2} answered, path {ov.path('beta', 'six')}, {relay_before}")

            print("\n$ kill -9 c1   # alpha's instance, while alpha pings beta every 50 ms")
            direct = ping_background(lab, hosts["alpha"], vips["beta"], seconds=6)
            time.sleep(1.0)
            ov.kill("c1")
            killed = time.monotonic()
            route_s = None
            while time.monotonic() - killed < 15:
                p = ov.dig("alpha", f"gamma.{DOMAIN}", "+short", "+time=1")
                if p.returncode == 0 and p.stdout.strip().splitlines()[-1:] == [vips["gamma"]]:
                    route_s = time.monotonic() - killed
                    break
                time.sleep(0.1)
            s, g, gap = ping_result(direct)
            print(f"  alpha -> beta during the kill: {g}/{s} answered, longest gap {gap * 1000:.0f} ms")
            print(f"  alpha now at instance {_instance_of(ov, 'alpha')}; a new route (alpha -> gamma) "
                  + (f"worked {route_s:.1f} s after the kill" if route_s is not None else "did NOT work"))

            used = next((n for n, h in rel.items() if h.addr4 and h.addr4 + ":" in relay_before), "t1")
            print(f"\n$ kill -9 {used}   # the relay beta <-> six uses, while beta pings six every 50 ms")
            relayed = ping_background(lab, hosts["beta"], vips["six"], seconds=8)
            time.sleep(1.0)
            ov.kill(used)
            rs, rg, rgap = ping_result(relayed)
            relay_after = next((t["endpoint"] for t in ov.status("beta")["tunnels"]
                                if t["peer"] == f"six.{DOMAIN}"), "")
            print(f"  beta -> six: {rg}/{rs} answered, longest gap {rgap:.2f} s; now {relay_after}")
            _show_instances(ov)
            nodes = json.loads(ov.cli("nodes", "--json"))
            same = {n["name"]: n["vip4"] for n in nodes} == vips
            print(f"\n$ cyphonic-cloud nodes   # from any host: the database holds them all, addresses unchanged: "
                  f"{'yes' if same else 'NO'}")
            ok = (ok_direct and ok_relay and got == sent and got2 == sent2 and g >= s - 2 and gap < 0.5
                  and route_s is not None and route_s <= 5.5 and rgap <= 5.0 and relay_after != relay_before
                  and same)
            rc = 0 if ok else 1
            print(f"\npart 4 result: {'OK' if ok else 'FAILED'}")
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    left = [n for n in os.listdir("/var/run/netns") if n.startswith(PREFIX + "-")] \
        if os.path.isdir("/var/run/netns") else []
    print(f"torn down: {'no namespace left' if not left else 'LEFT: ' + ', '.join(left)}; "
          f"PostgreSQL stopped and its directory removed")
    return rc if not left else 1
