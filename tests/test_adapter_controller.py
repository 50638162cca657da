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
               "workers", "worker_restarts", "dhcp", "arp", "dns", "data_path", "drops", "sockets", "health"}
DATA_PATH_KEYS = {"busy_poll_us", "heads_ups", "busy_polls", "idle_cpus", "handler_errors", "batches"}
GN_ROW_KEYS = {"mac", "name", "fqdn", "vip4", "lease_expires_in_s", "cloud", "instance", "port"}


class EngineDevice(Device):
    """The fake device, with what a NodeEngine asks of its device besides the peers."""

    def __init__(self) -> None:
        super().__init__()
        self.peers_by_fqdn = {}
        self.drops = {}
        self.counters = {}

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


def test_an_added_general_node_reaches_the_running_workers_without_restarting_them(tmp_path):
    """`cyadm gn add` hands the new socket to the live workers (restarting them lost every other
    general node's packets in their queues); `gn remove` takes it back, sessions first."""
    async def scenario():
        pool = Pool(2)
        ad = adapter(tmp_path, pool)
        ad._start_self()
        before = [(w.generation, w.proc) for w in pool.pool.workers]
        try:
            r = ad._command({"cmd": "gn_add", "mac": "52:54:00:12:34:57", "name": "cam2"})
            assert r == {"ok": True, "mac": "52:54:00:12:34:57", "name": "cam2"}
            assert [(w.generation, w.proc) for w in pool.pool.workers] == before    # nobody restarted
            link = ad.links["52:54:00:12:34:57"]
            for w in pool.pool.workers:                # each: the message, then the socket's fd
                mine = [m for p, m in pool.log if p is w.proc]
                assert mine == [("add_port", link.port), ("fd", link.port)]
            assert ad._worker_args()[0] == {link.port: link.sock}                  # and a later fork
            # its sessions go into the same processes
            link.gn.vip4 = "100.64.0.8"
            ad._install_sessions(link)
            dev = EngineDevice()
            dev.add(9)
            link.engine.device = dev
            ad._sync_all(1.0)
            assert {p for p, m in pool.log if m[0] == "tx" and m[7] == link.port} == {p for _, p in before}
            assert "taken" in ad._command({"cmd": "gn_add", "mac": "52:54:00:12:34:58", "name": "cam2"})["error"]
            assert ad._command({"cmd": "gn_remove", "mac": "52:54:00:12:34:57"}) == {"ok": True}
            for w in pool.pool.workers:
                kinds = [m[0] for p, m in pool.log if p is w.proc]
                assert kinds[-2:] == ["untx", "close_port"]
            assert [(w.generation, w.proc) for w in pool.pool.workers] == before
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


def test_cyadm_status_json_has_the_kernel_s_drops_and_every_part_s(tmp_path):
    """Issue 12: after 2.5 million bad datagrams `cyadm status` said `drops: {}`. A burst at a
    general node's socket: each datagram was either dropped by the kernel (`sockets`) or read
    and dropped by its engine (`drops`), exactly; every part's drops are in the one table;
    `under-load` says so; `cyadm metrics` has the same. Through the real cyadm, over the real
    status socket."""
    import json
    import subprocess
    import sys
    from collections import Counter
    from types import SimpleNamespace

    from appliance.address_config import DhcpServer, advertised_mtu
    from appliance.leases import LeaseStore
    from cyphonic.health import LoadWatch
    from cyphonic.socket_stats import socket_row
    from cyphonic.status_socket import remove, serve_status
    from test_metrics import parse, value

    burst = 400
    sock_path = str(tmp_path / "a.sock")

    async def cyadm(*args) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(sys.executable, "-m", "appliance.cyadm", "--socket", sock_path,
                                                 *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 30)
        return p.returncode, out.decode() + err.decode()

    async def scenario():
        cloud = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)      # stands for the cloud's address
        cloud.bind(("127.0.0.1", 0))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        side = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]   # DHCP's, DNS's
        for s in side:
            s.bind(("127.0.0.1", 0))
        own, gn_base = free_ports(2)
        cfg = adapter_config.parse_config({
            "cloud": f"127.0.0.1:{cloud.getsockname()[1]}", "cloud_key": CLOUD_KEY, "name": "adapter",
            "state_dir": str(tmp_path / "state"), "port": own, "gn_port_base": gn_base,
            "status_socket": sock_path, "metrics_file": ""})
        ad = Adapter(cfg, out=open(os.devnull, "w"))
        pool = Pool(1)
        ad.way_back = WayBack(lambda packet: True, drops=ad.drops)
        ad.pool = pool.pool
        pool.pool.health = ad.health
        ad.load = LoadWatch(sample_s=0.0)             # every status is a sample
        ad._start_self()
        link = ad._start_gn(ad.registry.add("52:54:00:12:34:56", "cam1"))
        server = await serve_status(sock_path, ad._command)
        try:
            # a drop in each part (the LAN's need a LAN port: stand-ins with their counters)
            dhcp = DhcpServer(server_ip="100.127.255.254", netmask="255.192.0.0", router="100.127.255.254",
                              dns="100.127.255.254", domain="overlay", mtu=advertised_mtu(), lease_s=600,
                              bindings=lambda m: None, leases=LeaseStore(str(tmp_path / "leases.json")),
                              log=lambda line: None)
            dhcp.receive(b"\x02" + bytes(300), 1000.0)                 # a server's message: dropped
            ad.dhcp = SimpleNamespace(server=dhcp, sock=side[0])
            ad.arp = SimpleNamespace(responder=SimpleNamespace(drops=Counter(short=4)), errors=Counter(ENETDOWN=1),
                                     sock=None, stats=lambda: {})
            ad.injector = SimpleNamespace(drops=Counter(EAGAIN=3))
            ad.resolver.resolver = SimpleNamespace(drops=Counter(formerr=2), counters=Counter(queries=2))
            ad.resolver.dns = SimpleNamespace(errors=Counter(upstream_short=1), sockets=lambda: [("dns", side[1])],
                                              flush=lambda: None, close=lambda: None)
            pool.pool.workers[0].stats = {"drop_no_session": 7, "sealed": 3, "ports": 1}
            ad.status()                                   # under-load's base sample
            # the burst: its own signaling channel's garbage from the cloud's address first,
            # then junk faster than anyone reads (nothing runs the loop meanwhile)
            link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            cloud.sendto(b"\x08\x00\x00", ("127.0.0.1", link.port))
            for _ in range(burst):
                sender.sendto(b"\xff" + bytes(40), ("127.0.0.1", link.port))
            for _ in range(1000):                         # the way back reads what the kernel kept
                if socket_row("", link.sock)["rx_queued_bytes"] == 0:
                    break
                await asyncio.sleep(0.005)
            rc, out = await cyadm("status", "--json")
            assert rc in (0, 3), out
            st = json.loads(out)
            rows = {r["socket"]: r for r in st["sockets"]}
            kernel = rows["cam1"]["kernel_drops"]
            assert isinstance(kernel, int) and kernel > 0, rows["cam1"]
            assert st["drops"]["engine_unknown_type"] + kernel == burst      # every datagram accounted for
            assert sum(v for k, v in st["drops"].items() if k.startswith("signaling_")) == 1, st["drops"]
            assert {k: st["drops"].get(k) for k in ("inject_EAGAIN", "dhcp_not_request", "arp_short", "arp_edge_ENETDOWN",
                                                    "dns_formerr", "dns_edge_upstream_short",
                                                    "worker_drop_no_session")} == \
                {"inject_EAGAIN": 3, "dhcp_not_request": 1, "arp_short": 4, "arp_edge_ENETDOWN": 1, "dns_formerr": 2,
                 "dns_edge_upstream_short": 1, "worker_drop_no_session": 7}
            assert "worker_sealed" not in st["drops"] and "worker_ports" not in st["drops"]
            assert all(isinstance(rows[k]["kernel_drops"], int) for k in ("adapter", "dhcp", "dns"))
            [load] = [h for h in st["health"] if h["code"] == "under-load"]
            assert f"{kernel} datagrams dropped by the kernel (most on cam1 0.0.0.0:{link.port})" in load["text"]
            rc, out = await cyadm("metrics")
            assert rc == 0, out
            fams = parse(out)
            assert value(fams, "cyphonic_socket_kernel_drops_total", daemon="adapter", socket="cam1") == kernel
            assert value(fams, "cyphonic_drops_total", reason="engine_unknown_type") == burst - kernel
            assert value(fams, "cyphonic_health_warning", code="under-load") == 1
            rc, out = await cyadm("status")
            assert f"kernel dropped {kernel}: cam1 {kernel}" in out and "dropped " in out, out
        finally:
            remove(server, sock_path)
            for lk in ad._all_links():
                lk.host.stop()
                lk.sock.close()
            for s in [cloud, sender, *side]:
                s.close()

    asyncio.run(scenario())
