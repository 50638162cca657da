"""The lab: a small topology builder in Linux network namespaces.

Segments are Linux bridges, each in its own switch namespace (`cyl-sw-<name>`); hosts and
routers are namespaces (`cyl-<name>`) joined to segments by veth pairs. A veth pair is created
inside the switch namespace with its peer placed directly in the host's namespace, so nothing
is ever created in the root namespace. NAT routers use nftables masquerade inside their own
namespace ("easy": endpoint-independent mapping, ports kept when free; "hard": a new random
port for every new flow, so each destination sees a different mapping). Loss uses nftables
`numgen` (this kernel has no netem).

Rules it keeps (see README.md):
- everything it creates carries the prefix; it never touches other namespaces or interfaces,
  except to delete stale `<prefix>-*` namespaces and `<prefix>*` root-namespace links left
  behind by a crashed run;
- one lab per prefix at a time, on this machine: a lock file (`/run/<prefix>-lab.lock`) is
  held from enter to exit, so a second run waits (bounded) instead of tearing down the first;
- every wait is bounded; teardown runs even when the body raised.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

IP = "ip"
NFT = "nft"
CMD_TIMEOUT_S = 10        # any single ip/nft/sysctl command
EXEC_TIMEOUT_S = 10       # Lab.exec default
LOCK_TIMEOUT_S = 120      # waiting for another lab with the same prefix to finish
TERM_GRACE_S = 2.0        # SIGTERM to SIGKILL for spawned processes
KILL_WAIT_S = 3.0         # waiting for killed processes to disappear from a namespace
LOCK_DIR = "/run"
NAT_KINDS = ("easy", "hard")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


class LabError(RuntimeError):
    """A lab command failed, or the lab was misused (not root, duplicate name, ...)."""


def _run(argv, *, input=None, timeout=CMD_TIMEOUT_S, check=True) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout} s") from e
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _ip(ns: str | None, *args: str, check=True) -> subprocess.CompletedProcess:
    return _run([IP, *(["-n", ns] if ns else []), *args], check=check)


def _nsexec(ns: str, *argv: str, input=None, check=True) -> subprocess.CompletedProcess:
    return _run([IP, "netns", "exec", ns, *argv], input=input, check=check)


def _sysctl(ns: str, **settings) -> None:
    _nsexec(ns, "sysctl", "-q", "-w", *(f"{k.replace('__', '.')}={v}" for k, v in settings.items()))


# --- stale cleanup ---------------------------------------------------------------------------

def _netns_names() -> list[str]:
    out = _run([IP, "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ns_pids(ns: str) -> list[int]:
    p = _run([IP, "netns", "pids", ns], check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _kill_ns(ns: str) -> None:
    """SIGKILL every process inside `ns`, wait (bounded) until none is left, delete `ns`."""
    deadline = time.monotonic() + KILL_WAIT_S
    while pids := _ns_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            log.warning("processes %s still alive in %s after SIGKILL", pids, ns)
            break
        time.sleep(0.05)
    _ip(None, "netns", "del", ns, check=False)


def _cleanup_prefix(prefix: str) -> list[str]:
    """Delete every `<prefix>-*` namespace (killing what runs inside) and `<prefix>*` root links."""
    removed = []
    for ns in _netns_names():
        if ns.startswith(prefix + "-"):
            _kill_ns(ns)
            removed.append(ns)
    for line in _ip(None, "-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix):
            _ip(None, "link", "del", name, check=False)
            removed.append(name)
    return removed


class _PrefixLock:
    """An flock on /run/<prefix>-lab.lock: released by the kernel even if we crash."""

    def __init__(self, prefix: str, timeout: float):
        self.path = os.path.join(LOCK_DIR, f"{prefix}-lab.lock")
        self.timeout = timeout
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # close-on-exec: children don't hold it
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LabError(f"another lab holds {self.path} (waited {self.timeout} s)") from None
                time.sleep(0.1)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, nftables): run as root, as CI does")


def cleanup_stale(prefix: str = "cyl", lock_timeout: float = LOCK_TIMEOUT_S) -> list[str]:
    """Remove what a crashed run left behind: `<prefix>-*` namespaces (and their processes)
    and `<prefix>*` links in the root namespace. Waits for a live lab with the same prefix to
    finish first (bounded). Returns the names removed."""
    _require_root()
    lock = _PrefixLock(prefix, lock_timeout)
    lock.acquire()
    try:
        return _cleanup_prefix(prefix)
    finally:
        lock.release()


# --- the topology ----------------------------------------------------------------------------

@dataclass(eq=False)
class Segment:
    """An L2 segment: bridge `br0` in namespace `ns`. Hosts attached get addresses from
    `net4`/`net6` and a default route via `gateway4`/`gateway6` (when set)."""
    name: str
    ns: str
    net4: ipaddress.IPv4Network | None
    net6: ipaddress.IPv6Network | None
    gateway4: str | None = None
    gateway6: str | None = None
    next_index: int = 1          # next host number in the subnet (same for v4 and v6)
    ports: int = 0               # veth ports created so far on the bridge

    def allocate(self) -> int:
        i = self.next_index
        self.next_index += 1
        if self.net4 is not None and i >= self.net4.num_addresses - 1:
            raise LabError(f"segment {self.name}: {self.net4} is full")
        return i


@dataclass(eq=False)
class Port:
    """One interface of a host on a segment."""
    iface: str
    segment: Segment
    addr4: str | None
    addr6: str | None


@dataclass(eq=False)
class Host:
    """A namespace with one primary interface (`iface` on `segment`) and maybe more (`ports`)."""
    name: str                      # the namespace name, e.g. "cyl-n1"
    short: str                     # the name given to Lab, e.g. "n1"
    ports: list[Port] = field(default_factory=list)

    @property
    def primary(self) -> Port:
        return self.ports[0]

    @property
    def iface(self) -> str:
        return self.primary.iface

    @property
    def segment(self) -> Segment:
        return self.primary.segment

    @property
    def addr4(self) -> str | None:
        return self.primary.addr4

    @property
    def addr6(self) -> str | None:
        return self.primary.addr6


@dataclass(eq=False)
class Router(Host):
    """A NAT router: WAN port (the primary one, `wan0`) on an upstream segment, LAN port
    (`lan0`, the gateway of `lan`) on its own segment."""
    kind: str = "easy"
    lan: Segment | None = None

    @property
    def wan_addr4(self) -> str | None:
        return self.addr4

    @property
    def wan_addr6(self) -> str | None:
        return self.addr6


def _ns_of(node) -> str:
    if isinstance(node, Host):
        return node.name
    if isinstance(node, Segment):
        return node.ns
    if isinstance(node, str):
        return node
    raise TypeError(f"not a lab node: {node!r}")


class Lab:
    """Builds namespaces, segments, hosts and NAT routers; tears all of it down on exit.

    Use as a context manager (or call start() and close()). Entering takes the prefix lock and
    removes whatever a crashed run left behind; leaving kills spawned processes (process group,
    SIGTERM then SIGKILL), kills anything else still running in our namespaces, and deletes them.
    """

    def __init__(self, prefix: str = "cyl", lock_timeout: float = LOCK_TIMEOUT_S):
        self.prefix = prefix
        self._lock = _PrefixLock(prefix, lock_timeout)
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._started = False
        self.segments: dict[str, Segment] = {}
        self.hosts: dict[str, Host] = {}

    # lifecycle

    def start(self) -> "Lab":
        _require_root()
        self._lock.acquire()
        self._started = True
        try:
            stale = _cleanup_prefix(self.prefix)
        except BaseException:
            self.close()
            raise
        if stale:
            log.info("removed stale lab leftovers: %s", " ".join(stale))
        return self

    def __enter__(self) -> "Lab":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Tear everything down. Safe to call twice; never raises for a half-built lab."""
        if not self._started:
            return
        try:
            self._stop_procs()
            for ns in reversed(self._namespaces):
                _kill_ns(ns)
            _cleanup_prefix(self.prefix)   # anything created behind our back with our prefix
        finally:
            self._namespaces.clear()
            self._started = False
            self._lock.release()

    def _stop_procs(self) -> None:
        live = [p for p in self._procs if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in live:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + TERM_GRACE_S
            for p in live:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            live = [p for p in live if p.poll() is None]
            if not live:
                break
        self._procs.clear()

    # building

    def _new_ns(self, ns: str) -> None:
        if not self._started:
            raise LabError("the lab is not started: use `with Lab() as lab:`")
        if ns in self._namespaces:
            raise LabError(f"namespace {ns} already exists in this lab")
        _ip(None, "netns", "add", ns)
        self._namespaces.append(ns)
        _ip(ns, "link", "set", "lo", "up")
        # v6 addresses usable at once (no duplicate address detection), including link-local ones
        _sysctl(ns, net__ipv6__conf__all__accept_dad=0, net__ipv6__conf__default__accept_dad=0)

    def _check_name(self, name: str) -> None:
        if not _NAME_RE.match(name):
            raise LabError(f"bad lab name {name!r}: lowercase letters, digits and '-'")

    def switch(self, name: str, v4: str | None = None, v6: str | None = None,
               gateway: bool = True) -> Segment:
        """A segment: bridge `br0` in namespace `<prefix>-sw-<name>`. With `gateway` the bridge
        takes the first address of each subnet and is the default route of hosts attached to it
        (an "internet" whose router knows nothing beyond the segment)."""
        self._check_name(name)
        if name in self.segments:
            raise LabError(f"segment {name} already exists")
        ns = f"{self.prefix}-sw-{name}"
        seg = Segment(name, ns,
                      ipaddress.IPv4Network(v4) if v4 else None,
                      ipaddress.IPv6Network(v6) if v6 else None)
        self._new_ns(ns)
        _ip(ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip(ns, "link", "set", "br0", "up")
        if gateway:
            i = seg.allocate()
            if seg.net4:
                seg.gateway4 = str(seg.net4[i])
                _ip(ns, "addr", "add", f"{seg.gateway4}/{seg.net4.prefixlen}", "dev", "br0")
            if seg.net6:
                seg.gateway6 = str(seg.net6[i])
                _ip(ns, "-6", "addr", "add", f"{seg.gateway6}/{seg.net6.prefixlen}", "dev", "br0", "nodad")
        self.segments[name] = seg
        return seg

    def attach(self, host: Host, segment: Segment, *, v4: bool = True, v6: bool = True,
               iface: str | None = None, default_route: bool = False) -> Port:
        """Join `host` to `segment` with a new veth (`eth<N>` unless `iface` is given). Addresses
        come from the segment's subnets (v4/v6 False: none of that family)."""
        iface = iface or f"eth{len(host.ports)}"
        segment.ports += 1
        sw_port = f"p{segment.ports}-{host.short}"[:15]
        _ip(segment.ns, "link", "add", sw_port, "type", "veth", "peer", "name", iface, "netns", host.name)
        _ip(segment.ns, "link", "set", sw_port, "master", "br0", "up")
        _ip(host.name, "link", "set", iface, "up")
        port = Port(iface, segment, None, None)
        if (v4 and segment.net4) or (v6 and segment.net6):
            i = segment.allocate()
            if v4 and segment.net4:
                port.addr4 = self._set_addr(host.name, iface, segment.net4, str(segment.net4[i]))
            if v6 and segment.net6:
                port.addr6 = self._set_addr(host.name, iface, segment.net6, str(segment.net6[i]))
        host.ports.append(port)
        if default_route:
            self._default_routes(host.name, port)
        return port

    @staticmethod
    def _set_addr(ns, iface, net, addr, old=None) -> str:
        if old:
            _ip(ns, "addr", "del", f"{old}/{net.prefixlen}", "dev", iface)
        extra = ["nodad"] if net.version == 6 else []
        _ip(ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", iface, *extra)
        return addr

    @staticmethod
    def _default_routes(ns: str, port: Port) -> None:
        seg = port.segment
        if port.addr4 and seg.gateway4:
            _ip(ns, "-4", "route", "replace", "default", "via", seg.gateway4, "dev", port.iface)
        if port.addr6 and seg.gateway6:
            _ip(ns, "-6", "route", "replace", "default", "via", seg.gateway6, "dev", port.iface)

    def host(self, name: str, segment: Segment, *, v4: bool = True, v6: bool = True) -> Host:
        """Namespace `<prefix>-<name>` with `eth0` on `segment`, addresses of the families the
        segment has (unless v4/v6 is False) and default routes via the segment's gateway."""
        self._check_name(name)
        if name in self.hosts:
            raise LabError(f"host {name} already exists")
        h = Host(f"{self.prefix}-{name}", name)
        self._new_ns(h.name)
        self.attach(h, segment, v4=v4, v6=v6, default_route=True)
        self.hosts[name] = h
        return h

    def nat_router(self, name: str, wan: Segment, lan: str, *, kind: str = "easy",
                   lan6: str | None = None) -> Router:
        """A NAT router `<prefix>-<name>`: `wan0` on `wan`, `lan0` as the gateway (first address)
        of a new segment named `name` with subnet `lan` (and `lan6`, masqueraded as well: NAT66).
        kind "easy": masquerade (endpoint-independent mapping, source port kept when free);
        "hard": masquerade random,fully-random (a new random port for every new flow)."""
        if kind not in NAT_KINDS:
            raise LabError(f"unknown NAT kind {kind!r}, expected one of {NAT_KINDS}")
        self._check_name(name)
        if name in self.hosts:
            raise LabError(f"host {name} already exists")
        r = Router(f"{self.prefix}-{name}", name, kind=kind)
        self._new_ns(r.name)
        _sysctl(r.name, net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1)
        self.attach(r, wan, iface="wan0", default_route=True)
        r.lan = self.switch(name, lan, lan6, gateway=False)
        port = self.attach(r, r.lan, iface="lan0")
        r.lan.gateway4, r.lan.gateway6 = port.addr4, port.addr6
        flags = " random,fully-random" if kind == "hard" else ""
        families = ["ip"] + (["ip6"] if lan6 and wan.net6 else [])
        # Like a home router: masquerade out of wan0, and a firewall that drops unsolicited
        # packets from the WAN to the router itself. The drop happens before conntrack confirms
        # the flow, so a peer's early hole-punching packet leaves no entry behind that would
        # collide with (and re-port) our own outgoing packet to that peer a moment later.
        rules = "".join(
            f"table {fam} {self.prefix}_nat {{\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    oifname \"wan0\" masquerade{flags}\n"
            f"  }}\n"
            f"  chain input {{\n"
            f"    type filter hook input priority filter; policy accept;\n"
            f"    iifname \"wan0\" ct state new meta l4proto udp drop\n"
            f"  }}\n}}\n" for fam in families)
        _nsexec(r.name, NFT, "-f", "-", input=rules)
        self.hosts[name] = r
        return r

    # running things

    def exec(self, node, argv: list[str], *, timeout: float = EXEC_TIMEOUT_S, check: bool = False,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run `argv` in the node's namespace and wait (at most `timeout` s; the command is killed
        and subprocess.TimeoutExpired raised after that). Text output is captured."""
        return subprocess.run([IP, "netns", "exec", _ns_of(node), *argv], input=input,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def snmp(self, node, table: str) -> dict[str, int]:
        """The node's ``table`` ("Tcp", "Udp", "Ip", ...) of /proc/net/snmp, which is per network
        namespace: {counter name: value}; {} if the table is not there."""
        lines = self.exec(node, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
        for names, values in zip(lines, lines[1:]):
            if names.startswith(table + ":") and values.startswith(table + ":"):
                return {k: int(v) for k, v in zip(names.split()[1:], values.split()[1:])}
        return {}

    def spawn(self, node, argv: list[str], *, log: str | os.PathLike | None = None,
              **popen_kwargs) -> subprocess.Popen:
        """Start `argv` in the background in the node's namespace, in its own process group.
        The Popen's pid is the command's own (`ip netns exec` execs it). stdout and stderr go to
        `log` (appended) or to /dev/null. Killed at teardown: SIGTERM, then SIGKILL."""
        ns = _ns_of(node)
        if ns not in self._namespaces:
            raise LabError(f"{ns} is not a namespace of this lab")
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            kw = dict(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            kw.update(popen_kwargs)
            p = subprocess.Popen([IP, "netns", "exec", ns, *argv], start_new_session=True, **kw)
        finally:
            if log is not None:
                out.close()
        self._procs.append(p)
        return p

    # impairments and mobility

    def set_loss(self, node, percent: int) -> None:
        """Drop `percent`% of packets at random (nft numgen): for a Router on its forwarding path
        (each direction separately), for a Host on its input and output. 0 removes the rule."""
        if not 0 <= percent <= 100:
            raise LabError(f"loss percent {percent} not in 0..100")
        ns = _ns_of(node)
        table = f"{self.prefix}_loss"
        rules = f"table inet {table}\ndelete table inet {table}\n"   # idempotent delete
        if percent:
            hooks = ["forward"] if isinstance(node, Router) else ["input", "output"]
            match = "" if percent == 100 else f"numgen random mod 100 < {percent} "
            rules += f"table inet {table} {{\n" + "".join(
                f"  chain {h} {{\n    type filter hook {h} priority filter; policy accept;\n"
                f"    {match}drop\n  }}\n" for h in hooks) + "}\n"
        _nsexec(ns, NFT, "-f", "-", input=rules)

    def move(self, host: Host, to: str | Segment | None = None) -> Host:
        """Change the host's primary address (roaming). `to` is:
        - an address (v4 or v6) in the same segment's subnet: that family's address is replaced;
        - None: the next free address of the segment (both families the host has);
        - a Segment: the interface is re-plugged there (same name), with new addresses and routes.
        Default routes are restored. Returns the host, updated."""
        port = host.primary
        if isinstance(to, Segment):
            v4, v6 = port.addr4 is not None, port.addr6 is not None
            _ip(host.name, "link", "del", port.iface)          # removes the bridge end as well
            host.ports.pop(0)
            new = self.attach(host, to, v4=v4, v6=v6, iface=port.iface)
            host.ports.insert(0, host.ports.pop())
            self._default_routes(host.name, new)
            return host
        seg = port.segment
        if to is None:
            i = seg.allocate()
            if port.addr4:
                port.addr4 = self._set_addr(host.name, port.iface, seg.net4, str(seg.net4[i]), port.addr4)
            if port.addr6:
                port.addr6 = self._set_addr(host.name, port.iface, seg.net6, str(seg.net6[i]), port.addr6)
        else:
            addr = ipaddress.ip_address(to)
            net = seg.net4 if addr.version == 4 else seg.net6
            if net is None or addr not in net:
                raise LabError(f"{addr} is not in segment {seg.name}'s subnet {net}")
            if addr.version == 4:
                port.addr4 = self._set_addr(host.name, port.iface, net, str(addr), port.addr4)
            else:
                port.addr6 = self._set_addr(host.name, port.iface, net, str(addr), port.addr6)
        self._default_routes(host.name, port)
        return host
