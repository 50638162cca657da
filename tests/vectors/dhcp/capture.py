"""Capture golden DHCP packets from the real clients (run once, as root; output: golden.json).

    .venv/bin/python tests/vectors/dhcp/capture.py

A lab (prefix "cyc"): switch "lan", namespace "adapter" (eth0 100.64.0.254/24) running our
server (`python -m appliance.dhcp_server`, lease 20 s so renew and rebind come quickly), a
namespace "gn" with a bare eth0 whose MAC is 02:cd:00:00:00:07 (bound to 100.64.0.7), and a
"squat" namespace that takes 100.64.0.7 itself for the DECLINE scenarios. tcpdump on the bridge
records every DHCP packet; the client -> server payloads are stored as hex with a label and a
note of how they came about. Each client runs from a private state directory and a script
that only records its environment, so nothing on the host is touched (dhcpcd runs in its own
mount namespace with /run/dhcpcd and /var/lib/dhcpcd bind-mounted from a temporary directory).

Scenarios per client:
  isc-dhcp-client  DORA, renew (unicast at T1), rebind (server stopped, broadcast at T2),
                   INIT-REBOOT (a second run with the lease file), release (dhclient -r)
  udhcpc           DORA, renew (SIGUSR1), release (SIGUSR2), DISCOVER with -r (option 50),
                   DECLINE (-a: ARP check finds the squatter)
  dhcpcd           DORA (rapid commit asked), renew (T1), INIT-REBOOT, release (dhcpcd -4 -k),
                   DECLINE (ARP probe finds the squatter). No INFORM: see capture_dhcpcd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from scapy.all import BOOTP, IP, UDP, rdpcap

from lab import Lab

HERE = os.path.dirname(os.path.abspath(__file__))

MAC = "02:cd:00:00:00:07"
VIP = "100.64.0.7"
SERVER_IP = "100.64.0.254"
PY = sys.executable
LEASE_S = 20                # T1 10 s, T2 17.5 s (dhcpcd takes no lease under 20 s)
DHCLIENT_CONF = """option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;
send host-name "gn";
request subnet-mask, broadcast-address, time-offset, routers,
\tdomain-name, domain-name-servers, domain-search, host-name,
\tdhcp6.name-servers, dhcp6.domain-search, dhcp6.fqdn, dhcp6.sntp-servers,
\tnetbios-name-servers, netbios-scope, interface-mtu,
\trfc3442-classless-static-routes, ntp-servers;
timeout 10;
"""
NAMES = {1: "discover", 2: "offer", 3: "request", 4: "decline", 5: "ack", 6: "nak", 7: "release", 8: "inform"}


def version(argv):
    p = subprocess.run(argv, capture_output=True, text=True)
    return ((p.stdout or "") + (p.stderr or "")).strip().splitlines()[0]


def label(pkt) -> str:
    b = pkt[BOOTP]
    raw = bytes(b)
    opts, i = {}, 240
    while i < len(raw) and raw[i] != 255:
        if raw[i] == 0:
            i += 1
            continue
        opts.setdefault(raw[i], raw[i + 2:i + 2 + raw[i + 1]])
        i += 2 + raw[i + 1]
    name = NAMES.get(opts.get(53, b"\0")[0], "other")
    if name == "request":
        if 54 in opts:
            return "request_selecting"
        if 50 in opts:
            return "request_init_reboot"
        return "request_rebind" if pkt[IP].dst == "255.255.255.255" else "request_renew"
    if name == "discover" and 50 in opts:
        return "discover_requested_ip"
    return name


def timeline(pcap: str) -> str:
    pkts = [p for p in rdpcap(pcap) if BOOTP in p]
    t0 = pkts[0].time if pkts else 0
    return "\n".join(f"{float(p.time - t0):7.2f} {p[IP].src:>15} -> {p[IP].dst:<15} ciaddr={p[BOOTP].ciaddr} "
                     f"{label(p)}" for p in pkts)


def extract(pcap: str) -> list[dict]:
    print(timeline(pcap))
    out = []
    for pkt in rdpcap(pcap):
        if UDP in pkt and pkt[UDP].dport == 67 and BOOTP in pkt:
            out.append({"label": label(pkt), "hex": bytes(pkt[UDP].payload).hex()})
    return out


class Rig:
    def __init__(self, lab, work):
        self.lab, self.work = lab, work
        lan = lab.switch("lan")
        self.lan = lan
        self.ad = lab.host("adapter", lan, v4=False, v6=False)
        self.gn = lab.host("gn", lan, v4=False, v6=False)
        self.squat = lab.host("squat", lan, v4=False, v6=False)
        lab.exec(self.ad, ["ip", "addr", "add", f"{SERVER_IP}/24", "dev", "eth0"], check=True)
        lab.exec(self.gn, ["ip", "link", "set", "eth0", "address", MAC], check=True)
        self.srv = None
        self.script = os.path.join(work, "env.sh")
        with open(self.script, "w") as f:
            f.write(f'#!/bin/sh\nenv | sort > "{work}/env.${{reason:-$1}}"\n'
                    'case "${reason:-$1}" in BOUND|RENEW|REBIND|REBOOT) '
                    'ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface";; '
                    'bound|renew) ip addr replace "$ip/$mask" dev "$interface";; esac\nexit 0\n')
        os.chmod(self.script, 0o755)

    def server(self, on: bool, fresh: bool = False):
        if fresh and os.path.exists(os.path.join(self.work, "leases.json")):
            os.unlink(os.path.join(self.work, "leases.json"))
        if self.srv is not None:
            self.srv.send_signal(signal.SIGTERM)
            self.srv.wait(5)
            self.srv = None
        if on:
            self.srv = self.lab.spawn(self.ad, [PY, "-m", "appliance.dhcp_server", "--iface", "eth0",
                                                "--server-ip", SERVER_IP, "--lease", str(LEASE_S),
                                                "--leases", os.path.join(self.work, "leases.json"),
                                                "--domain", "ov.example", "-v",
                                                "--binding", f"{MAC}={VIP}=gn"],
                                      log=os.path.join(self.work, "server.log"))
            time.sleep(1.0)

    def reset_gn(self):
        self.lab.exec(self.gn, ["ip", "addr", "flush", "dev", "eth0"])
        self.lab.exec(self.squat, ["ip", "addr", "flush", "dev", "eth0"])

    def tcpdump(self, name):
        path = os.path.join(self.work, name + ".pcap")
        p = self.lab.spawn(self.lan, ["tcpdump", "-i", "br0", "-U", "-w", path, "udp port 67 or udp port 68"])
        time.sleep(0.5)
        return p, path


def run(r, node, argv, timeout=20):
    """Run a client to completion (bounded); its output goes to the work dir's clients.log."""
    try:
        p = r.lab.exec(node, argv, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}{e.stderr or ''}", "timeout"
    with open(os.path.join(r.work, "clients.log"), "a") as f:
        f.write(f"$ {' '.join(argv)}\n{out}\n[exit {rc}]\n")
    print(" ".join(argv[-3:]), "->", rc)


def stop(p, sig=signal.SIGTERM, wait=5):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            p.kill()


def capture_dhclient(r: Rig) -> list[dict]:
    w = r.work
    conf = os.path.join(w, "dhclient.conf")
    with open(conf, "w") as f:
        f.write(DHCLIENT_CONF)
    base = ["dhclient", "-4", "-v", "-sf", r.script, "-cf", conf, "-lf", os.path.join(w, "dhclient.leases"),
            "-pf", os.path.join(w, "dhclient.pid")]
    r.reset_gn()
    r.server(True, fresh=True)
    tcp, pcap = r.tcpdump("dhclient")
    t0 = time.monotonic()
    run(r, r.gn, base + ["-1", "eth0"])  # DORA, then it daemonizes
    time.sleep(LEASE_S * 0.5 + 1.5)      # renew at T1 (unicast), answered at about 10 s
    r.server(False)                      # the next renew (about 20 s) goes unanswered ...
    time.sleep(max(0.0, t0 + LEASE_S * 0.5 + LEASE_S * 0.875 - 2.5 - time.monotonic()))
    r.server(True)                       # ... the rebind (broadcast, about 27.5 s) is answered
    time.sleep(5)
    run(r, r.gn, base + ["-x", "eth0"])  # stop, keeping the lease
    run(r, r.gn, base + ["-1", "eth0"])  # INIT-REBOOT from the lease file
    run(r, r.gn, base + ["-r", "eth0"])  # release (stops the daemon)
    time.sleep(0.5)
    stop(tcp)
    return extract(pcap)


def capture_udhcpc(r: Rig) -> list[dict]:
    r.reset_gn()
    r.server(True, fresh=True)
    tcp, pcap = r.tcpdump("udhcpc")
    p = r.lab.spawn(r.gn, ["udhcpc", "-i", "eth0", "-f", "-t", "3", "-T", "1", "-s", r.script],
                    log=os.path.join(r.work, "udhcpc.log"))
    time.sleep(2)
    os.kill(p.pid, signal.SIGUSR1)       # renew
    time.sleep(1)
    os.kill(p.pid, signal.SIGUSR2)       # release
    time.sleep(1)
    stop(p)
    r.reset_gn()
    run(r, r.gn, ["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "3", "-T", "1", "-r", VIP,
                  "-s", r.script])
    r.reset_gn()
    r.lab.exec(r.squat, ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"], check=True)
    p = r.lab.spawn(r.gn, ["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "1", "-T", "1", "-a",
                           "-s", r.script])                          # ARP check: conflict, DECLINE
    time.sleep(4)
    stop(p)
    r.reset_gn()
    time.sleep(0.5)
    stop(tcp)
    return extract(pcap)


def capture_dhcpcd(r: Rig) -> list[dict]:
    w = r.work
    for d in ("dhcpcd-db", "dhcpcd-run"):
        os.makedirs(os.path.join(w, d), exist_ok=True)
    pre = (f"mount -t tmpfs tmpfs /run && mkdir -p /run/dhcpcd && mount --bind {w}/dhcpcd-run /run/dhcpcd"
           f" && mount --bind {w}/dhcpcd-db /var/lib/dhcpcd && exec ")

    def dhcpcd(args):
        return ["unshare", "-m", "sh", "-c", pre + "dhcpcd " + args]

    r.reset_gn()
    r.server(True, fresh=True)
    tcp, pcap = r.tcpdump("dhcpcd")
    p = r.lab.spawn(r.gn, dhcpcd(f"-4 -B -A -t 10 -c {r.script} eth0"), log=os.path.join(w, "dhcpcd.log"))
    time.sleep(LEASE_S * 0.5 + 2)        # DORA, renew at T1
    stop(p)                              # SIGTERM: stops, keeping the lease file
    r.reset_gn()
    run(r, r.gn, dhcpcd(f"-1 -4 -B -A -t 10 -c {r.script} eth0"))   # INIT-REBOOT from the lease
    r.reset_gn()
    p = r.lab.spawn(r.gn, dhcpcd(f"-4 -B -A -t 10 -c {r.script} eth0"), log=os.path.join(w, "dhcpcd.log"))
    time.sleep(2)
    run(r, r.gn, dhcpcd("-4 -k eth0"))   # release (SIGALRM to the daemon; it then exits)
    stop(p)
    # No INFORM: dhcpcd 9.4.1 (privsep build) hangs after "ps_ctl_listen: read: Success" with
    # -s/--inform in this setup and never sends it; the INFORM tests use dhcppython packets.
    r.reset_gn()
    for f in os.listdir(os.path.join(w, "dhcpcd-db")):
        if f.endswith(".lease"):
            os.unlink(os.path.join(w, "dhcpcd-db", f))
    r.lab.exec(r.squat, ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"], check=True)
    p = r.lab.spawn(r.gn, dhcpcd(f"-1 -4 -B -t 6 -c {r.script} eth0"))   # ARP probe: DECLINE
    time.sleep(6)
    stop(p)
    r.reset_gn()
    time.sleep(0.5)
    stop(tcp)
    return extract(pcap)


def main() -> int:
    if os.geteuid() != 0:
        print("capture.py needs root (network namespaces)", file=sys.stderr)
        return 1
    out = {
        "note": ("Client -> server DHCP payloads (UDP port 67) captured with tcpdump on the lab "
                 "bridge by tests/vectors/dhcp/capture.py, against appliance/dhcp_server.py "
                 f"(server {SERVER_IP}, lease {LEASE_S} s). Client MAC {MAC}, bound to {VIP}. "
                 "Labels: discover, discover_requested_ip, request_selecting, request_init_reboot, "
                 "request_renew (unicast, ciaddr), request_rebind (broadcast, ciaddr), release, "
                 "decline, inform."),
        "captured": time.strftime("%Y-%m-%d"),
        "clients": {},
    }
    with tempfile.TemporaryDirectory(prefix="cyd-capture-") as work, Lab(prefix="cyc") as lab:
        rig = Rig(lab, work)
        for name, fn, ver in (("isc-dhcp-client", capture_dhclient, ["dhclient", "--version"]),
                              ("udhcpc", capture_udhcpc, ["udhcpc", "--help"]),
                              ("dhcpcd", capture_dhcpcd, ["dhcpcd", "--version"])):
            pkts = fn(rig)
            out["clients"][name] = {"version": version(ver), "packets": pkts}
            print(name, [p["label"] for p in pkts])
        rig.server(False)
        print(open(os.path.join(work, "server.log")).read())
        print(open(os.path.join(work, "clients.log")).read())
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
