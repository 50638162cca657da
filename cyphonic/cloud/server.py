"""`cyphonic-cloud serve`: the cloud process, a thin asyncio edge around the sans-IO cores.

One process runs the services named in the config (by default all three):
- AS and NMS share the control channel on ``signaling_port`` (``CloudCore``),
- the TRS listens on ``relay_port`` (``RelayService``),
each on an IPv4 socket and an IPv6-only socket. Log lines go to stdout, one
per event (journald on the appliance adds the time). Counters are written
atomically to ``<state_dir>/stats.json`` every STATS_EVERY_S for
``cyphonic-cloud stats``. SIGTERM and SIGINT stop it cleanly; after
``kill -9`` a restart finds every identity, token, revocation and policy in
the store, and nodes come back by themselves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections import Counter

from ..driver import CoreDriver
from ..health import Health, LoadWatch, Warning
from ..socket_stats import kernel_drop_counts, socket_rows
from ..udp import steered_udp_sockets
from ..wire import signaling as sig
from .cluster import Cluster
from .config import CloudConfig
from .constants import INTAKE_BATCH, RECV_BYTES
from .core import CloudCore
from .keys import load_keys
from .store import StoreError, open_store
from .trs import RelayService
from .trs_server import serve_relay

STATS_EVERY_S = 2.0


def relay_endpoints(config: CloudConfig, port: int) -> dict[int, sig.Endpoint]:
    eps = {}
    h4, h6 = config.relay_host4, config.relay_host6
    if h4:
        eps[4] = sig.Endpoint(h4, port)
    if h6:
        eps[6] = sig.Endpoint(h6, port)
    return eps


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, server: "CloudServer") -> None:
        self.server = server
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.server.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.server.errors[type(exc).__name__] += 1


class CloudServer:
    def __init__(self, config: CloudConfig, *, out=None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.errors: Counter = Counter()
        self.store = open_store(config.database_target)
        self.keys = load_keys(config.state_dir)
        self.core: CloudCore | None = None
        self.cluster: Cluster | None = None
        self._bus_listener = None      # PostgreSQL: LISTEN for bus messages (store_postgres.BusListener)
        self._listener_fd = -1
        self._cluster_timer = None     # a TRS alone: its heartbeat timer (the core drives it otherwise)
        self.relay: RelayService | None = None
        self.relay_server = None
        self._transports: dict[int, asyncio.DatagramTransport] = {}
        self._intakes: list[socket.socket] = []   # initiations only (udp.steered_udp_sockets)
        self.driver: CoreDriver | None = None
        self.health = Health()
        self.load = LoadWatch()        # under-load: cookie replies, kernel drops, drops climbing
        self._stats_error = ""
        self._stopping = asyncio.Event()
        self.started = time.time()

    def log(self, line: str) -> None:
        print(f"cyphonic-cloud: {line}", file=self.out, flush=True)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        relay_port = cfg.relay_port
        if "trs" in cfg.services:
            self.relay = RelayService(self.keys.relay_key)
            self.relay_server = await serve_relay(self.relay, cfg.listen4 or None, cfg.listen6 or None,
                                                  cfg.relay_port)
            relay_port = self.relay_server.port
            self.log(f"TRS listening on {', '.join(map(str, self.relay_server.addresses))}")
        self.cluster = self._join_cluster(relay_port)
        if "as" in cfg.services or "nms" in cfg.services:
            services = tuple(s for s in cfg.services if s in ("as", "nms"))
            self.core = CloudCore(store=self.store, keys=self.keys, domain=cfg.domain, prefix=cfg.prefix,
                                  services=services, cert_lifetime_s=cfg.cert_lifetime_s,
                                  registration_lifetime_s=cfg.registration_lifetime_s,
                                  keepalive_interval_s=cfg.keepalive_interval_s,
                                  relay_endpoints=relay_endpoints(cfg, relay_port), cluster=self.cluster)
            self.driver = CoreDriver(self.core, self._send, after_round=self._drain_logs, errors=self.errors)
            for family, host in ((socket.AF_INET, cfg.listen4), (socket.AF_INET6, cfg.listen6)):
                if not host:
                    continue
                # Initiations arrive on an intake socket of their own (udp.steered_udp_sockets):
                # a flood of them cannot fill the queue logged-in nodes' requests wait in. It is
                # read INTAKE_BATCH at a time, straight into the core with one flush per batch
                # (under a flood that is most of the cost), between asyncio's other callbacks.
                sock, intake = steered_udp_sockets(family, host, cfg.signaling_port)
                transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), sock=sock)
                self._transports[family] = transport
                if intake is not None:
                    self._intakes.append(intake)
                    loop.add_reader(intake.fileno(), self._read_intake, intake)
                self.log(f"{'+'.join(s.upper() for s in services)} listening on {host} udp {cfg.signaling_port}")
        if self.core is None:
            self._cluster_timer = loop.call_later(0, self._cluster_tick)
        self.log(f"cloud key {self.keys.cloud_key}")
        self.load.observe(time.time(), **self._load_sample())   # under-load's base: drops from the start count
        if self.driver is not None:
            self.driver.flush()
        loop.call_later(STATS_EVERY_S, self._write_stats_periodic)

    def _join_cluster(self, relay_port: int) -> Cluster:
        """This process's row among the instances sharing the database (raises StoreError)."""
        cfg = self.config
        signaling = []
        if "as" in cfg.services or "nms" in cfg.services:
            if cfg.listen4:
                signaling.append(f"{cfg.listen4}:{cfg.signaling_port}")
            if cfg.listen6:
                signaling.append(f"[{cfg.listen6}]:{cfg.signaling_port}")
        relay = []
        if "trs" in cfg.services:
            for fam, ep in sorted(relay_endpoints(cfg, relay_port).items()):
                relay.append(f"[{ep.host}]:{ep.port}" if fam == 6 else f"{ep.host}:{ep.port}")
        listener = None
        if hasattr(self.store, "bus_listener") and ("nms" in cfg.services):
            listener = self.store.bus_listener()
            if listener.connected:
                self._bus_listener = listener
                self._listener_fd = listener.fileno()
                asyncio.get_running_loop().add_reader(self._listener_fd, self._on_notify)
            else:
                self.log(f"bus: cannot LISTEN ({listener.error}); polling")
        self._refuse_a_twin(cfg.effective_instance_id)
        cluster = Cluster(self.store, cfg.effective_instance_id, services=tuple(cfg.services),
                          signaling=tuple(signaling), relay=tuple(relay), host=socket.gethostname(),
                          pid=os.getpid(), notified=self._bus_listener is not None, log=self.log)
        cluster.start(time.time())
        self.log(f"instance {cluster.instance_id} (tag {cluster.tag}); "
                 f"{len(cluster.instances)} instance(s) in the database, "
                 f"bus {'by NOTIFY' if cluster.notified else 'polled'}")
        return cluster

    def _refuse_a_twin(self, instance_id: str) -> None:
        """Two live processes must not share an instance id (each would wipe the other's rows).
        A row that is alive but whose process is gone (a restart after kill -9) is taken over."""
        now = time.time()
        rec = next((i for i in self.store.list_instances() if i.instance_id == instance_id), None)
        if rec is None or not rec.alive(now):
            return
        if rec.host == socket.gethostname():
            try:
                os.kill(rec.pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            if rec.pid == os.getpid():
                return
        raise StoreError(f"instance id {instance_id!r} is in use by pid {rec.pid} on {rec.host} "
                         f"(heartbeat {now - rec.heartbeat:.1f} s ago): give each process its own "
                         "instance_id in its config")

    def _on_notify(self) -> None:
        listener = self._bus_listener
        mine = listener.drain(self.cluster.instance_id)
        if not listener.connected:     # lost: poll until it is back (_keep_listening)
            asyncio.get_running_loop().remove_reader(self._listener_fd)
            self._listener_fd = -1
            self.cluster.notified = False
            self.log(f"bus: LISTEN connection lost ({listener.error}); polling until it is back")
        if mine and self.core is not None:
            self.core.read_bus(time.time())
            self.driver.flush()

    def _keep_listening(self) -> None:
        """Called each stats period: reconnect a lost LISTEN connection."""
        listener = self._bus_listener
        if listener is None or self._listener_fd >= 0 or self.cluster is None:
            return
        if listener.reconnect():
            self._listener_fd = listener.fileno()
            asyncio.get_running_loop().add_reader(self._listener_fd, self._on_notify)
            self.cluster.notified = True
            self.log("bus: LISTEN connection back")

    def _cluster_tick(self) -> None:
        """A process without AS/NMS (a TRS alone) keeps its heartbeat here."""
        if self._stopping.is_set() or self.cluster is None:
            return
        now = time.time()
        self.cluster.handle_timer(now)
        t = self.cluster.get_timer()
        self._cluster_timer = asyncio.get_running_loop().call_later(
            max(0.0, (t if t is not None else now + 1.0) - now), self._cluster_tick)

    def _read_intake(self, sock: socket.socket) -> None:
        core, errors = self.core, self.errors
        now = time.time()
        n = 0
        for _ in range(INTAKE_BATCH):
            try:
                data, addr = sock.recvfrom(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP errors surface here; never fatal
                errors[type(exc).__name__] += 1
                continue
            try:
                core.receive_datagram(data, addr, now)
            except Exception as exc:  # noqa: BLE001 - the core has its own no-throw boundary; counted
                errors["intake_" + type(exc).__name__] += 1
            n += 1
        if n:
            self.driver.flush()

    def on_datagram(self, data: bytes, addr) -> None:
        if self.driver is not None:
            self.driver.receive(data, addr)

    def _send(self, data: bytes, addr) -> None:
        transport = self._transports.get(socket.AF_INET6 if ":" in str(addr[0]) else socket.AF_INET)
        if transport is None:
            self.errors["no_socket_for_family"] += 1
            return
        transport.sendto(data, addr)

    def _drain_logs(self) -> int:
        logs = self.core.logs
        while logs:
            self.log(logs.popleft())
        return 0

    def socket_rows(self) -> list[dict]:
        """The kernel's drops on each of the cloud's sockets (``cyphonic.socket_stats``)."""
        named = []
        for sock, intake in [*((t.get_extra_info("socket"), False) for t in self._transports.values()),
                             *((s, True) for s in self._intakes)]:
            name = f"signaling{4 if sock is not None and sock.family == socket.AF_INET else 6}"
            named.append((name + (" intake" if intake else ""), sock))
        if self.relay_server is not None:
            named += self.relay_server.sockets()
        return socket_rows(named)

    def _load_sample(self) -> dict:
        """What ``under-load`` compares between two samples (``cyphonic.health.LoadWatch``)."""
        drops = {}
        if self.core is not None:
            drops.update({f"control_{k}": v for k, v in self.core.server.drops.items()})
        if self.relay is not None:
            drops.update({f"relay_{k}": v for k, v in self.relay.drops.items()})
        cookies = {"control": self.core.server.counters.get("cookie_replies_sent", 0)} if self.core else {}
        return {"cookie_replies": cookies, "kernel_drops": kernel_drop_counts(self.socket_rows()), "drops": drops}

    def stats(self) -> dict:
        now = time.time()
        self.health.observe(now, ([Warning("stats-unwritable", self._stats_error)] if self._stats_error else [])
                            + self.load.conditions(now, self._load_sample))
        out = {"kind": "cloud", "pid": os.getpid(), "services": list(self.config.services), "started": self.started,
               "written": now, "socket_errors": dict(self.errors), "sockets": self.socket_rows(),
               "send_backlog_bytes": {("ipv6" if f == socket.AF_INET6 else "ipv4"): t.get_write_buffer_size()
                                      for f, t in self._transports.items()},
               "health": self.health.report(now)}
        if self.relay_server is not None:
            out["relay_socket_errors"] = dict(self.relay_server.errors)
        if self.core is not None:
            out.update(self.core.stats(now))
            if self.core.nms is not None:
                out["registrations"] = self.core.nms.status(now)
        elif self.cluster is not None:   # a TRS alone: no core, but a heartbeat
            out["cluster"] = self.cluster.status(now)
        if self.relay is not None:
            out["relay"] = self.relay.stats()
        return out

    def _write_stats_periodic(self) -> None:
        self._keep_listening()
        path = stats_path(self.config)
        try:
            write_stats(path, self.stats())
            self._stats_error = ""
        except OSError as exc:
            self.errors["stats_" + type(exc).__name__] += 1
            if not self._stats_error:
                self.log(f"cannot write {path}: {exc.strerror or exc}")
            self._stats_error = f"{path}: {exc.strerror or exc}"
        if not self._stopping.is_set():
            asyncio.get_running_loop().call_later(STATS_EVERY_S, self._write_stats_periodic)

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig_ in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig_, self._stopping.set)
        await self._stopping.wait()
        self.log("stopping")
        self.close()

    def close(self) -> None:
        self._stopping.set()
        if self.driver is not None:
            self.driver.close()
        for t in self._transports.values():
            t.close()
        loop = asyncio.get_event_loop()
        for s in self._intakes:
            loop.remove_reader(s.fileno())
            s.close()
        self._intakes.clear()
        if self.relay_server is not None:
            self.relay_server.close()
        if self._cluster_timer is not None:
            self._cluster_timer.cancel()
        if self._listener_fd >= 0:
            loop.remove_reader(self._listener_fd)
            self._listener_fd = -1
        if self._bus_listener is not None:
            self._bus_listener.close()
        try:
            write_stats(stats_path(self.config), self.stats())
        except OSError:
            pass
        if self.cluster is not None:
            self.cluster.stop()       # heartbeat 0: the others see a clean stop at once
        self.store.close()


def stats_path(config: CloudConfig) -> str:
    """``stats-<instance_id>.json`` when the config names the instance; else ``stats.json`` for the
    default all-in-one process and ``stats-<services>.json`` otherwise,
    so processes that share a state directory do not overwrite each other's counters."""
    services = sorted(config.services)
    if config.instance_id:   # several instances may share a state directory
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in config.instance_id)
        return os.path.join(config.state_dir, f"stats-{safe}.json")
    name = "stats.json" if services == ["as", "nms", "trs"] else f"stats-{'-'.join(services)}.json"
    return os.path.join(config.state_dir, name)


def write_stats(path: str, stats: dict) -> None:
    from ..atomic_file import write_json_atomic
    write_json_atomic(path, stats, mode=0o644, indent=None, default=str)


async def serve(config: CloudConfig) -> int:
    server = CloudServer(config)
    await server.start()
    await server.run_until_stopped()
    return 0
