"""The adapter's workers with NFQUEUE's F_GSO (issue 15, step 5), end to end in namespaces:
TCP from a general node toward a node daemon (iperf3 and a hashed transfer) arrives intact
with ``nfq_gso`` on and off; with it on the workers read super-packets (``gso_reads``) and
cut each into several pieces; UDP arrives with its checksums finished (the receiver counts no
checksum error); and a UDP GSO send, which the worker cannot cut, is handed back to the
kernel and arrives segmented (``gso_repeated``)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time

import pytest

from lab import Lab
from lab.adapterlab import adapter_site, cyadm, tunnel_up

pytestmark = pytest.mark.root
PY = sys.executable
TRANSFER_BYTES = 8 << 20
SEED = 155

# the node daemon's side receives and hashes; the general node sends
SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = """
import random, socket, sys
data = random.Random(%d).randbytes(%d)
s = socket.create_connection((sys.argv[1], 5001), timeout=20); s.sendall(data); s.close()
""" % (SEED, TRANSFER_BYTES)

# a UDP GSO send (UDP_SEGMENT): 10 datagrams of 1000 bytes in one call; the receiver counts them
UDP_GSO_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 5002)); s.settimeout(5)
print("listening", flush=True); sizes = []
try:
    while True:
        d = s.recv(65536); sizes.append(len(d))
except socket.timeout:
    pass
print("got", len(sizes), sorted(set(sizes)), flush=True)
"""

UDP_GSO_SENDER = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(5):
    s.sendmsg([bytes([i]) * 10000], [(17, 103, struct.pack("=H", 1000))], 0, (sys.argv[1], 5002))
    time.sleep(0.05)
"""


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces); CI runs them as root")
    with Lab(prefix="cyng") as lab:
        yield lab


@pytest.mark.parametrize("nfq_gso", [True, False], ids=["nfq_gso", "segmented_by_the_kernel"])
def test_tcp_and_udp_from_the_general_node_arrive_intact(lab, tmp_path, nfq_gso):
    t = adapter_site(lab, tmp_path, extra={"nfq_gso": nfq_gso})
    ov, adapter, gn, srv_host, srv_vip = t["ov"], t["adapter"], t["gn"], t["srv_host"], t["srv_vip"]
    proc, sock, log = t["proc"], t["sock"], t["log"]
    tunnel_up(lab, gn, srv_vip, log)
    errors = {f: lab.snmp(srv_host, table)[f] for table, f in (("Tcp", "InCsumErrors"), ("Udp", "InCsumErrors"))}
    # iperf3 forward: the general node sends (the adapter's workers seal)
    lab.spawn(srv_host, ["iperf3", "-s", "-1", "-B", srv_vip], log=tmp_path / "iperf.log")
    time.sleep(0.5)
    r = lab.exec(gn, ["iperf3", "-c", srv_vip, "-t", "2", "-J"], timeout=30)
    up = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
    assert up > 5e6, up
    # a hashed transfer, general node -> node: every byte arrives as sent
    lab.spawn(srv_host, [PY, "-c", SERVER, srv_vip], log=tmp_path / "server.log")
    ov.wait_log(str(tmp_path / "server.log"), "listening", 10)
    r = lab.exec(gn, [PY, "-c", CLIENT, srv_vip], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    want = hashlib.sha256(random.Random(SEED).randbytes(TRANSFER_BYTES)).hexdigest()
    ov.wait_log(str(tmp_path / "server.log"), want, 20)
    assert f"{TRANSFER_BYTES} {want}" in open(tmp_path / "server.log").read()
    # UDP, 1300-byte datagrams (they fit the tunnel): checksums finished where the kernel left them
    lab.spawn(srv_host, ["iperf3", "-s", "-1", "-B", srv_vip], log=tmp_path / "iperf-udp.log")
    time.sleep(0.5)
    r = lab.exec(gn, ["iperf3", "-c", srv_vip, "-u", "-b", "100M", "-l", "1300", "-t", "2", "-J"], timeout=30)
    udp = json.loads(r.stdout)["end"]["sum"]
    assert udp["packets"] > 1000 and udp["lost_percent"] < 20, udp
    # a UDP GSO send: not ours to cut (its segment size is the sender's), the kernel segments it
    lab.spawn(srv_host, [PY, "-c", UDP_GSO_RECEIVER, srv_vip], log=tmp_path / "udp-gso.log")
    ov.wait_log(str(tmp_path / "udp-gso.log"), "listening", 10)
    r = lab.exec(gn, [PY, "-c", UDP_GSO_SENDER, srv_vip], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    ov.wait_log(str(tmp_path / "udp-gso.log"), "got", 15)
    assert "got 50 [1000]" in open(tmp_path / "udp-gso.log").read(), open(tmp_path / "udp-gso.log").read()
    for (table, f), before in zip((("Tcp", "InCsumErrors"), ("Udp", "InCsumErrors")), errors.values()):
        assert lab.snmp(srv_host, table)[f] == before, (table, f)
    time.sleep(1.5)                                  # (the workers' counters are asked for every second)
    st = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    batches = st["data_path"]["batches"]
    print(f"nfq_gso={nfq_gso}: iperf3 {up / 1e6:.0f} Mbit/s, batches {batches}")
    if nfq_gso:
        assert batches.get("gso_reads", 0) > 10 and batches["gso_pieces"] > 2 * batches["gso_reads"], batches
        assert batches.get("csum_finished", 0) > 1000, batches      # the UDP datagrams (and lone TCP packets)
        assert batches.get("gso_repeated", 0) >= 5, batches          # the UDP GSO sends
    else:
        assert not batches.get("gso_reads") and not batches.get("csum_finished") and not batches.get("gso_repeated")
    drops = {k: v for k, v in st.get("drops", {}).items() if "gso" in k or "csum" in k or "offload" in k}
    assert not drops, drops
    proc.terminate()
    proc.wait(15)
