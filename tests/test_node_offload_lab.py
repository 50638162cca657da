"""The node daemon's TUN offload modes (issue 15, step 3) with real namespaces, TUN devices and
TCP: iperf3 both ways through two node daemons in each ``tun_offload`` mode, with the counters
showing what the mode does (merge: merged writes on the way in, no super-packet reads; full:
also super-packets cut on the way out; off: neither), and the fallbacks when the kernel
refuses a mode. Needs root (CI runs as root)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from lab import Lab
from lab.nodelab import Overlay

pytestmark = pytest.mark.root

PY = sys.executable


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces); CI runs them as root")
    with Lab(prefix="cyo") as lab:
        yield lab


def wait_listening(lab, host, port: int, timeout: float = 10) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if f":{port} " in lab.exec(host, ["ss", "-Hltn"]).stdout:
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


def iperf_tcp(lab, client, server, vip: str, log, *args: str) -> float:
    lab.spawn(server, ["iperf3", "-s", "-1", "-B", vip], log=log)
    wait_listening(lab, server, 5201)
    r = lab.exec(client, ["iperf3", "-c", vip, "-t", "2", "-J", *args], timeout=30)
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]


@pytest.mark.parametrize("mode", ["merge", "full", "off"])
def test_tcp_both_ways_through_two_node_daemons_in_each_offload_mode(lab, tmp_path, mode):
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet, v6=False)
    h1 = lab.host("n1", inet, v6=False)
    h2 = lab.host("n2", inet, v6=False)
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("alpha", h1, extra={"tun_offload": mode})
    ov.add_node("beta", h2, extra={"tun_offload": mode})
    ov.wait_ready("alpha")
    vip_b = ov.wait_ready("beta")["identity"]["vip4"]
    sent, got, out = ov.ping("alpha", vip_b, count=5, interval=0.05)   # (brings the tunnel up)
    assert got == sent, out
    bps = iperf_tcp(lab, h1, h2, vip_b, tmp_path / "iperf-1.log")                 # alpha -> beta
    bps_back = iperf_tcp(lab, h1, h2, vip_b, tmp_path / "iperf-2.log", "-R", "-P", "2")   # beta -> alpha
    a, b = ov.status("alpha"), ov.status("beta")
    ca, cb = a["data_path"]["batches"], b["data_path"]["batches"]
    print(f"\ntun_offload {mode}: {bps / 1e6:.0f} / {bps_back / 1e6:.0f} Mbit/s; alpha {ca}; beta {cb}")
    assert bps > 20e6 and bps_back > 20e6
    for st, c in ((a, ca), (b, cb)):
        off = st["interface"]["offload"]
        assert off["requested"] == mode and off["mode"] == mode and off["reason"] == "", off
        assert off["state"] == ("off" if mode == "off" else "on"), off
        assert not c.get("offload_fallbacks") and not c.get("gso_disabled"), c
        assert not {k: v for k, v in st["drops"].items() if k.startswith("offload_")}, st["drops"]
        assert not {k: v for k, v in st["errors"].items() if k.startswith("tun")}, st["errors"]
        assert not c.get("coalesce_bad_checksum"), c
        # each side sent one way and received the other, so each did both halves of its mode
        if mode == "off":
            assert not c.get("super_reads") and not c.get("merged_writes"), c
            continue
        # in: runs of one flow were written as one
        assert c["merged_writes"] > 0 and c["merged_segments"] / c["merged_writes"] > 2, c
        if mode == "full":
            assert {"csum", "tso4"} <= set(off["features"])
            # out: the kernel handed over super-packets, each cut into many pieces
            assert c["super_reads"] > 0 and c["super_read_pieces"] / c["super_reads"] > 2, c
        else:
            assert off["features"] == ["gso-writes"]
            assert not c.get("super_reads") and not c.get("super_read_pieces"), c   # whole packets read


FALLBACK = textwrap.dedent("""
    import fcntl, json, os, select, socket, subprocess
    from cyphonic.node import tun as T

    def refuse_offload(fd, req, arg=0):
        if req == T.TUNSETOFFLOAD and (arg != 0 or REFUSE_ALL):
            raise OSError(22, "Invalid argument")
        return fcntl.ioctl(fd, req, arg)

    t = T.Tun("cyo0", offload=MODE, ioctl=refuse_offload)
    t.configure("10.99.0.1", 24, 1400)
    # a packet the kernel routes out of the device: one whole packet (a zero vnet header in merge)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x" * 3000, ("10.99.0.2", 9))
    for _ in range(20):   # (IPv6 router solicitations may come first)
        select.select([t.fd], [], [], 5)
        first = t.read()
        hdr, first = (first[:10], first[10:]) if t.vnet_hdr else (b"", first)
        if first[0] >> 4 == 4:
            break
    t.write(bytes(first))   # (a bare packet, as the slow path writes)
    print(json.dumps({"offload": t.offload, "vnet_hdr": t.vnet_hdr, "version": first[0] >> 4,
                      "length": len(first), "hdr": hdr.hex()}))
    t.close()
""")


@pytest.mark.parametrize("mode, refuse_all, falls_to", [("full", True, "off"), ("merge", True, "off"),
                                                      ("full", False, "merge")])
def test_a_refused_mode_falls_back_to_a_simpler_one(lab, mode, refuse_all, falls_to):
    """The kernel refuses TUNSETOFFLOAD (all of it, or only the TSO flags): the device still
    carries whole packets (the read is one MTU packet, IPv4), and the status says why."""
    inet = lab.switch("inet", "198.18.0.0/24")
    h = lab.host("f1", inet, v6=False)
    r = lab.exec(h, [PY, "-c", f"MODE = {mode!r}\nREFUSE_ALL = {refuse_all}\n" + FALLBACK], timeout=30)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["offload"]["state"] == "fallback" and "Invalid argument" in got["offload"]["reason"], got
    assert got["offload"]["requested"] == mode and got["offload"]["mode"] == falls_to, got
    assert got["vnet_hdr"] is (falls_to == "merge") and got["version"] == 4 and got["length"] <= 1400, got
    if falls_to == "merge":
        assert got["hdr"] == "00" * 10, got   # no read offloads: a whole packet, its checksum done
