"""Interface Handling (appliance/interface_handling.py): proxy ARP for overlay addresses and
injection toward the general node.

Unit tests of the sans-IO ARP responder and policy (every byte of a reply, probes from 0.0.0.0,
garbage, truncations, rate limit), then one lab test (marked root; fails, never skips, without
root): a general node "gn" (100.64.0.7/10) and the adapter's LAN port on a bare link.

The bottom of this file is a small command-line helper run inside the lab's namespaces
(`python tests/test_interface_handling.py serve-arp|probe|echo|bench ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import socket
import statistics
import struct
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.interface_handling import (ARP_FRAME_BYTES, ETH_P_ARP, ETH_P_IP, ArpResponder,
                                          Injector, OverlayArpPolicy, interface_mac, ipv4_problem,
                                          mac_bytes, mac_str, serve_arp)
from lab import Lab


# --- packet builders (shared by the tests and the helper) ----------------------------------

BCAST = b"\xff" * 6


def arp_request(src_mac: bytes, sender_ip: str, target_ip: str, *, eth_dst: bytes = BCAST,
                op: int = 1) -> bytes:
    return (eth_dst + src_mac + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op)
            + src_mac + socket.inet_aton(sender_ip) + bytes(6) + socket.inet_aton(target_ip))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + payload


def icmp_echo(src: str, dst: str, ident: int, seq: int, data: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    return ipv4_packet(src, dst, 1, icmp, ident=seq)


def udp_packet(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    return ipv4_packet(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


# --- unit tests -------------------------------------------------------------------------------

OWN = bytes.fromhex("02aaaaaaaa01")
GN = bytes.fromhex("02bbbbbbbb07")
GN2 = bytes.fromhex("02bbbbbbbb08")
VIPS = {GN: "100.64.0.7", GN2: "100.64.0.8"}


def policy(local=True):
    return OverlayArpPolicy("100.64.0.0/10", gateway="100.64.0.1", vip_of_mac=VIPS.get,
                            local_vips=(lambda: set(VIPS.values())) if local else None)


def responder(**kw):
    return ArpResponder(OWN, answer_for=kw.pop("answer_for", policy()), **kw)


def accounted(r: ArpResponder) -> bool:
    """Every frame ended in exactly one of replies, ignored, drops."""
    c = r.counters
    return c["frames"] == c["replies"] + c["ignored"] + sum(r.drops.values())


def test_reply_to_a_request_for_a_peer_vip_every_byte():
    r = responder()
    req = arp_request(GN, "100.64.0.7", "100.64.0.9")
    rep = r.receive(req, 0.0)
    expected = bytes.fromhex(
        "02bbbbbbbb07"      # Ethernet destination: the asker
        "02aaaaaaaa01"      # Ethernet source: the LAN port
        "0806"              # ARP
        "0001" "0800" "06" "04" "0002"   # Ethernet/IPv4, hlen 6, plen 4, op reply
        "02aaaaaaaa01" "64400009"        # sender: our MAC, the asked address 100.64.0.9
        "02bbbbbbbb07" "64400007")       # target: the asker's MAC and address
    assert rep == expected and len(rep) == ARP_FRAME_BYTES
    assert r.counters["replies"] == 1 and not r.drops and accounted(r)


def test_unicast_request_is_answered_and_padding_is_ignored():
    # a neighbour re-check arrives unicast to our MAC; real frames carry padding to 60 bytes
    r = responder()
    req = arp_request(GN, "100.64.0.7", "100.64.0.9", eth_dst=OWN) + bytes(18)
    rep = r.receive(req, 0.0)
    assert rep is not None and rep[:6] == GN and rep[28:32] == socket.inet_aton("100.64.0.9")


def test_gateway_address_is_answered():
    r = responder()
    rep = r.receive(arp_request(GN, "100.64.0.7", "100.64.0.1"), 0.0)
    assert rep is not None and rep[22:28] == OWN and rep[28:32] == socket.inet_aton("100.64.0.1")


@pytest.mark.parametrize("target", ["100.64.0.7",          # the asker's own VIP
                                    "100.64.0.8",          # another general node on this LAN
                                    "192.168.1.1",         # outside the overlay
                                    "100.64.0.0", "100.127.255.255"])   # prefix edges
def test_not_answered(target):
    r = responder()
    assert r.receive(arp_request(GN, "100.64.0.99", target), 0.0) is None
    assert r.counters["ignored"] == 1 and not r.drops and accounted(r)


def test_probe_from_zero_for_the_askers_own_vip_is_not_answered():
    # RFC 5227 probe: what a DHCP client sends before it takes the offered address.
    # Answering would make it DECLINE the lease; the asker is known by its MAC.
    r = responder(answer_for=policy(local=False))
    assert r.receive(arp_request(GN, "0.0.0.0", "100.64.0.7"), 0.0) is None
    assert r.counters["ignored"] == 1 and not r.drops


def test_probe_from_zero_for_a_peer_vip_is_answered_like_linux():
    r = responder()
    rep = r.receive(arp_request(GN, "0.0.0.0", "100.64.0.9"), 0.0)
    assert rep is not None
    assert rep[:6] == GN and rep[20:22] == b"\x00\x02"
    assert rep[22:28] == OWN and rep[28:32] == socket.inet_aton("100.64.0.9")
    assert rep[32:38] == GN and rep[38:42] == bytes(4)     # target: the prober, 0.0.0.0


def test_policy_gets_target_sender_and_mac():
    seen = []
    r = ArpResponder(OWN, answer_for=lambda *a: seen.append(a) or False)
    r.receive(arp_request(GN, "0.0.0.0", "100.64.0.9"), 0.0)
    assert seen == [("100.64.0.9", "0.0.0.0", GN)]


@pytest.mark.parametrize("frame,reason", [
    (arp_request(GN, "100.64.0.7", "100.64.0.7"), "gratuitous"),
    (arp_request(GN, "100.64.0.7", "100.64.0.9", op=2), "not_request"),
    (arp_request(GN, "100.64.0.7", "100.64.0.9", op=3), "not_request"),
    (arp_request(GN, "100.64.0.7", "100.64.0.9", eth_dst=GN2), "not_for_us"),
    (arp_request(OWN, "100.64.0.1", "100.64.0.9"), "own_frame"),
    (arp_request(GN, "100.64.0.7", "100.64.0.9")[:12] + b"\x08\x00"
     + arp_request(GN, "100.64.0.7", "100.64.0.9")[14:], "not_arp"),
    (arp_request(GN, "100.64.0.7", "100.64.0.9")[:14] + b"\x00\x06"
     + arp_request(GN, "100.64.0.7", "100.64.0.9")[16:], "bad_hardware"),
    (arp_request(GN, "100.64.0.7", "100.64.0.9")[:16] + b"\x86\xdd"
     + arp_request(GN, "100.64.0.7", "100.64.0.9")[18:], "bad_protocol"),
    (arp_request(GN, "100.64.0.7", "100.64.0.9")[:6] + GN2
     + arp_request(GN, "100.64.0.7", "100.64.0.9")[12:], "sender_mac_mismatch"),
    (arp_request(b"\x03" + GN[1:], "100.64.0.7", "100.64.0.9"), "bad_sender_mac"),
    (arp_request(GN, "255.255.255.255", "100.64.0.9"), "bad_sender_ip"),
    (arp_request(GN, "100.64.0.7", "224.0.0.1"), "bad_target_ip"),
    (arp_request(GN, "100.64.0.7", "0.0.0.0"), "bad_target_ip"),
])
def test_malformed_or_foreign_frames_are_counted_drops(frame, reason):
    r = responder()
    assert r.receive(frame, 0.0) is None
    assert dict(r.drops) == {reason: 1} and accounted(r)


def test_every_truncation_of_a_real_request_is_a_counted_drop():
    r = responder()
    req = arp_request(GN, "100.64.0.7", "100.64.0.9")
    for n in range(len(req)):
        assert r.receive(req[:n], 0.0) is None
    assert dict(r.drops) == {"short": len(req)} and r.counters["replies"] == 0
    assert r.receive(req, 0.0) is not None        # the whole one still works


def test_policy_exception_is_a_counted_drop():
    def boom(*_):
        raise KeyError("table gone")
    r = ArpResponder(OWN, answer_for=boom)
    assert r.receive(arp_request(GN, "100.64.0.7", "100.64.0.9"), 0.0) is None
    assert dict(r.drops) == {"policy_error": 1}


def test_requests_change_nothing_but_counters():
    r = responder()
    before = (r.own_mac, r.answer_for)
    for f in (arp_request(GN2, "100.64.0.8", "100.64.0.7"),   # GN2 "claims" nothing this way
              arp_request(GN, "100.64.0.7", "100.64.0.7"),
              arp_request(GN, "0.0.0.0", "100.64.0.7")):
        r.receive(f, 0.0)
    assert (r.own_mac, r.answer_for) == before and VIPS[GN] == "100.64.0.7"
    assert len(r.limiter) == 0      # no reply was sent, so no sender was even rate-tracked


def test_rate_limit_per_sender_mac():
    r = responder(rate_per_s=2.0, burst=3)
    req = arp_request(GN, "100.64.0.7", "100.64.0.9")
    got = [r.receive(req, 10.0) is not None for _ in range(5)]
    assert got == [True, True, True, False, False] and r.drops["rate_limited"] == 2
    other = arp_request(GN2, "100.64.0.8", "100.64.0.9")
    assert r.receive(other, 10.0) is not None                  # another MAC has its own bucket
    assert r.receive(req, 10.5) is not None                    # one token back after 0.5 s
    assert r.receive(req, 10.5) is None
    assert accounted(r)


def test_own_mac_must_be_unicast():
    for bad in (BCAST, bytes(6), b"\x01\x00\x5e\x00\x00\x01", b"\x02" * 5):
        with pytest.raises(ValueError):
            ArpResponder(bad, answer_for=policy())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_never_raise(data):
    r = responder()
    out = r.receive(data, 0.0)
    assert out is None or len(out) == ARP_FRAME_BYTES
    assert accounted(r) and not any(k.startswith("internal_") for k in r.drops)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_requests_never_raise_and_replies_stay_consistent(data):
    req = bytearray(arp_request(GN, data.draw(st.sampled_from(["100.64.0.7", "0.0.0.0"])),
                                "100.64.0.9"))
    for _ in range(data.draw(st.integers(1, 4))):
        req[data.draw(st.integers(0, len(req) - 1))] = data.draw(st.integers(0, 255))
    r = responder()
    out = r.receive(bytes(req), 0.0)
    assert accounted(r) and not any(k.startswith("internal_") for k in r.drops)
    if out is not None:   # whatever was accepted is answered from the request's own fields
        assert out[:6] == req[22:28] == req[6:12] and out[6:12] == OWN
        assert out[28:32] == req[38:42] and out[32:42] == req[22:32]


def test_overlay_policy_table():
    p = policy()
    assert p("100.64.0.9", "100.64.0.7", GN)
    assert p("100.64.0.1", "0.0.0.0", GN)                      # gateway, even to a prober
    assert not p("100.64.0.7", "0.0.0.0", GN)                  # own VIP by MAC
    assert not p("100.64.0.8", "100.64.0.7", GN)               # GN2 answers for itself
    assert not p("10.0.0.1", "100.64.0.7", GN)
    assert policy(local=False)("100.64.0.8", "100.64.0.7", GN)


def test_ipv4_problem():
    ok = udp_packet("100.64.0.9", "100.64.0.7", 1, 2, b"x" * 30)
    assert ipv4_problem(ok) is None
    assert ipv4_problem(ok[:19]) == "short"
    assert ipv4_problem(b"\x60" + ok[1:]) == "not_ipv4"
    assert ipv4_problem(b"\x44" + ok[1:]) == "bad_header_length"
    assert ipv4_problem(b"\x4f" + ok[1:]) == "bad_header_length"     # 60 bytes > 58
    assert ipv4_problem(ok + b"\0") == "bad_total_length"
    assert ipv4_problem(ok[:-1]) == "bad_total_length"


# --- the lab test ---------------------------------------------------------------------------

GN_VIP, PEER_VIP, GW = "100.64.0.7", "100.64.0.9", "100.64.0.1"
HELPER = [sys.executable, os.path.abspath(__file__)]


# --- injection in batches (issue 15, step 4): the edge with fake sockets ----------------------

class _BatchSock:
    def __init__(self, fail=None) -> None:
        self.fail = fail
        self.sent = []
        self.closed = False

    def sendmsg(self, parts):
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        self.sent.append(b"".join(bytes(p) for p in parts))

    def close(self):
        self.closed = True


def _bare_injector(batch_sock=None) -> Injector:
    """An Injector without its sockets (opening them needs CAP_NET_RAW)."""
    from collections import Counter
    inj = Injector.__new__(Injector)
    inj.ifname, inj.sent, inj.drops = "lan0", 0, Counter()
    inj.own_mac = bytes.fromhex("020000aabbcc")
    inj._eth_src_type = inj.own_mac + b"\x08\x00"
    inj.batch_sock, inj.batches, inj.gso_refused = batch_sock, "off", False
    return inj


def test_inject_write_sends_the_vnet_header_then_the_ethernet_header_then_the_packet():
    import errno
    from cyphonic.offload import GSO_TCPV4, ZERO_HDR, VirtioNetHdr
    gn = bytes.fromhex("021122334455")
    pkt = udp_packet("100.64.0.1", "100.64.0.7", 9, 9, b"hello")
    inj = _bare_injector(_BatchSock())
    assert inj.inject_write(ZERO_HDR + pkt, gn) and inj.sent == 1
    assert inj.batch_sock.sent == [ZERO_HDR + gn + inj.own_mac + b"\x08\x00" + pkt]
    assert not inj.inject_write(ZERO_HDR + pkt[:-1], gn) and inj.drops == {"bad_total_length": 1}
    # a GSO frame the kernel refuses: counted by errno, and the caller is told
    inj = _bare_injector(_BatchSock(errno.EINVAL))
    gso = VirtioNetHdr(1, GSO_TCPV4, 54, 1000, 34, 16).build()
    assert not inj.inject_write(ZERO_HDR + pkt, gn) and not inj.gso_refused
    assert not inj.inject_write(gso + pkt, gn) and inj.gso_refused and inj.drops == {"EINVAL": 2}
    inj = _bare_injector(_BatchSock(errno.EAGAIN))
    assert not inj.inject_write(gso + pkt, gn) and not inj.gso_refused and inj.drops == {"EAGAIN": 1}
    assert not _bare_injector(None).inject_write(ZERO_HDR + pkt, gn)     # never enabled: a drop, no exception


def test_enable_batches_refused_says_why_and_never_raises(monkeypatch):
    import errno
    opened = []

    class Refusing:
        def __init__(self, *a):
            self.closed = False
            opened.append(self)

        def setsockopt(self, level, opt, value):
            assert (level, opt, value) == (263, 15, 1)
            raise OSError(errno.ENOPROTOOPT, "no")

        def close(self):
            self.closed = True

    monkeypatch.setattr(socket, "socket", Refusing)
    inj = _bare_injector()
    assert inj.enable_batches() is False and inj.batch_sock is None
    assert inj.batches == "refused: ENOPROTOOPT" and opened[0].closed
    assert inj.stats()["batches"] == "refused: ENOPROTOOPT"


def _require_root():
    if os.geteuid() != 0:
        pytest.fail("the interface handling lab test needs root (network namespaces, raw "
                    "sockets); CI runs as root")


def _mac(lab, node, ifname="eth0") -> str:
    return json.loads(lab.exec(node, ["ip", "-j", "link", "show", ifname], check=True).stdout)[0]["address"]


def _helper(lab, node, *args, timeout=20) -> dict:
    p = lab.exec(node, [*HELPER, *args], timeout=timeout)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _udp_noports(lab, node) -> int:
    """The node's `Udp: NoPorts` counter (/proc/net/snmp is per network namespace)."""
    return lab.snmp(node, "Udp")["NoPorts"]


def _wait_log(path, needle, timeout=10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = open(path).read() if os.path.exists(path) else ""
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in {path} after {timeout} s:\n{text[-2000:]}")


@pytest.mark.root
def test_lab_proxy_arp_and_injection(tmp_path, capsys):
    _require_root()
    with Lab(prefix="cyih") as lab:
        lan = lab.switch("lan", gateway=False)              # a bare L2 segment
        gn = lab.host("gn", lan, v4=False, v6=False)
        ad = lab.host("adapter", lan, v4=False, v6=False)   # eth0 = the adapter's LAN port
        lab.exec(gn, ["ip", "addr", "add", f"{GN_VIP}/10", "dev", "eth0"], check=True)
        lab.exec(gn, ["ip", "route", "add", "default", "via", GW], check=True)
        lab.exec(ad, ["ip", "addr", "add", f"{GW}/32", "dev", "eth0"], check=True)
        lab.exec(ad, ["sysctl", "-qw", "net.ipv4.conf.eth0.proxy_arp=1"], check=True)
        gn_mac, ad_mac = _mac(lab, gn), _mac(lab, ad)

        log = tmp_path / "serve-arp.log"
        server = lab.spawn(ad, [*HELPER, "serve-arp", "eth0", "--prefix", "100.64.0.0/10",
                                "--gateway", GW, "--gn", f"{gn_mac}={GN_VIP}"], log=log)
        _wait_log(log, "READY")
        assert lab.exec(ad, ["sysctl", "-n", "net.ipv4.conf.eth0.proxy_arp"]).stdout.strip() == "0"

        # ARP requests as a general node's kernel and DHCP client send them
        pairs = {"request_peer": f"{GN_VIP}:{PEER_VIP}", "probe_peer": f"0.0.0.0:{PEER_VIP}",
                 "probe_own": f"0.0.0.0:{GN_VIP}", "gratuitous": f"{GN_VIP}:{GN_VIP}",
                 "outside": f"{GN_VIP}:192.0.2.1", "gateway": f"{GN_VIP}:{GW}"}
        got = _helper(lab, gn, "probe", "eth0", "--wait", "0.5", "--garbage", *pairs.values())
        res = {k: got[v] for k, v in pairs.items()}
        assert {r["mac"] for r in res["request_peer"]} == {ad_mac}, res
        assert {r["mac"] for r in res["probe_peer"]} == {ad_mac}, res    # a real conflict
        assert res["probe_own"] == [] and res["gratuitous"] == [] and res["outside"] == [], res
        assert res["gateway"] and {r["mac"] for r in res["gateway"]} == {ad_mac}, res
        rtt = res["request_peer"][0]["rtt_s"]
        assert rtt < 0.2, f"ARP reply took {rtt * 1000:.0f} ms (kernel proxy_delay is ~400 ms)"

        # injection: echo requests from the "peer" 100.64.0.9 to the general node; its echo
        # replies go to 100.64.0.9, which its kernel must ARP for: our responder answers.
        lab.exec(gn, ["ip", "neigh", "flush", "dev", "eth0"])
        echo = _helper(lab, ad, "echo", "eth0", PEER_VIP, GN_VIP, gn_mac)
        assert echo["inject"]["ok"] and echo["inject_frame"]["ok"], echo
        assert echo["drops"] == {"not_ipv4": 1, "bad_total_length": 1, "bad_dst_mac": 1,
                                 "EMSGSIZE": 2}, echo
        neigh = lab.exec(gn, ["ip", "neigh", "show", PEER_VIP, "dev", "eth0"]).stdout
        assert ad_mac in neigh, neigh
        # inject() needed no route to the general node (SO_BINDTODEVICE: on-link); the kernel's
        # own replies do: with a host route, it still answers ARP and ping for its own address
        lab.exec(ad, ["ip", "route", "add", f"{GN_VIP}/32", "dev", "eth0"], check=True)
        assert lab.exec(gn, ["ping", "-c1", "-W2", GW]).returncode == 0

        before = _udp_noports(lab, gn)
        bench = _helper(lab, ad, "bench", "eth0", PEER_VIP, GN_VIP, gn_mac, timeout=60)
        delivered = _udp_noports(lab, gn) - before         # the bench sends to a closed port
        assert delivered >= 0.9 * bench["sent"], (delivered, bench)

        server.send_signal(signal.SIGTERM)
        server.wait(timeout=5)
        text = _wait_log(log, "STATS")
        stats = json.loads(text.split("STATS", 1)[1].strip().splitlines()[0])
        drops = stats["drops"]
        assert not any(k.startswith("internal_") or k == "policy_error" for k in drops), stats
        assert not stats["edge_errors"], stats
        assert stats["counters"]["replies"] >= 4, stats
        assert drops.get("gratuitous", 0) >= 1 and drops.get("own_frame", 0) == 0, stats
        assert drops.get("short", 0) >= 1 and drops.get("bad_hardware", 0) >= 1, stats
        assert drops.get("not_request", 0) >= 1, stats
    with capsys.disabled():
        print(f"\nARP reply seen by gn after {rtt * 1e3:.2f} ms; responder: {stats}")
        print("injection cost per packet (µs, median of rounds; sender's syscall incl. veth "
              "delivery to gn):")
        for size, row in bench["us_per_packet"].items():
            print(f"  {size:>5} bytes: inject (raw IP) {row['inject']:.2f}   "
                  f"inject_frame (AF_PACKET) {row['inject_frame']:.2f}")
        print(f"  {bench['sent']} packets sent, {delivered} arrived at gn, drops: {bench['drops']}")


# --- helper run inside the lab's namespaces ---------------------------------------------------


def _cmd_serve_arp(a) -> int:
    vip_of = {mac_bytes(m): v for m, v in (g.split("=", 1) for g in a.gn)}
    own = interface_mac(a.ifname)
    pol = OverlayArpPolicy(a.prefix, gateway=a.gateway, vip_of_mac=vip_of.get,
                           local_vips=lambda: set(vip_of.values()))
    responder = ArpResponder(own, answer_for=pol)

    async def main():
        ep = await serve_arp(responder, a.ifname)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print("READY", mac_str(own), flush=True)
        await stop.wait()
        ep.close()
        print("STATS", json.dumps(ep.stats()), flush=True)

    asyncio.run(main())
    return 0


def _cmd_probe(a) -> int:
    """Send one ARP request per SENDER:TARGET pair, collect replies for `wait` seconds."""
    own = interface_mac(a.ifname)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    s.bind((a.ifname, ETH_P_ARP))
    out: dict[str, list] = {p: [] for p in a.pairs}
    want = {}
    sent_at = {}
    if a.garbage:   # malformed ARP first: the responder must count it and carry on
        good = arp_request(own, "100.64.0.7", "100.64.0.9")
        for frame in (good[:30], good[:14] + b"\x00\x06" + good[16:],
                      arp_request(own, "100.64.0.7", "100.64.0.9", op=2), good[:14] + os.urandom(28)):
            s.send(frame)
    for p in a.pairs:
        sender, target = p.split(":")
        want[(socket.inet_aton(target), socket.inet_aton(sender))] = p
        sent_at[p] = time.monotonic()
        s.send(arp_request(own, sender, target))
    deadline = time.monotonic() + a.wait
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        frame, addr = s.recvfrom(2048)
        now = time.monotonic()
        if addr[2] == 4 or len(frame) < 42 or frame[20:22] != b"\x00\x02" or frame[32:38] != own:
            continue
        p = want.get((frame[28:32], frame[38:42]))
        if p is not None:
            out[p].append({"mac": mac_str(frame[22:28]), "rtt_s": now - sent_at[p]})
    print(json.dumps(out))
    return 0


def _cmd_echo(a) -> int:
    """Inject ICMP echo requests (both methods) and wait for the general node's replies; also
    check that bad packets and too big ones are counted drops."""
    inj = Injector(a.ifname)
    gn_mac = mac_bytes(a.gn_mac)
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    cap.bind((a.ifname, ETH_P_IP))
    result = {}
    for seq, (name, send) in enumerate((("inject", inj.inject),
                                        ("inject_frame", lambda pk: inj.inject_frame(pk, gn_mac))), 1):
        data = os.urandom(56)
        t0 = time.monotonic()
        sent = send(icmp_echo(a.src, a.dst, 0x4242, seq, data))
        ok, deadline = False, t0 + 3.0
        while sent and not ok and (left := deadline - time.monotonic()) > 0:
            if not select.select([cap], [], [], left)[0]:
                break
            frame, addr = cap.recvfrom(4096)
            ip = frame[14:]
            if addr[2] == 4 or len(ip) < 28 or ip[9] != 1:
                continue
            ihl = (ip[0] & 15) * 4
            if (ip[12:16] == socket.inet_aton(a.dst) and ip[16:20] == socket.inet_aton(a.src)
                    and ip[ihl] == 0 and ip[ihl + 4:ihl + 8] == struct.pack("!HH", 0x4242, seq)):
                ok = ip[ihl + 8:ihl + 8 + len(data)] == data
        result[name] = {"sent": sent, "ok": ok, "rtt_s": time.monotonic() - t0}
    big = udp_packet(a.src, a.dst, 9, 9, bytes(3000))
    inj.inject(b"\x60" + bytes(39))
    inj.inject(udp_packet(a.src, a.dst, 9, 9, b"x")[:-1])
    inj.inject_frame(udp_packet(a.src, a.dst, 9, 9, b"x"), BCAST)
    inj.inject(big)
    inj.inject_frame(big, gn_mac)
    result["drops"] = dict(inj.drops)
    inj.close()
    print(json.dumps(result))
    return 0


def _cmd_bench(a) -> int:
    """Per-packet cost of inject() and inject_frame(), alternating rounds."""
    inj = Injector(a.ifname)
    gn_mac = mac_bytes(a.gn_mac)
    res = {}
    for size in (64, 1400):
        pk = udp_packet(a.src, a.dst, 40000, 9, bytes(size - 28))
        meth = {"inject": lambda: inj.inject(pk), "inject_frame": lambda: inj.inject_frame(pk, gn_mac)}
        for f in meth.values():          # warm up (neighbour entry, caches)
            for _ in range(200):
                f()
        rounds = {k: [] for k in meth}
        for _ in range(a.rounds):
            for k, f in meth.items():
                t0 = time.perf_counter_ns()
                for _ in range(a.count):
                    f()
                rounds[k].append((time.perf_counter_ns() - t0) / a.count / 1000)
                time.sleep(0.02)         # let the receiver drain
        res[str(size)] = {k: statistics.median(v) for k, v in rounds.items()}
    print(json.dumps({"us_per_packet": res, "drops": dict(inj.drops), "sent": inj.sent}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve-arp")
    p.add_argument("ifname")
    p.add_argument("--prefix", required=True)
    p.add_argument("--gateway")
    p.add_argument("--gn", action="append", default=[], help="MAC=VIP of a general node")
    p.set_defaults(fn=_cmd_serve_arp)
    p = sub.add_parser("probe")
    p.add_argument("ifname")
    p.add_argument("pairs", nargs="+", help="SENDER_IP:TARGET_IP")
    p.add_argument("--wait", type=float, default=0.5)
    p.add_argument("--garbage", action="store_true", help="send malformed ARP frames first")
    p.set_defaults(fn=_cmd_probe)
    for name, fn in (("echo", _cmd_echo), ("bench", _cmd_bench)):
        p = sub.add_parser(name)
        p.add_argument("ifname")
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("gn_mac")
        p.add_argument("--count", type=int, default=5000)
        p.add_argument("--rounds", type=int, default=5)
        p.set_defaults(fn=fn)
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
