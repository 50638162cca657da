"""Resolver: DNS for the general nodes on the LAN port (the paper's Resolver Module).

The resolver is the node daemon's, shared: ``cyphonic.resolver.OverlayResolver`` (sans-IO:
overlay names, held queries, passthrough) behind ``cyphonic.dns_server`` (its asyncio edge,
UDP and TCP). A query for ``name.<overlay domain>`` brings up the tunnel of *the general node
that asked*, whose engine's ``EngineHost`` then tells the resolver when that tunnel is up or
failed (it is the query's ``asker``). What is the adapter's own is here:
- start-up: once the overlay domain is known (at start from the registry, or at the first
  login of a general node), on ``lan_address``:53; a second start while the first is on its
  way does nothing;
- the asker: a query's source address is a general node's virtual IP, hence its MAC;
- ``on_resolve``: the asker's engine resolves the name (and its link is flushed at once).

Never: answer for a source that is not a general node with a general node's tunnel (an
unknown asker resolves nothing: counted in ``drops["dns_unknown_asker"]``).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from cyphonic.node.config import parse_hostport

from .config import AdapterConfig
from .constants import DNS_HOLD_S
from .general_nodes import Registry


class AdapterResolver:
    """``links``: the general nodes' ``signaling.Link``s by MAC (the controller's, kept current)."""

    def __init__(self, cfg: AdapterConfig, registry: Registry, links: dict, *,
                 clock: Callable[[], float], log: Callable[[str], None], drops: Counter | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.links = links
        self.clock = clock
        self.log = log
        self.drops: Counter = drops if drops is not None else Counter()
        self.resolver = None        # cyphonic.resolver.OverlayResolver, once started
        self.dns = None             # cyphonic.dns_server.DnsServer
        self._starting = False
        self._resolves = 0          # names handed to engines (after_round reports them)

    async def start(self, domain: str) -> None:
        if self.dns is not None or self._starting:
            return
        self._starting = True
        try:
            from cyphonic.dns_server import serve_dns
            from cyphonic.resolver import OverlayResolver
            upstream = None if self.cfg.dns_upstream == "none" else parse_hostport(self.cfg.dns_upstream,
                                                                                  "dns_upstream")
            resolver = OverlayResolver(domain, prefix=self.cfg.prefix, passthrough=upstream is not None,
                                       hold_s=DNS_HOLD_S)
            self.dns = await serve_dns(resolver, self.cfg.lan_address, 53, on_resolve=self.on_resolve,
                                       upstream=upstream, asker_of=self.asker_of)
            self.resolver = resolver
        finally:
            self._starting = False
        for link in self.links.values():
            self.attach(link)
        self.log(f"DNS on {self.cfg.lan_address}:53 for *.{domain}")

    def attach(self, link) -> None:
        """Tell ``link``'s EngineHost of the resolver (once it runs): its tunnels answer the
        queries of its general node, the asker."""
        if self.resolver is not None:
            link.host.resolver = self.resolver
            link.host.asker = link.gn.mac

    def asker_of(self, client) -> str | None:
        gn = self.registry.by_vip(client[0])
        return gn.mac if gn else None

    def on_resolve(self, fqdn: str, asker) -> str | None:
        link = self.links.get(asker) if asker else None
        if link is None:
            self.drops["dns_unknown_asker"] += 1
            return None
        vip = link.engine.resolve(fqdn, self.clock())
        self._resolves += 1
        link.host.flush()
        return vip

    def flush(self) -> int:
        """Send what the resolver has (an ``EngineHost``'s ``after_round``): how many names it
        handed to engines meanwhile, so that a link flushing now goes round once more."""
        if self.dns is None:
            return 0
        before = self._resolves
        self.dns.flush()
        return self._resolves - before

    def close(self) -> None:
        if self.dns is not None:
            self.dns.close()

    def counters(self) -> dict:
        return dict(self.resolver.counters) if self.resolver is not None else {}
