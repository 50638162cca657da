"""Shared builders for the core's tests: a throwaway CA, identities, a fake network."""

from __future__ import annotations

import random
from collections import deque

from cyphonic.certs import CertificateAuthority, TrustStore
from cyphonic.device import Device
from cyphonic.handshake import StaticIdentity
from cyphonic.ipv4 import icmp_echo

T0 = 1_800_000_000.0
DOMAIN = "test.cyphonic.example"


class World:
    """A CA, devices, and an in-memory network that delivers (or drops) datagrams."""

    def __init__(self, seed: int = 1) -> None:
        self.ca = CertificateAuthority.generate(seed=bytes([seed]) * 32)
        self.now = T0
        self.devices: dict[str, Device] = {}
        self.addr: dict[str, tuple] = {}
        self.wire: deque = deque()      # (data, src_addr, dst_addr)
        self.captured: list = []        # everything that was ever sent
        self.drop_filter = None         # callable(data, src, dst) -> True to drop
        self.serial = 0
        self.rng = random.Random(seed)

    def identity(self, name: str, vip: str, *, not_after: float | None = None,
                 not_before: float | None = None) -> StaticIdentity:
        self.serial += 1
        ident = StaticIdentity.generate()
        cert = self.ca.issue(serial=self.serial, fqdn=f"{name}.{DOMAIN}", vip4=vip,
                             static_public=ident.public,
                             not_before=int(not_before if not_before is not None else self.now - 60),
                             not_after=int(not_after if not_after is not None else self.now + 30 * 86400))
        return ident.with_certificate(cert.encode())

    def device(self, name: str, vip: str, port: int | None = None, **kw) -> Device:
        d = Device(self.identity(name, vip), TrustStore.of(self.ca.public),
                   rng=random.Random(len(self.devices) + 7), **kw)
        self.devices[name] = d
        self.addr[name] = ("192.0.2.%d" % (len(self.devices)), port or 40000 + len(self.devices))
        return d

    def name_of(self, addr) -> str | None:
        for n, a in self.addr.items():
            if a == addr:
                return n
        return None

    def collect(self) -> None:
        for name, dev in self.devices.items():
            for data, dst in dev.datagrams_to_send():
                self.captured.append((data, self.addr[name], dst))
                if self.drop_filter is not None and self.drop_filter(data, self.addr[name], dst):
                    continue
                self.wire.append((data, self.addr[name], dst))

    def pump(self, limit: int = 10_000) -> int:
        """Deliver until quiet; returns datagrams delivered."""
        n = 0
        self.collect()
        while self.wire and n < limit:
            data, src, dst = self.wire.popleft()
            target = self.name_of(dst)
            if target is not None:
                self.devices[target].receive_datagram(data, src, self.now)
            n += 1
            self.collect()
        return n

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Move the fake clock, firing timers as a real event loop would."""
        end = self.now + seconds
        while self.now < end:
            deadlines = [d for dev in self.devices.values() if (d := dev.get_timer()) is not None]
            nxt = min([end] + [d for d in deadlines if d > self.now] + [self.now + step])
            self.now = min(end, nxt)
            for dev in self.devices.values():
                t = dev.get_timer()
                if t is not None and t <= self.now:
                    dev.handle_timer(self.now)
            self.pump()

    def events(self, name: str) -> list:
        out = []
        while (e := self.devices[name].next_event()) is not None:
            out.append(e)
        return out


def ping(src_dev: Device, dst_dev: Device, seq: int, data: bytes = b"payload") -> bytes:
    return icmp_echo(str(src_dev.cert.vip4), str(dst_dev.cert.vip4), 1, seq, data)
