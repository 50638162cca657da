"""The same two-endpoint scenario over real UDP sockets on 127.0.0.1, and the demo itself."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

from cyphonic import events as ev
from cyphonic.certs import TrustStore
from cyphonic.device import Device
from cyphonic.ipv4 import icmp_echo, parse_icmp_echo
from cyphonic.udp import open_device

from corefixtures import World


def test_two_devices_over_real_udp_sockets():
    async def scenario():
        w = World(seed=3)
        w.now = time.time()  # real sockets, real clock: certificates valid now
        ia, ib = w.identity("alice", "100.64.0.1"), w.identity("bob", "100.64.0.2")
        a = Device(ia, TrustStore.of(w.ca.public))
        b = Device(ib, TrustStore.of(w.ca.public))
        got_a, got_b, sent = [], [], []
        box = {}

        def on_b(e):
            if isinstance(e, ev.PacketReceived):
                got_b.append(e.packet)
                src, dst, t, ident, seq, data = parse_icmp_echo(e.packet)
                box["b"].send_packet(icmp_echo(dst, src, ident, seq, data, reply=True))

        pb = await open_device(b, ("127.0.0.1", 0), on_b)
        box["b"] = pb
        pa = await open_device(a, ("127.0.0.1", 0),
                               lambda e: got_a.append(e) if isinstance(e, ev.PacketReceived) else None,
                               tap=lambda d, addr: sent.append(d))
        bport = pb.transport.get_extra_info("sockname")[1]
        a.add_peer(ib.certificate, w.now, endpoint=("127.0.0.1", bport))
        for seq in range(50):
            pa.send_packet(icmp_echo("100.64.0.1", "100.64.0.2", 7, seq, b"x" * 100))
            await asyncio.sleep(0.002)
        for _ in range(200):
            if len(got_a) == 50:
                break
            await asyncio.sleep(0.01)
        # replay everything alice sent, from another real socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for d in sent:
            s.sendto(d, ("127.0.0.1", bport))
        s.sendto(b"\x04garbage", ("127.0.0.1", bport))
        s.close()
        await asyncio.sleep(0.2)
        pa.close()
        pb.close()
        return a, b, got_a, got_b, sent

    a, b, got_a, got_b, sent = asyncio.run(scenario())
    assert len(got_b) == 50 and len(got_a) == 50
    replayed_data = sum(1 for d in sent if d[0] == 4)
    assert b.drops["replay"] == replayed_data
    assert b.drops["replay_initiation"] + b.drops["ratelimited_peer"] == 1
    assert b.drops["short"] == 1
    assert b.peer(a.cert.fqdn).rx_packets == 50


def test_make_demo_runs_and_reports_ok():
    proc = subprocess.run([sys.executable, "-m", "lab.demo", "--loopback"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "result: OK" in proc.stdout
    assert "20/20 replies" in proc.stdout
    assert "bob refused: 10 replayed data packets, 1 replayed initiation, 1 forged" in proc.stdout
    assert "route DIRECT from=alice.demo.cyphonic.example to=bob.demo.cyphonic.example" in proc.stdout
    assert "enrolled ok node=bob.demo.cyphonic.example" in proc.stdout
