"""Where a lone packet's time goes: the ping round trip of each tunnel path cut into hops.

tcpdump stamps every echo and every tunnel datagram where it passes (all namespaces share one
kernel clock), on four points of a path: the sender's clear side (the node daemon's or
wireguard-go's TUN; for the adapter, its LAN port, where the general node's packets come in),
the sender's wire (eth0), n2's wire and n2's TUN. Each echo request is followed through them:

    t1 request on the clear side   t2 its datagram leaves the sender   t3 ... reaches n2
    t4 request on n2's TUN          t5 n2's kernel answers on the TUN   t6 the answer leaves n2
    t7 it reaches the sender        t8 the answer on the clear side

and the hops are ``out`` (t2 - t1: the sender's tunnel, a sleeping process woken), ``peer_in``
(t4 - t3), ``peer_kernel`` (t5 - t4), ``peer_out`` (t6 - t5), ``wire`` (t3 - t2 + t7 - t6)
and ``back`` (t8 - t7: the sender's tunnel, usually awake, busy polling), in medians of µs.
An echo missing at any point, or answered after ``MAX_RTT_S``, is left out (``paired``
says how many were used). The captures cost the same on every path: compare paths, not the
sum with the plain ping rows.

``pair`` is pure (timestamps in, hops out) and unit-tested; ``measure`` runs the captures.
"""

from __future__ import annotations

import os
import re
import select
import statistics
import subprocess
import time
from bisect import bisect_left

HOPS = ("out", "peer_in", "peer_kernel", "peer_out", "wire", "back", "total")
HOP_LABELS = {
    "out": "ping hop: clear request -> datagram out, sender (µs)",
    "peer_in": "ping hop: datagram in -> TUN, n2 (µs)",
    "peer_kernel": "ping hop: n2's kernel answers (µs)",
    "peer_out": "ping hop: TUN -> datagram out, n2 (µs)",
    "wire": "ping hop: on the wire, both ways (µs)",
    "back": "ping hop: datagram in -> clear answer, sender (µs)",
    "total": "ping hop: total, clear side to clear side (µs)",
}
MAX_RTT_S = 0.05
COUNT = 60
INTERVAL_S = 0.1
CAPTURE_START_S = 10.0    # at most this long for every tcpdump to say it is listening
_STAMP = re.compile(r"^(\d+\.\d+) ")


def parse(text: str) -> list[tuple[float, str]]:
    """``tcpdump -tt -n`` lines as (seconds, line), in order; other lines are skipped."""
    out = []
    for line in text.splitlines():
        m = _STAMP.match(line)
        if m:
            out.append((float(m.group(1)), line))
    return out


def _first_at_or_after(times: list[float], t: float) -> float | None:
    i = bisect_left(times, t)
    return times[i] if i < len(times) else None


def _last_in(times: list[float], lo: float, hi: float) -> float | None:
    i = bisect_left(times, hi + 1e-12) - 1
    return times[i] if i >= 0 and times[i] >= lo else None


def pair(clear: list[tuple[float, str]], wire: list[tuple[float, str]], peer_wire: list[tuple[float, str]],
         peer_clear: list[tuple[float, str]], max_rtt_s: float = MAX_RTT_S) -> dict[str, list[float]]:
    """Each echo request on the clear side followed through the other points (module doc):
    {hop: [seconds, one per echo followed all the way]}."""
    def kind(points, what):
        return sorted(t for t, line in points if what in line)
    c_req, c_rep = kind(clear, "echo request"), kind(clear, "echo reply")
    p_req, p_rep = kind(peer_clear, "echo request"), kind(peer_clear, "echo reply")
    w = sorted(t for t, _ in wire)
    pw = sorted(t for t, _ in peer_wire)
    hops: dict[str, list[float]] = {h: [] for h in HOPS}
    for t1 in c_req:
        t2 = _first_at_or_after(w, t1)
        t3 = _first_at_or_after(pw, t2) if t2 is not None else None
        t4 = _first_at_or_after(p_req, t3) if t3 is not None else None
        t5 = _first_at_or_after(p_rep, t4) if t4 is not None else None
        t6 = _first_at_or_after(pw, t5) if t5 is not None else None
        t8 = _first_at_or_after(c_rep, t6) if t6 is not None else None
        t7 = _last_in(w, t6, t8) if t8 is not None else None
        if t7 is None or t8 - t1 > max_rtt_s:
            continue
        hops["out"].append(t2 - t1)
        hops["peer_in"].append(t4 - t3)
        hops["peer_kernel"].append(t5 - t4)
        hops["peer_out"].append(t6 - t5)
        hops["wire"].append((t3 - t2) + (t7 - t6))
        hops["back"].append(t8 - t7)
        hops["total"].append(t8 - t1)
    return hops


def medians_us(hops: dict[str, list[float]]) -> dict:
    out: dict = {h: (round(statistics.median(v) * 1e6) if v else None) for h, v in hops.items()}
    out["paired"] = len(hops.get("total", []))
    return out


def _capture(lab, host, iface: str, flt: str) -> subprocess.Popen:
    return lab.spawn(host, ["tcpdump", "-i", iface, "-n", "-l", "--immediate-mode", "-tt", "--time-stamp-precision=nano",
                            "-Q", "inout", "-B", "4096", flt],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _await_listening(p: subprocess.Popen, deadline: float) -> None:
    """Until tcpdump says "listening on" (its capture is attached); RuntimeError if it exits
    or says nothing by ``deadline`` (time.monotonic())."""
    said = ""
    while "listening on" not in said:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([p.stderr], [], [], left)[0]:
            raise RuntimeError(f"tcpdump did not start capturing: {said.strip()!r}")
        chunk = os.read(p.stderr.fileno(), 4096)      # (unbuffered: select sees what is left)
        if not chunk:
            raise RuntimeError(f"tcpdump exited: {said.strip()!r}")
        said += chunk.decode(errors="replace")


def _stop(p: subprocess.Popen) -> list[tuple[float, str]]:
    p.terminate()
    try:
        out, _ = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate(timeout=5)
    return parse(out or "")


def measure(bench, paths, count: int = COUNT, interval_s: float = INTERVAL_S) -> dict:
    """{path: medians_us(...) | {"error": ...}} for each tunnel path of ``bench`` (one ping run
    of ``count`` echoes each, paths one after the other). ``bench.hop_points(path)``: the
    sender's clear (host, interface), its wire (host, interface), and n2's TUN."""
    out = {}
    for path in paths:
        info = bench.path_info(path)
        clear, wire, peer_tun = bench.hop_points(path)
        n2 = bench.h["n2"]
        udp = f"udp and port {info['port']}"
        caps = [_capture(bench.lab, *clear, "icmp"), _capture(bench.lab, *wire, udp),
                _capture(bench.lab, n2, "eth0", udp), _capture(bench.lab, n2, peer_tun, "icmp")]
        failed = None
        try:
            deadline = time.monotonic() + CAPTURE_START_S
            for p in caps:
                _await_listening(p, deadline)
            bench.lab.exec(bench.h[info["client"]], ["ping", "-n", "-c", str(count), "-i", str(interval_s),
                                                     "-W", "2", info["target"]],
                           timeout=count * interval_s + 20)
            time.sleep(0.2)            # (grace: tcpdump prints what it read before it is stopped)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            failed = str(exc)          # a diagnostic row: reported, never the end of the bench
        finally:
            points = [_stop(p) for p in caps]
        res = medians_us(pair(*points))
        if failed:
            res = {"error": failed}
        elif not res["paired"]:
            res = {"error": f"no echo followed through all four points ({[len(p) for p in points]} lines)"}
        out[path] = res
    return out
