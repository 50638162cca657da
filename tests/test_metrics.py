"""The Prometheus text format of a status document (cyphonic.metrics): the format's grammar
(HELP and TYPE once per family, before its samples; escaping; values), the naming rules
(``cyphonic_``, counters ``_total``), and what each daemon's status becomes."""

from __future__ import annotations

import math
import re

import pytest

from cyphonic.metrics import COUNTER, GAUGE, Exposition, escape_help, escape_label_value, exposition, format_value

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_VALUE = r"(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)|\+Inf|-Inf|NaN)"
_LABELS = r'\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)?\}'
_SAMPLE = re.compile(rf"({_NAME})({_LABELS})? ({_VALUE})")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse(text: str) -> dict:
    """A strict reader of the text format 0.0.4 as we write it: {family: (type, help, {labels
    tuple: value})}; fails on anything out of order or out of grammar."""
    assert text.endswith("\n") and "\n\n" not in text
    families: dict = {}
    current = None
    lines = text[:-1].split("\n")
    i = 0
    while i < len(lines):
        m = re.fullmatch(rf"# HELP ({_NAME}) (.*)", lines[i])
        assert m, f"line {i}: {lines[i]!r} (a family starts with HELP)"
        name, help_ = m.groups()
        assert name not in families, f"{name} twice"
        t = re.fullmatch(rf"# TYPE {re.escape(name)} (counter|gauge)", lines[i + 1])
        assert t, lines[i + 1]
        current = families[name] = (t.group(1), help_, {})
        i += 2
        while i < len(lines) and not lines[i].startswith("#"):
            s = _SAMPLE.fullmatch(lines[i])
            assert s and s.group(1) == name, f"line {i}: {lines[i]!r} in family {name}"
            labels = tuple((k, re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), v))
                           for k, v in _LABEL.findall(s.group(2) or ""))
            assert labels not in current[2], f"{name}{labels} twice"
            current[2][labels] = float(s.group(3).replace("Inf", "inf"))
            i += 1
        assert current[2], f"{name} has no sample"
    for name, (type_, _, _) in families.items():
        assert name.startswith("cyphonic_") or name.startswith("t_")
        assert (type_ == "counter") == name.endswith("_total"), name
    return families


def value(families: dict, name: str, **labels) -> float:
    for key, v in families[name][2].items():
        if all(dict(key).get(k) == str(x) for k, x in labels.items()):
            return v
    raise KeyError(f"{name}{labels} not in {families[name][2]}")


def test_label_values_and_help_texts_are_escaped():
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert escape_help('back\\slash\nnew "quote"') == 'back\\\\slash\\nnew "quote"'
    x = Exposition(daemon="node")
    x.add("t_drops_total", COUNTER, "Help with a \\ and a\nline feed.", 3, reason='we"ird\\re\nason')
    text = x.text()
    assert text == ('# HELP t_drops_total Help with a \\\\ and a\\nline feed.\n'
                    '# TYPE t_drops_total counter\n'
                    't_drops_total{daemon="node",reason="we\\"ird\\\\re\\nason"} 3\n')
    fams = parse(text)
    assert value(fams, "t_drops_total", reason='we"ird\\re\nason') == 3


def test_values_types_and_what_is_not_a_sample():
    assert [format_value(v) for v in (True, False, 7, 0.5, 1e21, math.inf, -math.inf)] == \
        ["1", "0", "7", "0.5", "1e+21", "+Inf", "-Inf"]
    assert format_value(math.nan) == "NaN"
    x = Exposition()
    x.add("t_up", GAUGE, "Up.", True)
    x.add("t_temp", GAUGE, "Can be negative.", -2.5)
    x.add("t_seen_total", COUNTER, "Counted.", "unavailable", socket="a")   # not a number: no sample
    x.add("t_seen_total", COUNTER, "Counted.", -1, socket="b")              # a counter never goes below 0
    x.add("t_seen_total", COUNTER, "Counted.", None, socket="c")
    x.add("t_empty", GAUGE, "No samples: left out.", None)
    x.add("t_sum_total", COUNTER, "Added up.", 2, k="x")
    x.add("t_sum_total", COUNTER, "Added up.", 3, k="x")
    fams = parse(x.text())
    assert set(fams) == {"t_up", "t_temp", "t_sum_total"}
    assert fams["t_up"][0] == "gauge" and fams["t_sum_total"][0] == "counter"
    assert value(fams, "t_up") == 1 and value(fams, "t_temp") == -2.5 and value(fams, "t_sum_total", k="x") == 5
    assert Exposition().text() == ""


def test_our_own_mistakes_are_refused():
    x = Exposition()
    with pytest.raises(ValueError):
        x.add("t_count", COUNTER, "A counter without _total.", 1)
    with pytest.raises(ValueError):
        x.add("t_level_total", GAUGE, "A gauge named like a counter.", 1)
    with pytest.raises(ValueError):
        x.add("t-bad", GAUGE, "A bad name.", 1)
    with pytest.raises(ValueError):
        x.add("t_x", GAUGE, "A bad label.", 1, **{"bad-label": "v"})
    x.add("t_x", GAUGE, "One type.", 1)
    with pytest.raises(ValueError):
        x.add("t_x", "summary", "Another.", 1)
    with pytest.raises(ValueError):
        exposition({"kind": "toaster"})


NODE = {
    "kind": "node", "pid": 42, "uptime_s": 12.5,
    "identity": {"fqdn": "alpha.overlay.test", "vip4": "100.64.0.2", "static_key": "ab"},
    "cloud": {"address": "192.0.2.1:47101", "state": "ready", "last_error": "", "clock_offset_s": 172800.4},
    "interface": {"name": "cy0", "mtu": 1408, "present": True}, "udp_port": 47100,
    "dns": {"listen": "127.0.0.53:53", "running": True, "counters": {"queries": 9, "answered_a": 4}},
    "tunnels": [{"peer": "beta.overlay.test", "vip4": "100.64.0.3", "path": "direct", "endpoint": "192.0.2.3:47100",
                 "up": True, "last_handshake_age_s": 3.2, "rx_bytes": 1000, "tx_bytes": 2000,
                 "rx_packets": 10, "tx_packets": 20}],
    "health": [{"code": "under-load", "severity": "warning", "text": "120 kernel drops", "since": 1700000000.5}],
    "drops": {"device_mac1": 5, "engine_unknown_type": 2, "signaling_short": 1, "dns_formerr": 3},
    "sockets": [{"socket": "udp4", "local": "0.0.0.0:47100", "kernel_drops": 120, "rx_queued_bytes": 0,
                 "rcvbuf_bytes": 425984},
                {"socket": "udp6", "local": "[::]:47100", "kernel_drops": "unavailable", "reason": "SO_MEMINFO: x"}],
    "errors": {"tun_write_OSError": 1},
    "data_path": {"busy_poll_us": 500, "busy_polls": 7, "idle_cpus": 1.5, "handler_errors": {"ValueError": 2}},
}


def test_a_node_status_in_the_text_format():
    fams = parse(exposition(NODE))
    assert all(all(dict(k)["daemon"] == "node" for k in f[2]) for f in fams.values())
    assert value(fams, "cyphonic_info", fqdn="alpha.overlay.test", vip4="100.64.0.2") == 1
    assert value(fams, "cyphonic_uptime_seconds") == 12.5 and value(fams, "cyphonic_cloud_link_up") == 1
    assert value(fams, "cyphonic_clock_offset_seconds") == 172800.4      # two days behind the cloud
    # every drop reason of the status, and the kernel's on each socket that could be read
    assert {dict(k)["reason"]: v for k, v in fams["cyphonic_drops_total"][2].items()} == NODE["drops"]
    assert fams["cyphonic_drops_total"][0] == "counter"
    assert value(fams, "cyphonic_socket_kernel_drops_total", socket="udp4", local="0.0.0.0:47100") == 120
    assert [dict(k)["socket"] for k in fams["cyphonic_socket_kernel_drops_total"][2]] == ["udp4"]   # not a 0 for udp6
    assert value(fams, "cyphonic_socket_receive_buffer_bytes", socket="udp4") == 425984
    assert value(fams, "cyphonic_health_warning", code="under-load", severity="warning", subject="") == 1
    assert value(fams, "cyphonic_health_warning_since_seconds", code="under-load") == 1700000000.5
    assert value(fams, "cyphonic_tunnel_transmit_bytes_total", peer="beta.overlay.test") == 2000
    assert value(fams, "cyphonic_tunnel_receive_packets_total", vip4="100.64.0.3") == 10
    assert value(fams, "cyphonic_tunnel_up", peer="beta.overlay.test") == 1
    assert value(fams, "cyphonic_tunnel_last_handshake_age_seconds", peer="beta.overlay.test") == 3.2
    assert value(fams, "cyphonic_errors_total", reason="tun_write_OSError") == 1
    assert value(fams, "cyphonic_errors_total", reason="handler_ValueError") == 2
    assert value(fams, "cyphonic_dns_events_total", event="queries") == 9
    assert value(fams, "cyphonic_interface_up") == 1 and value(fams, "cyphonic_data_path_busy_polls_total") == 7


ADAPTER = {
    "kind": "adapter", "pid": 7, "uptime_s": 100.0, "identity": {"fqdn": "adapter.overlay.test", "vip4": "100.64.0.9"},
    "cloud": {"state": "logging-in", "general_nodes": "ready"},
    "general_nodes": [{"mac": "52:54:00:12:34:56", "name": "cam1", "fqdn": None, "vip4": "100.64.0.5",
                       "lease_expires_in_s": 3000, "cloud": "ready", "port": 47200},
                      {"mac": "52:54:00:12:34:57", "name": "cam2", "fqdn": None, "vip4": None,
                       "lease_expires_in_s": None, "cloud": "stopped", "port": None}],
    "tunnels": [{"gn": "cam1", "peer": "srv.overlay.test", "vip4": "100.64.0.3", "path": "relay", "up": False,
                 "last_handshake_age_s": None, "rx_bytes": 0, "tx_bytes": 5, "rx_packets": 0, "tx_packets": 1}],
    "workers": [{"index": 0, "pid": 11, "alive": True, "queue": 0, "sessions": 2, "sealed": 30, "sealed_bytes": 4000,
                 "drop_no_session": 4, "per_session": {"100.64.0.5>100.64.0.3": 4000}},
                {"index": 1, "pid": 12, "alive": False, "queue": 1}],
    "worker_restarts": 1,
    "dhcp": {"counters": {"rx_DISCOVER": 2, "tx_OFFER": 2}, "drops": {"bad_op": 1}, "leases": 1, "warnings": []},
    "arp": {"counters": {"frames": 8, "replies": 3}, "drops": {}, "rate_table": 1},
    "dns": {"queries": 4},
    "data_path": {"busy_poll_us": 500, "heads_ups": 6, "busy_polls": 5, "idle_cpus": None, "handler_errors": {}},
    "drops": {"worker_drop_no_session": 4, "dhcp_bad_op": 1, "inject_EAGAIN": 2},
    "sockets": [{"socket": "cam1", "local": "0.0.0.0:47200", "kernel_drops": 9, "rx_queued_bytes": 0,
                 "rcvbuf_bytes": 1000},
                {"socket": "nfqueue 0", "local": "queue 0", "kernel_drops": 3, "queue_dropped": 3, "user_dropped": 0,
                 "queued": 0}],
    "health": [{"code": "worker-down", "severity": "error", "text": "worker 1 is not running",
                "subject": "worker 1", "since": 5.0}],
}


def test_an_adapter_status_in_the_text_format():
    fams = parse(exposition(ADAPTER))
    assert all(all(dict(k)["daemon"] == "adapter" for k in f[2]) for f in fams.values())
    assert value(fams, "cyphonic_cloud_link_up") == 0
    assert value(fams, "cyphonic_general_nodes") == 2
    assert value(fams, "cyphonic_general_node_cloud_link_up", gn="cam1", mac="52:54:00:12:34:56") == 1
    assert value(fams, "cyphonic_general_node_cloud_link_up", gn="cam2") == 0
    assert [dict(k)["gn"] for k in fams["cyphonic_general_node_lease_expires_in_seconds"][2]] == ["cam1"]
    assert value(fams, "cyphonic_tunnel_transmit_bytes_total", gn="cam1", peer="srv.overlay.test") == 5
    assert value(fams, "cyphonic_worker_up", worker=1, queue=1) == 0
    assert value(fams, "cyphonic_worker_sealed_packets_total", worker=0) == 30
    assert value(fams, "cyphonic_worker_sealed_bytes_total", worker=0) == 4000
    assert value(fams, "cyphonic_worker_restarts_total") == 1
    assert value(fams, "cyphonic_drops_total", reason="inject_EAGAIN") == 2
    assert value(fams, "cyphonic_socket_kernel_drops_total", socket="nfqueue 0") == 3
    assert value(fams, "cyphonic_dhcp_events_total", event="rx_DISCOVER") == 2 and value(fams, "cyphonic_dhcp_leases") == 1
    assert value(fams, "cyphonic_arp_events_total", event="replies") == 3
    assert value(fams, "cyphonic_dns_events_total", event="queries") == 4
    assert value(fams, "cyphonic_health_warning", code="worker-down", subject="worker 1") == 1
    assert "cyphonic_data_path_idle_cpus" not in fams                    # None: no sample


CLOUD = {
    "kind": "cloud", "pid": 3, "services": ["as", "nms", "trs"], "started": 1000.0, "written": 1060.0,
    "socket_errors": {"ConnectionRefusedError": 2}, "relay_socket_errors": {"send_buffer_full": 1},
    "sockets": [{"socket": "signaling4", "local": "0.0.0.0:47101", "kernel_drops": 50, "rx_queued_bytes": 0,
                 "rcvbuf_bytes": 1}],
    "health": [],
    "counters": {"messages": 10, "logins_ok": 2}, "control_drops": {"mac1": 140}, "control": {"sessions": 2,
                                                                                           "cookie_replies_sent": 6},
    "sessions": 2, "nms": {"registrations": 2}, "registrations": [{"fqdn": "a"}, {"fqdn": "b"}],
    "relayed_routes": 3,
    "cluster": {"instance_id": "c1", "tag": 2, "alive": ["c1", "c2", "t1"], "dead": ["c3"], "relays": ["t1"],
                "counters": {"bus_sent_push": 4, "bus_received": 5}, "drops": {"bus_short": 1}, "last_error": ""},
    "relay": {"sessions": 1, "max_sessions": 4096, "bound_sides": 2, "ratelimit_sources": 1, "queued": 0,
              "drops": {"malformed": 140}, "counters": {"relayed_packets": 7, "relayed_bytes": 700}},
}


def test_the_cloud_stats_in_the_text_format():
    fams = parse(exposition(CLOUD))
    assert all(all(dict(k)["daemon"] == "cloud" for k in f[2]) for f in fams.values())
    assert value(fams, "cyphonic_info", services="as,nms,trs") == 1 and value(fams, "cyphonic_uptime_seconds") == 60
    assert value(fams, "cyphonic_drops_total", reason="control_mac1") == 140
    assert value(fams, "cyphonic_drops_total", reason="relay_malformed") == 140
    assert value(fams, "cyphonic_errors_total", reason="relay_send_buffer_full") == 1
    assert value(fams, "cyphonic_socket_kernel_drops_total", socket="signaling4") == 50
    assert value(fams, "cyphonic_control_events_total", event="cookie_replies_sent") == 6
    assert value(fams, "cyphonic_cloud_registered_nodes") == 2 and value(fams, "cyphonic_control_sessions") == 2
    assert value(fams, "cyphonic_relay_events_total", event="relayed_packets") == 7
    assert value(fams, "cyphonic_cloud_instance_info", instance="c1", tag="2") == 1
    assert value(fams, "cyphonic_cloud_instances", state="alive") == 3
    assert value(fams, "cyphonic_cloud_instances", state="dead") == 1
    assert value(fams, "cyphonic_cloud_relays_alive") == 1 and value(fams, "cyphonic_cloud_relayed_routes") == 3
    assert value(fams, "cyphonic_cloud_bus_events_total", event="bus_sent_push") == 4
    assert value(fams, "cyphonic_drops_total", reason="bus_short") == 1
    assert value(fams, "cyphonic_relay_bytes_total", event="relayed_bytes") == 700     # one unit per family
    assert "relayed_bytes" not in {dict(k)["event"] for k in fams["cyphonic_relay_events_total"][2]}
    # the stats file as an older cloud wrote it (no kind) is still the cloud's
    assert exposition({k: v for k, v in CLOUD.items() if k != "kind"}) == exposition(CLOUD)


def test_every_metric_name_is_documented():
    """docs/architecture.md, Metrics, lists every family the three daemons write."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "architecture.md")) as f:
        doc = f.read()
    section = doc[doc.index("## Metrics"):doc.index("## Tests, in tiers")]
    documented = set(re.findall(r"`(cyphonic_[a-z_]+)`", section))
    written = set()
    for doc_ in (NODE, ADAPTER, CLOUD):
        written |= set(parse(exposition(doc_)))
    assert written - documented == set()
