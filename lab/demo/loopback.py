"""Part 3 of `make demo` (`python -m lab.demo`): the overlay working for real, on loopback.

What it runs (all real processes and real UDP sockets on 127.0.0.1):
1. a cloud (`cyphonic-cloud init` + `serve`: Authentication, Node Management
   and Tunnel Relay services) in a throwaway state directory;
2. two end nodes, alice and bob, each enrolled with a one-time token from
   `cyphonic-cloud enroll`. Each logs in (the AS issues its certificate, FQDN
   and virtual IP) and registers (the NMS notes its address and NAT status);
3. alice asks for bob by FQDN: the NMS checks the policy, selects the route,
   tells bob, then answers alice; alice and bob handshake directly (Noise IK,
   each verifying the other's certificate; the cloud never sees a session key)
   and exchange encrypted ICMP echo packets;
4. an attacker replays captured datagrams and forges one; bob refuses them.
The report says who talked, what the cloud decided, which keys were verified,
how many packets went each way and what was refused; everything is torn down.

Usage: ``python -m lab.demo --loopback`` (``python -m lab.demo.loopback node FILE`` runs one node).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from cyphonic import events as ev
from cyphonic.cloud.keys import parse_cloud_key
from cyphonic.handshake import StaticIdentity
from cyphonic.ipv4 import icmp_echo, parse_icmp_echo
from cyphonic.node.engine import NodeEngine, TunnelFailed, TunnelUp
from cyphonic.signaling import LoggedIn, LoginFailed, Registered
from cyphonic.udp import open_device
from cyphonic.wire import signaling as sig

from ..cloudproc import CloudProcess

DOMAIN = "demo.cyphonic.example"
PINGS = 20
TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one end node (a child process) --------------------------------------------------

async def _run_node(conf: dict) -> dict:
    ca, sig_pub = parse_cloud_key(conf["cloud_key"])
    port = _free_port()
    engine = NodeEngine(StaticIdentity.generate(), ca, sig_pub, ("127.0.0.1", conf["cloud_port"]),
                        token=conf["token"].encode(), name_hint=conf["name"],
                        local_endpoints=[sig.Endpoint("127.0.0.1", port)])
    log: list[str] = []
    replies: dict[int, float] = {}
    sent_at: dict[int, float] = {}
    bye = asyncio.Event()
    captured: list[bytes] = []
    box: list = []
    result: dict = {"name": conf["name"], "log": log, "port": port}

    def on_event(e) -> None:
        if isinstance(e, LoggedIn):
            result.update(fqdn=e.fqdn, vip4=e.vip4)
            log.append(f"logged in with its enrollment token: the AS issued {e.fqdn}, virtual IP {e.vip4}, "
                       f"certificate of {len(e.certificate)} bytes")
        elif isinstance(e, LoginFailed):
            log.append(f"login refused: {e.code.name} {e.text}")
        elif isinstance(e, Registered):
            log.append(f"registered with the NMS: observed {e.observed.host}:{e.observed.port}, "
                       f"{'behind NAT' if e.nat else 'no NAT'}")
        elif isinstance(e, ev.PeerAdded):
            log.append(f"the NMS announced {e.fqdn} ({e.vip4}); its certificate verified against the pinned CA")
        elif isinstance(e, ev.HandshakeCompleted):
            log.append(f"handshake with {e.fqdn} complete as {'initiator' if e.initiator else 'responder'}: "
                       f"peer certificate serial {e.certificate_serial} and static key verified")
        elif isinstance(e, TunnelUp):
            result["path"] = e.path
            log.append(f"tunnel to {e.fqdn} ({e.vip4}) is up, path {e.path} via {e.endpoint[0]}:{e.endpoint[1]}")
        elif isinstance(e, TunnelFailed):
            log.append(f"tunnel to {e.fqdn} failed: {e.code.name} {e.text}")
        elif isinstance(e, ev.PacketReceived):
            pkt = parse_icmp_echo(e.packet)
            if pkt is None:
                return
            src, dst, itype, ident, seq, data = pkt
            if itype == 8:
                if data == b"bye":
                    bye.set()
                engine.send_packet(icmp_echo(dst, src, ident, seq, data, reply=True), time.time())
            elif itype == 0 and seq in sent_at:
                replies[seq] = time.perf_counter() - sent_at[seq]

    proto = await open_device(engine, ("127.0.0.1", port), on_event,
                              tap=lambda d, a: captured.append(d) if d[:1] in (b"\x01", b"\x04") else None)
    box.append(proto)
    engine.start(time.time())
    proto.flush()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not engine.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not engine.ready:
            log.append(f"not ready: {engine.signaling.status()}")
            return result
        if conf["role"] == "initiator":
            # Wait until the peer has registered too, then ask for it by name.
            await asyncio.sleep(0.5)
            peer = conf["peer_fqdn"]
            log.append(f"asks the NMS for {peer}")
            t0 = time.perf_counter()
            vip = engine.resolve(peer, time.time())
            proto.flush()
            while vip is None and time.monotonic() < deadline:
                p = engine.device.peer(peer)
                if "path" in result or any("failed" in line for line in log):
                    break
                await asyncio.sleep(0.005)
            result["setup_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            p = engine.device.peer(peer)
            if p is None or "path" not in result:
                return result
            me, them = result["vip4"], str(p.cert.vip4)
            for seq in range(1, PINGS + 1):
                sent_at[seq] = time.perf_counter()
                engine.send_packet(icmp_echo(me, them, 0x4359, seq, b"cyphonic demo payload"), time.time())
                proto.flush()
                await asyncio.sleep(0.02)
            while len(replies) < PINGS and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            # The attacker: replay captured tunnel datagrams from another socket, then forge one.
            target = p.endpoint
            attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            data_packets = [d for d in captured if d[0] == 4]
            initiations = [d for d in captured if d[0] == 1][:1]
            replays = data_packets[:10]
            for d in replays + initiations:
                attacker.sendto(d, target)
            forged = bytearray(data_packets[-1])
            forged[8:16] = (int.from_bytes(forged[8:16], "big") + 1000).to_bytes(8, "big")  # fresh counter
            forged[20] ^= 0x80
            attacker.sendto(bytes(forged), target)
            attacker.close()
            result["attack"] = {"replayed": len(replays), "initiations": len(initiations), "forged": 1}
            await asyncio.sleep(0.2)
            engine.send_packet(icmp_echo(me, them, 0x4359, PINGS + 1, b"bye"), time.time())
            proto.flush()
            await asyncio.sleep(0.3)
            rtts = sorted(replies.values())
            result["pings"] = {"sent": PINGS, "replies": len(replies),
                               "rtt_ms_median": round(rtts[len(rtts) // 2] * 1000, 3) if rtts else None}
        else:
            try:
                await asyncio.wait_for(bye.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                log.append("timed out waiting for the peer")
            await asyncio.sleep(0.2)
    finally:
        engine.stop(time.time())
        proto.flush()
        proto.close()
        result["status"] = engine.status(time.time())
    return result


def _node_main(path: str) -> int:
    with open(path) as f:
        conf = json.load(f)
    print(json.dumps(asyncio.run(_run_node(conf)), default=str))
    return 0


# --- the orchestrator ------------------------------------------------------------------------

def loopback_demo() -> int:
    print("Part 3: the protocol under attack (processes on 127.0.0.1)\n")
    with tempfile.TemporaryDirectory(prefix="cyphonic-demo-") as workdir:
        # the example config's timers; IPv4 only
        cloud = CloudProcess(workdir, domain=DOMAIN, prefix=None, listen6="", keepalive_s=None, lifetime_s=None)
        procs: dict[str, subprocess.Popen] = {}
        try:
            cloud.start()
            print(f"cloud: AS + NMS on udp 127.0.0.1:{cloud.signaling_port}, domain {DOMAIN}")
            print(f"cloud key (pinned by the nodes): {cloud.cloud_key[:40]}...")
            tokens = {n: cloud.cli("enroll", n, "--expires", "1h").strip() for n in ("alice", "bob")}
            for n, t in tokens.items():
                print(f"  cyphonic-cloud enroll {n:5} -> one-time token {t[:18]}...")
            for name in ("bob", "alice"):
                conf = {"name": name, "token": tokens[name], "cloud_key": cloud.cloud_key,
                        "cloud_port": cloud.signaling_port,
                        "role": "initiator" if name == "alice" else "responder",
                        "peer_fqdn": f"bob.{DOMAIN}"}
                path = os.path.join(workdir, f"{name}.json")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(conf, f)
                procs[name] = subprocess.Popen([sys.executable, "-m", "lab.demo.loopback", "node", path],
                                               stdout=subprocess.PIPE, text=True)
            results = {}
            for name, p in procs.items():
                out, _ = p.communicate(timeout=TIMEOUT_S + 15)
                if p.returncode != 0 or not out.strip():
                    print(f"demo: node {name} failed (exit {p.returncode})", file=sys.stderr)
                    return 1
                results[name] = json.loads(out.strip().splitlines()[-1])
            time.sleep(2.2)  # one stats interval, so `nodes` shows the registrations
            nodes_table = cloud.cli("nodes")
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
            cloud.stop()
        return _report(results, cloud.log(), nodes_table)


def _report(results: dict, cloud_log: str, nodes_table: str) -> int:
    a, b = results["alice"], results["bob"]
    print()
    for r in (a, b):
        print(f"{r['name']} ({r.get('fqdn')}, {r.get('vip4')}):")
        for line in r["log"]:
            print(f"  - {line}")
    print("\nthe cloud's log:")
    for line in cloud_log.splitlines():
        if "listening" in line or "cloud key" in line:
            continue
        print(f"  {line}")
    print("\n$ cyphonic-cloud nodes")
    print("  " + nodes_table.rstrip().replace("\n", "\n  "))
    dev_a = a.get("status", {}).get("device", {})
    dev_b = b.get("status", {}).get("device", {})
    pa = (dev_a.get("peers") or [{}])[0]
    pb = (dev_b.get("peers") or [{}])[0]
    pings = a.get("pings", {})
    drops = dev_b.get("drops", {})
    att = a.get("attack", {})
    print(f"\ntunnel set-up (route selection + handshake): {a.get('setup_ms')} ms, path {a.get('path')}")
    print(f"packets: alice sent {pa.get('tx_packets', 0)} and received {pa.get('rx_packets', 0)}; "
          f"bob received {pb.get('rx_packets', 0)} and sent {pb.get('tx_packets', 0)} "
          f"(encrypted ICMP echo, {pings.get('replies', 0)}/{pings.get('sent', 0)} replies, "
          f"median RTT {pings.get('rtt_ms_median')} ms)")
    refused_init = drops.get("replay_initiation", 0) + drops.get("ratelimited_peer", 0)
    print(f"attacker: replayed {att.get('replayed', 0)} data packets and {att.get('initiations', 0)} handshake "
          f"initiation, forged {att.get('forged', 0)}")
    print(f"bob refused: {drops.get('replay', 0)} replayed data packets, {refused_init} replayed initiation, "
          f"{drops.get('auth', 0)} forged; bob's endpoint for alice stayed {pb.get('endpoint')}")
    ok = (pings.get("replies") == pings.get("sent") == PINGS and drops.get("replay", 0) == att.get("replayed")
          and refused_init == att.get("initiations") == 1
          and drops.get("auth", 0) == att.get("forged") == 1 and a.get("path") == "direct")
    print("\nresult:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "node":
        sys.exit("usage: python -m lab.demo.loopback node FILE   (the whole demo: python -m lab.demo)")
    sys.exit(_node_main(sys.argv[2]))
