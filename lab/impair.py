"""A user-space impairment stage for the lab (this kernel has no netem): reorders, and
optionally delays, the UDP packets a router forwards, through NFQUEUE.

    python -m lab.impair --queue 7 --swap-every 4 [--seconds 60]

Every ``swap-every``-th packet is held back and released right after the next one, so the two
arrive swapped. Bounded: at most one packet held, and the process ends after ``--seconds``.
Install the steering rule in the router's namespace first:
    iptables-nft -I FORWARD -p udp -j NFQUEUE --queue-num 7
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from netfilterqueue import NetfilterQueue


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queue", type=int, default=7)
    ap.add_argument("--swap-every", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    held = []
    count = [0, 0]  # packets, swaps

    def on_packet(pkt) -> None:
        count[0] += 1
        if held:
            pkt.accept()
            held.pop().accept()  # the held one goes after the one that came later: swapped
            count[1] += 1
        elif count[0] % args.swap_every == 0:
            held.append(pkt)
        else:
            pkt.accept()

    nfq = NetfilterQueue()
    nfq.bind(args.queue, on_packet)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    end = time.monotonic() + args.seconds
    try:
        import select
        fd = nfq.get_fd()
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                nfq.run(block=False)
            elif held:  # nothing came after it: let it go
                held.pop().accept()
    finally:
        for p in held:
            p.accept()
        nfq.unbind()
        print(f"impair: {count[0]} packets, {count[1]} swapped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
