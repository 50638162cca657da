"""The controller's wiring without the OS parts (no packet filter, no NFQUEUE, no LAN port):
links for the adapter and a general node on real UDP sockets, the worker pool with stand-in
processes, the status document cyadm reads, a worker's miss, cyadm's gn commands."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket

from appliance import config as adapter_config
from appliance.controller import Adapter
from appliance.way_back import WayBack

from test_adapter_sessions import Device, Pool

CLOUD_KEY = "cyk1:" + "ab" * 32 + ":" + "cd" * 32

# What scripts read from `cyadm status --json` (docs/adapter.md): these keys stay.
STATUS_KEYS = {"kind", "pid", "uptime_s", "identity", "cloud", "lan", "packet_filter", "general_nodes", "tunnels",
               "workers", "worker_restarts", "dhcp", "arp", "dns", "data_path", "drops", "health"}
DATA_PATH_KEYS = {"busy_poll_us", "heads_ups", "busy_polls", "idle_cpus", "handler_errors"}
GN_ROW_KEYS = {"mac", "name", "fqdn", "vip4", "lease_expires_in_s", "cloud", "port"}


class EngineDevice(Device):
    """The fake device, with what a NodeEngine asks of its device besides the peers."""

    def __init__(self) -> None:
        super().__init__()
        self.peers_by_fqdn = {}
        self.drops = {}

    def datagrams_to_send(self):
        return []

    def next_event(self):
        return None

    def get_timer(self):
        return None

    def maintain(self, now):
        pass


def free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("0.0.0.0", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def adapter(tmp_path, pool: Pool) -> Adapter:
    own, gn_base = free_ports(2)
    cfg = adapter_config.parse_config({"cloud": "127.0.0.1:9", "cloud_key": CLOUD_KEY, "name": "adapter",
                                       "state_dir": str(tmp_path / "state"), "port": own, "gn_port_base": gn_base,
                                       "status_socket": str(tmp_path / "adapter.sock")})
    ad = Adapter(cfg, out=open(os.devnull, "w"))
    ad.way_back = WayBack(lambda packet: True, drops=ad.drops)
    ad.pool = pool.pool
    pool.pool.health = ad.health
    return ad


def test_status_keys_links_sessions_and_gn_commands(tmp_path):
    async def scenario():
        pool = Pool(2)
        ad = adapter(tmp_path, pool)
        ad._start_self()
        gn = ad.registry.add("52:54:00:12:34:56", "cam1")
        gn.vip4 = "100.64.0.5"                       # as if it had logged in before
        link = ad._start_gn(gn)
        try:
            assert link.port == ad.cfg.gn_port_base and link.sessions is not None
            # the general node's engine, as if its tunnels were up: the workers get its sessions
            dev = EngineDevice()
            peer = dev.add(9)
            link.engine.device = dev
            ad._sync_all(1.0)
            txs = pool.txs()
            assert [m[5] for m in txs] == [1, 2] and txs[0][1] == ipaddress.IPv4Address("100.64.0.5").packed
            # a worker's miss for a peer whose tunnel is up: installed (a restarted worker here)
            pool.crash(0)
            pool.pool.supervise(ad.clock())
            ad._on_miss(("miss", link.sessions.gn_vip4, bytes([100, 64, 1, 9])))
            assert [m[5] for m in pool.txs()] == [1, 2, 3] and pool.txs()[-1][3] == peer.current.keys.send_key
            # the status document: its keys, the links' health with subjects and since
            st = ad.status()
            assert set(st) == STATUS_KEYS and set(st["data_path"]) == DATA_PATH_KEYS
            assert st["kind"] == "adapter" and st["identity"]["static_key"]
            assert [set(r) for r in st["general_nodes"]] == [GN_ROW_KEYS] and st["general_nodes"][0]["port"] == link.port
            assert st["worker_restarts"] == 1 and len(st["workers"]) == 2
            subjects = {(h["code"], h.get("subject")) for h in st["health"]}
            assert ("connecting", "adapter") in subjects and ("connecting", "cam1") in subjects
            assert ("worker-restarted", "worker 0") in subjects
            assert all("since" in h for h in st["health"])
            assert not any(h["code"].startswith("gn-login") for h in st["health"])
            # cyadm gn list / remove: the general node's sessions leave the workers
            assert ad._command({"cmd": "gn_list"})["general_nodes"][0]["name"] == "cam1"
            assert ad._command({"cmd": "gn_remove", "mac": "52:54:00:12:34:56"}) == {"ok": True}
            assert "52:54:00:12:34:56" not in ad.links and link.sock.fileno() == -1
            # ... and every worker closes its copy of the socket, so the port is free again
            closed = [p for p, m in pool.log if m == ("close_port", link.port)]
            assert len(closed) == 2 and {id(p) for p in closed} == {id(w.proc) for w in pool.pool.workers}
            assert all(not held for held in pool.held().values())
            assert "not enrolled" in ad._command({"cmd": "gn_remove", "mac": "52:54:00:12:34:56"})["error"]
            assert ad._command({"cmd": "nope"}) == {"error": "unknown command nope"}
        finally:
            for lk in ad._all_links():
                lk.host.stop()
                lk.sock.close()

    asyncio.run(scenario())


def test_a_new_virtual_ip_never_hands_a_live_key_its_stream_ids_again(tmp_path):
    """The engine (and its tunnels' keys) outlives the session installer a new virtual IP
    replaces: the stream ids already used stay used (the key is rekeyed instead)."""
    async def scenario():
        pool = Pool(2)
        ad = adapter(tmp_path, pool)
        ad._start_self()
        gn = ad.registry.add("52:54:00:12:34:57", "cam2")
        gn.vip4 = "100.64.0.6"
        link = ad._start_gn(gn)
        try:
            dev = EngineDevice()
            dev.add(9)
            link.engine.device = dev
            ad._sync_all(1.0)
            gn.vip4 = "100.64.0.7"                   # renumbered by the cloud, tunnels still up
            ad._install_sessions(link)
            ad._sync_all(2.0)
            pairs = [(m[3], m[5]) for m in pool.txs()]
            assert len(pairs) == 2 and len(set(pairs)) == len(pairs)
            assert dev.rekeys == [dev.peers_by_vip[bytes([100, 64, 1, 9])].fqdn]
        finally:
            for lk in ad._all_links():
                lk.host.stop()
                lk.sock.close()

    asyncio.run(scenario())


def test_an_added_general_node_forks_the_workers_again_so_they_hold_its_socket(tmp_path):
    async def scenario():
        pool = Pool(2)
        ad = adapter(tmp_path, pool)
        ad._start_self()
        before = [w.generation for w in pool.pool.workers]
        try:
            r = ad._command({"cmd": "gn_add", "mac": "52:54:00:12:34:57", "name": "cam2"})
            assert r == {"ok": True, "mac": "52:54:00:12:34:57", "name": "cam2"}
            assert all(w.generation not in before for w in pool.pool.workers)
            assert ad._worker_args()[0] == {ad.links["52:54:00:12:34:57"].port: ad.links["52:54:00:12:34:57"].sock}
            assert "taken" in ad._command({"cmd": "gn_add", "mac": "52:54:00:12:34:58", "name": "cam2"})["error"]
        finally:
            for lk in ad._all_links():
                lk.host.stop()
                lk.sock.close()

    asyncio.run(scenario())


def test_run_starts_waits_for_the_stop_and_always_closes(tmp_path):
    """(cyphonic.driver.run_until_signalled, the daemons' shared life cycle.)"""
    ad = adapter(tmp_path, Pool(1))
    calls = []

    async def start():
        calls.append("start")
        asyncio.get_running_loop().call_later(0.01, ad._stop.set)

    async def close():
        calls.append("close")

    ad.start, ad.close = start, close
    assert asyncio.run(ad.run()) == 0 and calls == ["start", "close"]

    async def failing_start():
        raise OSError("LAN interface lan0 not found")

    ad2 = adapter(tmp_path / "2", Pool(1))
    ad2.start, ad2.close = failing_start, close
    try:
        asyncio.run(ad2.run())
    except OSError:
        pass
    assert calls == ["start", "close", "close"]


def test_the_dhcp_domain_follows_the_cloud_from_the_first_login(tmp_path):
    """A freshly set-up adapter knows the overlay's domain only once it logs in: the general
    nodes' leases carry it (option 15) from then on, not the placeholder it started with."""
    from types import SimpleNamespace

    from appliance.address_config import Binding, DhcpServer, advertised_mtu
    from appliance.leases import LeaseStore
    from cyphonic import signaling as sg
    from test_address_config import decode, discover

    ad = adapter(tmp_path, Pool(1))
    mac = "52:54:00:12:34:58"
    server = DhcpServer(server_ip="100.127.255.254", netmask="255.192.0.0", router="100.127.255.254",
                        dns="100.127.255.254", domain="overlay", mtu=advertised_mtu(), lease_s=600,
                        bindings=lambda m: Binding(m, "100.64.0.9", "cam3") if m == mac else None,
                        leases=LeaseStore(str(tmp_path / "leases.json")), log=lambda line: None)
    ad.dhcp = SimpleNamespace(server=server)
    ad._on_self_event(sg.LoggedIn("adapter.ov.example", "100.64.0.1", 10, "ov.example", b"", False))
    [offer] = server.receive(discover(mac), 1000.0)
    assert decode(offer)[1][15] == b"ov.example"
