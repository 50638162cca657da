"""An in-memory cloud and nodes on a fake network with a fake clock."""

from __future__ import annotations

import random

from cyphonic import signaling as sg
from cyphonic.cloud import authentication
from cyphonic.cloud.core import CloudCore
from cyphonic.cloud.keys import CloudKeys
from cyphonic.cloud.store import MemoryStore
from cyphonic.certs import CertificateAuthority
from cyphonic.handshake import StaticIdentity
from cyphonic.wire import signaling as sig

T0 = 1_800_000_000.0
CLOUD = ("198.51.100.1", 47101)
DOMAIN = "ov.example"


def make_keys(seed: int = 9) -> CloudKeys:
    return CloudKeys(CertificateAuthority.generate(seed=bytes([seed]) * 32),
                     StaticIdentity.generate(), bytes([seed]) * 32)


class CloudNet:
    def __init__(self, store=None, relay=True, prefix="100.64.0.0/24"):
        self.now = T0
        self.store = store or MemoryStore()
        self.keys = make_keys()
        relay_eps = {4: sig.Endpoint("198.51.100.1", 47102), 6: sig.Endpoint("2001:db8::1", 47102)} if relay else {}
        self.cloud = CloudCore(store=self.store, keys=self.keys, domain=DOMAIN, prefix=prefix,
                               relay_endpoints=relay_eps, rng=random.Random(5))
        self.nodes: dict[str, sg.SignalingClient] = {}
        self.addrs: dict[str, tuple] = {}
        self.drop_to_cloud = False
        self.drop_from_cloud = set()

    def token(self, name, **kw):
        return authentication.create_token(self.store, name, self.now, **kw)

    def node(self, name, addr, *, token=None, local=None, identity=None, **kw):
        ident = identity or StaticIdentity.generate()
        tok = (token if token is not None else self.token(name)).encode()
        local = local if local is not None else (sig.Endpoint(addr[0], addr[1]),)
        c = sg.SignalingClient(ident, self.keys.signaling.public, CLOUD, token=tok, name_hint=name,
                               local_endpoints=tuple(local), rng=random.Random(len(self.nodes)), **kw)
        self.nodes[name] = c
        self.addrs[name] = addr
        return c

    def pump(self, limit=10000):
        n = 0
        moved = True
        while moved and n < limit:
            moved = False
            for name, c in self.nodes.items():
                for data, dst in c.datagrams_to_send():
                    moved = True
                    n += 1
                    if not self.drop_to_cloud:
                        self.cloud.receive_datagram(data, self.addrs[name], self.now)
            for data, dst in self.cloud.datagrams_to_send():
                moved = True
                n += 1
                for name, addr in self.addrs.items():
                    if addr == dst and name not in self.drop_from_cloud:
                        self.nodes[name].receive_datagram(data, CLOUD, self.now)

    def advance(self, seconds, step=0.5):
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for c in list(self.nodes.values()) + [self.cloud]:
                t = c.get_timer()
                if t is not None and t <= self.now:
                    c.handle_timer(self.now)
            self.pump()

    def events(self, name):
        out = []
        c = self.nodes[name]
        while (e := c.next_event()) is not None:
            out.append(e)
        return out

    def start_all(self):
        for c in self.nodes.values():
            c.start(self.now)
        self.pump()
