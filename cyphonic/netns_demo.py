"""Part 1 of `make demo`: the whole overlay in network namespaces, with stock tools.

Topology (tests/lab): an "internet" segment with the cloud; two sites, each a
home-router-like NAT (easy) with one host behind it running `cyphonic-node`.
The stock `ping` in site 1 pings site 2's node by its FQDN: the name goes to
the node's DNS stub, which asks the NMS for a route (both behind NAT: hole
punching), the two daemons handshake, the answer carries the virtual IP, and
the pings flow through the TUN interfaces. `cyadm status` of each node is
printed, then everything is torn down (namespaces, processes, /etc/netns).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "cyd"


def _etc_netns(ns: str) -> str:
    return os.path.join("/etc/netns", ns)


def run() -> int:
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from tests.lab import Lab
    from tests.nodelab import DOMAIN, Overlay

    print("Part 1: a cloud and two cyphonic-node daemons in network namespaces, stock tools only\n")
    workdir = tempfile.mkdtemp(prefix="cyphonic-demo-")
    netns_dirs = []
    rc = 1
    try:
        with Lab(prefix=PREFIX) as lab:
            inet = lab.switch("inet", "198.18.0.0/24")
            cloud = lab.host("cloud", inet)
            r1 = lab.nat_router("site1", inet, lan="10.1.0.0/24", kind="easy")
            r2 = lab.nat_router("site2", inet, lan="10.2.0.0/24", kind="easy")
            h1 = lab.host("alpha", r1.lan)
            h2 = lab.host("beta", r2.lan)
            print(f"  cloud {cloud.addr4} on the internet segment; alpha {h1.addr4} behind NAT "
                  f"{r1.wan_addr4}; beta {h2.addr4} behind NAT {r2.wan_addr4}")
            ov = Overlay(lab, cloud, workdir)
            ov.start_cloud()
            for name, host in (("alpha", h1), ("beta", h2)):
                ov.add_node(name, host)
                # the stock resolver of that namespace asks the node's DNS stub
                d = _etc_netns(host.name)
                os.makedirs(d, exist_ok=True)
                netns_dirs.append(d)
                with open(os.path.join(d, "resolv.conf"), "w") as f:
                    f.write("nameserver 127.0.0.1\n")
            for name in ("alpha", "beta"):
                st = ov.wait_ready(name)
                print(f"  {name}: enrolled as {st['identity']['fqdn']}, virtual IP {st['identity']['vip4']}, "
                      f"cloud link {st['cloud']['state']}, seen as {st['cloud']['observed']} (behind NAT)")
            target = f"beta.{DOMAIN}"
            print(f"\n$ ip netns exec {h1.name} ping -c 5 {target}")
            p = lab.exec(h1, ["ping", "-c", "5", "-i", "0.2", "-W", "3", target], timeout=40)
            print("  " + p.stdout.strip().replace("\n", "\n  "))
            print(f"\n$ ip netns exec {h2.name} dig +noall +answer +stats alpha.{DOMAIN}   "
                  "# an existing tunnel: answered at once")
            d = lab.exec(h2, ["dig", "+noall", "+answer", "+stats", "+time=8", "+tries=1", f"alpha.{DOMAIN}"],
                         timeout=15).stdout.strip().splitlines()
            print("  " + "\n  ".join(line for line in d if line and ("IN" in line or "Query time" in line)))
            for name, host in (("alpha", h1), ("beta", h2)):
                print(f"\n$ ip netns exec {host.name} cyadm status")
                st = lab.exec(host, [sys.executable, "-m", "appliance.cyadm", "--socket",
                                     ov.nodes[name]["socket"], "status"], timeout=15)
                print("  " + st.stdout.rstrip().replace("\n", "\n  "))
            print("\nthe cloud's log:")
            for line in open(ov.cloud_log).read().splitlines():
                if "listening" not in line and "cloud key" not in line:
                    print(f"  {line}")
            ok = " 0% packet loss" in p.stdout and ov.path("alpha", "beta") == "punched"
            rc = 0 if ok else 1
            print(f"\npart 1 result: {'OK' if ok else 'FAILED'} (path {ov.path('alpha', 'beta')})")
    finally:
        for d in netns_dirs:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    left = [n for n in os.listdir("/var/run/netns") if n.startswith(PREFIX + "-")] \
        if os.path.isdir("/var/run/netns") else []
    print(f"torn down: {'no namespace left' if not left else 'LEFT: ' + ', '.join(left)}")
    return rc if not left else 1
