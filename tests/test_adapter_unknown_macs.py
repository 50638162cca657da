"""The unknown MACs that asked for a lease (appliance.unknown_macs): bounded whatever the LAN
sends, written at most every few seconds, kept across a restart, a bad file ignored; and the
wiring: the DHCP server tells the controller, which keeps only MACs that are not enrolled and
shows them in the status document."""

from __future__ import annotations

import asyncio
import json
import os
import random

import pytest

from appliance.address_config import DhcpServer
from appliance.constants import UNKNOWN_MACS_KEPT, UNKNOWN_MACS_WRITE_EVERY_S
from appliance.leases import LeaseStore
from appliance.unknown_macs import UnknownMacs

from test_adapter_controller import adapter
from test_adapter_sessions import Pool
from test_address_config import discover

T0 = 1_700_000_000.0


def record(tmp_path, **kw) -> tuple[UnknownMacs, list[str]]:
    logs: list[str] = []
    return UnknownMacs(tmp_path / "state" / "unknown_macs.json", log=logs.append, **kw), logs


def random_mac(rng: random.Random) -> str:
    return ":".join(f"{rng.randrange(256):02x}" for _ in range(6))


def test_a_flood_of_random_macs_stays_bounded_and_costs_a_write_every_few_seconds(tmp_path):
    writes = []

    def counting_write(path, doc, **kw):
        writes.append(len(doc["macs"]))
        from cyphonic.atomic_file import write_json_atomic
        write_json_atomic(path, doc, **kw)

    u, _ = record(tmp_path, write=counting_write)
    rng = random.Random(7)
    n, rate = 10_000, 1000.0                     # 10,000 DISCOVERs from random MACs over 10 s
    for i in range(n):
        now = T0 + i / rate
        u.seen(random_mac(rng), now)
        u.flush(now)                             # as often as one could call it: once per packet
        assert len(u.macs) <= UNKNOWN_MACS_KEPT
    assert u.total == n and len(u.macs) == UNKNOWN_MACS_KEPT
    assert len(writes) <= n / rate / UNKNOWN_MACS_WRITE_EVERY_S + 1, writes     # not one per packet
    assert all(k <= UNKNOWN_MACS_KEPT for k in writes)
    assert os.path.getsize(u.path) < 4096
    u.flush(T0 + n / rate, force=True)           # at stop: whatever the time
    assert not u.dirty and u.writes == len(writes)


def test_the_record_survives_a_restart_most_recent_first(tmp_path):
    u, _ = record(tmp_path)
    for i in range(20):                          # 20 MACs: the 4 seen least recently are forgotten
        u.seen(f"02:00:00:00:00:{i:02x}", T0 + i)
    u.seen("02:00:00:00:00:10", T0 + 50)         # one of them asks twice more
    u.seen("02:00:00:00:00:10", T0 + 100)
    assert u.flush(T0 + 100)
    again, logs = record(tmp_path)
    again.load()
    st = again.status()
    assert logs == [] and st == u.status() and "warning" not in st
    assert st["total"] == 22 and st["last_seen"] == T0 + 100 and len(st["macs"]) == UNKNOWN_MACS_KEPT
    assert st["macs"][0] == {"mac": "02:00:00:00:00:10", "first_seen": T0 + 16, "last_seen": T0 + 100, "count": 3}
    assert [m["mac"] for m in st["macs"][1:3]] == ["02:00:00:00:00:13", "02:00:00:00:00:12"]
    assert st["macs"][-1]["mac"] == "02:00:00:00:00:04"
    assert (os.stat(u.path).st_mode & 0o777) == 0o600
    # an enrolled MAC leaves the list; the total keeps its requests
    again.forget("02:00:00:00:00:10")
    assert again.flush(T0 + 200) and again.status()["total"] == 22
    assert "02:00:00:00:00:10" not in {m["mac"] for m in again.status()["macs"]}


BAD_FILES = [
    b"",
    b"{not json",
    b"\xff\xfe garbage",
    b"[]",
    json.dumps({"format": "something-else", "version": 1, "total": 1, "macs": []}).encode(),
    json.dumps({"format": "cyphonic-unknown-macs", "version": 1, "total": -1, "macs": []}).encode(),
    json.dumps({"format": "cyphonic-unknown-macs", "version": 1, "total": 1, "macs": {}}).encode(),
    json.dumps({"format": "cyphonic-unknown-macs", "version": 1, "total": 1,
                "macs": [{"mac": "not a mac", "first_seen": 1, "last_seen": 2, "count": 1}]}).encode(),
    json.dumps({"format": "cyphonic-unknown-macs", "version": 1, "total": 1,
                "macs": [{"mac": "02:00:00:00:00:01", "first_seen": 3, "last_seen": 2, "count": 1}]}).encode(),
    json.dumps({"format": "cyphonic-unknown-macs", "version": 1, "total": 1,
                "macs": [{"mac": "02:00:00:00:00:01", "first_seen": 1, "last_seen": 2, "count": True}]}).encode(),
    b'{"format": "cyphonic-unknown-macs", "version": 1, "total": 1, "macs": [{"mac": "02:00:00:00:00:01", '
    b'"first_seen": NaN, "last_seen": 2, "count": 1}]}',
    b" " * 70000 + b"{}",
]


@pytest.mark.parametrize("content", BAD_FILES)
def test_a_corrupt_file_is_reported_and_ignored_and_the_next_write_replaces_it(tmp_path, content):
    u, logs = record(tmp_path)
    os.makedirs(os.path.dirname(u.path))
    with open(u.path, "wb") as f:
        f.write(content)
    u.load()                                      # never raises
    st = u.status()
    assert st["total"] == 0 and st["macs"] == [] and "ignored" in st["warning"]
    assert len(logs) == 1 and u.path in logs[0]
    u.seen("02:00:00:00:00:01", T0)
    assert u.flush(T0)
    again, _ = record(tmp_path)
    again.load()
    assert again.status()["total"] == 1 and "warning" not in again.status()


def test_an_unreadable_file_and_a_failed_write_are_reported_not_raised(tmp_path):
    u, logs = record(tmp_path)
    os.makedirs(u.path)                           # reading it fails (EISDIR), even as root
    u.load()
    assert "unreadable" in u.status()["warning"] and len(logs) == 1
    u.seen("02:00:00:00:00:01", T0)
    assert not u.flush(T0)                        # writing over a directory fails too
    assert "cannot write" in u.status()["warning"] and u.dirty and len(logs) == 2
    assert not u.flush(T0 + 1)                    # not tried again before the interval
    assert not u.flush(T0 + UNKNOWN_MACS_WRITE_EVERY_S) and len(logs) == 2   # logged once
    os.rmdir(u.path)
    assert u.flush(T0 + 2 * UNKNOWN_MACS_WRITE_EVERY_S) and "warning" not in u.status()


def test_the_dhcp_server_tells_of_each_request_it_does_not_answer(tmp_path):
    told = []
    server = DhcpServer(server_ip="100.127.255.254", netmask="255.192.0.0", router="100.127.255.254",
                        dns="100.127.255.254", domain="overlay", mtu=1380, leases=LeaseStore(tmp_path / "l.json"),
                        bindings=lambda mac: None, log=lambda line: None,
                        on_no_binding=lambda mac, now: told.append((mac, now)))
    for i in range(3):
        assert server.receive(discover("02:aa:bb:cc:dd:ee"), T0 + i) == []
    assert told == [("02:aa:bb:cc:dd:ee", T0 + i) for i in range(3)] and server.drops["unknown_mac"] == 3


def test_the_controller_keeps_only_macs_that_are_not_enrolled_and_shows_them(tmp_path):
    async def scenario():
        ad = adapter(tmp_path, Pool(1))
        ad._start_self()
        try:
            ad.registry.add("52:54:00:12:34:56", "cam1")       # enrolled, not logged in yet: no lease
            ad._no_binding("52:54:00:12:34:56", T0)
            ad._no_binding("52:54:00:aa:bb:cc", T0 + 1)
            ad._no_binding("52:54:00:aa:bb:cc", T0 + 2)
            u = ad.status()["dhcp"]["unknown_macs"]
            assert u["total"] == 2 and [m["mac"] for m in u["macs"]] == ["52:54:00:aa:bb:cc"]
            assert u["macs"][0]["count"] == 2 and u["last_seen"] == T0 + 2
            ad.unknown_macs.flush(T0 + 2)
            assert json.load(open(tmp_path / "state" / "unknown_macs.json"))["total"] == 2
            ad._command({"cmd": "gn_add", "mac": "52:54:00:aa:bb:cc", "name": "cam2"})   # enrolled now
            assert ad.status()["dhcp"]["unknown_macs"]["macs"] == []
        finally:
            for lk in ad._all_links():
                lk.host.stop()
                lk.sock.close()

    asyncio.run(scenario())
