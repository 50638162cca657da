"""The adapter's status document, as ``cyadm status [--json]`` shows it, and its health
conditions (``cyphonic.health``: one model for the node daemon, the adapter and the cloud).

The document's keys are what scripts read (``--json``): ``kind``, ``pid``, ``uptime_s``,
``identity``, ``cloud``, ``lan``, ``packet_filter``, ``general_nodes``, ``tunnels``,
``workers``, ``worker_restarts``, ``dhcp``, ``arp``, ``dns``, ``data_path``, ``drops``,
``sockets``, ``health``. Rows of tunnels are ``EngineHost.tunnel_rows`` (the node daemon's) with
the general node's name in front (``gn``) and the bytes the workers sealed added.
``cloud.instance`` is the cloud instance (``host:port``) the adapter's own link uses and
``cloud.instances`` the list it knows; each row of ``general_nodes`` has the ``instance`` its
link uses (several instances: each link moves on by itself when its instance goes silent).
``dhcp.unknown_macs`` lists the devices that asked for a lease and are not enrolled
(``appliance.unknown_macs``).

``drops`` is every drop of the adapter by reason, in one flat table (``drop_counts``): what
``cyadm status --json`` shows and ``under-load`` compares. ``sockets`` is what the kernel
dropped on each socket and NFQUEUE (``cyphonic.socket_stats``).

Pure but for reading the parts it is given: no sockets, no clock (``now`` is an argument).
"""

from __future__ import annotations

from collections import Counter

from cyphonic.health import Warning
from cyphonic.socket_stats import nfqueue_rows, socket_rows as kernel_socket_rows

# The workers' counters that are drops (the others: sealed, sealed_bytes, installs, sessions, ports...).
WORKER_DROP_PREFIXES = ("drop_", "send_", "internal_", "nfq_", "install_", "heads_up_")
# The workers' counters of batching (issue 15), summed into ``data_path.batches``.
WORKER_BATCH_COUNTERS = ("gso_sends", "gso_segments", "plain_sends", "gso_disabled", "verdict_batches",
                         "verdicts", "gso_reads", "gso_pieces", "csum_finished", "gso_repeated")


def general_node_rows(registry, leases, links: dict, now: float) -> list[dict]:
    rows = []
    for mac, gn in registry.nodes.items():
        lease = leases.get(mac)
        link = links.get(mac)
        st = link.engine.signaling.status() if link else {}
        rows.append({"mac": mac, "name": gn.name, "fqdn": gn.fqdn or None, "vip4": gn.vip4 or None,
                     "lease_expires_in_s": round(lease.expires - now) if lease and lease.active(now) else None,
                     "cloud": st.get("state", "stopped"), "instance": st.get("instance"),
                     "port": link.port if link else None})
    return rows


def tunnel_rows(links: dict, pool, now: float) -> list[dict]:
    rows = []
    for link in links.values():
        gn = link.gn
        sealed = (lambda peer_vip4, gn_vip4=gn.vip4: (pool.tx_bytes(gn_vip4, peer_vip4), 0)) if pool else None
        rows.extend({"gn": gn.name, **row} for row in link.host.tunnel_rows(now, sealed))
    return rows


def conditions(now: float, self_link, links: dict, pool, enrollment, leases) -> list[Warning]:
    """What is wrong now: every cloud link (the adapter's and each general node's), the
    workers, the configuration's general nodes, the token file, the registry, the leases."""
    out = []
    for link in ([self_link] if self_link is not None else []) + list(links.values()):
        out.extend(link.host.conditions(now))
    if pool is not None:
        out.extend(pool.conditions())
    out.extend(enrollment.conditions())
    out.extend(Warning("lease-file", str(w)) for w in getattr(leases, "warnings", []))
    return out


def counters(links) -> dict:
    """Every link's drops and errors, summed (``drops`` in the document, beside the adapter's own)."""
    total: Counter = Counter()
    for link in links:
        total.update(link.host.counters())
    return dict(total)


def drop_counts(*, links, own: dict, injector, dhcp, arp, resolver, pool) -> dict:
    """Every drop by reason: the links' (``counters``: engines, devices, signaling channels,
    sends), the controller's own (way back, sessions, enrollment, DNS askers), and prefixed
    by part: ``inject_`` (toward the general nodes, by errno), ``dhcp_``, ``arp_`` (and
    ``arp_edge_``), ``dns_`` (the resolver) and ``dns_edge_`` (its sockets), ``worker_``
    (the workers' last counters, summed)."""
    out = {**counters(links), **own}
    parts = [("inject_", injector.drops if injector is not None else {}),
             ("dhcp_", dhcp.server.drops if dhcp is not None else {}),
             ("arp_", arp.responder.drops if arp is not None else {}),
             ("arp_edge_", arp.errors if arp is not None else {}),
             ("dns_", resolver.resolver.drops if resolver is not None and resolver.resolver is not None else {}),
             ("dns_edge_", resolver.dns.errors if resolver is not None and resolver.dns is not None else {})]
    for prefix, table in parts:
        out.update({prefix + k: v for k, v in table.items()})
    workers: Counter = Counter()
    for w in (pool.workers if pool is not None else ()):
        workers.update({k: v for k, v in w.stats.items()
                        if k.startswith(WORKER_DROP_PREFIXES) and isinstance(v, int)})
    out.update({"worker_" + k: v for k, v in workers.items()})
    return out


def batch_counts(pool, way_back_batches) -> dict:
    """How many packets each system call moved: the way back's GRO reads (``gro_reads``,
    ``gro_pieces``, ...) and the workers' GSO sends and NFQUEUE verdict batches, summed."""
    out: Counter = Counter(way_back_batches or {})
    for w in (pool.workers if pool is not None else ()):
        out.update({k: v for k, v in w.stats.items() if k in WORKER_BATCH_COUNTERS and isinstance(v, int)})
    return dict(out)


def socket_rows(*, links, dhcp, arp, resolver, queues: range | None) -> list[dict]:
    """The kernel's drops on every socket of the controller and on the workers' NFQUEUEs."""
    named = [(link.host.subject or link.gn.name, link.sock) for link in links]
    named += [("dhcp", dhcp.sock if dhcp is not None else None), ("arp", arp.sock if arp is not None else None)]
    if resolver is not None and resolver.dns is not None:
        named += resolver.dns.sockets()
    return kernel_socket_rows(named) + (nfqueue_rows(queues) if queues else [])


def document(*, cfg, pid: int, now: float, started: float, self_link, links: dict, registry, leases,
             pool, health: list[dict], filter_mode: str, dhcp, arp, dns: dict, reply_wait, selector,
             drops: dict, sockets: list[dict], unknown_macs: dict | None = None,
             way_back_batches: dict | None = None) -> dict:
    sig = self_link.engine.signaling if self_link is not None else None
    link_status = sig.status() if sig else {}
    return {
        "kind": "adapter", "pid": pid, "uptime_s": round(now - started, 1),
        "identity": {"fqdn": link_status.get("fqdn"), "vip4": link_status.get("vip4"),
                     "static_key": sig.identity.public.hex() if sig else None},
        "cloud": {"address": cfg.cloud, **link_status,
                  "general_nodes": ", ".join(sorted({link.engine.signaling.state.value
                                                     for link in links.values()})) or "none"},
        "lan": {"interface": cfg.lan_interface, "address": cfg.lan_address},
        "packet_filter": filter_mode,
        "general_nodes": general_node_rows(registry, leases, links, now),
        "tunnels": tunnel_rows(links, pool, now),
        "workers": pool.rows() if pool is not None else [],
        "worker_restarts": pool.restarts if pool is not None else 0,
        "dhcp": {**(dhcp.server.stats() if dhcp else {}), "unknown_macs": unknown_macs or {}},
        "arp": arp.stats() if arp else {},
        "dns": dns,
        "data_path": {"busy_poll_us": cfg.busy_poll_us if reply_wait else 0,
                      "heads_ups": reply_wait.heads_ups if reply_wait else 0,
                      "busy_polls": reply_wait.busy_polls if reply_wait else 0,
                      "idle_cpus": round(reply_wait.idle_cpus, 2) if reply_wait else None,
                      "handler_errors": dict(selector.handler_errors) if selector else {},
                      "batches": batch_counts(pool, way_back_batches)},
        "drops": drops,
        "sockets": sockets,
        "health": health,
    }
