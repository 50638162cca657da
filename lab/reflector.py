"""A tiny UDP reflector, like a STUN binding request: the server answers every datagram with
the source address and port it saw. The lab uses it to see what a NAT maps a flow to.

As a module (run inside a namespace with `Lab.spawn` / `Lab.exec`):
    python -m lab.reflector serve ADDR PORT [PORT ...]       answers "IP PORT" on each port
    python -m lab.reflector probe [--bind PORT] HOST:PORT ...  one socket, prints JSON
                                                               {"HOST:PORT": ["IP", PORT], ...}
IPv6 targets are written [ADDR]:PORT. The probe retries every 0.2 s and gives up after
--timeout seconds per target (the answer is then null).

From Python: `serve(lab, node, addr, ports)` and `probe(lab, node, targets, bind_port)`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import socket
import sys
import time

RETRY_S = 0.2
PROBE_TIMEOUT_S = 5.0


def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def run_server(addr: str, ports: list[int]) -> None:
    socks = []
    for port in ports:
        s = socket.socket(_family(addr), socket.SOCK_DGRAM)
        s.bind((addr, port))
        socks.append(s)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            try:
                data, src = s.recvfrom(2048)
                s.sendto(f"{src[0]} {src[1]}".encode(), src)
            except OSError:
                pass     # e.g. ICMP unreachable from an earlier reply: keep serving


def run_probe(targets: list[str], bind_port: int, timeout: float) -> dict:
    host0, _ = _split(targets[0])
    fam = _family(host0)
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", bind_port))
    result = {}
    for target in targets:
        dest = _split(target)
        result[target] = None
        deadline = time.monotonic() + timeout
        while result[target] is None and time.monotonic() < deadline:
            try:
                s.sendto(b"probe", dest)
            except OSError:
                pass     # no route yet, or unreachable: retry until the deadline
            end = min(deadline, time.monotonic() + RETRY_S)
            while (left := end - time.monotonic()) > 0:
                if not select.select([s], [], [], left)[0]:
                    break
                try:
                    data, src = s.recvfrom(2048)
                except OSError:
                    continue
                if ipaddress.ip_address(src[0]) == ipaddress.ip_address(dest[0]) and src[1] == dest[1]:
                    ip, port = data.decode().split()
                    result[target] = [ip, int(port)]
                    break
    return result


def serve(lab, node, addr: str, ports: list[int], log=None):
    """Start a reflector in `node` on `addr` and each of `ports`; returns the Popen."""
    return lab.spawn(node, [sys.executable, "-m", "lab.reflector", "serve", addr, *map(str, ports)], log=log)


def probe(lab, node, targets: list[str], bind_port: int = 0,
          timeout: float = PROBE_TIMEOUT_S) -> dict:
    """From `node`, send to each HOST:PORT from one UDP socket; returns {target: (ip, port) or None}."""
    p = lab.exec(node, [sys.executable, "-m", "lab.reflector", "probe", "--bind", str(bind_port),
                        "--timeout", str(timeout), *targets],
                 timeout=timeout * len(targets) + 10, check=True)
    return {t: tuple(v) if v else None for t, v in json.loads(p.stdout).items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("addr")
    sv.add_argument("ports", nargs="+", type=int)
    pr = sub.add_parser("probe")
    pr.add_argument("--bind", type=int, default=0)
    pr.add_argument("--timeout", type=float, default=PROBE_TIMEOUT_S)
    pr.add_argument("targets", nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        run_server(a.addr, a.ports)
    else:
        print(json.dumps(run_probe(a.targets, a.bind, a.timeout)))


if __name__ == "__main__":
    main()
