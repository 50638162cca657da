"""Parts 1 and 2 of `make demo` (`python -m lab.demo`, as root): the whole system in network
namespaces, with stock tools.

Part 1 is the paper's evaluation model (Fig. 5): a general node that runs only
stock tools (isc-dhcp-client, dig, ping, iperf3) behind a CYPHONIC adapter, a
router, the cloud and a conventional CYPHONIC node (cyphonic-node). The general
node takes a lease, resolves the node's FQDN, pings it and runs iperf3; the
report quotes the stock tools' own lines and `cyadm status`.

Part 2:

Topology (the lab): an "internet" segment with the cloud; two sites, each a
home-router-like NAT (easy) with one host behind it running `cyphonic-node`.
The stock `ping` in site 1 pings site 2's node by its FQDN: the name goes to
the node's DNS stub, which asks the NMS for a route (both behind NAT: hole
punching), the two daemons handshake, the answer carries the virtual IP, and
the pings flow through the TUN interfaces. `cyadm status` of each node is
printed, then everything is torn down (namespaces, processes, /etc/netns).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import time

from ..adapterlab import LAN_ADDRESS, add_gn, cyadm, dhclient, mac_of, start_adapter
from ..nodelab import DOMAIN, Overlay
from ..topology import Lab

PREFIX = "cyd"


def _etc_netns(ns: str) -> str:
    return os.path.join("/etc/netns", ns)


def run() -> int:
    rc = run_adapter()
    print()
    return run_nodes() or rc


def _quote(text: str, pick=lambda line: True) -> str:
    return "  " + "\n  ".join(line for line in text.strip().splitlines() if pick(line))


def run_adapter() -> int:
    print("Part 1: the paper's evaluation model (Fig. 5): general node - CYPHONIC adapter - router - "
          "cloud and CYPHONIC node\n")
    workdir = tempfile.mkdtemp(prefix="cyphonic-demo-")
    rc = 1
    try:
        with Lab(prefix=PREFIX) as lab:
            inet = lab.switch("inet", "198.18.0.0/24")
            cloud = lab.host("cloud", inet, v6=False)
            node_host = lab.host("node", inet, v6=False)
            router = lab.nat_router("router", inet, lan="10.1.0.0/24", kind="easy")
            adapter = lab.host("adapter", router.lan, v6=False)
            lan = lab.switch("lan", gateway=False)
            port = lab.attach(adapter, lan, v4=False, v6=False)
            gn = lab.host("gn", lan, v4=False, v6=False)
            tmp = pathlib.Path(workdir)
            ov = Overlay(lab, cloud, workdir)
            ov.start_cloud()
            ov.add_node("node", node_host)
            node_vip = ov.wait_ready("node")["identity"]["vip4"]
            print(f"  cloud {cloud.addr4}; CYPHONIC node node.{DOMAIN} ({node_vip}) at {node_host.addr4}; "
                  f"adapter {adapter.addr4} behind router {router.wan_addr4}")
            proc, sock, log = start_adapter(lab, ov, adapter, port.iface, tmp)
            mac = mac_of(lab, gn)
            print(f"\n$ cyadm gn add {mac} --name camera")
            add_gn(lab, adapter, sock, log, ov, mac, "camera")
            print(_quote(open(log).read(), lambda l: "camera" in l))
            print(f"\n$ ip netns exec {gn.name} dhclient -v eth0        # the general node: stock tools only")
            r, lease = dhclient(lab, gn, tmp, "gn")
            print(_quote(r.stdout + r.stderr, lambda l: l.startswith(("DHCP", "bound to"))))
            print(f"  lease: {lease.get('new_ip_address')}/{lease.get('new_subnet_mask')} router "
                  f"{lease.get('new_routers')} dns {lease.get('new_domain_name_servers')} mtu "
                  f"{lease.get('new_interface_mtu')} lease {lease.get('new_dhcp_lease_time')} s")
            print(f"\n$ ip netns exec {gn.name} dig @{LAN_ADDRESS} node.{DOMAIN}")
            d = lab.exec(gn, ["dig", f"@{LAN_ADDRESS}", f"node.{DOMAIN}", "+time=10", "+tries=1"], timeout=20)
            print(_quote(d.stdout, lambda l: "IN\tA" in l and not l.startswith(";") or "Query time" in l
                         or "status:" in l))
            print(f"\n$ ip netns exec {gn.name} ping -c 5 {node_vip}")
            p = lab.exec(gn, ["ping", "-c", "5", "-i", "0.2", "-W", "2", node_vip], timeout=30)
            print(_quote(p.stdout, lambda l: "packets transmitted" in l or l.startswith("rtt")))
            lab.spawn(node_host, ["iperf3", "-s", "-1", "-B", node_vip], log=tmp / "iperf-s.log")
            time.sleep(0.5)
            print(f"\n$ ip netns exec {gn.name} iperf3 -c {node_vip} -u -b 50M -l 1400 -t 3")
            i = lab.exec(gn, ["iperf3", "-c", node_vip, "-u", "-b", "50M", "-l", "1400", "-t", "3"], timeout=40)
            print(_quote(i.stdout, lambda l: ("sender" in l or "receiver" in l)))
            print(f"\n$ ip netns exec {adapter.name} cyadm status")
            st = cyadm(lab, adapter, sock, "status")
            print(_quote(st.stdout))
            ok = bool(lease) and " 0% packet loss" in p.stdout and "receiver" in i.stdout and node_vip in d.stdout
            proc.terminate()
            proc.wait(15)
            rc = 0 if ok else 1
            print(f"\npart 1 result: {'OK' if ok else 'FAILED'}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    left = [n for n in os.listdir("/var/run/netns") if n.startswith(PREFIX + "-")] \
        if os.path.isdir("/var/run/netns") else []
    print(f"torn down: {'no namespace left' if not left else 'LEFT: ' + ', '.join(left)}")
    return rc if not left else 1


def run_nodes() -> int:
    print("Part 2: two cyphonic-node daemons, each behind its own NAT, stock tools only\n")
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
            print(f"\npart 2 result: {'OK' if ok else 'FAILED'} (path {ov.path('alpha', 'beta')})")
    finally:
        for d in netns_dirs:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    left = [n for n in os.listdir("/var/run/netns") if n.startswith(PREFIX + "-")] \
        if os.path.isdir("/var/run/netns") else []
    print(f"torn down: {'no namespace left' if not left else 'LEFT: ' + ', '.join(left)}")
    return rc if not left else 1
