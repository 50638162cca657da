"""The Prometheus textfile the node daemon and the adapter write for node_exporter
(cyphonic.metrics_file), and the node daemon's status wiring: the kernel's drops per socket,
every drop of its parts, ``under-load`` and the textfile, on a NodeDaemon that is not started
(real sockets, no namespaces)."""

from __future__ import annotations

import os
import socket
import stat

from cyphonic.health import LoadWatch
from cyphonic.metrics import exposition
from cyphonic.metrics_file import MetricsFile
from cyphonic.node.config import parse_config
from cyphonic.node.daemon import NodeDaemon

from test_metrics import NODE, parse, value
from test_socket_stats import _overflow

CLOUD_KEY = "cyk1:" + "ab" * 32 + ":" + "cd" * 32


def test_written_when_due_atomically_readable_by_node_exporter_and_removed_at_a_stop(tmp_path):
    path = str(tmp_path / "metrics" / "node.prom")            # the directory is made
    asked = []
    mf = MetricsFile(path, lambda: asked.append(1) or NODE, log=lambda line: None, every_s=5.0)
    mf.tick(100.0)
    with open(path) as f:
        assert f.read() == exposition(NODE)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert [n for n in os.listdir(tmp_path / "metrics")] == ["node.prom"]   # no temporary file left
    mf.tick(104.9)
    assert len(asked) == 1                                     # not due: the status is not even asked
    mf.tick(105.0)
    assert len(asked) == 2 and mf.conditions() == []
    mf.remove()
    assert not os.path.exists(path)


def test_a_failure_is_counted_logged_once_and_a_health_condition_until_it_works_again(tmp_path):
    blocker = tmp_path / "metrics"
    blocker.write_text("a file where the directory should be")
    lines = []
    mf = MetricsFile(str(blocker / "node.prom"), lambda: NODE, log=lines.append, every_s=1.0)
    for t in (0.0, 1.0, 2.0):
        mf.tick(t)
    assert len(lines) == 1 and "cannot write the metrics file" in lines[0]
    assert sum(mf.errors.values()) == 3
    [w] = mf.conditions()
    assert w.code == "metrics-unwritable" and str(blocker) in w.text
    blocker.unlink()
    mf.tick(3.0)
    assert mf.conditions() == [] and os.path.exists(blocker / "node.prom")
    off = MetricsFile("", lambda: NODE, log=lines.append)
    off.tick(0.0)
    assert off.conditions() == []


def test_the_node_daemon_status_has_kernel_and_user_space_drops_under_load_and_metrics(tmp_path):
    cfg = parse_config({"cloud": "127.0.0.1:9", "cloud_key": CLOUD_KEY, "state_dir": str(tmp_path / "state"),
                        "status_socket": str(tmp_path / "node.sock"),
                        "metrics_file": str(tmp_path / "metrics" / "node.prom")})
    nd = NodeDaemon(cfg, out=open(os.devnull, "w"))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    udp.bind(("127.0.0.1", 0))
    try:
        nd.socks[socket.AF_INET] = udp
        nd.load = LoadWatch(sample_s=0.0)                      # every status is a sample
        st = nd.status()
        [row] = st["sockets"]
        assert row["socket"] == "udp4" and row["kernel_drops"] == 0
        assert not any(h["code"] == "under-load" for h in st["health"])
        sent, delivered = _overflow(udp)                       # the kernel drops on the daemon's socket
        nd.drops["vip_queue_full"] += 500                      # and its own drops climb
        st = nd.status()
        assert st["sockets"][0]["kernel_drops"] == sent - delivered > 0
        assert st["drops"]["vip_queue_full"] == 500
        [load] = [h for h in st["health"] if h["code"] == "under-load"]
        assert f"{sent - delivered} datagrams dropped by the kernel (most on udp4 127.0.0.1:" in load["text"]
        assert "500 dropped by the daemon (most vip_queue_full)" in load["text"]
        nd.metrics_file.tick(0.0)
        with open(cfg.metrics_file) as f:
            fams = parse(f.read())
        assert value(fams, "cyphonic_drops_total", daemon="node", reason="vip_queue_full") == 500
        assert value(fams, "cyphonic_socket_kernel_drops_total", socket="udp4") == sent - delivered
        assert value(fams, "cyphonic_health_warning", code="under-load") == 1
    finally:
        udp.close()
