"""`make demo`: the protocol core working for real, over UDP on loopback.

Two end nodes run as two processes. A throwaway certificate authority (the
Authentication Service's role) issues each a certificate; the nodes handshake
(Noise IK, each verifying the other's certificate), exchange encrypted ICMP
echo packets, and then an attacker replays and tampers with captured
datagrams. The report says who talked, which keys were verified, how many
packets went each way and how many replays and forgeries were refused.

Usage: ``python -m cyphonic.demo`` (the orchestrator), or internally
``python -m cyphonic.demo node ...`` for one end node.
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

from . import events as ev
from .certs import CertificateAuthority, TrustStore, key_id
from .device import Device
from .handshake import StaticIdentity
from .ipv4 import icmp_echo, parse_icmp_echo
from .udp import open_device
from .wire import cert as wire_cert

DOMAIN = "demo.cyphonic.example"
NODES = {"alice": "100.64.0.1", "bob": "100.64.0.2"}
PINGS = 20
TIMEOUT_S = 20.0


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: str) -> tuple[StaticIdentity, TrustStore, dict]:
    with open(path) as f:
        d = json.load(f)
    ident = StaticIdentity(bytes.fromhex(d["private"]), bytes.fromhex(d["public"]), bytes.fromhex(d["cert"]))
    return ident, TrustStore.of(bytes.fromhex(d["ca_public"])), d


async def _run_node(name: str, workdir: str) -> dict:
    ident, trust, conf = _load(os.path.join(workdir, f"{name}.json"))
    device = Device(ident, trust, accept_unknown_peers=True)
    log: list[str] = []
    replies: dict[int, float] = {}
    sent_at: dict[int, float] = {}
    done = asyncio.Event()
    captured: list[bytes] = []
    proto_box: list = []

    def on_event(e) -> None:
        if isinstance(e, ev.HandshakeCompleted):
            log.append(f"handshake with {e.fqdn} ({e.vip4}) complete as "
                       f"{'initiator' if e.initiator else 'responder'}; peer certificate serial "
                       f"{e.certificate_serial} verified against CA {trust_id}")
        elif isinstance(e, ev.PeerAdded):
            log.append(f"initiation from {e.fqdn} ({e.vip4}): certificate verified, static key matches")
        elif isinstance(e, ev.PacketReceived):
            pkt = parse_icmp_echo(e.packet)
            if pkt is None:
                return
            src, dst, itype, ident_, seq, data = pkt
            if itype == 8:
                if data == b"bye":
                    done.set()
                proto_box[0].send_packet(icmp_echo(dst, src, ident_, seq, data, reply=True))
            elif itype == 0 and seq in sent_at:
                replies[seq] = time.perf_counter() - sent_at[seq]

    trust_id = key_id(next(iter(trust.ca_keys.values()))).hex()
    proto = await open_device(device, ("127.0.0.1", conf["port"]), on_event,
                              tap=lambda d, a: captured.append(d))
    proto_box.append(proto)
    result: dict = {"name": name, "fqdn": device.cert.fqdn, "vip4": str(device.cert.vip4),
                    "port": conf["port"], "log": log}
    try:
        if conf["role"] == "initiator":
            peer = conf["peer"]
            device.add_peer(bytes.fromhex(peer["cert"]), time.time(), endpoint=("127.0.0.1", peer["port"]))
            log.append(f"peer {peer['fqdn']}: certificate verified before the handshake")
            me, them = str(device.cert.vip4), peer["vip4"]
            for seq in range(1, PINGS + 1):
                sent_at[seq] = time.perf_counter()
                proto.send_packet(icmp_echo(me, them, 0x4359, seq, b"cyphonic demo payload"))
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 5
            while len(replies) < PINGS and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            # The attacker: replay captured datagrams from another socket, then tamper with one.
            data_packets = [d for d in captured if d[0] == 4 and len(d) > 32]
            initiations = [d for d in captured if d[0] == 1]
            attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            target = ("127.0.0.1", peer["port"])
            replays = data_packets[:10]
            for d in replays:
                attacker.sendto(d, target)
            for d in initiations[:1]:
                attacker.sendto(d, target)
            # A forgery with a fresh counter (so the replay window lets it through to the AEAD).
            forged = bytearray(data_packets[-1])
            counter = int.from_bytes(forged[8:16], "big") + 1000
            forged[8:16] = counter.to_bytes(8, "big")
            forged[20] ^= 0x80
            attacker.sendto(bytes(forged), target)
            attacker.close()
            result["attack"] = {"replayed_data": len(replays), "replayed_initiations": len(initiations[:1]),
                                "tampered": 1}
            await asyncio.sleep(0.2)
            proto.send_packet(icmp_echo(me, them, 0x4359, PINGS + 1, b"bye"))
            await asyncio.sleep(0.3)
            rtts = sorted(replies.values())
            result["pings"] = {"sent": PINGS, "replies": len(replies),
                               "rtt_ms_median": round(rtts[len(rtts) // 2] * 1000, 3) if rtts else None}
        else:
            try:
                await asyncio.wait_for(done.wait(), TIMEOUT_S)
            except asyncio.TimeoutError:
                log.append("timed out waiting for the peer")
            await asyncio.sleep(0.2)
    finally:
        proto.close()
    result["status"] = device.status(time.time())
    return result


def _node_main(name: str, workdir: str) -> int:
    result = asyncio.run(_run_node(name, workdir))
    print(json.dumps(result))
    return 0


def _setup(workdir: str) -> dict:
    now = int(time.time())
    ca = CertificateAuthority.generate()
    ports = {n: _free_udp_port() for n in NODES}
    confs = {}
    for serial, (name, vip) in enumerate(NODES.items(), start=1):
        ident = StaticIdentity.generate()
        cert = ca.issue(serial=serial, fqdn=f"{name}.{DOMAIN}", vip4=vip, static_public=ident.public,
                        not_before=now - 60, not_after=now + 3600, groups=("demo",))
        confs[name] = {"private": ident.private.hex(), "public": ident.public.hex(),
                       "cert": cert.encode().hex(), "ca_public": ca.public.hex(),
                       "fqdn": cert.fqdn, "vip4": vip, "port": ports[name]}
    confs["alice"]["role"], confs["bob"]["role"] = "initiator", "responder"
    confs["alice"]["peer"] = {k: confs["bob"][k] for k in ("cert", "fqdn", "vip4", "port")}
    for name, conf in confs.items():
        path = os.path.join(workdir, f"{name}.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(conf, f)
    return {"ca_key_id": ca.key_id.hex(), "confs": confs}


def main() -> int:
    print("CYPHONIC protocol core demo: two end nodes, one throwaway CA, UDP on 127.0.0.1\n")
    with tempfile.TemporaryDirectory(prefix="cyphonic-demo-") as workdir:
        info = _setup(workdir)
        print(f"CA (Authentication Service) Ed25519 key id {info['ca_key_id']}")
        for name in NODES:
            c = info["confs"][name]
            cert = wire_cert.decode(bytes.fromhex(c["cert"]))
            print(f"  issued {cert.fqdn:32} vip {c['vip4']:12} serial {cert.serial} "
                  f"static key {c['public'][:16]}...  udp 127.0.0.1:{c['port']}")
        procs = {}
        try:
            for name in ("bob", "alice"):
                procs[name] = subprocess.Popen([sys.executable, "-m", "cyphonic.demo", "node", name, workdir],
                                               stdout=subprocess.PIPE, text=True)
                if name == "bob":
                    time.sleep(0.3)
            results = {}
            for name, p in procs.items():
                out, _ = p.communicate(timeout=TIMEOUT_S + 10)
                if p.returncode != 0:
                    print(f"demo: node {name} failed (exit {p.returncode})", file=sys.stderr)
                    return 1
                results[name] = json.loads(out.strip().splitlines()[-1])
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return _report(results)


def _report(results: dict) -> int:
    a, b = results["alice"], results["bob"]
    print()
    for r in (a, b):
        print(f"{r['name']} ({r['fqdn']}, {r['vip4']}):")
        for line in r["log"]:
            print(f"  - {line}")
    pa = a["status"]["peers"][0] if a["status"]["peers"] else {}
    pb = b["status"]["peers"][0] if b["status"]["peers"] else {}
    pings = a.get("pings", {})
    print(f"\npackets: alice sent {pa.get('tx_packets', 0)} and received {pa.get('rx_packets', 0)}; "
          f"bob received {pb.get('rx_packets', 0)} and sent {pb.get('tx_packets', 0)} "
          f"(encrypted ICMP echo, {pings.get('replies', 0)}/{pings.get('sent', 0)} replies, "
          f"median RTT {pings.get('rtt_ms_median')} ms)")
    drops = b["status"]["drops"]
    att = a.get("attack", {})
    print(f"attacker: replayed {att.get('replayed_data', 0)} data packets and "
          f"{att.get('replayed_initiations', 0)} handshake initiation, tampered with {att.get('tampered', 0)}")
    print(f"bob refused: {drops.get('replay', 0)} replayed data packets, "
          f"{drops.get('replay_initiation', 0) + drops.get('ratelimited_peer', 0)} replayed initiation, "
          f"{drops.get('auth', 0)} forged packet; bob's endpoint for alice stayed {pb.get('endpoint')}")
    ok = (pings.get("replies") == pings.get("sent") and drops.get("replay", 0) == att.get("replayed_data")
          and drops.get("auth", 0) == att.get("tampered")
          and drops.get("replay_initiation", 0) + drops.get("ratelimited_peer", 0) == att.get("replayed_initiations"))
    print("\nresult:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "node":
        sys.exit(_node_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
