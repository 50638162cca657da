"""Issue 13: the cloud's addresses in the node daemon's, the adapter's and the boot file's
configuration: one host:port as before, a TOML list, a comma-separated string, a DNS name with
several records; errors that name the key."""

from __future__ import annotations

import socket

import pytest

from appliance import config as adapter_config
from cyphonic.node import config as node_config
from cyphonic.node.config import NodeConfigError, resolve_cloud

KEY = "cyk1:" + "11" * 32 + ":" + "22" * 32


def node(**kw):
    return node_config.parse_config({"cloud_key": KEY, **kw}, "node.toml")


def adapter(**kw):
    return adapter_config.parse_config({"cloud_key": KEY, **kw}, "adapter.toml")


def test_a_single_address_works_as_before():
    cfg = node(cloud="198.51.100.1:47101")
    assert cfg.cloud == "198.51.100.1:47101"
    assert cfg.cloud_addr == ("198.51.100.1", 47101) and cfg.cloud_addrs == (("198.51.100.1", 47101),)
    assert adapter(cloud="[2001:db8::1]:47101").cloud_addr == ("2001:db8::1", 47101)


@pytest.mark.parametrize("parse", [node, adapter])
def test_a_list_and_a_comma_string(parse):
    want = (("10.0.0.1", 4500), ("10.0.0.2", 4500), ("cloud3.example.net", 4500))
    listed = parse(cloud=["10.0.0.1:4500", "10.0.0.2:4500", "cloud3.example.net:4500"])
    assert listed.cloud_addrs == want and listed.cloud_addr == want[0]
    assert parse(cloud="10.0.0.1:4500, 10.0.0.2:4500,cloud3.example.net:4500").cloud_addrs == want


@pytest.mark.parametrize("parse,error", [(node, NodeConfigError), (adapter, adapter_config.AdapterConfigError)])
@pytest.mark.parametrize("value,says", [
    ([], "cloud: empty list"),
    ("10.0.0.1:4500,,10.0.0.2:4500", "cloud: empty entry"),
    (["10.0.0.1:4500", "10.0.0.300:4500"], "cloud[1]: expected host:port"),
    (["10.0.0.1:4500", 4500], "cloud[1]: must be a string"),
    (["10.0.0.1:4500", "10.0.0.1:4500"], "cloud[1]: 10.0.0.1:4500 is listed twice"),
    ("10.0.0.1", "cloud: expected host:port"),
    ("cloud_.example:4500", "cloud: expected host:port"),
    ("10.0.0.1:70000", "cloud: expected host:port"),
])
def test_bad_cloud_values_name_the_key(parse, error, value, says):
    with pytest.raises(error) as exc:
        parse(cloud=value)
    assert says in str(exc.value)


@pytest.mark.parametrize("parse,error", [(node, NodeConfigError), (adapter, adapter_config.AdapterConfigError)])
def test_cloud_nms_needs_a_single_cloud_address(parse, error):
    assert parse(cloud="10.0.0.1:4500", cloud_nms="10.0.0.9:4501").nms_addr == ("10.0.0.9", 4501)
    with pytest.raises(error) as exc:
        parse(cloud=["10.0.0.1:4500", "10.0.0.2:4500"], cloud_nms="10.0.0.9:4501")
    assert "cloud_nms: only with a single cloud address (cloud lists 2)" in str(exc.value)


def fake_resolver(table):
    def getaddrinfo(host, port, type=0):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 17, "", (a, port)) for a in table[host]]
    return getaddrinfo


def test_a_name_with_several_records_is_several_instances():
    gai = fake_resolver({"cloud.example.net": ["10.0.0.1", "10.0.0.2", "2001:db8::3", "10.0.0.1"]})
    cfg = node(cloud="cloud.example.net:4500")
    assert resolve_cloud(cfg.cloud_addrs, getaddrinfo=gai) == (
        ("10.0.0.1", 4500), ("10.0.0.2", 4500), ("2001:db8::3", 4500))
    mixed = node(cloud=["10.0.0.9:4500", "cloud.example.net:4501"])
    assert resolve_cloud(mixed.cloud_addrs, getaddrinfo=gai)[:2] == (("10.0.0.9", 4500), ("10.0.0.1", 4501))
    with pytest.raises(NodeConfigError) as exc:
        resolve_cloud(node(cloud="nowhere.example.net:4500").cloud_addrs, getaddrinfo=gai)
    assert "cloud: cannot resolve nowhere.example.net" in str(exc.value)
    with pytest.raises(NodeConfigError) as exc:     # split AS/NMS: a name must give one address
        resolve_cloud(cfg.cloud_addrs, single=True, getaddrinfo=gai)
    assert "cloud_nms needs a single cloud address" in str(exc.value)


def test_localhost_resolves_with_the_real_resolver():
    out = resolve_cloud(node(cloud="localhost:4500").cloud_addrs)
    assert out and all(port == 4500 and host in ("127.0.0.1", "::1") for host, port in out)


BOOT = """hostname = "adapter1"
[cloud]
address = ADDRESS
key = "cyk1:{k}"
token = "0123456789ab.{t}"
[ports]
wan = "end0"
lan = "eth1"
[wan]
address = "dhcp"
""".replace("{k}", "ab" * 32 + ":" + "cd" * 32).replace("{t}", "5a" * 16)


def boot_plan(address: str, extra: str = ""):
    import tomllib

    from appliance.provision import Interface, plan
    ifaces = [Interface("end0", "dc:a6:32:00:00:01", True), Interface("eth1", "00:e0:4c:68:00:02", True)]
    return plan(tomllib.loads(BOOT.replace("ADDRESS", address) + extra), ifaces)


def test_the_boot_file_takes_a_list_a_comma_string_or_a_name():
    import tomllib
    for address in ('["203.0.113.10:47101", "203.0.113.11:47101"]', '"203.0.113.10:47101,203.0.113.11:47101"',
                    '"cloud.example.net:47101"'):
        p = boot_plan(address)
        assert p.errors == [], (address, p.errors)
        conf = next(o for o in p.outputs if o.path.endswith("adapter.toml")).content.decode()
        cfg = adapter_config.parse_config(tomllib.loads(conf), "adapter.toml")
        assert cfg.cloud_addrs[0] in (("203.0.113.10", 47101), ("cloud.example.net", 47101)), address
    assert adapter_config.parse_config(tomllib.loads(next(
        o for o in boot_plan('["203.0.113.10:47101", "203.0.113.11:47101"]').outputs
        if o.path.endswith("adapter.toml")).content.decode()), "x").cloud_addrs == (
        ("203.0.113.10", 47101), ("203.0.113.11", 47101))


@pytest.mark.parametrize("address,extra,says", [
    ("[]", "", "[cloud] address: required"),
    ('["203.0.113.10:47101", 5]', "", "[cloud] address: must be a list of strings"),
    ('["203.0.113.10:47101", "203.0.113.300:47101"]', "", "[cloud] address[1]: expected host:port"),
    ('"203.0.113.10:47101,"', "", "[cloud] address: empty entry"),
    ('["203.0.113.10:47101", "203.0.113.11:47101"]', '[adapter]\ncloud_nms = "203.0.113.12:47102"\n',
     "[adapter] cloud_nms: only with a single cloud address"),
])
def test_the_boot_file_errors_name_the_key(address, extra, says):
    errors = boot_plan(address, extra).errors
    assert any(says in e for e in errors), errors


def test_a_cloud_name_that_does_not_resolve_yet_is_tried_again_not_a_crash(monkeypatch):
    import asyncio

    from cyphonic.node import daemon as d
    from cyphonic.node.config import NodeConfigError
    calls, logs, waits = [], [], []

    def flaky(addrs, **kw):
        calls.append(addrs)
        if len(calls) < 3:
            raise NodeConfigError("cloud: cannot resolve cloud.example: Name or service not known")
        return (("192.0.2.1", 47101),)

    async def no_sleep(s):
        waits.append(s)

    from cyphonic import driver
    monkeypatch.setattr(d, "resolve_cloud", flaky)
    monkeypatch.setattr(driver.asyncio, "sleep", no_sleep)
    nd = d.NodeDaemon.__new__(d.NodeDaemon)
    nd.cfg = type("C", (), {"cloud_addrs": (("cloud.example", 47101),), "cloud_nms": ""})()
    nd.log = logs.append
    assert asyncio.run(nd._resolve_cloud_at_start()) == (("192.0.2.1", 47101),)
    assert len(calls) == 3 and waits == [1.0, 2.0]
    assert all("cannot resolve cloud.example" in line and "trying again" in line for line in logs)
