"""`make bench` (`python -m lab.bench`, or `cyphonic-bench` in the development venv): the
benchmarks (benchmarks, not tests). Each part prints a table and writes ``<out>/<part>.json``.

- ``crypto`` (lab.bench.core): the crypto core on one core, seal/open against a plain PyNaCl
  call, and full handshakes per second (``crypto.json``);
- ``cloud`` (lab.bench.cloud): logins, registrations and route selections per second against
  the cloud instances (one on SQLite, one to three on PostgreSQL) (``cloud.json``);
- ``node`` (lab.bench.node): two cyphonic-node daemons against plain routing and wireguard-go
  in network namespaces: ping RTT, iperf3 UDP (1400- and 1300-byte datagrams) and TCP (1 and 4
  streams, both directions), CPU per datagram and per 1448 B of TCP payload, tunnel set-up, memory (``node.json``;
  needs root, wireguard-go and wireguard-tools);
- ``adapter`` (lab.bench.adapter): a general node through cyphonic-adapter, side by side in one
  run with the node daemon, plain routing and wireguard-go: the same measurements and the
  adapter's memory (``adapter.json``; needs root);
- ``flood`` (lab.bench.flood): an existing tunnel's ping loss and RTT without and under a flood of
  valid-mac1 handshake initiations from spoofed sources, for the node daemon, the adapter and
  wireguard-go, and a fresh tunnel's set-up under it (``flood.json``; needs root);
- ``offload`` (lab.bench.offload, not part of ``all``): TCP, UDP and ping through node daemons
  with each ``tun_offload`` mode (off, merge, full) and through wireguard-go, in one
  interleaved run (``offload.json``; needs root).

Each part also runs alone: ``python -m lab.bench.<module> --out build/bench``.
"""

from __future__ import annotations

import argparse

PARTS = ("crypto", "cloud", "node", "adapter", "flood", "offload")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--rounds", type=int, default=5, help="crypto part: rounds (best of)")
    ap.add_argument("--packets", type=int, default=100_000, help="crypto part: packets per round")
    ap.add_argument("--only", choices=(*PARTS, "all"), default="all",
                    help="crypto core, the cloud process, the node pair against wireguard-go, a general "
                         "node through the adapter against those, a handshake flood at each, or all of them")
    args = ap.parse_args(argv)
    if args.only in ("crypto", "all"):
        from . import core
        core.run(args.out, rounds=args.rounds, packets=args.packets)
    if args.only in ("cloud", "all"):
        from . import cloud
        cloud.run(args.out)
    if args.only in ("node", "all"):
        from . import node
        node.run(args.out)
    if args.only in ("adapter", "all"):
        from . import adapter
        adapter.run(args.out)
    if args.only in ("flood", "all"):
        from . import flood
        flood.run(args.out)
    if args.only == "offload":
        from . import offload
        offload.run(args.out)
    return 0
