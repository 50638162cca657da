"""`cyphonic-node`: the conventional CYPHONIC node daemon (the paper's CMN).

One process, one asyncio loop:
- the node engine (signaling, tunnels, relay paths) on one UDP socket per family;
- Interface Handling: a TUN interface with the node's virtual IP (``tun``);
- the Resolver: a DNS stub where overlay names bring tunnels up (``cyphonic.resolver``);
- Packet Handling: TUN -> engine -> UDP and back; a packet to a peer's
  virtual IP with no earlier query brings the tunnel up too (it waits in a
  bounded queue meanwhile). The common case runs in a tight epoll loop
  beneath asyncio (``packet_handling``), straight through the device's fast
  path; the rest takes the slow path here;
- roaming: netlink tells us when the host's addresses change
  (``addresses``); a change re-registers and the tunnels carry on (the
  virtual IP stays);
- status on a Unix socket for ``cyadm status``.

State (0600 under ``state_dir``): ``identity.key`` (X25519), ``certificate``,
``login.json``. The enrollment token is used once, at the first start. A clean
stop removes the TUN interface and its routes (it is non-persistent, so a crash
does too) and the status socket.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import socket
import sys
import time
from collections import Counter, OrderedDict, deque

from .. import constants as C
from .. import signaling as sg
from ..atomic_file import write_json_atomic
from ..driver import patiently, run_until_signalled
from ..cloud.keys import parse_cloud_key
from ..health import Health, LoadWatch, Warning
from ..metrics_file import MetricsFile
from ..socket_stats import kernel_drop_counts, socket_rows
from ..status_socket import remove as remove_status, serve_status
from ..udp import steered_udp_sockets
from ..wire import cert as wire_cert
from ..wire import signaling as sig
from .addresses import AddressMonitor, host_addresses
from .config import NodeConfig, NodeConfigError, is_address, parse_hostport, resolve_cloud
from .engine import NodeEngine, Resolved, TunnelFailed, TunnelUp
from .engine_host import EngineHost, ptr_name
from .identity import load_identity, save_certificate
from .packet_handling import DataPathSelector, PacketPath, run_on_data_path, sample_idle_cpus
from .tun import Tun, TunError
from .constants import (ADDRESS_POLL_S, ADDRESS_RESYNC_S, ADDRESS_SETTLE_S, FATAL_EXIT, SOCKET_BUFFER_BYTES,
                        TICK_S, VIP_QUEUE_PACKETS, VIP_QUEUE_PEERS)


class NodeDaemon:
    """``selector``: the DataPathSelector under the running loop (``main`` builds both); without
    one the data path's handlers are plain asyncio readers (slower, same behaviour)."""

    def __init__(self, cfg: NodeConfig, *, out=None, selector: DataPathSelector | None = None) -> None:
        self.cfg = cfg
        self.out = out or sys.stdout
        self.selector = selector
        self.ca_public, self.cloud_static = parse_cloud_key(cfg.cloud_key)
        self.identity = load_identity(cfg.state_dir)
        self.socks: dict[int, socket.socket] = {}
        self.intake: dict[int, socket.socket] = {}   # initiations only (udp.steered_udp_sockets)
        self.port = cfg.port
        self.engine: NodeEngine | None = None
        self.host: EngineHost | None = None
        self.tun: Tun | None = None
        self.resolver = None
        self.dns = None
        self.login: dict = self._load_login()
        self.vip_queue: OrderedDict[str, deque] = OrderedDict()
        self.asked_by_vip: dict[str, str] = {}
        self.drops: Counter = Counter()
        self.errors: Counter = Counter()
        self.health = Health()
        self.load = LoadWatch()
        self.metrics_file = MetricsFile(cfg.metrics_file, self.status, log=self.log, errors=self.errors)
        self._dns_starting = False
        self._stop = asyncio.Event()
        self.exit_code = 0
        self.local_addrs: list[str] = []
        self.started = time.time()
        self.status_server = None
        self.path: PacketPath | None = None
        self.addr_monitor: AddressMonitor | None = None
        self._addr_changed = asyncio.Event()
        self._resolving = False            # the cloud's names are being resolved again

    # --- logging and persistence -------------------------------------------------------

    def log(self, line: str) -> None:
        print(f"cyphonic-node: {line}", file=self.out, flush=True)

    def _load_login(self) -> dict:
        try:
            with open(os.path.join(self.cfg.state_dir, "login.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _save_login(self, e: sg.LoggedIn) -> None:
        save_certificate(self.cfg.state_dir, e.certificate)
        self.login = {"fqdn": e.fqdn, "vip4": e.vip4, "prefix_len": e.prefix_len, "domain": e.domain}
        write_json_atomic(os.path.join(self.cfg.state_dir, "login.json"), self.login)

    def _token(self) -> bytes:
        if self.identity.certificate:
            return b""
        if self.cfg.token:
            return self.cfg.token.encode()
        if self.cfg.token_file:
            try:
                with open(self.cfg.token_file) as f:
                    return f.read().strip().encode()
            except OSError as exc:
                self.log(f"cannot read token_file {self.cfg.token_file}: {exc.strerror}")
        return b""

    # --- start and stop ------------------------------------------------------------------

    async def run(self) -> int:
        await run_until_signalled(self.start, self.close, self._stop)
        return self.exit_code

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        sel = self.selector
        if sel is not None:
            self.path = PacketPath(sel.add_fast_reader, sel.remove_fast_reader, busy_poll_s=cfg.busy_poll_us / 1e6,
                                   spin=sel.spin, stop_spin=sel.stop_spin, **self._slow_path())
        else:
            self.path = PacketPath(loop.add_reader, loop.remove_reader, **self._slow_path())
        for family, host in ((socket.AF_INET, cfg.listen4), (socket.AF_INET6, cfg.listen6)):
            if not host:
                continue
            try:
                s, intake = steered_udp_sockets(family, host, self.port, buffer_bytes=SOCKET_BUFFER_BYTES)
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    continue  # no IPv6 here
                raise
            self.port = s.getsockname()[1]
            self.socks[family] = s
            if intake is not None:
                self.intake[family] = intake
        # all to the slow path until the device and the TUN exist
        self.path.attach(self.socks, intake=self.intake)
        try:
            self.addr_monitor = AddressMonitor()
            loop.add_reader(self.addr_monitor.fileno(), self._on_address_notification)
        except OSError as exc:
            self.log(f"no netlink address notifications ({exc.strerror}); reading addresses "
                     f"every {ADDRESS_POLL_S} s")
        # pyroute2's synchronous IPRoute runs its own event loop: call it from a worker thread
        self.local_addrs = await asyncio.to_thread(host_addresses, {cfg.interface})
        token = self._token()
        if not self.identity.certificate and not token:
            self.log("not enrolled: set `token` (from `cyphonic-cloud enroll NAME`) in the config")
        # The cloud's names resolved once, here (each A/AAAA record is an instance), again only
        # when every instance failed a whole round (_on_event).
        instances = await self._resolve_cloud_at_start()
        if len(instances) > 1:
            self.log("cloud instances: " + ", ".join(sg.address_text(a) for a in instances))
        self.engine = NodeEngine(self.identity, self.ca_public, self.cloud_static, list(instances),
                                 token=token, name_hint=cfg.name, nms_addr=cfg.nms_addr,
                                 local_endpoints=self._endpoints(), spread=cfg.cloud_order == "spread")
        self.host = EngineHost(self.engine, self.socks, deliver=self._deliver, on_event=self._on_event,
                               log=self.log, health=self.health, after_round=self._dns_flush,
                               records_path=os.path.join(cfg.state_dir, "peers.json"))
        self.status_server = await serve_status(self.cfg.status_socket,
                                                lambda req: self.status() if req.get("cmd", "status") == "status"
                                                else {"error": "unknown command"})
        if self.login.get("domain"):
            await self._start_dns(self.login["domain"])
        self._tasks = [loop.create_task(self._watch_addresses()), loop.create_task(self._tick())]
        if self.path.busy_poll_s:
            self._tasks.append(loop.create_task(sample_idle_cpus(self.path, self._stop)))
        self.log(f"started: udp port {self.port}, cloud {cfg.cloud}, identity key "
                 f"{self.identity.public.hex()[:16]}...")
        self.host.start()   # the login goes out last: DNS and the status socket are up to hear of it
        if self.engine.device is not None and self.login.get("vip4"):
            # Peers came back from their records (the cloud may be down): the interface with the
            # address of the last login, so they are reached before any login (docs/protocol.md 11.6).
            self._setup_tun(self.login["vip4"], self.login["prefix_len"])

    def flush(self) -> None:
        if self.host is not None:
            self.host.flush()

    def _dns_flush(self) -> int:
        if self.dns is not None:
            self.dns.flush()
        return 0

    def _deliver(self, packet: bytes) -> None:
        if self.tun is not None:
            try:
                self.tun.write(packet)
            except OSError as exc:
                self.errors["tun_write_" + type(exc).__name__] += 1

    def _slow_path(self) -> dict:
        return {"slow_datagram": self._slow_datagram, "slow_packet": self._slow_packet,
                "flush": self.flush, "errors": self.errors, "drops": self.drops}

    def close(self) -> None:
        loop = asyncio.get_event_loop()
        self.metrics_file.remove()          # stopped: no metrics, rather than frozen ones
        if self.host is not None:
            self.host.stop()
        if self.path is not None:
            self.path.detach()
        if self.addr_monitor is not None:
            loop.remove_reader(self.addr_monitor.fileno())
            self.addr_monitor.close()
            self.addr_monitor = None
        for s in [*self.socks.values(), *self.intake.values()]:
            s.close()
        self.socks.clear()
        self.intake.clear()
        if self.tun is not None:
            self.tun.close()
            self.log(f"removed {self.cfg.interface}")
            self.tun = None
        if self.dns is not None:
            self.dns.close()
        if self.status_server is not None:
            remove_status(self.status_server, self.cfg.status_socket)
        for t in getattr(self, "_tasks", []):
            t.cancel()

    def _endpoints(self) -> list[sig.Endpoint]:
        eps = []
        for a in self.local_addrs:
            fam = socket.AF_INET6 if ":" in a else socket.AF_INET
            if fam in self.socks:
                eps.append(sig.Endpoint(a, self.port))
        return eps[:C.MAX_ENDPOINTS]

    def _on_address_notification(self) -> None:
        mon = self.addr_monitor
        try:
            changed = mon.drain()
        except OSError as exc:  # the socket broke: fall back to reading every ADDRESS_POLL_S
            self.errors["address_monitor_" + type(exc).__name__] += 1
            self.log(f"netlink address notifications failed ({exc}); reading addresses "
                     f"every {ADDRESS_POLL_S} s")
            asyncio.get_running_loop().remove_reader(mon.fileno())
            mon.close()
            self.addr_monitor = None
            changed = True
        if changed:
            self._addr_changed.set()

    async def _watch_addresses(self) -> None:
        """Roaming: read the host's addresses again when netlink says they changed (or every
        ADDRESS_RESYNC_S anyway); a change re-registers from the new address (tunnels carry
        on, the virtual IP stays)."""
        while not self._stop.is_set():
            every = ADDRESS_RESYNC_S if self.addr_monitor is not None else ADDRESS_POLL_S
            try:
                await asyncio.wait_for(self._addr_changed.wait(), every)
                await asyncio.sleep(ADDRESS_SETTLE_S)
            except asyncio.TimeoutError:
                pass
            self._addr_changed.clear()
            try:
                addrs = await asyncio.to_thread(host_addresses, {self.cfg.interface})
            except Exception as exc:  # netlink trouble must not stop the daemon
                self.errors["address_poll"] += 1
                self.log(f"cannot read addresses: {exc}")
                continue
            if addrs != self.local_addrs and self.engine is not None:
                self.log(f"addresses changed: {', '.join(self.local_addrs) or '-'} -> "
                         f"{', '.join(addrs) or '-'}; re-registering")
                self.local_addrs = addrs
                self.engine.set_local_endpoints(self._endpoints(), time.time())
                self.flush()

    # --- the data path's slow path (packet_handling.PacketPath carries the common case) --------

    def _slow_datagram(self, data: bytes, addr, now: float) -> None:
        """A datagram the fast path did not take: signaling, handshakes, relays, new endpoints."""
        self.engine.receive_datagram(data, addr, now)  # PacketPath flushes after its batch

    def _slow_packet(self, packet: bytes, now: float) -> None:
        """A packet from the TUN the fast path did not take: no session yet (or a rekey, a relay),
        or no tunnel at all: then it waits for one, which a packet brings up as a query does."""
        device = self.engine.device
        if device is None or len(packet) < 20 or packet[0] >> 4 != 4:
            self.drops["tun_not_ipv4"] += 1
            return
        if packet[16:20] in device.peers_by_vip:
            self.engine.send_packet(packet, now)
        else:
            self._queue_for_vip(packet, now)

    def _queue_for_vip(self, packet: bytes, now: float) -> None:
        vip = str(ipaddress.IPv4Address(packet[16:20]))
        q = self.vip_queue.get(vip)
        if q is None:
            if len(self.vip_queue) >= VIP_QUEUE_PEERS:
                _, old = self.vip_queue.popitem(last=False)
                self.drops["vip_queue_evicted"] += len(old)
            q = self.vip_queue[vip] = deque()
            self.asked_by_vip[ptr_name(vip)] = vip
            self.engine.resolve(ptr_name(vip), now)
        if len(q) >= VIP_QUEUE_PACKETS:
            q.popleft()
            self.drops["vip_queue_full"] += 1
        q.append(packet)

    async def _tick(self) -> None:
        """Deadlines the fast path moved (passive keepalives, rekey checks) come due here; the
        health conditions are observed at the same pace. A failure is counted and logged, and
        the tick goes on: nothing else fires those deadlines."""
        while not self._stop.is_set():
            await asyncio.sleep(TICK_S)
            if self.host is None:
                continue
            try:
                self.host.poke()
                self.health.observe(time.time(), self._conditions(time.time()))
                self.metrics_file.tick(time.time())
            except Exception as exc:  # noqa: BLE001
                self.errors["tick_" + type(exc).__name__] += 1
                if self.errors["tick_" + type(exc).__name__] == 1:
                    self.log(f"periodic work failed: {type(exc).__name__}: {exc}")

    # --- events ----------------------------------------------------------------------------------

    def _on_event(self, e) -> None:
        """What only the node daemon does with an event (``EngineHost`` logged it already)."""
        now = time.time()
        if isinstance(e, sg.LoggedIn):
            self._save_login(e)
            self.identity = self.engine.signaling.identity
            self._setup_tun(e.vip4, e.prefix_len)
            if self.dns is None:
                asyncio.get_running_loop().create_task(self._start_dns(e.domain))
            elif self.resolver is not None:
                self.resolver.self_names = {e.fqdn: e.vip4}
        elif isinstance(e, sg.LoginFailed):
            if e.code in sg.FATAL_LOGIN_CODES:
                self.exit_code = FATAL_EXIT
                self._stop.set()
        elif isinstance(e, sg.InstanceMoved):
            self.log(str(e) + (" (every instance silent: backing off)" if e.round_failed else ""))
            if e.round_failed:
                asyncio.get_running_loop().create_task(self._resolve_cloud_again())
        elif isinstance(e, Resolved):
            self.asked_by_vip[e.fqdn] = self.asked_by_vip.pop(e.asked, e.vip4)
        elif isinstance(e, TunnelUp):
            q = self.vip_queue.pop(e.vip4, None)
            self.asked_by_vip.pop(e.fqdn, None)
            for packet in q or ():
                self.engine.send_packet(packet, now)
        elif isinstance(e, TunnelFailed):
            vip = self.asked_by_vip.pop(e.fqdn, None)
            if vip is not None:
                self.drops["vip_queue_failed"] += len(self.vip_queue.pop(vip, ()))

    async def _resolve_cloud_at_start(self):
        """The cloud's names, resolved before the engine starts. A name that does not resolve
        yet (booting before the network or the DNS server is up) is tried again, every 1 s
        doubling to 30 s, with a log line each time; never a crash loop. A configuration
        mistake (a name for cloud_nms with several addresses) is final."""
        cfg = self.cfg
        return await patiently(lambda: resolve_cloud(cfg.cloud_addrs, single=bool(cfg.cloud_nms)),
                               retry_on=NodeConfigError, log=self.log, final=lambda exc: "cloud_nms" in str(exc))

    async def _resolve_cloud_again(self) -> None:
        """Every cloud instance failed a whole round: if the config names the cloud by DNS, its
        records may have changed. A failure keeps the list we have."""
        names = [a for a in self.cfg.cloud_addrs if not is_address(a[0])]
        if not names or self._resolving or self.engine is None:
            return
        self._resolving = True
        try:
            instances = await asyncio.to_thread(resolve_cloud, self.cfg.cloud_addrs, single=bool(self.cfg.cloud_nms))
            if instances != self.engine.signaling.instances:
                self.log("cloud instances now: " + ", ".join(sg.address_text(a) for a in instances))
                self.engine.signaling.set_instances(instances, time.time())
                self.flush()
        except Exception as exc:  # noqa: BLE001 - DNS trouble keeps the instances we have
            self.errors["cloud_resolve"] += 1
            self.log(f"cannot resolve the cloud again: {exc}")
        finally:
            self._resolving = False

    def _setup_tun(self, vip4: str, prefix_len: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.tun is None:
                self.tun = Tun(self.cfg.interface, offload=self.cfg.tun_offload)
                if self.tun.offload["state"] == "fallback":
                    self.path.batch["offload_fallbacks"] += 1
                    self.log(f"{self.cfg.interface}: tun_offload {self.cfg.tun_offload!r} refused "
                             f"({self.tun.offload['reason']}): mode {self.tun.offload['mode']!r}")
                self.path.attach(self.socks, self.engine.device, self.tun.fd, intake=self.intake,
                                 vnet_hdr=self.tun.vnet_hdr)
        except TunError as exc:
            self.log(str(exc))
            self.health.record(time.time(), Warning("tun-failed", str(exc)))
            return
        loop.create_task(self._configure_tun(vip4, prefix_len))

    async def _configure_tun(self, vip4: str, prefix_len: int) -> None:
        try:
            await asyncio.to_thread(self.tun.configure, vip4, prefix_len, self.cfg.mtu)
            self.log(f"interface {self.cfg.interface}: {vip4}/{prefix_len}, mtu {self.cfg.mtu}, "
                     f"tun_offload {self.tun.offload['mode']}")
        except TunError as exc:
            self.log(str(exc))
            self.health.record(time.time(), Warning("tun-failed", str(exc)))

    async def _start_dns(self, domain: str) -> None:
        # from start() (the domain of the last login) and from a login: never both at once
        if self.dns is not None or self._dns_starting:
            return
        self._dns_starting = True
        try:
            await self._serve_dns(domain)
        finally:
            self._dns_starting = False

    async def _serve_dns(self, domain: str) -> None:
        from ..dns_server import serve_dns
        from ..resolver import OverlayResolver
        cfg = self.cfg
        upstream = None
        if cfg.dns_upstream and cfg.dns_upstream != "none":
            upstream = parse_hostport(cfg.dns_upstream, "dns_upstream")
        elif not cfg.dns_upstream:
            upstream = _resolv_conf_upstream(cfg.dns_addr[0])
        prefix = None
        if self.login.get("vip4"):
            prefix = str(ipaddress.IPv4Network(f"{self.login['vip4']}/{self.login['prefix_len']}", strict=False))
        self.resolver = OverlayResolver(domain, self_names={self.login["fqdn"]: self.login["vip4"]}
                                        if self.login.get("fqdn") else {},
                                        prefix=prefix, hold_s=cfg.dns_hold_s, passthrough=upstream is not None)
        host, port = cfg.dns_addr
        try:
            self.dns = await serve_dns(self.resolver, host, port, on_resolve=self._dns_resolve, upstream=upstream)
            self.host.resolver = self.resolver
            self.log(f"DNS on {host}:{port} for *.{domain}" + (f", upstream {upstream[0]}:{upstream[1]}"
                                                                if upstream else ", no upstream"))
        except OSError as exc:
            self.log(f"cannot serve DNS on {host}:{port}: {exc.strerror}")
            self.health.record(time.time(), Warning("dns-down", f"{host}:{port}: {exc.strerror}"))
            self.resolver = None

    def _dns_resolve(self, fqdn: str, asker) -> None:
        vip = self.engine.resolve(fqdn, time.time())
        if vip is not None and self.resolver is not None:
            self.resolver.tunnel_up(fqdn, vip, time.time())
        self.flush()

    # --- status ----------------------------------------------------------------------------------

    def _conditions(self, now: float) -> list[Warning]:
        out = self.host.conditions(now) if self.host is not None else []
        return out + self.load.conditions(now, self._load_sample) + self.metrics_file.conditions()

    def _load_sample(self) -> dict:
        """What ``under-load`` compares between two samples (``cyphonic.health.LoadWatch``)."""
        device = self.engine.device if self.engine is not None else None
        return {"cookie_replies": {"device": device.counters.get("cookie_replies_sent", 0)} if device else {},
                "kernel_drops": kernel_drop_counts(self.socket_rows()), "drops": self.drop_counts()}

    def socket_rows(self) -> list[dict]:
        """The kernel's drops on each of our sockets (``cyphonic.socket_stats``)."""
        named = [(f"udp{4 if fam == socket.AF_INET else 6}", s) for fam, s in self.socks.items()]
        named += [(f"udp{4 if fam == socket.AF_INET else 6} intake", s) for fam, s in self.intake.items()]
        if self.dns is not None:
            named += self.dns.sockets()
        return socket_rows(named)

    def drop_counts(self) -> dict:
        """Every drop of the daemon by reason: its own, the engine's (``EngineHost.counters``)
        and the DNS stub's (``dns_``: the resolver's, ``dns_edge_``: its sockets')."""
        out = {**dict(self.drops), **(self.host.counters() if self.host is not None else {})}
        if self.resolver is not None:
            out.update({f"dns_{k}": v for k, v in self.resolver.drops.items()})
        if self.dns is not None:
            out.update({f"dns_edge_{k}": v for k, v in self.dns.errors.items()})
        return out

    def health_report(self) -> list[dict]:
        now = time.time()
        self.health.observe(now, self._conditions(now))
        return self.health.report(now)

    def status(self) -> dict:
        now = time.time()
        eng = self.engine
        sigst = eng.signaling.status() if eng else {}
        tunnels = self.host.tunnel_rows(now) if self.host is not None else []
        cert = wire_cert.decode(self.identity.certificate) if self.identity.certificate else None
        return {
            "kind": "node", "pid": os.getpid(), "uptime_s": round(now - self.started, 1),
            "identity": {"fqdn": self.login.get("fqdn"), "vip4": self.login.get("vip4"),
                         "static_key": self.identity.public.hex(),
                         "cert_serial": cert.serial if cert else None,
                         "cert_expires": cert.not_after if cert else None},
            "cloud": {"address": self.cfg.cloud, **sigst},
            "interface": {"name": self.cfg.interface, "mtu": self.cfg.mtu, "present": self.tun is not None,
                          "offload": dict(self.tun.offload) if self.tun is not None
                          else {"requested": self.cfg.tun_offload, "mode": "off", "state": "off",
                                "features": [], "reason": ""}},
            "udp_port": self.port,
            "dns": {"listen": self.cfg.dns_listen, "running": self.dns is not None,
                    "counters": dict(self.resolver.counters) if self.resolver else {}},
            "tunnels": tunnels,
            "health": self.health_report(),
            "drops": self.drop_counts(),
            "sockets": self.socket_rows(),
            "errors": dict(self.errors),
            "data_path": {"busy_poll_us": self.cfg.busy_poll_us,
                          "busy_polls": self.path.busy_polls if self.path else 0,
                          "idle_cpus": round(self.path.idle_cpus, 2) if self.path else None,
                          "handler_errors": dict(self.selector.handler_errors) if self.selector else {},
                          "batches": dict(self.path.batch) if self.path else {}},
        }


def _resolv_conf_upstream(own_host: str) -> tuple[str, int] | None:
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver" and parts[1] != own_host:
                    return parts[1], 53
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    import argparse
    from .config import NodeConfigError, example_config, load_config
    ap = argparse.ArgumentParser(prog="cyphonic-node", description="The CYPHONIC node daemon.")
    ap.add_argument("--config", default="/etc/cyphonic/node.toml")
    ap.add_argument("--example-config", action="store_true", help="print a commented example config")
    args = ap.parse_args(argv)
    if args.example_config:
        print(example_config(), end="")
        return 0
    try:
        cfg = load_config(args.config)
        return run_on_data_path(lambda selector: NodeDaemon(cfg, selector=selector))
    except (NodeConfigError, TunError) as exc:
        print(f"cyphonic-node: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cyphonic-node: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
