"""The adapter's way back injecting in batches (issue 15, step 4), end to end in namespaces:
TCP from a node daemon toward a general node (iperf3 -R and a hashed transfer) arrives intact
through one frame per merged run (AF_PACKET with PACKET_VNET_HDR), the counters show merged
frames, and with ``inject_batch = false`` the one-packet path carries the same."""

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
SEED = 15

SERVER = """
import random, socket, sys
data = random.Random(%d).randbytes(%d)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); c.sendall(data); c.close()
""" % (SEED, TRANSFER_BYTES)

CLIENT = """
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], 5001), timeout=20); h = hashlib.sha256(); n = 0
while True:
    b = s.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest())
"""


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces); CI runs them as root")
    with Lab(prefix="cyib") as lab:
        yield lab


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one_packet_per_send"])
def test_tcp_toward_the_general_node_arrives_intact(lab, tmp_path, batched):
    t = adapter_site(lab, tmp_path, extra={"inject_batch": batched})
    ov, adapter, gn, srv_host, srv_vip = t["ov"], t["adapter"], t["gn"], t["srv_host"], t["srv_vip"]
    proc, sock, log = t["proc"], t["sock"], t["log"]
    tunnel_up(lab, gn, srv_vip, log)
    csum_errors = lab.snmp(gn, "Tcp")["InCsumErrors"]
    # iperf3 -R: the node daemon sends, the general node receives (the adapter's way back)
    lab.spawn(srv_host, ["iperf3", "-s", "-1", "-B", srv_vip], log=tmp_path / "iperf.log")
    time.sleep(0.5)
    r = lab.exec(gn, ["iperf3", "-c", srv_vip, "-R", "-t", "2", "-J"], timeout=30)
    down = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
    assert down > 5e6, down
    # a hashed transfer, node -> general node: every byte arrives as sent
    lab.spawn(srv_host, [PY, "-c", SERVER, srv_vip], log=tmp_path / "server.log")
    ov.wait_log(str(tmp_path / "server.log"), "listening", 10)
    r = lab.exec(gn, [PY, "-c", CLIENT, srv_vip], timeout=60)
    want = hashlib.sha256(random.Random(SEED).randbytes(TRANSFER_BYTES)).hexdigest()
    assert r.stdout.split() == [str(TRANSFER_BYTES), want], r.stdout + r.stderr
    assert lab.snmp(gn, "Tcp")["InCsumErrors"] == csum_errors
    st = json.loads(cyadm(lab, adapter, sock, "status", "--json").stdout)
    batches = st["data_path"]["batches"]
    print(f"inject_batch={batched}: iperf3 -R {down / 1e6:.0f} Mbit/s, batches {batches}")
    if batched:
        assert batches.get("merged_writes", 0) > 10 and batches["merged_segments"] > 2 * batches["merged_writes"], batches
        assert not batches.get("inject_batches_refused") and not batches.get("inject_gso_refused"), batches
    else:
        assert not batches.get("merged_writes") and not batches.get("plain_writes"), batches
    drops = {k: v for k, v in st.get("drops", {}).items() if k.startswith("inject")}
    assert not drops, drops
    proc.terminate()
    proc.wait(15)
