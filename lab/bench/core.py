"""`make bench`, crypto core part (a benchmark, not a test).

Measures on one core, side by side in one run (this machine is shared: quote
ratios, not absolute numbers):
- seal and open per second for 64, 512 and 1400-byte packets through the data
  channel (``SendStream.seal`` / ``ReceiveSession.open``);
- a plain call of PyNaCl's ``nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt``
  on the same sizes (the baseline the target is stated against);
- full handshakes per second (both sides in one process: initiation, mac1,
  decrypt, certificate verification, response, keys);
- the per-segment Python cost of the TCP offloads (``cyphonic.offload``): the one's-complement
  sum of a 1,428-byte segment against the plain ``int.from_bytes(b) % 0xFFFF`` it folds
  before, a ``Coalescer`` merging 44 segments (each one's checksum verified), ``split_gso``
  cutting a 44-segment super-packet.

Each measurement is the best of several interleaved rounds. The table is
printed and written to ``<out>/crypto.json``.

    python -m lab.bench --only crypto --out build/bench
    python -m lab.bench.core --out build/bench        # the same, this part alone
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import struct
import time

import nacl.bindings as nb

from cyphonic import offload
from cyphonic.certs import CertificateAuthority, TrustStore
from cyphonic.datachannel import ReceiveSession, SendStream
from cyphonic.handshake import (InitiatorHandshake, StaticIdentity, check_mac1, consume_initiation,
                                create_response)

from .common import write_result

SIZES = (64, 512, 1400)
ROUNDS = 5
PACKETS = 100_000


def _rate(fn, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t)
    return n / best


def bench_sizes(rounds: int, n: int) -> list[dict]:
    key = os.urandom(32)
    rows = []
    for size in SIZES:
        msg = os.urandom(size)
        ad = bytes(16)
        nonce = bytes(12)
        enc = nb.crypto_aead_chacha20poly1305_ietf_encrypt

        def plain(k: int) -> None:
            for _ in range(k):
                enc(msg, ad, nonce, key)

        def seal(k: int) -> None:
            s = SendStream(key, 1)
            f = s.seal
            for _ in range(k):
                f(msg)

        def open_(k: int) -> None:
            r = ReceiveSession(key, 1)
            f = r.open
            for p in packets:
                f(p)

        s = SendStream(key, 1)
        packets = [s.seal(msg) for _ in range(n)]
        plain_rate = seal_rate = open_rate = 0.0
        for _ in range(rounds):  # interleave so a noisy neighbour hits all three alike
            plain_rate = max(plain_rate, _rate(plain, n, 1))
            seal_rate = max(seal_rate, _rate(seal, n, 1))
            open_rate = max(open_rate, _rate(open_, n, 1))
        rows.append({"bytes": size, "plain_pynacl_encrypt_per_s": round(plain_rate),
                     "seal_per_s": round(seal_rate), "open_per_s": round(open_rate),
                     "seal_us": round(1e6 / seal_rate, 3), "open_us": round(1e6 / open_rate, 3),
                     "plain_us": round(1e6 / plain_rate, 3),
                     "seal_speedup_vs_plain": round(seal_rate / plain_rate, 2)})
    return rows


def bench_handshakes(seconds: float) -> dict:
    ca = CertificateAuthority.generate()
    now = time.time()
    ids = []
    for i, name in enumerate(("a", "b")):
        ident = StaticIdentity.generate()
        cert = ca.issue(serial=i + 1, fqdn=f"{name}.bench.example", vip4=f"100.64.0.{i + 1}",
                        static_public=ident.public, not_before=int(now) - 60, not_after=int(now) + 3600)
        ids.append(ident.with_certificate(cert.encode()))
    a, b = ids
    trust = TrustStore.of(ca.public)
    count = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        init = InitiatorHandshake(a, b.public, 1)
        m1 = init.create_initiation(now + count)
        rec = consume_initiation(b, check_mac1(b, m1))
        trust.verify(rec.certificate, now, expected_static=rec.peer_static)
        m2, _ = create_response(b, rec, 2)
        init.consume_response(m2)
        count += 1
    elapsed = time.perf_counter() - t0
    return {"full_handshakes_per_s": round(count / elapsed, 1), "handshake_ms": round(elapsed / count * 1000, 3)}


MSS = 1408            # TCP payload per segment (the tunnel's MTU less headers)
RUN = 44              # segments per merged run and per super-packet (64 KB)


def _segment(seq: int, payload: bytes) -> bytes:
    src, dst = bytes([100, 64, 0, 2]), bytes([100, 64, 0, 3])
    tcp = struct.pack("!HHIIBBHHH", 5001, 40000, seq, 1, 0x50, 0x10, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", offload.checksum(ip)) + ip[12:]
    pseudo = offload.ones_sum(src + dst) + 6 + 20 + len(payload)
    tcp = tcp[:16] + struct.pack("!H", offload.checksum(tcp + payload, pseudo)) + tcp[18:]
    return ip + tcp + payload


def bench_segments(rounds: int) -> dict:
    """µs per TCP segment: the sum alone (folded, and the plain division), merging, cutting."""
    rng = random.Random(1)
    segs = [_segment(1000 + i * MSS, rng.randbytes(MSS)) for i in range(RUN)]
    if not offload.l4_checksum_ok(segs[0]):
        raise RuntimeError("bench segment built with a wrong checksum")
    body = segs[0][20:]
    big = bytes(segs[0][:40] + b"".join(x[40:] for x in segs))
    hdr = offload.VirtioNetHdr(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 40, MSS, 20, 16)

    def plain(k: int) -> None:
        for _ in range(k):
            int.from_bytes(body, "big") % 0xFFFF

    def folded(k: int) -> None:
        for _ in range(k):
            offload.ones_sum(body)

    def merge(k: int) -> None:
        for _ in range(k // RUN):
            c = offload.Coalescer()
            for x in segs:
                c.push(x)
            c.flush()

    def cut(k: int) -> None:
        for _ in range(k // RUN):
            offload.split_gso(bytearray(big), hdr)

    n = 20 * RUN * 25
    us = {name: round(1e6 / _rate(fn, n, rounds), 2)
          for name, fn in (("sum_plain", plain), ("sum", folded), ("merge", merge), ("cut", cut))}
    us["sum_vs_plain"] = round(us["sum"] / us["sum_plain"], 2)
    return {"segment_bytes": len(body), "us_per_segment": us}


def run(out_dir: str, *, rounds: int = ROUNDS, packets: int = PACKETS) -> dict:
    rows = bench_sizes(rounds, packets)
    hs = bench_handshakes(2.0)
    seg = bench_segments(rounds)
    print("crypto core, one core, best of %d rounds of %d packets" % (rounds, packets))
    print(f"{'bytes':>6} {'seal/s':>10} {'open/s':>10} {'plain PyNaCl/s':>15} {'seal µs':>8} "
          f"{'open µs':>8} {'plain µs':>9} {'seal vs plain':>14}")
    for r in rows:
        print(f"{r['bytes']:>6} {r['seal_per_s']:>10,} {r['open_per_s']:>10,} "
              f"{r['plain_pynacl_encrypt_per_s']:>15,} {r['seal_us']:>8} {r['open_us']:>8} "
              f"{r['plain_us']:>9} {r['seal_speedup_vs_plain']:>13}x")
    print(f"full handshakes (both sides, incl. certificate verification): {hs['full_handshakes_per_s']}/s "
          f"({hs['handshake_ms']} ms each)")
    u = seg["us_per_segment"]
    print(f"TCP offloads, µs per {seg['segment_bytes']}-byte segment: checksum sum {u['sum']} (the plain "
          f"division {u['sum_plain']}: {u['sum_vs_plain']}x), merged with its check {u['merge']}, "
          f"cut from a super-packet {u['cut']}")
    r64 = rows[0]
    targets = {"seal64_at_least_3x_plain": r64["seal_speedup_vs_plain"] >= 3.0,
               "seal64_at_least_150k_per_s": r64["seal_per_s"] >= 150_000}
    print("targets:", ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in targets.items()))
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()},
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "sizes": rows, "handshake": hs, "segments": seg, "targets": targets}
    print(f"written {write_result(out_dir, 'crypto', result)}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--packets", type=int, default=PACKETS)
    args = ap.parse_args(argv)
    run(args.out, rounds=args.rounds, packets=args.packets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
