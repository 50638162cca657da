"""The adapter's Resolver edge (appliance.resolver): which general node asked, whose engine
resolves, and the flush count that makes a link's driver go round again."""

from __future__ import annotations

from types import SimpleNamespace

from appliance import config as adapter_config
from appliance.general_nodes import Registry
from appliance.resolver import AdapterResolver

CLOUD_KEY = "cyk1:" + "ab" * 32 + ":" + "cd" * 32


def make(tmp_path):
    cfg = adapter_config.parse_config({"cloud": "192.0.2.1:47101", "cloud_key": CLOUD_KEY,
                                       "state_dir": str(tmp_path)})
    reg = Registry(cfg.state_dir)
    gn = reg.add("52:54:00:12:34:56", "cam1")
    gn.vip4 = "100.64.0.5"
    asked, flushed = [], []
    link = SimpleNamespace(gn=gn, engine=SimpleNamespace(resolve=lambda fqdn, now: asked.append(fqdn) or "100.64.0.9"),
                           host=SimpleNamespace(flush=lambda: flushed.append(1), resolver=None, asker=None))
    r = AdapterResolver(cfg, reg, {gn.mac: link}, clock=lambda: 5.0, log=lambda line: None)
    return r, asked, flushed, link


def test_the_asker_is_the_general_node_at_the_querys_source_address(tmp_path):
    r, asked, flushed, _ = make(tmp_path)
    assert r.asker_of(("100.64.0.5", 5353)) == "52:54:00:12:34:56"
    assert r.asker_of(("100.64.0.6", 5353)) is None
    assert r.on_resolve("srv.overlay", "52:54:00:12:34:56") == "100.64.0.9"
    assert asked == ["srv.overlay"] and flushed == [1]
    assert r.on_resolve("srv.overlay", None) is None and r.on_resolve("srv.overlay", "52:54:00:00:00:01") is None
    assert r.drops["dns_unknown_asker"] == 2 and asked == ["srv.overlay"]


def test_flush_reports_the_names_handed_to_engines_meanwhile(tmp_path):
    r, _, _, link = make(tmp_path)
    assert r.flush() == 0 and r.counters() == {}          # not started: nothing to do
    r.attach(link)
    assert link.host.resolver is None                      # nothing to attach yet
    r.resolver = object()
    r.attach(link)
    assert link.host.resolver is r.resolver and link.host.asker == "52:54:00:12:34:56"
    r.dns = SimpleNamespace(flush=lambda: r.on_resolve("a.overlay", "52:54:00:12:34:56"), close=lambda: None)
    assert r.flush() == 1
