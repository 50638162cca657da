"""`make bench`, flood part: an existing tunnel without and under a handshake flood (issue 12,
"Handshake flood" and Benchmark), for the node daemon, the adapter and wireguard-go.

The adapter bench's lab (lab/bench/adapter.py: a cloud, cyphonic-node daemons on n1, n2 and
fresh hosts f1..f4, wireguard-go on n1 and n2, an adapter with general node ``gn`` on its LAN),
plus an attacker host ``atk`` on the "internet" segment and wireguard-go on f1 and f2 as fresh
peers of n2's. Per path, one after the other:

- ``cyphonic`` (column "node"): n1 pings n2's virtual IP; the flood goes to n2's node daemon
  (tunnel initiations, mac1 keyed by n2's static key, from its status);
- ``adapter``: gn pings n2's virtual IP through the adapter; the flood goes to the general
  node's WAN port on the adapter (mac1 keyed by the general node's static key, from its
  certificate);
- ``wireguard-go``: n1 pings n2's wireguard address; the flood goes to n2's wireguard-go
  (WireGuard's own initiation, 148 bytes, mac1 keyed by n2's public key from ``wg show``).

Each path: ``UNLOADED_PINGS`` echoes every 20 ms unloaded, then a flood of ``FLOOD_S`` s from
random spoofed sources (lab/flood.py: one sender, as fast as it goes) with an echo every 20 ms
through it; RTT loss and median of both. Meanwhile ``PROBE_AT_S`` s into the flood, a fresh peer
sets up a new tunnel to the flooded target (node: f2's daemon asks its DNS for n2, whose answer
waits for the tunnel; adapter: f4 for the general node; wireguard-go: f2's wireguard-go, time
to the first echo reply), against the same unloaded before the flood (f1, f3, f1). Also counted:
what the target answered to the spoofed sources (at the segment's gateway, by message type: the
cookie replies), the key agreements a cyphonic target did for nothing (its ``device_auth``
drops: initiations that failed after the Diffie-Hellman), the target namespace's UDP receive
buffer overflows, the target's CPU time and RSS growth. A wireguard-go that sends cookie replies
to the flood also proves the flood's WireGuard mac1 right (it answers nothing to a bad mac1).

"Handshakes per second completed under flood" is not measured as a rate: a legitimate
initiator is held to 20 initiations a second per source by design, so what matters is whether,
and how fast, a fresh tunnel comes up under the flood: the set-up rows.

    python -m lab.bench --only flood --out build/bench
    python -m lab.bench.flood --out build/bench        # the same, this part alone
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import time

from appliance.cyadm import ask
from cyphonic.wire import cert as wire_cert

from .. import flood as fl
from ..adapterlab import mac_of
from . import adapter as ab
from . import node as nb
from .common import bench_lab, cpu_seconds, machine, write_result

PATHS = ("cyphonic", "adapter", "wireguard-go")
COLUMNS = [("cyphonic", "node"), ("adapter", "adapter"), ("wireguard-go", "wireguard-go")]
FLOOD_S = 20.0
FLOOD_RATE = 0.0              # as fast as one sender goes
FLOOD_PROCS = 1               # the target keeps the other core of these two
UNLOADED_PINGS = 200          # at fl.PING_INTERVAL_S
PROBE_AT_S = 4.0              # the fresh tunnel's set-up starts this far into the flood ...
WG_PROBE_DEADLINE_S = 12      # ... and a wireguard-go one gives up after this (within the flood)
WG_PROBE_INTERVAL_S = 0.02
SETTLE_S = 3.0                # after a flood, before the next path's unloaded pings
# fresh peer (unloaded, under flood) per path
FRESH = {"cyphonic": ("f1", "f2"), "adapter": ("f3", "f4"), "wireguard-go": ("f1", "f2")}
WG_FRESH_ADDR = {"f1": 3, "f2": 4}


class FloodBench(ab.AdapterBench):
    name = "flood"
    paths = ("plain", "cyphonic", "adapter", "wireguard-go")

    def build_more(self, inet) -> None:
        super().build_more(inet)
        self.inet = inet
        self.h["atk"] = self.lab.host("atk", inet, v6=False)
        self.replies = fl.ReplyCounter(self.lab, inet)

    def after_build(self) -> None:
        super().after_build()
        self.wg_pub = {i: self._wg_public(i) for i in (0, 1)}
        self.wg_if = (*self.wg_if, *(f"wg{self.prefix}{WG_FRESH_ADDR[h]}" for h in ("f1", "f2")))
        for hn in ("f1", "f2"):
            self._start_fresh_wireguard(hn)

    def _wg_public(self, i: int) -> bytes:
        """The public key of wireguard-go on n1 (0) or n2 (1), as ``wg show`` gives it."""
        out = self.lab.exec(self.h[("n1", "n2")[i]], ["wg", "show", self.wg_if[i], "public-key"],
                            check=True).stdout.strip()
        key = base64.b64decode(out)
        if len(key) != 32:
            raise nb.BenchError(f"not a WireGuard public key: {out!r}")
        return key

    def _start_fresh_wireguard(self, hn: str) -> None:
        """wireguard-go on ``hn`` with n2's wireguard-go as its peer (and n2 knowing it), no
        handshake yet: the first echo to n2's wireguard address sets the tunnel up."""
        lab, n = self.lab, WG_FRESH_ADDR[hn]
        ifname = f"wg{self.prefix}{n}"
        key = os.path.join(self.work, f"{ifname}.key")
        priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(priv + "\n")
        sock = f"/var/run/wireguard/{ifname}.sock"
        if os.path.exists(sock):
            os.unlink(sock)
        p = lab.spawn(self.h[hn], ["wireguard-go", "-f", ifname], log=os.path.join(self.work, f"{ifname}.log"))
        self.wg_procs.append(p)
        end = time.monotonic() + 10
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > end:
                raise nb.BenchError(f"wireguard-go {ifname} did not start")
            time.sleep(0.05)
        n2 = self.h["n2"]
        for host, argv in (
                (hn, ["wg", "set", ifname, "private-key", key, "listen-port", str(nb.WG_PORT + n),
                      "peer", base64.b64encode(self.wg_pub[1]).decode(), "endpoint", f"{n2.addr4}:{nb.WG_PORT + 1}",
                      "allowed-ips", f"{nb.WG_NET}.2/32"]),
                (hn, ["ip", "addr", "add", f"{nb.WG_NET}.{n}/24", "dev", ifname]),
                (hn, ["ip", "link", "set", ifname, "mtu", str(nb.WG_MTU), "up"]),
                ("n2", ["wg", "set", self.wg_if[1], "peer", pub, "allowed-ips", f"{nb.WG_NET}.{n}/32"])):
            lab.exec(self.h[host], argv, check=True)

    # --- one path --------------------------------------------------------------------------

    def target(self, path: str) -> dict:
        """What the flood hits on this path: host, address, port, kind, static key, processes."""
        if path == "cyphonic":
            st = self.ov.status(self.node_names["n2"])
            return {"host": self.h["n2"], "addr": self.h["n2"].addr4, "port": self.cy_port, "kind": "tunnel",
                    "key": bytes.fromhex(st["identity"]["static_key"]), "pids": [self.cy_pids[1]]}
        if path == "adapter":
            self._refresh_adapter_pids()
            mac = mac_of(self.lab, self.h["gn"]).replace(":", "")
            with open(os.path.join(self.work, "adapter", "gn", mac, "certificate")) as f:
                key = wire_cert.decode(bytes.fromhex(f.read().strip())).static_public
            return {"host": self.h["adapter"], "addr": self.h["adapter"].addr4, "port": self.gn_port,
                    "kind": "tunnel", "key": key, "pids": list(self.adapter_pids)}
        if path == "wireguard-go":
            return {"host": self.h["n2"], "addr": self.h["n2"].addr4, "port": nb.WG_PORT + 1, "kind": "wireguard",
                    "key": self.wg_pub[1], "pids": [self.wg_pids[1]]}
        raise KeyError(path)

    def drops(self, path: str) -> dict:
        try:
            if path == "cyphonic":
                return dict(self.ov.status(self.node_names["n2"])["drops"])
            if path == "adapter":
                return dict(ask(self.adapter_sock)["drops"])
        except (OSError, ValueError, KeyError):
            pass
        return {}

    def fresh_setup(self, path: str, hn: str) -> dict:
        """A new tunnel from fresh peer ``hn`` to the path's target: how long it takes."""
        t = time.perf_counter()
        if path == "cyphonic":
            return nb.dig_sample(hn, "n2", self.ov.dig(self.node_names[hn], f"{self.node_names['n2']}.{self.domain}"),
                                 self.vip["n2"], t)
        if path == "adapter":
            return nb.dig_sample(hn, ab.GN_NAME, self.ov.dig(self.node_names[hn], f"{ab.GN_NAME}.{self.domain}"),
                                 self.gn_vip, t)
        p = self.lab.exec(self.h[hn], ["ping", "-n", "-i", str(WG_PROBE_INTERVAL_S), "-w", str(WG_PROBE_DEADLINE_S),
                                       "-c", "1", f"{nb.WG_NET}.2"], timeout=WG_PROBE_DEADLINE_S + 10)
        m = re.search(r"icmp_seq=(\d+) .*time=([\d.]+) ms", p.stdout)
        ms = round((int(m.group(1)) - 1) * WG_PROBE_INTERVAL_S * 1000 + float(m.group(2)), 1) if m else None
        return {"from": hn, "to": "n2", "ok": m is not None, "query_ms": ms,
                "wall_ms": round((time.perf_counter() - t) * 1000, 1)}

    def measure(self, path: str) -> dict:
        info = self.path_info(path)
        client, dest = self.h[info["client"]], info["target"]
        tg = self.target(path)
        fresh_idle, fresh_flood = FRESH[path]
        setup_idle = self.fresh_setup(path, fresh_idle)
        unloaded = fl.ping(self.lab, client, dest, count=UNLOADED_PINGS, interval=fl.PING_INTERVAL_S)
        rss0 = {pid: fl.rss_kb(pid) for pid in tg["pids"]}
        cpu0 = sum(cpu_seconds(p) for p in tg["pids"])
        udp0, rep0, drops0 = fl.udp_counters(self.lab, tg["host"]), self.replies.read(), self.drops(path)
        flood = fl.Flood(self.lab, self.h["atk"], kind=tg["kind"], key=tg["key"], target=tg["addr"],
                         port=tg["port"], rate=FLOOD_RATE, seconds=FLOOD_S, procs=FLOOD_PROCS,
                         log=os.path.join(self.work, f"flood-{path}.log"))
        probe: dict = {}

        def sample():
            if not probe and time.monotonic() - flood.started >= PROBE_AT_S:
                probe.update(self.fresh_setup(path, fresh_flood))
            return None

        run = fl.under_flood(self.lab, flood, pinger=client, target=dest, sample=sample, sample_every_s=0.5,
                             log=os.path.join(self.work, f"ping-{path}.log"))
        cpu = sum(cpu_seconds(p) for p in tg["pids"]) - cpu0
        time.sleep(SETTLE_S)
        secs = run["flood"]["seconds"] or FLOOD_S
        udp = {k: v - udp0.get(k, 0) for k, v in fl.udp_counters(self.lab, tg["host"]).items()}
        rep = {k: v - rep0.get(k, 0) for k, v in self.replies.read().items()}
        drops = {k: v - drops0.get(k, 0) for k, v in self.drops(path).items() if v - drops0.get(k, 0)}
        rss = {pid: ((fl.rss_kb(pid) or 0) - (kb or 0)) for pid, kb in rss0.items()}
        row = {"flood": run["flood"], "unloaded": unloaded, "under_flood": run["ping"],
               "replies_to_spoofed_sources": rep,
               "cookie_replies_per_s": round(rep.get("cookie", 0) / secs),
               "key_agreements_per_s": (round(drops.get("device_auth", 0) / secs) if path != "wireguard-go" else None),
               "target_drops": drops, "target_udp": udp,
               "target_rcvbuf_overflows_per_s": round(udp.get("RcvbufErrors", 0) / secs),
               "target_cpu_s": round(cpu, 2), "target_rss_growth_kb": rss,
               "setup_unloaded": setup_idle, "setup_under_flood": probe or None}
        self.say(f"  {path}: {run['flood']['rate']}/s; ping loss {unloaded['loss_percent']}% -> "
                 f"{run['ping']['loss_percent']}%, median {unloaded['median_ms']} -> {run['ping']['median_ms']} ms; "
                 f"cookie replies {row['cookie_replies_per_s']}/s")
        return row


def run(out_dir: str, *, prefix: str = "cyb", quiet: bool = False) -> dict:
    """Build the lab, measure each path, print the table, write ``<out_dir>/flood.json``."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    nb._check_tools()
    t0 = time.perf_counter()
    m: dict = {"machine": machine()}
    with bench_lab("flood", prefix=prefix, say=say, dump_logs=nb._dump_logs) as (lab, work):
        b = FloodBench(lab, work, log=say)
        try:
            say("flood bench: building the lab (cloud, 6 cyphonic-node daemons, an adapter, "
                "4 wireguard-go, an attacker)")
            b.build()
            b.warm_up()
            m["build_s"] = round(time.perf_counter() - t0, 1)
            for path in PATHS:
                say(f"flood bench: {path}")
                m[path] = b.measure(path)
                time.sleep(SETTLE_S)
        finally:
            b.stop_wireguard()
    result = {
        "what": "an existing tunnel's pings without and under a flood of valid-mac1 handshake "
                "initiations from random spoofed sources, per target: node daemon, adapter "
                "(general node's WAN port), wireguard-go; one run",
        "machine": m["machine"],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": nb._versions(),
        "parameters": {"flood_seconds": FLOOD_S, "flood_rate_asked": FLOOD_RATE or "unpaced",
                       "flood_sender_processes": FLOOD_PROCS, "spoofed_sources": fl.SPOOF_NET,
                       "spoofed_sources_routable_back": False, "pool_packets": fl.POOL_PACKETS,
                       "ping_interval_s": fl.PING_INTERVAL_S, "unloaded_pings": UNLOADED_PINGS,
                       "fresh_setup_probe_at_s": PROBE_AT_S},
        "paths": {p: m[p] for p in PATHS},
        "runtime_s": {"build": m["build_s"], "total": round(time.perf_counter() - t0, 1)},
    }
    print_table(result, say)
    say(f"written {write_result(out_dir, 'flood', result)}")
    return result


def print_table(r: dict, say=print) -> None:
    p = r["paths"]

    def row(label, fn):
        return label, {k: fn(p[k]) for k in p}

    def setup(x):
        return x["query_ms"] if x and x.get("ok") else "failed"

    rows = [
        row("flood: initiations sent per s", lambda x: x["flood"]["rate"]),
        row("ping loss unloaded (%)", lambda x: x["unloaded"]["loss_percent"]),
        row("ping loss under flood (%)", lambda x: x["under_flood"]["loss_percent"]),
        row("ping RTT median unloaded (ms)", lambda x: x["unloaded"]["median_ms"]),
        row("ping RTT median under flood (ms)", lambda x: x["under_flood"]["median_ms"]),
        row("ping RTT p90 under flood (ms)", lambda x: x["under_flood"]["p90_ms"]),
        row("cookie replies sent per s", lambda x: x["cookie_replies_per_s"]),
        row("key agreements for nothing per s", lambda x: x["key_agreements_per_s"]),
        row("target socket overflows per s", lambda x: x["target_rcvbuf_overflows_per_s"]),
        row("target CPU s during the flood", lambda x: x["target_cpu_s"]),
        row("target RSS growth (MB)", lambda x: round(sum(x["target_rss_growth_kb"].values()) / 1024, 1)),
        row("fresh tunnel set-up unloaded (ms)", lambda x: setup(x["setup_unloaded"])),
        row("fresh tunnel set-up under flood (ms)", lambda x: setup(x["setup_under_flood"])),
    ]
    nb.print_rows(f"handshake flood ({r['parameters']['flood_seconds']:.0f} s, spoofed sources, one sender; "
                  f"{r['machine']['cpus']} CPUs, shared)", COLUMNS, rows, [], say)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--prefix", default="cyb", help="lab prefix (namespaces <prefix>-*)")
    args = ap.parse_args(argv)
    run(args.out, prefix=args.prefix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
