"""`make bench`, cloud part: logins, registrations and route selections per second
against ONE real ``cyphonic-cloud serve`` process (AS + NMS) on loopback.

What runs:
- a real cloud process in a temporary directory (``cyphonic-cloud init``, a
  reusable ``enroll`` token, ``serve``), listening on 127.0.0.1 on a free port,
  with keepalive and registration lifetimes so long that nothing expires;
- in this process, a load generator: N simulated nodes, each a sans-IO
  ``ControlClient`` with its own static key, all on ONE non-blocking UDP socket.
  Received datagrams are handed to their client by session index (control data
  carries the receiver's index at bytes 4..8, a control handshake response the
  initiator's at bytes 8..12; both are the index the client chose for its
  handshake). Each node sends from its own loopback address (127.100.x.y, chosen
  per datagram with IP_PKTINFO): the cloud admits only
  ``HANDSHAKE_RATE_PER_SOURCE_PER_S`` handshakes a second per source address, so
  N nodes behind one address would measure that limit instead of the cloud.

Phases, each bounded in count and in wall time:
  logins         LoginRequest with the token (Noise handshake + enrollment + certificate)
  handshakes     the second handshake, now carrying the certificate (as a node does after login)
  registrations  RegisterRequest, pipelined (several outstanding per node, a global cap)
  routes         half the nodes ask RouteRequest for the other half; a responder accepts
                 each pushed RouteDirection with a TunnelResponse; a route counts when the
                 initiator has its RouteDirection

Per phase: completions per wall second, and per second of the cloud process's
CPU time (utime+stime from /proc/<pid>/stat): the first is what this shared
2-core machine did with the generator competing for the cores; the second is
what one cloud process does with a core to itself. The generator's CPU time,
client retransmissions and kernel UDP receive-buffer drops are reported too.
The table is printed and written to ``<out>/cloud.json``.
"""

from __future__ import annotations

import argparse
import select
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections import Counter

from cyphonic.cloud.keys import parse_cloud_key
from cyphonic.control import Connected, ControlClient, Incoming, Reply, RequestTimedOut, Unreachable
from cyphonic.handshake import StaticIdentity
from cyphonic.wire import signaling as sig

from ..cloudproc import CloudProcess
from . import common

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
DOMAIN = "bench.test"

TARGET_REGISTRATIONS_PER_S = 2000
TARGET_ROUTES_PER_S = 500

# Bounds of the load loops.
LOGIN_CONCURRENCY = 32       # handshakes in flight at once (initiations are the biggest datagrams)
MAX_INFLIGHT = 96            # requests outstanding at once: the cloud's default UDP receive buffer
                             # (~212 KB) holds only ~170 small datagrams; more would be dropped
PER_NODE_WINDOW = 4          # requests outstanding per node
DRAIN_S = 3.0                # after a phase: wait this long at most for its stragglers
TIMER_CHECK_S = 0.05         # how often the clients' timers are looked at


# --- the cloud process --------------------------------------------------------------------

# The config of the cloud under load: AS+NMS only, IPv4 only, nothing expires during the run.
CLOUD_SETTINGS = {"services": '["as", "nms"]', "cert_lifetime_s": 86400, "log_level": '"info"'}


def bench_cloud(tmpdir: str, profile: str | None = None) -> CloudProcess:
    """Not started yet: the caller enrolls first, then ``start()``; ``stop()`` always."""
    return CloudProcess(tmpdir, domain=DOMAIN, prefix="100.64.0.0/10", listen6="", keepalive_s=3600,
                        lifetime_s=86400, extra=CLOUD_SETTINGS, profile=profile, die_with_parent=True)


def _udp_counters() -> dict[str, int]:
    """The kernel's UDP counters (RcvbufErrors: datagrams dropped on a full receive buffer)."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return dict(zip(rows[0][1:], map(int, rows[1][1:])))
    except (OSError, IndexError, ValueError):
        return {}


# --- the load generator ---------------------------------------------------------------------

class SimNode:
    __slots__ = ("i", "identity", "client", "src", "cmsg", "name", "fqdn", "endpoint", "out",
                 "connected", "done")

    def __init__(self, i: int, cloud_static: bytes, cloud_addr, port: int) -> None:
        self.i = i
        self.identity = StaticIdentity.generate()
        self.client = ControlClient(self.identity, cloud_static, cloud_addr)
        self.src = f"127.100.{i // 250}.{i % 250 + 1}"
        self.cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("I4s4s", 0, socket.inet_aton(self.src), bytes(4)))]
        self.name = f"ld{i:05d}"
        self.fqdn = ""
        self.endpoint = sig.Endpoint(self.src, port)
        self.out = 0            # this node's requests outstanding in the current phase
        self.connected = False
        self.done = False


class Phase:
    """Counts of one measured phase."""

    def __init__(self, name: str, limit: int, max_s: float) -> None:
        self.name = name
        self.limit = limit
        self.max_s = max_s
        self.issued = 0
        self.ok = 0
        self.errors: Counter = Counter()
        self.timeouts = 0
        self.inflight = 0
        self.finished = False   # stop issuing (limit reached)

    def settled(self) -> int:
        return self.ok + sum(self.errors.values()) + self.timeouts


class LoadGenerator:
    def __init__(self, cloud_addr: tuple[str, int], cloud_static: bytes, n: int) -> None:
        self.cloud_addr = cloud_addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, b"lo")  # loopback only (best effort)
        except OSError:
            pass
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            except OSError:
                pass
        # The wildcard address, so that replies to every node's 127.100.x.y arrive here; datagrams
        # from anywhere but the cloud's address are dropped unread.
        self.sock.bind(("0.0.0.0", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.poll = select.poll()
        self.poll.register(self.sock, select.POLLIN)
        self.nodes = [SimNode(i, cloud_static, cloud_addr, self.port) for i in range(n)]
        self.by_index: dict[int, SimNode] = {}
        self.handler = None
        self.foreign = 0
        self.unknown_index = 0
        self.send_errors: Counter = Counter()
        self._next_timer_check = 0.0

    def close(self) -> None:
        self.sock.close()

    # I/O

    def flush(self, node: SimNode) -> None:
        client = node.client
        if client.handshake is not None:
            self.by_index[client.handshake.local_index] = node
        sendmsg = self.sock.sendmsg
        for data, addr in client.datagrams_to_send():
            try:
                sendmsg((data,), node.cmsg, 0, addr)
            except OSError as exc:
                self.send_errors[type(exc).__name__] += 1

    def pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for datagrams, hand all that arrived to their clients, run timers."""
        if self.poll.poll(max(0, int(timeout_s * 1000))):
            recvfrom = self.sock.recvfrom
            by_index = self.by_index
            cloud = self.cloud_addr
            now = time.time()
            for _ in range(4096):
                try:
                    data, addr = recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    break
                if addr != cloud or len(data) < 12:
                    self.foreign += 1
                    continue
                mtype = data[0]
                if mtype == 8:
                    node = by_index.get(int.from_bytes(data[4:8], "big"))
                elif mtype == 7:
                    node = by_index.get(int.from_bytes(data[8:12], "big"))
                else:
                    node = None
                if node is None:
                    self.unknown_index += 1
                    continue
                client = node.client
                client.receive_datagram(data, addr, now)
                while (event := client.next_event()) is not None:
                    self.handler(node, event, now)
                self.flush(node)
        now = time.time()
        if now >= self._next_timer_check:
            self._next_timer_check = now + TIMER_CHECK_S
            for node in self.nodes:
                client = node.client
                t = client.get_timer()
                if t is not None and t <= now:
                    client.handle_timer(now)
                    while (event := client.next_event()) is not None:
                        self.handler(node, event, now)
                    self.flush(node)

    def retransmits(self) -> int:
        return sum(n.client.counters["requests_retransmitted"] + n.client.counters["initiations_retransmitted"]
                   for n in self.nodes)

    def run(self, phase: Phase, start, done) -> None:
        """Call ``start(now)``, then pump until ``done()`` or the phase's time is up."""
        deadline = time.perf_counter() + phase.max_s
        start(time.time())
        while not done() and time.perf_counter() < deadline:
            self.pump(0.05)


def _measure(gen: LoadGenerator, cloud: CloudProcess, phase: Phase, start, done, count_of) -> dict:
    """Run one phase; return its row. ``count_of()`` is the number of completions."""
    udp0 = _udp_counters()
    rt0 = gen.retransmits()
    c0, g0, t0 = common.cpu_seconds(cloud.proc.pid), time.process_time(), time.perf_counter()
    gen.run(phase, start, done)
    t1, c1, g1 = time.perf_counter(), common.cpu_seconds(cloud.proc.pid), time.process_time()
    count = count_of()
    phase.finished = True
    # Let the stragglers come back (not counted) so that the next phase starts clean.
    end = time.perf_counter() + DRAIN_S
    while phase.inflight > 0 and time.perf_counter() < end:
        gen.pump(0.05)
    udp1 = _udp_counters()
    seconds = t1 - t0
    unanswered = phase.inflight
    cloud_cpu = c1 - c0
    return {"count": count, "seconds": round(seconds, 3), "per_s": round(count / seconds, 1) if seconds else 0.0,
            "cloud_cpu_s": round(cloud_cpu, 3),
            "per_cloud_cpu_s": round(count / cloud_cpu, 1) if cloud_cpu > 0 else None,
            "cloud_cpu_share": round(cloud_cpu / seconds, 2) if seconds else None,
            "generator_cpu_s": round(g1 - g0, 3),
            "errors": sum(phase.errors.values()), "error_codes": dict(phase.errors),
            "timeouts": phase.timeouts, "issued": phase.issued,
            "unanswered": unanswered,  # still outstanding DRAIN_S after the phase ended
            "hit_time_limit": count < phase.limit,
            "retransmits": gen.retransmits() - rt0,
            "udp_rcvbuf_errors": udp1.get("RcvbufErrors", 0) - udp0.get("RcvbufErrors", 0)}


def _error_name(msg: sig.Message) -> str:
    """How a wrong answer is counted: an Error by its code, anything else by its type."""
    if isinstance(msg, sig.Error):
        return getattr(msg.code, "name", str(msg.code))
    return type(msg).__name__


def _each_once(ph: Phase, nodes: list[SimNode], send):
    """Issue ``send(node, now)`` once per node, LOGIN_CONCURRENCY at a time: returns ``(issue,
    start)``; ``start(now)`` fills the slots, ``issue(now)`` refills one when a request ends."""
    queue = iter(nodes)

    def issue(now: float) -> None:
        node = next(queue, None)
        if node is None:
            return
        ph.issued += 1
        ph.inflight += 1
        send(node, now)

    def start(now: float) -> None:
        for _ in range(LOGIN_CONCURRENCY):
            issue(now)

    return issue, start


def phase_logins(gen: LoadGenerator, cloud: CloudProcess, token: bytes, max_s: float) -> dict:
    nodes = gen.nodes
    ph = Phase("logins", len(nodes), max_s)

    def send(node: SimNode, now: float) -> None:
        node.client.request(sig.LoginRequest(token=token, name_hint=node.name, static_public=node.identity.public,
                                             software="cyphonic-bench"), now)
        gen.flush(node)

    issue, start = _each_once(ph, nodes, send)

    def on_event(node: SimNode, ev, now: float) -> None:
        if isinstance(ev, Reply):
            ph.inflight -= 1
            if isinstance(ev.msg, sig.LoginResponse):
                ph.ok += 1
                node.fqdn = ev.msg.fqdn
                node.identity = node.identity.with_certificate(ev.msg.certificate)
                node.done = True
            else:
                ph.errors[_error_name(ev.msg)] += 1
            if not ph.finished:
                issue(now)
        elif isinstance(ev, RequestTimedOut):
            ph.inflight -= 1
            ph.timeouts += 1
            if not ph.finished:
                issue(now)

    gen.handler = on_event
    return _measure(gen, cloud, ph, start, lambda: ph.settled() >= len(nodes), lambda: ph.ok)


def phase_handshakes(gen: LoadGenerator, cloud: CloudProcess, max_s: float) -> dict:
    """After login: set the certificate and handshake again (the NMS wants it in the handshake)."""
    nodes = [n for n in gen.nodes if n.done]
    ph = Phase("handshakes", len(nodes), max_s)

    def send(node: SimNode, now: float) -> None:
        node.connected = False
        node.client.set_identity(node.identity)
        node.client.set_cloud_address(gen.cloud_addr, now)
        gen.flush(node)

    issue, start = _each_once(ph, nodes, send)

    def on_event(node: SimNode, ev, now: float) -> None:
        if isinstance(ev, Connected) and not node.connected:
            node.connected = True
            ph.ok += 1
            ph.inflight -= 1
            if not ph.finished:
                issue(now)
        elif isinstance(ev, Unreachable):
            ph.inflight -= 1
            ph.timeouts += 1

    gen.handler = on_event
    return _measure(gen, cloud, ph, start, lambda: ph.settled() >= len(nodes), lambda: ph.ok)


def _pipelined(gen: LoadGenerator, ph: Phase, senders: list[SimNode], make_request, window: int, cap: int):
    """Issue requests round-robin over ``senders``: at most ``window`` per node and ``cap`` in all."""
    rr = [0]

    def issue_some(now: float) -> None:
        n = len(senders)
        tries = 0
        while ph.inflight < cap and ph.issued < ph.limit and not ph.finished and tries < n:
            node = senders[rr[0]]
            rr[0] = (rr[0] + 1) % n
            if node.out >= window:
                tries += 1
                continue
            tries = 0
            node.out += 1
            ph.inflight += 1
            ph.issued += 1
            node.client.request(make_request(node), now)
            gen.flush(node)

    return issue_some


def _settle(ph: Phase, node: SimNode, ev, ok_type: type, issue_some, now: float) -> bool:
    """A pipelined request's end, its Reply or its timeout: count it, free its slot, issue more.
    True for a Reply of ``ok_type``; False for any other answer, a timeout or another event."""
    if isinstance(ev, Reply):
        ok = isinstance(ev.msg, ok_type)
        if ok:
            ph.ok += 1
        else:
            ph.errors[_error_name(ev.msg)] += 1
    elif isinstance(ev, RequestTimedOut):
        ok = False
        ph.timeouts += 1
    else:
        return False
    node.out -= 1
    ph.inflight -= 1
    issue_some(now)
    return ok


def phase_registrations(gen: LoadGenerator, cloud: CloudProcess, limit: int, max_s: float,
                        window: int, cap: int) -> dict:
    senders = [n for n in gen.nodes if n.connected]
    ph = Phase("registrations", limit, max_s)
    for n in senders:
        n.out = 0
    issue_some = _pipelined(gen, ph, senders,
                            lambda node: sig.RegisterRequest(local_endpoints=(node.endpoint,), flags=1),
                            window, cap)

    def on_event(node: SimNode, ev, now: float) -> None:
        _settle(ph, node, ev, sig.RegisterResponse, issue_some, now)

    gen.handler = on_event
    return _measure(gen, cloud, ph, issue_some, lambda: ph.issued >= limit and ph.inflight == 0, lambda: ph.ok)


def phase_routes(gen: LoadGenerator, cloud: CloudProcess, limit: int, max_s: float,
                 window: int, cap: int) -> dict:
    ready = [n for n in gen.nodes if n.connected and n.fqdn]
    half = len(ready) // 2
    initiators, responders = ready[:half], ready[half:]
    ph = Phase("routes", limit, max_s)
    answered = Counter()
    for n in ready:
        n.out = 0
    k = [0]

    def make(node: SimNode) -> sig.Message:
        k[0] += 1
        return sig.RouteRequest(peer_fqdn=responders[(node.i + k[0]) % len(responders)].fqdn)

    issue_some = _pipelined(gen, ph, initiators, make, window, cap)

    def on_event(node: SimNode, ev, now: float) -> None:
        if isinstance(ev, Incoming):
            if isinstance(ev.msg, sig.RouteDirection):
                answered["directions_to_responders"] += 1
                node.client.reply(ev, sig.TunnelResponse(route_id=ev.msg.route_id, accepted=True, code=None), now)
            else:
                answered[f"unexpected_{type(ev.msg).__name__}"] += 1
        elif _settle(ph, node, ev, sig.RouteDirection, issue_some, now):
            answered[f"route_{ev.msg.route_type.name.lower()}"] += 1

    gen.handler = on_event
    if not initiators or not responders:
        raise RuntimeError("routes need at least two connected nodes")
    row = _measure(gen, cloud, ph, issue_some, lambda: ph.issued >= limit and ph.inflight == 0, lambda: ph.ok)
    row["detail"] = dict(answered)
    row["initiators"], row["responders"] = len(initiators), len(responders)
    return row


# --- run, report ------------------------------------------------------------------------------

def run(out_dir: str, *, nodes: int = 200, seconds: float = 15.0, registrations: int = 20_000,
        routes: int = 10_000, window: int = PER_NODE_WINDOW, inflight: int = MAX_INFLIGHT,
        login_seconds: float = 20.0, quiet: bool = False, profile: str | None = None) -> dict:
    """Start a cloud, load it, write ``<out_dir>/cloud.json``; returns what was written.
    ``profile``: run the cloud under cProfile and write its stats to this file (slows it down)."""
    if nodes < 2:
        raise ValueError("at least two nodes")
    machine = common.machine()
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="cyphonic-cloud-bench-")
    cloud = gen = None
    old_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM: clean up like Ctrl-C
        old_term = signal.signal(signal.SIGTERM, common.raise_system_exit)
    try:
        cloud = bench_cloud(tmp, profile)
        token = cloud.cli("enroll", "bench", "--reusable", "--expires", "1d").strip().encode()
        cloud.start(timeout_s=20)
        _, cloud_static = parse_cloud_key(cloud.cloud_key)
        gen = LoadGenerator(("127.0.0.1", cloud.signaling_port), cloud_static, nodes)
        phases = {}
        phases["logins"] = phase_logins(gen, cloud, token, login_seconds)
        phases["handshakes"] = phase_handshakes(gen, cloud, login_seconds)
        phases["registrations"] = phase_registrations(gen, cloud, registrations, seconds, window, inflight)
        phases["routes"] = phase_routes(gen, cloud, routes, seconds, window, inflight)
        if not cloud.alive():
            raise RuntimeError(f"the cloud died during the run: {cloud.log()[-2000:]}")
        rc = cloud.stop()  # it writes stats.json as it stops
        cloud_stats = cloud.last_stats()
        log_lines = cloud.log().count("\n")
    finally:
        if gen is not None:
            gen.close()
        if cloud is not None:
            cloud.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    def target(row: dict, rate_key: str, goal: int) -> dict:
        """Met: the rate reached AND every request of the phase answered without error."""
        failed = row["errors"] + row["timeouts"] + row["unanswered"]
        rate = row[rate_key] or 0
        return {"target": goal, "measured": rate, "met": rate >= goal and failed == 0,
                "failed_requests": failed}

    reg, rt = phases["registrations"], phases["routes"]
    targets = {
        "registrations_per_s_wall": target(reg, "per_s", TARGET_REGISTRATIONS_PER_S),
        "routes_per_s_wall": target(rt, "per_s", TARGET_ROUTES_PER_S),
        "registrations_per_cloud_cpu_s": target(reg, "per_cloud_cpu_s", TARGET_REGISTRATIONS_PER_S),
        "routes_per_cloud_cpu_s": target(rt, "per_cloud_cpu_s", TARGET_ROUTES_PER_S),
    }
    result = {
        "what": "one cyphonic-cloud serve process (AS+NMS) on loopback; load generator in the bench process",
        "machine": machine,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": {"nodes": nodes, "max_seconds_per_phase": seconds, "max_login_seconds": login_seconds,
                       "max_registrations": registrations, "max_routes": routes,
                       "per_node_window": window, "max_inflight": inflight,
                       "login_concurrency": LOGIN_CONCURRENCY, "cloud_under_cprofile": bool(profile),
                       "source_addresses": "one 127.100.x.y per node, one socket (IP_PKTINFO)"},
        "phases": phases,
        "targets": targets,
        "targets_note": ("the issue's targets are judged on per_s (completions per wall second on this "
                         "shared 2-core machine, generator included); per_cloud_cpu_s is completions per "
                         "second of the cloud process's own CPU time, i.e. its rate with a core to itself; "
                         "a target counts as met only if no request of the phase failed or went unanswered"),
        "cloud": {"exit_code": rc, "log_lines": log_lines,
                  "counters": cloud_stats.get("counters"), "nms": cloud_stats.get("nms"),
                  "control": cloud_stats.get("control"), "control_drops": cloud_stats.get("control_drops"),
                  "socket_errors": cloud_stats.get("socket_errors"), "registered": cloud_stats.get("registered")},
        "generator": {"foreign_datagrams": gen.foreign, "unknown_index": gen.unknown_index,
                      "send_errors": dict(gen.send_errors),
                      "client_drops": dict(sum((n.client.drops for n in gen.nodes), Counter()))},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    if not quiet:
        print_table(result)
    path = common.write_result(out_dir, "cloud", result)
    if not quiet:
        print(f"written {path}")
    return result


def print_table(result: dict) -> None:
    p = result["parameters"]
    print(f"cloud control plane: one `cyphonic-cloud serve` (AS+NMS) on loopback, {p['nodes']} simulated nodes "
          f"on one socket, window {p['per_node_window']}/node, at most {p['max_inflight']} in flight")
    print(f"{'phase':14} {'count':>7} {'wall s':>7} {'per s':>9} {'cloud CPU s':>11} {'per cloud-CPU s':>15} "
          f"{'gen CPU s':>9} {'errors':>6} {'lost':>5} {'retx':>5} {'drops':>5}")
    for name, r in result["phases"].items():
        per_cpu = f"{r['per_cloud_cpu_s']:,.0f}" if r["per_cloud_cpu_s"] else "-"
        print(f"{name:14} {r['count']:>7,} {r['seconds']:>7.2f} {r['per_s']:>9,.0f} {r['cloud_cpu_s']:>11.2f} "
              f"{per_cpu:>15} {r['generator_cpu_s']:>9.2f} {r['errors'] + r['timeouts']:>6} "
              f"{r['unanswered']:>5} {r['retransmits']:>5} {r['udp_rcvbuf_errors']:>5}")
    print("(per s: completions per wall second, generator sharing the 2 cores; per cloud-CPU s: per second of "
          "the cloud process's own CPU time; errors: Error answers and timeouts; lost: requests never answered; "
          "retx: client retransmissions; drops: kernel UDP receive-buffer drops, system-wide counter)")
    for name, r in result["phases"].items():
        if r["unanswered"] or r["errors"] or r["timeouts"]:
            print(f"WARNING: {name}: {r['errors']} errors {r['error_codes']}, {r['timeouts']} timeouts, "
                  f"{r['unanswered']} requests never answered"
                  + (" (the phase ran into its time limit)" if r["hit_time_limit"] else ""))
    t = result["targets"]
    def verdict(v: dict) -> str:
        why = f", {v['failed_requests']} requests failed or unanswered" if v["failed_requests"] else ""
        return f"{'met' if v['met'] else 'NOT met'} ({v['measured']:,.0f}/s{why})"

    print("targets (judged per wall second; met only if no request failed): "
          + ", ".join(f"{k.replace('_per_s_wall', '')} >= {v['target']}/s {verdict(v)}"
                      for k, v in t.items() if k.endswith("_wall")))
    print("  the same per cloud-CPU second: "
          + ", ".join(f"{k.replace('_per_cloud_cpu_s', '')} {verdict(v)}"
                      for k, v in t.items() if k.endswith("_cloud_cpu_s")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=15.0, help="max wall seconds of each load phase")
    ap.add_argument("--registrations", type=int, default=20_000)
    ap.add_argument("--routes", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=PER_NODE_WINDOW)
    ap.add_argument("--inflight", type=int, default=MAX_INFLIGHT)
    ap.add_argument("--profile", metavar="FILE", help="run the cloud under cProfile, stats to FILE, "
                    "and print its top functions (the rates then include the profiler's overhead)")
    args = ap.parse_args(argv)
    run(args.out, nodes=args.nodes, seconds=args.seconds, registrations=args.registrations, routes=args.routes,
        window=args.window, inflight=args.inflight, profile=args.profile)
    if args.profile:
        import pstats
        st = pstats.Stats(args.profile)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
