"""`cyphonic-adapter`: the controller of the CYPHONIC adapter appliance (the paper's Fig. 2 and 4).

One asyncio process that wires the paper's modules together (docs/adapter-design.md); each
lives in its own module and this one only connects them:
- General Node Management: the registry (``general_nodes``) and who is served, with which
  token and port (``enrollment``);
- Signaling: a cloud link per general node, and the adapter's own (``signaling``);
- Address Configuration: DHCP on the LAN port (``address_config``, ``leases``, ``dhcp_server``);
- Resolver: DNS on the LAN port, a query brings up the asking general node's tunnel
  (``resolver``);
- Interface Handling: proxy ARP, injection toward a general node (``interface_handling``),
  the LAN port's address and routes (``netlink``);
- Packet Handling: the packet filter (``packet_filter``), the NFQUEUE workers that seal
  (``packet_handling``, ``worker_pool``), the sessions they seal with (``sessions``) and the
  way back that the controller opens, checks and injects (``way_back``);
- ``cyadm``'s status socket (``status``).

The timers and limits are in ``constants``. Never: run a packet-path or netlink call that can
block on the event loop (netlink goes through a thread), or let a command's failure take the
status socket down (it answers ``{"error": ...}``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
import time
from collections import Counter

from cyphonic import events as ev
from cyphonic import signaling as sg
from cyphonic.driver import patiently, run_until_signalled
from cyphonic.health import Health, LoadWatch, Warning
from cyphonic.metrics_file import MetricsFile
from cyphonic.node.engine import TunnelUp
from cyphonic.node.engine_host import TIMESTAMP_FLOOR_FILE, TimestampFloorFile, ptr_name
from cyphonic.node.packet_handling import DataPathSelector, run_on_data_path, sample_idle_cpus
from cyphonic.socket_stats import kernel_drop_counts
from cyphonic.status_socket import remove as remove_status, serve_status

from . import netlink
from . import packet_filter as pf
from . import status
from .address_config import Binding, DhcpServer
from .config import AdapterConfig
from .constants import SELF_MAC, STATS_EVERY_S, SYNC_S
from .dhcp_server import serve_dhcp
from .enrollment import Enrollment
from .general_nodes import GeneralNode, GeneralNodeError, Registry
from .interface_handling import ArpResponder, Injector, OverlayArpPolicy, interface_mac, serve_arp
from .leases import LeaseStore
from .resolver import AdapterResolver
from .sessions import SessionInstaller
from .signaling import Link, Signaling
from .unknown_macs import UnknownMacs
from .way_back import WayBack
from .worker_pool import WorkerPool


class Adapter:
    def __init__(self, cfg: AdapterConfig, *, out=None, selector: DataPathSelector | None = None) -> None:
        self.cfg = cfg
        self.out = out or sys.stdout
        self.selector = selector    # the event loop's DataPathSelector: the way back runs from select()
        self.clock = time.time
        self.started = self.clock()
        self.health = Health()
        self.load = LoadWatch()               # under-load: cookie replies, kernel drops, drops climbing
        self.metrics_file = MetricsFile(cfg.metrics_file, self.status, log=self.log)
        self.drops: Counter = Counter()
        self.registry = Registry(cfg.state_dir)
        self.leases = LeaseStore(os.path.join(cfg.state_dir, "leases.json"), log=self.log)
        self.unknown_macs = UnknownMacs(os.path.join(cfg.state_dir, "unknown_macs.json"), log=self.log)
        self.unknown_macs.load()
        # One reservation under the handshake timestamps of every identity this process runs
        # (cyphonic.timestamp_floor: they share the clock): one fsync'd write per 5 minutes
        # however many general nodes, where the adapter's own identity always kept it.
        # (140ca15 to f6e22d4 kept one per general node: folded in once, the highest wins.)
        self.timestamps = TimestampFloorFile(
            os.path.join(self.registry.identity_dir(GeneralNode(SELF_MAC, "")), TIMESTAMP_FLOOR_FILE),
            clock=self.clock, log=self.log, drops=self.drops,
            merge_glob=os.path.join(cfg.state_dir, "gn", "*", TIMESTAMP_FLOOR_FILE))
        self.prefix = ipaddress.IPv4Network(cfg.prefix)
        self.links: dict[str, Link] = {}       # mac -> the general node's link
        self.self_link: Link | None = None     # the adapter's own identity
        self.signaling = Signaling(cfg, health=self.health, log=self.log, clock=self.clock)
        self.enrollment = Enrollment(cfg, self.registry, on_added=self._on_gn_added, log=self.log, drops=self.drops)
        self.resolver = AdapterResolver(cfg, self.registry, self.links, clock=self.clock, log=self.log,
                                        drops=self.drops)
        self.pool: WorkerPool | None = None
        self.way_back: WayBack | None = None
        self.injector: Injector | None = None
        self.dhcp = self.arp = self.status_server = None
        self.filter_mode = ""
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def log(self, line: str) -> None:
        print(f"cyphonic-adapter: {line}", file=self.out, flush=True)

    # --- start / stop ------------------------------------------------------------------------

    async def run(self) -> int:
        await run_until_signalled(self.start, self.close, self._stop)
        return 0

    async def _resolve_cloud(self) -> None:
        """A cloud name that does not resolve yet (the appliance booted before the network or its
        DNS server) is tried again, every 1 s doubling to 30 s, with a log line each: no crash loop."""
        from .config import AdapterConfigError
        await patiently(self.signaling.resolve, retry_on=AdapterConfigError, log=self.log,
                        final=lambda exc: "cloud_nms" in str(exc))

    async def start(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        if self.registry.warning:
            self.log(self.registry.warning)
        await asyncio.to_thread(netlink.setup_lan, cfg.lan_interface, cfg.lan_address)
        self.signaling.wan_addr = await asyncio.to_thread(netlink.first_address, cfg.wan_interface)
        await self._resolve_cloud()                         # the cloud's names -> its instances, once
        self.injector = Injector(cfg.lan_interface)
        self.way_back = WayBack(self.injector.inject, selector=self.selector,
                                busy_poll_s=cfg.busy_poll_us / 1e6, drops=self.drops, clock=self.clock,
                                batch_injector=self.injector if cfg.inject_batch else None)
        self.pool = WorkerPool(cfg.nworkers, cfg.queue_first, worker_args=self._worker_args,
                               add_reader=loop.add_reader, remove_reader=loop.remove_reader,
                               on_message=self._on_miss, health=self.health, log=self.log, clock=self.clock)
        self._start_self()
        for gn in list(self.registry.nodes.values()):
            self._start_gn(gn)
        self.enrollment.enroll_configured(self.clock(), starting=True)   # before the workers fork: they get the sockets
        self.filter_mode = await asyncio.to_thread(pf.load, pf.PacketFilterConfig(
            lan_if=cfg.lan_interface, wan_if=cfg.wan_interface, prefix=cfg.prefix, lan_address=cfg.lan_address,
            queues=(cfg.queue_first, cfg.nworkers), mtu=cfg.mtu, passthrough=cfg.passthrough))
        self.log(f"packet filter loaded ({self.filter_mode} NFQUEUE path), queues "
                 f"{cfg.queue_first}..{cfg.queue_first + cfg.nworkers - 1}")
        self.pool.start()
        self.dhcp = await serve_dhcp(DhcpServer(
            server_ip=cfg.lan_address, netmask=str(self.prefix.netmask), router=cfg.lan_address,
            dns=cfg.lan_address, domain=self.enrollment.domain() or "overlay", mtu=cfg.mtu, lease_s=cfg.lease_s,
            bindings=self._binding, leases=self.leases, log=self.log, on_no_binding=self._no_binding),
            cfg.lan_interface)
        policy = OverlayArpPolicy(cfg.prefix, gateway=cfg.lan_address, vip_of_mac=self.enrollment.vip_of_mac,
                                  local_vips=lambda: {link.gn.vip4 for link in self.links.values() if link.gn.vip4})
        self.arp = await serve_arp(ArpResponder(interface_mac(cfg.lan_interface), answer_for=policy),
                                   cfg.lan_interface)
        self.status_server = await serve_status(cfg.status_socket, self._command)
        if self.enrollment.domain():
            await self.resolver.start(self.enrollment.domain())
        self._tasks.append(loop.create_task(self._sync_loop()))
        if self.way_back.reply_wait is not None:
            self._tasks.append(loop.create_task(sample_idle_cpus(self.way_back.reply_wait, self._stop)))
        self.log(f"started: LAN {cfg.lan_interface} ({cfg.lan_address}), WAN {cfg.wan_interface}, "
                 f"{len(self.links)} general nodes, {cfg.nworkers} workers")

    async def close(self) -> None:
        self._stop.set()
        self.metrics_file.remove()         # stopped: no metrics, rather than frozen ones
        for t in self._tasks:
            t.cancel()
        for link in self._all_links():
            link.host.stop()           # goodbye to the cloud, no more timers
        if self.pool is not None:
            self.pool.stop()
        await asyncio.to_thread(pf.unload)
        self.unknown_macs.flush(self.clock(), force=True)
        for x in (self.dhcp, self.arp, self.resolver):
            if x is not None:
                x.close()
        for link in self._all_links():
            if self.way_back is not None:
                self.way_back.unwatch(link)
            link.close()
        if self.way_back is not None:
            self.way_back.close()
        if self.status_server is not None:
            remove_status(self.status_server, self.cfg.status_socket)
        self.log("stopped: packet filter removed, workers stopped")

    # --- links: the general nodes' and the adapter's own -------------------------------------

    def _all_links(self) -> list[Link]:
        return ([self.self_link] if self.self_link is not None else []) + list(self.links.values())

    def _start_self(self) -> None:
        """The adapter's own identity: a node of the overlay in its own right (its cloud link is
        what `cyadm status` reports first; it carries no general node's traffic)."""
        name = self.cfg.name or socket.gethostname().split(".")[0].lower()
        me = GeneralNode(SELF_MAC, name, token=self.cfg.token)
        me.extra["port"] = self.cfg.port
        self.self_link = self._open_link(me, self.cfg.port, who="adapter", subject="adapter",
                                         deliver=self._to_adapter_itself, on_event=self._on_self_event)
        self.self_link.host.start()

    def _start_gn(self, gn: GeneralNode) -> Link:
        link = self._open_link(gn, self.enrollment.port_of(gn), who=f"general node {gn.name} ({gn.mac})",
                               subject=gn.name, deliver=self.way_back.deliver,
                               on_event=lambda e: self._on_gn_event(link, e))
        self.links[gn.mac] = link
        if self.pool is not None:
            self.pool.add_port(link.port, link.sock)   # the running workers get its socket (none yet at start)
        self._install_sessions(link)
        link.host.start()
        return link

    def _open_link(self, gn: GeneralNode, port: int, *, who: str, subject: str, deliver, on_event) -> Link:
        identity = self.registry.identity(gn)     # <state_dir>/gn/<mac>/ (0600)
        link = self.signaling.open(gn, identity, port, self.enrollment.login_token(gn, bool(identity.certificate)),
                                   who=who, subject=subject, deliver=deliver, on_event=on_event,
                                   after_round=self.resolver.flush, timestamps=self.timestamps,
                                   records_path=os.path.join(self.registry.identity_dir(gn), "peers.json"))
        if gn.mac != SELF_MAC:
            self.resolver.attach(link)
            link.host.clock_warning = False    # one clock: the adapter's own link says `clock-off`
        self.way_back.watch(link, to_general_node=gn.mac != SELF_MAC)
        return link     # (not started yet: its event handler may need it bound first)

    def _stop_gn(self, mac: str) -> None:
        link = self.links.pop(mac, None)
        if link is None:
            return
        if link.sessions is not None:
            link.sessions.close()
        link.host.stop()
        self.signaling.forget(link)
        self.way_back.unwatch(link)
        if self.pool is not None:
            self.pool.close_port(link.port)   # the workers' copies of the socket too: the port is freed
        link.close()

    def _on_gn_added(self, gn: GeneralNode, starting: bool) -> None:
        """A general node was enrolled: start it. The running workers get its socket over their
        pipes (``WorkerPool.add_port``), so none restarts and no other general node's packet in
        a queue is lost."""
        self.unknown_macs.forget(gn.mac)
        self._start_gn(gn)

    def _worker_args(self) -> tuple:
        return ({link.port: link.sock for link in self.links.values()}, self.way_back.heads_up,
                self.cfg.mtu if self.cfg.nfq_gso else 0)

    def _to_adapter_itself(self, packet: bytes) -> None:
        self.drops["to_adapter_itself"] += 1     # the adapter's identity carries no data

    # --- sessions into the workers --------------------------------------------------------------

    def _install_sessions(self, link: Link) -> None:
        """The general node's session installer, once its virtual IP is known (a new one if it changed)."""
        gn_vip = ipaddress.IPv4Address(link.gn.vip4).packed if link.gn.vip4 else None
        if link.sessions is not None and link.sessions.gn_vip4 == gn_vip:
            return
        if link.sessions is not None:
            link.sessions.close()
        link.sessions = SessionInstaller(gn_vip, link.port, self.pool, stream_ids=link.stream_ids,
                                         drops=self.drops) if gn_vip else None

    def _sync(self, link: Link, now: float) -> None:
        device = link.engine.device
        if link.sessions is not None and device is not None:
            link.sessions.sync(device, now)

    def _sync_all(self, now: float) -> None:
        for link in self.links.values():
            self._sync(link, now)
            link.host.flush()

    def _on_miss(self, msg: tuple) -> None:
        """A worker had a packet with no session: install it if the tunnel is up, else bring the
        tunnel up (a packet brings a tunnel up as a query does)."""
        _, gn_vip, peer_vip = msg
        link = next((link for link in self.links.values() if link.sessions is not None
                     and link.sessions.gn_vip4 == gn_vip), None)
        if link is None:
            return
        now = self.clock()
        device = link.engine.device
        known = device.peers_by_vip.get(peer_vip) if device is not None else None
        if known is not None and known.sendable(now) is not None:
            self._sync(link, now)              # the tunnel is up: the worker lacks it yet
        elif known is not None:
            # A peer without a session: restored from its record after a restart (maybe with the
            # cloud down), or its session lapsed. Bring it up by name, as a query would.
            link.engine.resolve(known.fqdn, now)
        else:
            peer = ipaddress.IPv4Address(peer_vip)
            if peer in self.prefix:
                link.engine.resolve(ptr_name(str(peer)), now)
        link.host.flush()

    async def _sync_loop(self) -> None:
        """The periodic work. A failure is counted and logged once per kind, and the loop goes
        on: it is what restarts workers and keeps every tunnel's keys fresh."""
        next_stats = 0.0
        while not self._stop.is_set():
            await asyncio.sleep(SYNC_S)
            try:
                next_stats = self._sync_round(next_stats)
            except Exception as exc:  # noqa: BLE001
                self._periodic_failed(exc)

    def _periodic_failed(self, exc: Exception) -> None:
        what = "sync_loop_" + type(exc).__name__
        self.drops[what] += 1
        if self.drops[what] == 1:
            self.log(f"periodic work failed: {type(exc).__name__}: {exc}")

    def _sync_round(self, next_stats: float) -> float:
        now = self.clock()
        self.pool.supervise(now)           # a new worker has a new generation: synced below
        if self.enrollment.retry_due(now):
            self.enrollment.enroll_configured(now)
        for link in list(self.links.values()):
            try:                               # one general node's trouble must not starve the others
                if link.engine.device is not None:
                    link.engine.device.maintain(now)   # rekeys by age: the workers' traffic is not seen here
                self._sync(link, now)
                link.host.flush()
                link.host.poke()               # deadlines the way back moved (keepalives)
            except Exception as exc:  # noqa: BLE001
                self._periodic_failed(exc)
        self.self_link.host.poke()
        if now >= next_stats:
            next_stats = now + STATS_EVERY_S
            self.pool.ask_stats()
            self.health.observe(now, self._conditions(now))   # (and at every status request)
        self.metrics_file.tick(now)
        self.unknown_macs.flush(now)       # written at most every few seconds, not per DHCP packet
        return next_stats

    # --- events ------------------------------------------------------------------------------------

    def _on_self_event(self, e) -> None:
        if isinstance(e, sg.LoggedIn):
            self._follow_domain(e.domain)

    def _follow_domain(self, domain: str) -> None:
        """The overlay's domain, as the cloud says at login, is the general nodes' DHCP search
        domain (option 15) from then on: a freshly set-up adapter knows it only after a login,
        and a general node is bound (given a lease) only after its own login, which comes here
        first."""
        if domain and self.dhcp is not None and self.dhcp.server.domain != domain:
            self.dhcp.server.set_domain(domain)
            self.log(f"DHCP domain: {domain}")

    def _on_gn_event(self, link: Link, e) -> None:
        """What only the adapter does with a general node's event (``EngineHost`` logged it, and
        told the Resolver of tunnels)."""
        if isinstance(e, sg.LoggedIn):
            gn = link.gn
            self.registry.save_login(gn, e.certificate, e.fqdn, e.vip4, e.prefix_len, e.domain)
            self._follow_domain(e.domain)
            self._install_sessions(link)
            loop = asyncio.get_running_loop()
            loop.create_task(self._route_gn(e.vip4))
            if self.resolver.dns is None:
                loop.create_task(self._start_dns(e.domain))
        elif isinstance(e, (TunnelUp, ev.HandshakeCompleted, ev.EndpointChanged)):
            self._sync(link, self.clock())

    async def _route_gn(self, vip4: str) -> None:
        err = await asyncio.to_thread(netlink.route_to_lan, self.cfg.lan_interface, vip4)
        if err:
            self.log(f"cannot route {vip4} to the LAN: {err}")

    async def _start_dns(self, domain: str) -> None:
        try:
            await self.resolver.start(domain)
        except OSError as exc:
            self.log(f"cannot serve DNS on {self.cfg.lan_address}:53: {exc.strerror or exc}")
            self.health.record(self.clock(), Warning("dns-down", f"{self.cfg.lan_address}:53: {exc.strerror or exc}"))

    def _binding(self, mac: str) -> Binding | None:
        return self.enrollment.binding(mac, may_enroll=not self._stop.is_set())

    def _no_binding(self, mac: str, now: float) -> None:
        """DHCP did not answer ``mac``: recorded for ``cyadm status`` unless it is enrolled (and
        only waiting for its login)."""
        if self.registry.get(mac) is None:
            self.unknown_macs.seen(mac, now)

    # --- cyadm -------------------------------------------------------------------------------------

    def _command(self, req: dict) -> dict:
        cmd = req.get("cmd", "status")
        try:
            if cmd == "status":
                return self.status()
            if cmd == "gn_add":
                gn = self.enrollment.add(req["mac"], req["name"], group=req.get("group", ""),
                                         token=req.get("token", ""))
                return {"ok": True, "mac": gn.mac, "name": gn.name}
            if cmd == "gn_remove":
                gn = self.registry.remove(req["mac"])
                self._stop_gn(gn.mac)
                self.log(f"general node {gn.name} ({gn.mac}) removed")
                return {"ok": True}
            if cmd == "gn_list":
                return {"general_nodes": status.general_node_rows(self.registry, self.leases, self.links,
                                                                  self.clock())}
            return {"error": f"unknown command {cmd}"}
        except (GeneralNodeError, KeyError) as exc:
            return {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the status socket must answer, whatever happened
            self.log(f"command {cmd} failed: {type(exc).__name__}: {exc}")
            return {"error": f"internal error: {type(exc).__name__}: {exc}"}

    def _conditions(self, now: float) -> list[Warning]:
        return (status.conditions(now, self.self_link, self.links, self.pool, self.enrollment, self.leases)
                + self.load.conditions(now, self._load_sample) + self.metrics_file.conditions())

    def _load_sample(self) -> dict:
        """What ``under-load`` compares between two samples (``cyphonic.health.LoadWatch``)."""
        return {"cookie_replies": {link.host.subject: link.engine.device.counters.get("cookie_replies_sent", 0)
                                   for link in self._all_links() if link.engine.device is not None},
                "kernel_drops": kernel_drop_counts(self._socket_rows()), "drops": self._drop_counts()}

    def _drop_counts(self) -> dict:
        return status.drop_counts(links=self._all_links(), own=self.drops, injector=self.injector, dhcp=self.dhcp,
                                  arp=self.arp, resolver=self.resolver, pool=self.pool)

    def _socket_rows(self) -> list[dict]:
        queues = range(self.cfg.queue_first, self.cfg.queue_first + self.cfg.nworkers) \
            if self.pool is not None and self.pool.workers else None
        return status.socket_rows(links=self._all_links(), dhcp=self.dhcp, arp=self.arp, resolver=self.resolver,
                                  queues=queues)

    def status(self) -> dict:
        now = self.clock()
        self.health.observe(now, self._conditions(now))
        wait = self.way_back.reply_wait if self.way_back is not None else None
        return status.document(
            cfg=self.cfg, pid=os.getpid(), now=now, started=self.started, self_link=self.self_link,
            links=self.links, registry=self.registry, leases=self.leases,
            pool=self.pool, health=self.health.report(now), filter_mode=self.filter_mode, dhcp=self.dhcp,
            arp=self.arp, dns=self.resolver.counters(), reply_wait=wait, selector=self.selector,
            drops=self._drop_counts(), sockets=self._socket_rows(),
            unknown_macs=self.unknown_macs.status(),
            way_back_batches=self.way_back.batch if self.way_back is not None else None)


def main(argv: list[str] | None = None) -> int:
    import argparse
    from .config import AdapterConfigError, load_config
    ap = argparse.ArgumentParser(prog="cyphonic-adapter")
    ap.add_argument("--config", default="/etc/cyphonic/adapter.toml")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        return run_on_data_path(lambda selector: Adapter(cfg, selector=selector))
    except (AdapterConfigError, pf.PacketFilterError, GeneralNodeError, OSError) as exc:
        print(f"cyphonic-adapter: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
