"""The node daemon's TUN offload modes (issue 15, step 3) in one interleaved run: node daemons
with ``tun_offload`` "off" (a plain TUN), "merge" (vnet header, whole packets read, merged GSO
writes on the way in) and "full" (also TSO reads cut and checksummed in Python), and
wireguard-go.

One lab (prefix ``cyq``, namespaces of lab.topology): n1 -> n2 through daemons in "merge" and
through wireguard-go (as in lab.bench.node), n3 -> n4 in "off", n5 -> n6 in "full". Ping,
UDP 1300-byte datagrams unlimited (CPU µs per datagram) and each TCP run of lab.bench.node's
TCP_RUNS (1 and 4 streams, both directions) for every path back to back in rotating order,
``rounds`` times; the table shows the medians, the ratios, the tunnel processes' CPU µs per
1448 bytes of TCP payload, and the daemons' counters of the last round: super-packets read from
the TUN and their pieces, merged writes and their segments, GSO sends and GRO reads.

    python -m lab.bench --only offload --out build/bench-offload
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

from ..nodelab import DOMAIN, Overlay
from . import node as nb
from .common import bench_lab, machine, write_result

PATHS = ("off", "merge", "full", "wireguard-go")
ROUNDS = 3
# path -> (client, server, tun_offload); wireguard-go runs between n1 and n2 beside "merge"
PAIRS = {"off": ("n3", "n4", "off"), "merge": ("n1", "n2", "merge"), "full": ("n5", "n6", "full")}


class OffloadBench(nb.NodeBench):
    name = "offload"
    paths = PATHS
    node_names = {"n1": "alpha", "n2": "beta", "n3": "gamma", "n4": "delta", "n5": "epsilon", "n6": "zeta"}

    def build(self) -> None:
        self.domain = DOMAIN
        lab = self.lab
        inet = lab.switch("inet", "198.18.0.0/24")
        self.cloud = lab.host("cloud", inet, v6=False)
        self.h = {n: lab.host(n, inet, v6=False) for n in self.node_names}
        self.anchor = {n: self.anchor_in(self.h[n]) for n in self.node_names}
        self.ov = Overlay(lab, self.cloud, os.path.join(self.work, "overlay"))
        self.ov.start_cloud()
        mode = {hn: m for c, s, m in PAIRS.values() for hn in (c, s)}
        for hn, name in self.node_names.items():
            self.ov.add_node(name, self.h[hn], extra={"tun_offload": mode[hn]})
        st = {hn: self.ov.wait_ready(name, timeout=40) for hn, name in self.node_names.items()}
        self.offload_state = {hn: s["interface"]["offload"] for hn, s in st.items()}
        for hn, s in self.offload_state.items():
            if s["mode"] != mode[hn]:
                raise nb.BenchError(f"{hn}: tun_offload {mode[hn]!r} is in mode {s['mode']!r}: {s['reason']}")
        self.vip = {hn: s["identity"]["vip4"] for hn, s in st.items()}
        self.ports = {hn: s["udp_port"] for hn, s in st.items()}
        self.cy_port = self.ports["n2"]
        self.cy_mtu = st["n2"]["interface"]["mtu"]
        self.pids = {hn: self.ov.nodes[name]["proc"].pid for hn, name in self.node_names.items()}
        self.cy_pids = [self.pids["n1"], self.pids["n2"]]
        self._start_wireguard()

    def path_info(self, path: str) -> dict:
        if path in PAIRS:
            client, server, _ = PAIRS[path]
            return {"client": client, "target": self.vip[server], "pids": [self.pids[client], self.pids[server]],
                    "port": self.ports[server], "tun": "cy0", "server": server}
        return {**super().path_info(path), "server": "n2"}

    def _server(self, target: str, port: int) -> subprocess.Popen:
        hn = {v: k for k, v in self.vip.items()}.get(target, "n2")   # (wireguard-go: n2)
        log = os.path.join(self.work, "iperf3-server.log")
        p = self.lab.spawn(self.h[hn], ["iperf3", "-s", "-1", "-B", target, "-p", str(port)], log=log)
        hexport = f":{port:04X}"
        end = time.monotonic() + nb.SERVER_READY_S
        while time.monotonic() < end:
            listening = any(f[1].endswith(hexport) and f[3] == "0A"
                            for f in (line.split() for line in
                                      nb._read(f"/proc/{self.anchor[hn]}/net/tcp").splitlines()[1:]))
            if listening or p.poll() is not None:
                break
            time.sleep(0.02)
        return p

    def _counters(self, info: dict) -> dict:
        c_ifs = (info["tun"],) if info["tun"] else ()
        ports = {"tunnel": info["port"]} if info["port"] else {}
        server = info["server"]
        return {"client": nb.net_counters(self.anchor[info["client"]], {}, c_ifs + ("eth0",)),
                "n2": nb.net_counters(self.anchor[server], ports, (info.get("tun2") or info["tun"] or "eth0", "eth0")),
                "batches": self.batch_counters(info)}

    def batch_counters(self, info: dict) -> dict:
        if info.get("tun") != "cy0":
            return {}
        return {**self.node_batches(info["client"]), **self.node_batches(info["server"])}


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


def run(out_dir: str, *, prefix: str = "cyq", rounds: int = ROUNDS, quiet: bool = False) -> dict:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    nb._check_tools()
    t0 = time.perf_counter()
    with bench_lab("offload", prefix=prefix, say=say, dump_logs=nb._dump_logs) as (lab, work):
        b = OffloadBench(lab, work, log=say)
        try:
            say("offload bench: building the lab (cloud, 6 cyphonic-node daemons, 2 wireguard-go)")
            b.build()
            b.warm_up()
            say("offload bench: ping")
            ping = b.ping()
            udp_rounds, tcp_rounds = [], []
            for i in range(rounds):
                say(f"offload bench: round {i + 1} of {rounds}: UDP {nb.UDP_MTU_BYTES} B unlimited, TCP")
                udp_rounds.append(b.udp_unlimited(nb.UDP_MTU_BYTES, nb.MTU_SECONDS))
                tcp_rounds.append(b.tcp_all())
            offload_state = b.offload_state
        finally:
            b.stop_wireguard()
    labels = list(tcp_rounds[0])
    result = {
        "what": "ping, UDP 1300 B and TCP through node daemons with tun_offload off, merge and full, "
                "and wireguard-go; one run, interleaved",
        "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": rounds, "tcp_seconds": nb.TCP_SECONDS, "offload_state": offload_state, "ping": ping,
        "udp_1300_median": {p: {k: _median(r[p][k] for r in udp_rounds)
                                for k in ("received_mbit", "lost_percent", "tunnel_cpu_us_per_datagram")}
                            for p in PATHS},
        "tcp_median_mbit": {label: {p: _median(r[label][p]["received_mbit"] for r in tcp_rounds) for p in PATHS}
                            for label in labels},
        "tcp_cpu_us_per_1448_payload_bytes_median": {
            label: {p: _median(r[label][p].get("tunnel_cpu_us_per_1448_payload_bytes") for r in tcp_rounds)
                    for p in PATHS} for label in labels},
        "udp_rounds": udp_rounds, "tcp_rounds": tcp_rounds,
        "runtime_s": round(time.perf_counter() - t0, 1),
    }
    written = write_result(out_dir, "offload", result)
    print_table(result, say)
    say(f"written {written}")
    return result


def table_rows(r: dict) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = [("ping RTT median (ms)", {p: r["ping"][p]["median_ms"] for p in PATHS}),
                                    ("ping RTT p99 (ms)", {p: r["ping"][p]["p99_ms"] for p in PATHS})]
    u = r["udp_1300_median"]
    rows.append(("UDP 1300 B unlimited: received (Mbit/s)", {p: u[p]["received_mbit"] for p in PATHS}))
    rows.append(("UDP 1300 B unlimited: loss (%)", {p: u[p]["lost_percent"] for p in PATHS}))
    rows.append(("UDP 1300 B unlimited: tunnel CPU µs/datagram",
                 {p: u[p]["tunnel_cpu_us_per_datagram"] for p in PATHS}))
    for label, by_path in r["tcp_median_mbit"].items():
        rows.append((f"TCP {label} (Mbit/s)", by_path))
    for label, by_path in r["tcp_cpu_us_per_1448_payload_bytes_median"].items():
        rows.append((f"TCP {label}: tunnel CPU µs per 1448 B payload", by_path))
    return rows


def print_table(r: dict, say=print) -> None:
    nb.print_rows(f"node daemon TUN offload modes (one run, interleaved, medians of {r['rounds']} rounds; "
                  f"{r['machine']['cpus']} CPUs, shared: quote ratios)",
                  [(p, p) for p in PATHS], table_rows(r),
                  [("merge/off", "merge", "off"), ("full/off", "full", "off"), ("merge/full", "merge", "full"),
                   ("merge/wg", "merge", "wireguard-go")], say)
    last = r["tcp_rounds"][-1]
    say("\ncounters of the last round, per host: datagrams per GSO send (gso) and GRO read (gro), pieces "
        "per super-packet read (tso), segments per merged write (mrg); fallbacks (must be none)")
    for label, by_path in last.items():
        for p in PAIRS:
            row = by_path[p]
            fallbacks = {k: v for k, v in row.get("batches", {}).items()
                         if k.endswith(("_offload_fallbacks", "_coalesce_bad_checksum", "_gso_disabled"))}
            say(f"  {label:18} {p:6} {nb.batching(row)} {fallbacks or ''}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--prefix", default="cyq", help="lab prefix (namespaces <prefix>-*)")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args(argv)
    run(args.out, prefix=args.prefix, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
