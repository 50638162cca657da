"""`cyphonic-adapter`: the controller of the CYPHONIC adapter appliance (the paper's Fig. 2 and 4).

One asyncio process that joins the parts (docs/adapter-design.md):
- General Node Management: the registry of general nodes (GNs) by MAC, an
  identity and a ``NodeEngine`` per GN (its own UDP port on the WAN side);
- Address Configuration: DHCP on the LAN port, the GN's virtual IP as its address;
- Resolver: DNS on the LAN port; a GN's query brings up *that GN's* tunnel;
- Interface Handling: proxy ARP for overlay addresses, injection toward the GN;
- Packet Handling: the packet filter and the NFQUEUE worker pool (sealing);
  the controller opens, checks and injects the way back;
- the status socket for ``cyadm``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import Counter

from pyroute2 import IPRoute

from cyphonic import constants as C
from cyphonic import events as ev
from cyphonic import signaling as sg
from cyphonic.cloud.keys import parse_cloud_key
from cyphonic.datachannel import OPENED, RECV_BUFFER, RECV_STAGE
from cyphonic.node.daemon import ptr_name
from cyphonic.status_socket import remove as remove_status, serve_status
from cyphonic.node.engine import NodeEngine, RelayPath, Resolved, TunnelFailed, TunnelUp
from cyphonic.node.packet_handling import DataPathSelector, sample_idle_cpus
from cyphonic.wire import signaling as sig

from . import packet_filter as pf
from .address_config import Binding, DhcpServer
from .config import AdapterConfig
from .dhcp_server import serve_dhcp
from .general_nodes import GeneralNodeError, Registry
from .interface_handling import ArpResponder, Injector, OverlayArpPolicy, interface_mac, serve_arp
from .leases import LeaseStore
from .packet_handling import ReplyWait, worker_main

SYNC_S = 0.25
CONFIG_GN_RETRY_S = 30.0     # general_nodes from the config that could not be enrolled: tried again
MAX_STREAMS_PER_KEY = C.MAX_RECEIVE_STREAMS_PER_SESSION - 1


def _ipr(fn):
    with IPRoute() as ipr:
        return fn(ipr)


def _first_addr(ifname: str) -> str | None:
    def q(ipr):
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        for a in ipr.get_addr(index=idx[0], family=socket.AF_INET):
            return a.get_attr("IFA_ADDRESS")
        return None
    return _ipr(q)


class GnRuntime:
    def __init__(self, gn, engine: NodeEngine, sock: socket.socket, port: int) -> None:
        self.gn = gn
        self.engine = engine
        self.sock = sock
        self.port = port
        self.paths: dict[str, str] = {}
        self.installed: dict[bytes, tuple] = {}   # peer vip -> (keypair id, endpoint, worker generation)
        self.routed = False


class Adapter:
    def __init__(self, cfg: AdapterConfig, *, out=None, selector: DataPathSelector | None = None) -> None:
        self.cfg = cfg
        self.selector = selector   # the event loop's DataPathSelector: the way back runs from select()
        self.heads_up = -1                          # eventfd the workers write before a lone packet
        self.reply_wait: ReplyWait | None = None
        self.out = out or sys.stdout
        self.ca_public, self.cloud_static = parse_cloud_key(cfg.cloud_key)
        self.registry = Registry(cfg.state_dir)
        self.leases = LeaseStore(os.path.join(cfg.state_dir, "leases.json"), log=self.log)
        self.prefix = ipaddress.IPv4Network(cfg.prefix)
        self.gns: dict[str, GnRuntime] = {}          # mac -> runtime
        self.workers: list[dict] = []                # {"proc", "conn", "queue", "generation", "stats"}
        self.worker_restarts = 0
        self._streams: dict[int, int] = {}           # id(keypair) -> next stream id
        self._keypairs: dict[int, object] = {}       # keep keypairs alive while their id is in use
        self.health_events: list = []
        self.drops: Counter = Counter()
        self._stop = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None
        self.injector: Injector | None = None
        self.resolver = None
        self.dns = None
        self._dns_starting = False
        self.dhcp = None
        self.arp = None
        self.started = time.time()
        self.config_gn_pending: dict[str, str] = {}   # mac -> why general_nodes could not enroll it
        self._config_gn_next = 0.0
        self._token_file_warning = ""
        self.filter_mode = ""
        self.wan_addr: str | None = None

    def log(self, line: str) -> None:
        print(f"cyphonic-adapter: {line}", file=self.out, flush=True)

    # --- start / stop ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, self._stop.set)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.close()
        return 0

    async def start(self) -> None:
        cfg = self.cfg
        if self.registry.warning:
            self.log(self.registry.warning)
        await asyncio.to_thread(self._setup_lan)
        # pyroute2's synchronous API runs its own event loop: only ever from a worker thread
        self.wan_addr = await asyncio.to_thread(_first_addr, cfg.wan_interface)
        self.injector = Injector(cfg.lan_interface)
        if self.selector is not None and cfg.busy_poll_us:
            # the workers' heads-up before a lone packet (packet_handling.ReplyWait)
            self.heads_up = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.reply_wait = ReplyWait(cfg.busy_poll_us / 1e6, self.selector.spin, self.selector.stop_spin)
            self.selector.add_fast_reader(self.heads_up, self._on_heads_up)
        self._start_self()
        for gn in list(self.registry.nodes.values()):
            self._start_gn(gn)
        self._enroll_configured(starting=True)   # before the workers fork: they get the sockets
        self.filter_mode = await asyncio.to_thread(pf.load, pf.PacketFilterConfig(
            lan_if=cfg.lan_interface, wan_if=cfg.wan_interface, prefix=cfg.prefix, lan_address=cfg.lan_address,
            queues=(cfg.queue_first, cfg.nworkers), mtu=cfg.mtu, passthrough=cfg.passthrough))
        self.log(f"packet filter loaded ({self.filter_mode} NFQUEUE path), queues "
                 f"{cfg.queue_first}..{cfg.queue_first + cfg.nworkers - 1}")
        self._start_workers()
        self.dhcp = await serve_dhcp(DhcpServer(
            server_ip=cfg.lan_address, netmask=str(self.prefix.netmask), router=cfg.lan_address,
            dns=cfg.lan_address, domain=self._domain() or "overlay", mtu=cfg.mtu, lease_s=cfg.lease_s,
            bindings=self._binding, leases=self.leases, log=self.log), cfg.lan_interface)
        policy = OverlayArpPolicy(cfg.prefix, gateway=cfg.lan_address,
                                  vip_of_mac=lambda mac: self._vip_of_mac(mac),
                                  local_vips=lambda: {r.gn.vip4 for r in self.gns.values() if r.gn.vip4})
        self.arp = await serve_arp(ArpResponder(interface_mac(cfg.lan_interface), answer_for=policy),
                                   cfg.lan_interface)
        self.status_server = await serve_status(cfg.status_socket, self._command)
        if self._domain():
            await self._start_dns(self._domain())
        self._tasks = [asyncio.get_running_loop().create_task(self._sync_loop())]
        if self.reply_wait is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(sample_idle_cpus(self.reply_wait, self._stop)))
        self.log(f"started: LAN {cfg.lan_interface} ({cfg.lan_address}), WAN {cfg.wan_interface}, "
                 f"{len(self.gns)} general nodes, {cfg.nworkers} workers")

    def _setup_lan(self) -> None:
        cfg = self.cfg

        def q(ipr):
            idx = ipr.link_lookup(ifname=cfg.lan_interface)
            if not idx:
                raise pf.PacketFilterError(f"LAN interface {cfg.lan_interface} not found")
            idx = idx[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
            if cfg.lan_address not in have:
                ipr.addr("add", index=idx, address=cfg.lan_address, prefixlen=32)
            ipr.link("set", index=idx, state="up")
        _ipr(q)

    async def close(self) -> None:
        self._stop.set()
        for t in getattr(self, "_tasks", []):
            t.cancel()
        for r in self._runtimes():
            r.engine.stop(time.time())
            self._send_out(r)
        for w in self.workers:
            try:
                w["conn"].send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for w in self.workers:
            w["proc"].join(2)
            if w["proc"].is_alive():
                w["proc"].kill()
        await asyncio.to_thread(pf.unload)
        for x in (self.dhcp, self.arp, self.dns):
            if x is not None:
                x.close()
        for r in self._runtimes():
            self._unwatch_udp(r)
            r.sock.close()
        if self.heads_up >= 0:
            self.selector.remove_fast_reader(self.heads_up)
            os.close(self.heads_up)
            self.heads_up = -1
        if getattr(self, "status_server", None) is not None:
            remove_status(self.status_server, self.cfg.status_socket)
        self.log("stopped: packet filter removed, workers stopped")

    # --- general nodes --------------------------------------------------------------------------

    def _domain(self) -> str:
        for gn in self.registry.nodes.values():
            if gn.domain:
                return gn.domain
        return ""

    def _gn_token(self) -> str:
        """The adapter's enrollment token: gn_token, else the one kept in gn_token_file (read when
        needed; unreadable = no token, logged once and shown by cyadm)."""
        if self.cfg.gn_token or not self.cfg.gn_token_file:
            return self.cfg.gn_token
        from .config import read_token_file
        try:
            return read_token_file(self.cfg.gn_token_file)
        except OSError as exc:
            warning = f"cannot read gn_token_file {self.cfg.gn_token_file}: {exc.strerror}"
            if warning != self._token_file_warning:
                self.log(warning)
            self._token_file_warning = warning
            return ""

    def _enroll_configured(self, starting: bool = False) -> None:
        """The config's general_nodes: each MAC not in the registry yet is enrolled as `cyadm gn add`
        does. Idempotent (a MAC already enrolled is left as it is, whatever its name there); a
        failure is logged, shown by cyadm as a `gn-config` warning and tried again every
        CONFIG_GN_RETRY_S. A MAC that was enrolled and is later removed with `cyadm gn remove`
        stays removed until the next start."""
        todo = self.cfg.general_nodes if starting else \
            [c for c in self.cfg.general_nodes if c.mac in self.config_gn_pending]
        for c in todo:
            if self.registry.get(c.mac) is not None:
                self.config_gn_pending.pop(c.mac, None)
                continue
            try:
                gn = self.registry.add(c.mac, c.name, group=c.group)
            except GeneralNodeError as exc:
                if self.config_gn_pending.get(c.mac) != str(exc):
                    self.log(f"general node {c.name} ({c.mac}) from the config not enrolled: {exc}; "
                             f"trying again every {CONFIG_GN_RETRY_S:.0f} s")
                self.config_gn_pending[c.mac] = str(exc)
                continue
            self.config_gn_pending.pop(c.mac, None)
            r = self._start_gn(gn)
            if not starting:
                self._restart_workers_with(r)
            self.log(f"general node {gn.name} ({gn.mac}) added from the config")
        self._config_gn_next = time.time() + CONFIG_GN_RETRY_S

    def _binding(self, mac: str) -> Binding | None:
        gn = self.registry.get(mac)
        if gn is None and self.cfg.auto_enroll and not self._stop.is_set():
            gn = self._auto_enroll(mac)
        if gn is None or not gn.vip4:
            return None  # not enrolled, or not logged in yet: the client asks again later
        return Binding(gn.mac, gn.vip4, gn.name)

    def _auto_enroll(self, mac: str):
        """auto_enroll (off by default): an unknown MAC becomes a general node named after it."""
        try:
            gn = self.registry.add(mac, "gn-" + mac.replace(":", "")[-6:], auto=True)
        except GeneralNodeError as exc:
            self.drops["auto_enroll_refused"] += 1
            self.log(f"auto-enroll of {mac} refused: {exc}")
            return None
        self.log(f"auto-enrolled {mac} as {gn.name}")
        self._restart_workers_with(self._start_gn(gn))
        return gn

    def _vip_of_mac(self, mac: bytes) -> str | None:
        gn = self.registry.get(":".join(f"{b:02x}" for b in mac))
        return gn.vip4 if gn else None

    def _start_self(self) -> None:
        """The adapter's own identity: a node of the overlay in its own right (its cloud link is
        what `cyadm status` reports first; it carries no general node's traffic)."""
        import socket as _s
        from appliance.general_nodes import GeneralNode
        name = self.cfg.name or _s.gethostname().split(".")[0].lower()
        me = GeneralNode("02:00:00:00:00:00", name, token=self.cfg.token)
        ident = self.registry.identity(me)   # kept under <state_dir>/gn/020000000000/ (0600)
        me.extra["port"] = self.cfg.port
        self.self_rt = self._start_engine(me, ident, self.cfg.port)

    def _gn_port(self, gn) -> int:
        """Each general node keeps its own WAN port for as long as it is enrolled (stored in the
        registry; the lowest free one from gn_port_base when it is added)."""
        port = gn.extra.get("port")
        if not port:
            taken = {g.extra.get("port") for g in self.registry.nodes.values() if g is not gn}
            port = next(p for p in range(self.cfg.gn_port_base, self.cfg.gn_port_base + 1024) if p not in taken)
            gn.extra["port"] = port
            self.registry.save()
        return port

    def _start_gn(self, gn) -> GnRuntime:
        r = self._start_engine(gn, self.registry.identity(gn), self._gn_port(gn))
        self.gns[gn.mac] = r
        return r

    def _start_engine(self, gn, identity, port: int) -> GnRuntime:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
        wan = self.wan_addr
        token = "" if identity.certificate else gn.token or self._gn_token()  # read only when needed
        engine = NodeEngine(identity, self.ca_public, self.cloud_static, self.cfg.cloud_addr,
                            token=b"" if identity.certificate else token.encode(), name_hint=gn.name,
                            nms_addr=self.cfg.nms_addr,
                            local_endpoints=[sig.Endpoint(wan, port)] if wan else [])
        r = GnRuntime(gn, engine, s, port)
        self._watch_udp(r)
        engine.start(time.time())
        self._flush(r)
        return r

    # --- workers ------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        for i in range(self.cfg.nworkers):
            self.workers.append(self._spawn_worker(i, generation=0))

    def _spawn_worker(self, i: int, generation: int) -> dict:
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        sockets = {r.port: r.sock for r in self.gns.values()}
        queue = self.cfg.queue_first + i
        proc = ctx.Process(target=worker_main, args=(i, queue, child, sockets, self.heads_up), daemon=True,
                           name=f"cyphonic-worker-{i}")
        proc.start()
        child.close()
        w = {"index": i, "proc": proc, "conn": parent, "queue": queue, "generation": generation,
             "stats": {}, "started": time.time()}
        asyncio.get_running_loop().add_reader(parent.fileno(), self._on_worker, w)
        return w

    def _on_worker(self, w: dict) -> None:
        try:
            while w["conn"].poll():
                msg = w["conn"].recv()
                if msg[0] == "miss":
                    self._on_miss(msg[1], msg[2])
                elif msg[0] == "stats":
                    w["stats"] = msg[1]
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(w["conn"].fileno())
            w["dead"] = True

    def _supervise(self) -> None:
        """Restart a dead worker; its sessions are installed again with fresh stream ids."""
        if self._stop.is_set():
            return  # shutting down: workers are being stopped on purpose
        for i, w in enumerate(self.workers):
            if w.get("dead") or not w["proc"].is_alive():
                try:
                    asyncio.get_running_loop().remove_reader(w["conn"].fileno())
                except (ValueError, OSError):
                    pass
                code = w["proc"].exitcode
                self.worker_restarts += 1
                self.log(f"worker {i} (pid {w['proc'].pid}) died (exit {code}); restarting")
                self.health_events.append(("worker-restarted", "warning",
                                           f"worker {i} died (exit {code}) and was restarted", time.time()))
                self.workers[i] = self._spawn_worker(i, w["generation"] + 1)
                for r in self.gns.values():
                    r.installed.clear()  # reinstall everywhere, fresh stream ids

    def _on_miss(self, gn_vip: bytes, peer_vip: bytes) -> None:
        gn_ip = str(ipaddress.IPv4Address(gn_vip))
        for r in self.gns.values():
            if r.gn.vip4 == gn_ip:
                if r.engine.device is not None and peer_vip in r.engine.device.peers_by_vip:
                    self._sync_sessions(r, time.time())  # the tunnel is up: the worker lacks it yet
                    return
                peer = str(ipaddress.IPv4Address(peer_vip))
                if ipaddress.IPv4Address(peer) in self.prefix:
                    r.engine.resolve(ptr_name(peer), time.time())
                    self._flush(r)
                return

    def _sync_sessions(self, r: GnRuntime, now: float) -> None:
        """Install each live send session into every worker, each with a fresh stream id."""
        device = r.engine.device
        if device is None or not r.gn.vip4:
            return
        gn_vip = ipaddress.IPv4Address(r.gn.vip4).packed
        gen = tuple(w["generation"] for w in self.workers)
        for peer_vip, peer in list(device.peers_by_vip.items()):
            kp = peer.sendable(now)
            if kp is None or peer.endpoint is None:
                if peer_vip in r.installed:
                    del r.installed[peer_vip]
                    for w in self.workers:
                        self._send_worker(w, ("untx", gn_vip, peer_vip))
                continue
            ep = peer.endpoint
            endpoint = ("relay", ep.trs, ep.session_id) if isinstance(ep, RelayPath) else tuple(ep)
            want = (id(kp), endpoint, gen)
            if r.installed.get(peer_vip) == want:
                continue
            first = self._streams.get(id(kp), 1)
            if first + len(self.workers) > MAX_STREAMS_PER_KEY:
                device._begin_handshake(peer, now)  # out of stream ids for this key: rekey
                continue
            self._streams[id(kp)] = first + len(self.workers)
            self._keypairs[id(kp)] = kp
            for i, w in enumerate(self.workers):
                self._send_worker(w, ("tx", gn_vip, peer_vip, kp.keys.send_key, kp.keys.remote_index,
                                      first + i, endpoint, r.port))
            r.installed[peer_vip] = want
        if len(self._keypairs) > 4 * C.MAX_PEERS:
            live = {v[0] for rr in self.gns.values() for v in rr.installed.values()}
            for k in [k for k in self._keypairs if k not in live]:
                self._keypairs.pop(k, None)
                self._streams.pop(k, None)

    def _send_worker(self, w: dict, msg) -> None:
        try:
            w["conn"].send(msg)
        except (OSError, BrokenPipeError):
            w["dead"] = True

    async def _sync_loop(self) -> None:
        last_stats = 0.0
        while not self._stop.is_set():
            await asyncio.sleep(SYNC_S)
            now = time.time()
            self._supervise()
            if self.config_gn_pending and now >= self._config_gn_next:
                self._enroll_configured()
            for r in self.gns.values():
                if r.engine.device is not None:
                    r.engine.device.maintain(now)
                self._sync_sessions(r, now)
                t = r.engine.get_timer()
                if t is not None and t <= now:  # deadlines the fast path moved (keepalives)
                    r.engine.handle_timer(now)
                self._flush(r)
            if now - last_stats > 1.0:
                last_stats = now
                for w in self.workers:
                    self._send_worker(w, ("stats",))

    # --- the way back and the engines ------------------------------------------------------------

    def _watch_udp(self, r: GnRuntime) -> None:
        if self.selector is not None:
            self.selector.add_fast_reader(r.sock.fileno(), lambda: self._on_udp(r))
        else:
            asyncio.get_running_loop().add_reader(r.sock.fileno(), self._on_udp, r)

    def _unwatch_udp(self, r: GnRuntime) -> None:
        if self.selector is not None:
            self.selector.remove_fast_reader(r.sock.fileno())
        else:
            asyncio.get_running_loop().remove_reader(r.sock.fileno())

    def _on_heads_up(self) -> bool:
        try:
            os.eventfd_read(self.heads_up)
        except BlockingIOError:
            return False
        self.reply_wait.heads_up()
        return False

    def _on_udp(self, r: GnRuntime) -> bool:
        """A general node's socket is readable: open, check and inject the common case here (run
        straight from select() under a DataPathSelector: no asyncio machinery per packet), the rest
        through the engine. Returns True when the engine was used (asyncio has work then)."""
        now = time.time()
        device = r.engine.device if r is not getattr(self, "self_rt", None) else None
        inject = self.injector.inject
        recvfrom_into = r.sock.recvfrom_into
        slow = False
        for _ in range(256):
            try:
                n, addr = recvfrom_into(RECV_STAGE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.drops["udp_error"] += 1
                continue
            if len(addr) > 2:
                addr = addr[:2]
            if device is not None:  # the common case: open, check and inject, nothing copied
                plen = device.fast_receive_staged(n, addr, now)
                if plen is not None:
                    if plen:
                        if self.reply_wait is not None:
                            self.reply_wait.delivered(now)
                        if not inject(OPENED[:plen]):
                            self.drops["inject_failed"] += 1
                    continue
            r.engine.receive_datagram(RECV_BUFFER[0:n], addr, now)
            slow = True
        if slow:
            self._flush(r)
        return slow

    def _send_out(self, r: GnRuntime) -> int:
        out = r.engine.datagrams_to_send()
        for data, addr in out:
            try:
                r.sock.sendto(data, addr)
            except OSError:
                self.drops["udp_send_error"] += 1
        return len(out)

    def _flush(self, r: GnRuntime) -> None:
        for _ in range(64):
            sent = self._send_out(r)
            n = 0
            while (e := r.engine.next_event()) is not None:
                n += 1
                if isinstance(e, ev.PacketReceived):
                    if r is getattr(self, "self_rt", None):
                        self.drops["to_adapter_itself"] += 1  # the adapter's identity carries no data
                    elif not self.injector.inject(e.packet):
                        self.drops["inject_failed"] += 1
                    continue
                self._on_event(r, e)
            if self.dns is not None:
                self.dns.flush()
            if not sent and not n:
                break
        self._arm()

    def _runtimes(self) -> list:
        return list(self.gns.values()) + ([self.self_rt] if getattr(self, "self_rt", None) else [])

    def _arm(self) -> None:
        times = [t for r in self._runtimes() if (t := r.engine.get_timer()) is not None]
        t = min(times) if times else None
        if t == self._armed_for and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = t
        if t is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, t - time.time()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_for = None
        now = time.time()
        for r in self._runtimes():
            t = r.engine.get_timer()
            if t is not None and t <= now:
                r.engine.handle_timer(now)
                self._flush(r)
        self._arm()

    def _on_event(self, r: GnRuntime, e) -> None:
        now = time.time()
        gn = r.gn
        if r is getattr(self, "self_rt", None):
            if isinstance(e, sg.LoggedIn):
                self.self_login = e
                self.log(f"adapter logged in as {e.fqdn} ({e.vip4})" + (" (enrolled)" if e.enrolled else ""))
            elif isinstance(e, sg.LoginFailed):
                self.log(f"adapter login refused: {e.code.name} {e.text}")
            return
        if isinstance(e, sg.LoggedIn):
            self.registry.save_login(gn, e.certificate, e.fqdn, e.vip4, e.prefix_len, e.domain)
            self.log(f"general node {gn.name} ({gn.mac}) logged in as {e.fqdn} ({e.vip4})"
                     + (" (enrolled)" if e.enrolled else ""))
            asyncio.get_running_loop().create_task(self._route_gn(e.vip4))
            if self.dns is None:
                asyncio.get_running_loop().create_task(self._start_dns(e.domain))
        elif isinstance(e, sg.LoginFailed):
            self.log(f"general node {gn.name}: login refused: {e.code.name} {e.text}")
            self.health_events.append(("gn-login-failed", "error", f"{gn.name}: {e.code.name} {e.text}", now))
        elif isinstance(e, sg.Registered):
            self.log(f"general node {gn.name}: registered, observed {e.observed.host}:{e.observed.port}")
        elif isinstance(e, TunnelUp):
            r.paths[e.fqdn] = e.path
            self.log(f"{gn.name}: tunnel up to {e.fqdn} ({e.vip4}) path {e.path}")
            self._sync_sessions(r, now)
            if self.resolver is not None:
                self.resolver.tunnel_up(e.fqdn, e.vip4, now, asker=gn.mac)
        elif isinstance(e, TunnelFailed):
            self.log(f"{gn.name}: tunnel to {e.fqdn} failed: {e.code.name} {e.text}")
            if self.resolver is not None:
                self.resolver.tunnel_failed(e.fqdn, e.code, now, asker=gn.mac)
        elif isinstance(e, (ev.HandshakeCompleted, ev.EndpointChanged)):
            self._sync_sessions(r, now)
        elif isinstance(e, Resolved):
            pass
        elif isinstance(e, sg.CloudLost):
            self.log(f"{gn.name}: cloud link lost: {e.reason}")

    async def _route_gn(self, vip4: str) -> None:
        """A host route to the GN's virtual IP on the LAN port (DNS answers, DHCP unicast)."""
        def q(ipr):
            idx = ipr.link_lookup(ifname=self.cfg.lan_interface)[0]
            try:
                ipr.route("replace", dst=f"{vip4}/32", oif=idx)
            except Exception as exc:  # noqa: BLE001
                return str(exc)
            return None
        err = await asyncio.to_thread(_ipr, q)
        if err:
            self.log(f"cannot route {vip4} to the LAN: {err}")

    # --- DNS -------------------------------------------------------------------------------------

    async def _start_dns(self, domain: str) -> None:
        # Called from start() and from the first login; a general node that logs in while
        # start() is still on its way (general_nodes from the config) must not start it twice.
        if self.dns is not None or self._dns_starting:
            return
        self._dns_starting = True
        try:
            from cyphonic.dns_server import serve_dns
            from cyphonic.node.config import parse_hostport
            from cyphonic.resolver import OverlayResolver
            upstream = (None if self.cfg.dns_upstream == "none"
                        else parse_hostport(self.cfg.dns_upstream, "dns_upstream"))
            resolver = OverlayResolver(domain, prefix=self.cfg.prefix, passthrough=upstream is not None,
                                       hold_s=8.0)
            self.resolver = resolver
            self.dns = await serve_dns(resolver, self.cfg.lan_address, 53, on_resolve=self._dns_resolve,
                                       upstream=upstream, asker_of=self._asker_of)
        finally:
            self._dns_starting = False
        self.log(f"DNS on {self.cfg.lan_address}:53 for *.{domain}")

    def _asker_of(self, client) -> str | None:
        gn = self.registry.by_vip(client[0])
        return gn.mac if gn else None

    def _dns_resolve(self, fqdn: str, asker) -> str | None:
        r = self.gns.get(asker) if asker else None
        if r is None:
            self.drops["dns_unknown_asker"] += 1
            return None
        vip = r.engine.resolve(fqdn, time.time())
        self._flush(r)
        return vip

    # --- status ----------------------------------------------------------------------------------

    def _command(self, req: dict) -> dict:
        cmd = req.get("cmd", "status")
        try:
            if cmd == "status":
                return self.status()
            if cmd == "gn_add":
                gn = self.registry.add(req["mac"], req["name"], group=req.get("group", ""),
                                       token=req.get("token", ""))
                self._restart_workers_with(self._start_gn(gn))
                self.log(f"general node {gn.name} ({gn.mac}) added")
                return {"ok": True, "mac": gn.mac, "name": gn.name}
            if cmd == "gn_remove":
                gn = self.registry.remove(req["mac"])
                r = self.gns.pop(gn.mac, None)
                if r is not None:
                    r.engine.stop(time.time())
                    self._send_out(r)
                    self._unwatch_udp(r)
                    r.sock.close()
                self.log(f"general node {gn.name} ({gn.mac}) removed")
                return {"ok": True}
            if cmd == "gn_list":
                return {"general_nodes": self._gn_rows()}
            return {"error": f"unknown command {cmd}"}
        except (GeneralNodeError, KeyError) as exc:
            return {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the status socket must answer, whatever happened
            self.log(f"command {cmd} failed: {type(exc).__name__}: {exc}")
            return {"error": f"internal error: {type(exc).__name__}: {exc}"}

    def _restart_workers_with(self, r: GnRuntime) -> None:
        """A new GN socket: the workers are forked again at once so they hold it (rare: it happens
        when a general node is added). Their sessions are installed again with fresh stream ids."""
        loop = asyncio.get_running_loop()
        for i, w in enumerate(self.workers):
            self._send_worker(w, ("stop",))
            try:
                loop.remove_reader(w["conn"].fileno())
            except (ValueError, OSError):
                pass
            w["proc"].join(1)
            if w["proc"].is_alive():
                w["proc"].kill()
            self.workers[i] = self._spawn_worker(i, w["generation"] + 1)
        for rr in self.gns.values():
            rr.installed.clear()
            self._sync_sessions(rr, time.time())

    def _worker_tx(self, gn_vip: str, peer_vip: str) -> int:
        key = f"{gn_vip}>{peer_vip}"
        return sum(w["stats"].get("per_session", {}).get(key, 0) for w in self.workers)

    def _gn_rows(self) -> list[dict]:
        now = time.time()
        rows = []
        for mac, gn in self.registry.nodes.items():
            lease = self.leases.get(mac)
            r = self.gns.get(mac)
            rows.append({"mac": mac, "name": gn.name, "fqdn": gn.fqdn or None, "vip4": gn.vip4 or None,
                         "lease_expires_in_s": round(lease.expires - now) if lease and lease.active(now) else None,
                         "cloud": r.engine.signaling.status()["state"] if r else "stopped",
                         "port": r.port if r else None})
        return rows

    def status(self) -> dict:
        now = time.time()
        tunnels = []
        for r in self.gns.values():
            dev = r.engine.device
            if dev is None:
                continue
            for p in dev.peers_by_fqdn.values():
                ps = p.status(now)
                ep = p.endpoint
                tunnels.append({"gn": r.gn.name, "peer": p.fqdn, "vip4": ps["vip4"],
                                "path": r.paths.get(p.fqdn, "-"),
                                "endpoint": str(ep) if isinstance(ep, RelayPath) else
                                (f"{ep[0]}:{ep[1]}" if ep else None),
                                "up": ps["session"], "last_handshake_age_s": ps["last_handshake_age_s"],
                                "rx_bytes": ps["rx_bytes"],
                                "tx_bytes": ps["tx_bytes"] + self._worker_tx(r.gn.vip4, ps["vip4"])})
        workers = [{"index": w["index"], "pid": w["proc"].pid, "alive": w["proc"].is_alive(),
                    "queue": w["queue"], **{k: v for k, v in w["stats"].items() if k not in ("index", "pid")}}
                   for w in self.workers]
        health = []
        for r in self.gns.values():
            st = r.engine.signaling.state
            if st == sg.State.RECONNECTING:
                health.append({"code": "cloud-unreachable", "severity": "error",
                               "text": f"{r.gn.name}: {r.engine.signaling.last_error}"})
            elif st == sg.State.FAILED:
                health.append({"code": "gn-login-failed", "severity": "error",
                               "text": f"{r.gn.name}: {r.engine.signaling.last_error}"})
        if any(not w["proc"].is_alive() for w in self.workers):
            health.append({"code": "worker-down", "severity": "error", "text": "a worker is not running"})
        for code, sev, text, when in self.health_events[-20:]:
            if now - when < 300:
                health.append({"code": code, "severity": sev, "text": text})
        for mac, why in self.config_gn_pending.items():
            health.append({"code": "gn-config", "severity": "warning",
                           "text": f"{mac} (general_nodes in the config) not enrolled: {why}; retrying"})
        if self._token_file_warning:
            health.append({"code": "token-file", "severity": "warning", "text": self._token_file_warning})
        if self.registry.warning:
            health.append({"code": "registry-unreadable", "severity": "warning", "text": self.registry.warning})
        for w in getattr(self.leases, "warnings", []):
            health.append({"code": "lease-file", "severity": "warning", "text": str(w)})
        return {"kind": "adapter", "pid": os.getpid(), "uptime_s": round(now - self.started, 1),
                "identity": {"fqdn": getattr(getattr(self, "self_login", None), "fqdn", None),
                             "vip4": getattr(getattr(self, "self_login", None), "vip4", None),
                             "static_key": self.self_rt.engine.signaling.identity.public.hex()},
                "cloud": {"address": self.cfg.cloud, **self.self_rt.engine.signaling.status(),
                          "general_nodes": ", ".join(sorted({r.engine.signaling.state.value
                                                             for r in self.gns.values()})) or "none"},
                "lan": {"interface": self.cfg.lan_interface, "address": self.cfg.lan_address},
                "packet_filter": self.filter_mode,
                "general_nodes": self._gn_rows(), "tunnels": tunnels, "workers": workers,
                "worker_restarts": self.worker_restarts,
                "dhcp": self.dhcp.server.stats() if self.dhcp else {},
                "arp": self.arp.stats() if self.arp else {},
                "dns": dict(self.resolver.counters) if self.resolver else {},
                "data_path": {"busy_poll_us": self.cfg.busy_poll_us if self.reply_wait else 0,
                              "heads_ups": self.reply_wait.heads_ups if self.reply_wait else 0,
                              "busy_polls": self.reply_wait.busy_polls if self.reply_wait else 0,
                              "idle_cpus": round(self.reply_wait.idle_cpus, 2) if self.reply_wait else None,
                              "handler_errors": dict(self.selector.handler_errors) if self.selector else {}},
                "drops": dict(self.drops), "health": health}


def main(argv: list[str] | None = None) -> int:
    import argparse
    from .config import AdapterConfigError, load_config
    ap = argparse.ArgumentParser(prog="cyphonic-adapter")
    ap.add_argument("--config", default="/etc/cyphonic/adapter.toml")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        selector = DataPathSelector()
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
            return runner.run(Adapter(cfg, selector=selector).run())
    except (AdapterConfigError, pf.PacketFilterError, GeneralNodeError, OSError) as exc:
        print(f"cyphonic-adapter: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
