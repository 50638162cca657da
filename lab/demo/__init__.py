"""`make demo` (`python -m lab.demo`, or `cyphonic-demo` in the development venv): the whole
system working for real, with stock tools.

- Parts 1 and 2 (`lab.demo.netns`, as root): a general node behind a CYPHONIC adapter, and two
  node daemons behind NATs, in network namespaces (the lab, prefix ``cyd``).
- Part 3 (`lab.demo.loopback`, no root needed): the protocol under attack, processes on 127.0.0.1.
- Part 4 (`lab.demo.cluster`, as root): the cloud as three instances and two relays on a
  PostgreSQL server started for it; kill -9 of an instance and of a relay during traffic.

Not root, or ``--loopback``: part 3 only. The exit status is 0 when every part that ran was OK.
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loopback", action="store_true", help="only part 3 (loopback, no namespaces)")
    ap.add_argument("--cluster", action="store_true", help="only part 4 (several cloud instances, as root)")
    args = ap.parse_args(argv)
    from .loopback import loopback_demo
    if args.loopback:
        return loopback_demo()
    if os.geteuid() != 0:
        print("(not root: skipping parts 1 and 2, which need network namespaces; run `make demo` as root)\n")
        return loopback_demo()
    from .cluster import run as cluster_demo
    if args.cluster:
        return cluster_demo()
    from .netns import run as netns_demo
    rc = netns_demo()
    print()
    rc = loopback_demo() or rc
    print()
    return cluster_demo() or rc
