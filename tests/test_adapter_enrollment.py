"""General Node Management while the adapter runs (appliance.enrollment): the config's
general_nodes enrolled idempotently and retried, auto-enroll, the token a first login uses,
and each general node's WAN port."""

from __future__ import annotations

from appliance import config as adapter_config
from appliance.constants import CONFIG_GN_RETRY_S
from appliance.enrollment import Enrollment
from appliance.general_nodes import Registry

CLOUD_KEY = "cyk1:" + "ab" * 32 + ":" + "cd" * 32
TOKEN = "0123456789ab." + "5a" * 16


def make(tmp_path, **keys):
    cfg = adapter_config.parse_config({"cloud": "192.0.2.1:47101", "cloud_key": CLOUD_KEY,
                                       "state_dir": str(tmp_path / "state"), **keys})
    reg = Registry(cfg.state_dir)
    added, lines = [], []
    e = Enrollment(cfg, reg, on_added=lambda gn, starting: added.append((gn.mac, starting)), log=lines.append)
    return e, reg, added, lines


def test_configured_general_nodes_are_enrolled_once_and_retried_until_they_can_be(tmp_path):
    e, reg, added, lines = make(tmp_path, general_nodes=[{"mac": "52:54:00:12:34:56", "name": "cam1"},
                                                         {"mac": "52:54:00:12:34:57", "name": "cam2"}])
    reg.add("52:54:00:00:00:09", "cam2")          # the name is taken by another MAC: cam2 must wait
    e.enroll_configured(100.0, starting=True)
    assert added == [("52:54:00:12:34:56", True)]  # at start: the workers fork later
    assert reg.get("52:54:00:12:34:56").name == "cam1"
    assert list(e.pending) == ["52:54:00:12:34:57"] and "taken" in e.pending["52:54:00:12:34:57"]
    assert sum("not enrolled" in line for line in lines) == 1
    assert [w.code for w in e.conditions()] == ["gn-config"]
    assert not e.retry_due(100.0 + CONFIG_GN_RETRY_S - 1) and e.retry_due(100.0 + CONFIG_GN_RETRY_S)
    e.enroll_configured(200.0)                      # a retry that fails again: not logged twice
    assert sum("not enrolled" in line for line in lines) == 1 and len(added) == 1
    reg.remove("52:54:00:00:00:09")                 # the conflict goes away: the retry enrolls it
    e.enroll_configured(300.0)
    assert added[-1] == ("52:54:00:12:34:57", False) and e.pending == {} and e.conditions() == []
    assert not e.retry_due(10_000.0)
    # a restart with the same config enrolls nothing again
    e2, reg2, added2, _ = make(tmp_path, general_nodes=[{"mac": "52:54:00:12:34:56", "name": "cam1"},
                                                        {"mac": "52:54:00:12:34:57", "name": "cam2"}])
    e2.enroll_configured(0.0, starting=True)
    assert added2 == [] and len(reg2.nodes) == 2 and e2.pending == {}


def test_the_token_file_is_read_only_when_needed_and_an_unreadable_one_is_a_warning(tmp_path):
    token_file = tmp_path / "token"
    e, reg, _, lines = make(tmp_path, gn_token_file=str(token_file))
    assert e.gn_token() == "" and "cannot read gn_token_file" in e.token_warning
    assert [w.code for w in e.conditions()] == ["token-file"]
    e.gn_token()
    assert len(lines) == 1                          # logged once
    token_file.write_text(TOKEN + "\n")
    assert e.gn_token() == TOKEN and e.conditions() == []
    gn = reg.add("52:54:00:12:34:56", "cam1")
    assert e.login_token(gn, enrolled=False) == TOKEN.encode()
    assert e.login_token(gn, enrolled=True) == b""  # the certificate logs in
    gn.token = "own"
    assert e.login_token(gn, enrolled=False) == b"own"
    e2, _, _, _ = make(tmp_path / "2", gn_token="inline", gn_token_file=str(token_file))
    assert e2.gn_token() == "inline"


def test_add_auto_enroll_and_ports(tmp_path):
    e, reg, added, lines = make(tmp_path, gn_port_base=47300)
    gn = e.add("52-54-00-12-34-56", "cam1", group="cams")
    assert added == [("52:54:00:12:34:56", False)] and gn.group == "cams" and "added" in lines[-1]
    auto = e.auto_enroll("52:54:00:ab:cd:ef")
    assert auto.name == "gn-abcdef" and auto.auto and "auto-enrolled" in lines[-1]
    assert e.auto_enroll("52:54:00:ab:cd:ef") is None and e.drops["auto_enroll_refused"] == 1
    assert e.port_of(gn) == 47300 and e.port_of(auto) == 47301 and e.port_of(gn) == 47300
    reg.remove(gn.mac)
    again = e.add("52:54:00:12:34:99", "cam9")
    assert e.port_of(again) == 47300                # the lowest free one
    assert Registry(reg.state_dir).get(auto.mac).extra["port"] == 47301   # kept in the registry


def test_dhcp_bindings_arp_addresses_and_the_domain_come_from_the_registry(tmp_path):
    e, reg, added, _ = make(tmp_path, auto_enroll=True)
    gn = e.add("52:54:00:12:34:56", "cam1")
    assert e.binding(gn.mac, may_enroll=True) is None and e.domain() == ""    # not logged in yet
    gn.vip4, gn.domain = "100.64.0.5", "ov.test"
    b = e.binding(gn.mac, may_enroll=True)
    assert (b.mac, b.vip4, b.name) == (gn.mac, "100.64.0.5", "cam1") and e.domain() == "ov.test"
    assert e.vip_of_mac(bytes.fromhex("525400123456")) == "100.64.0.5" and e.vip_of_mac(b"\x02" * 6) is None
    assert e.binding("52:54:00:00:00:01", may_enroll=False) is None and len(added) == 1   # stopping: no enrolling
    assert e.binding("52:54:00:00:00:01", may_enroll=True) is None and len(added) == 2    # enrolled, no IP yet
