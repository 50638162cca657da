"""A daemon's status in the Prometheus text exposition format 0.0.4: what ``cyadm metrics``
and ``cyphonic-cloud metrics`` print and what the daemons write for node_exporter's textfile
collector (``cyphonic.metrics_file``). No HTTP server of ours listens anywhere.

The input is the document the daemon answers already, so the metrics never say anything the
status does not: the node daemon's and the adapter's status (``cyadm status --json``,
``kind`` "node" or "adapter") and the cloud's stats (``cyphonic-cloud stats --json``, ``kind``
"cloud"). ``exposition(doc)`` picks by ``kind``.

Naming (https://prometheus.io/docs/practices/naming/): every name starts ``cyphonic_``,
counters end ``_total``, units are base units in the name (``_bytes``, ``_seconds``), kinds
of one thing are a label (``reason`` of a drop, ``event`` of a counter table, ``socket``),
and every sample has ``daemon`` ("node", "adapter", "cloud") so two daemons' files in one
textfile directory never collide. ``docs/architecture.md`` lists the names.

Format (https://prometheus.io/docs/instrumenting/exposition_formats/): one ``# HELP`` and one
``# TYPE`` line per family, then all its samples; label values escape ``\\``, ``"`` and the
line feed, HELP texts ``\\`` and the line feed; values are integers, floats, ``+Inf``, ``-Inf``
or ``NaN``. A family with no sample is left out; a value that is not a number (``"unavailable"``)
is not a sample; two samples of one family with the same labels are added up.

Pure: a dict in, a string out; no clock, files or sockets.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping

COUNTER, GAUGE = "counter", "gauge"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _number(value) -> int | float | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return None


@dataclass
class Family:
    name: str
    type: str
    help: str
    samples: dict[tuple[tuple[str, str], ...], int | float] = field(default_factory=dict)


class Exposition:
    """Families in the order first added; ``add`` refuses a bad name or a family added again
    with another type (our mistakes), and skips values that are not numbers."""

    def __init__(self, **common: str) -> None:
        self.common = {k: str(v) for k, v in common.items()}
        self.families: dict[str, Family] = {}

    def add(self, name: str, type_: str, help_: str, value, **labels) -> None:
        if not _NAME.fullmatch(name) or type_ not in (COUNTER, GAUGE) or \
                (type_ == COUNTER) != name.endswith("_total"):
            raise ValueError(f"bad metric {name!r} ({type_})")
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = Family(name, type_, help_)
        elif fam.type != type_:
            raise ValueError(f"{name} added as {type_} and {fam.type}")
        v = _number(value)
        if v is None or (type_ == COUNTER and not v >= 0):
            return
        merged = {**self.common, **{k: "" if x is None else str(x) for k, x in labels.items()}}
        for k in merged:
            if not _LABEL.fullmatch(k) or k.startswith("__"):
                raise ValueError(f"bad label name {k!r}")
        key = tuple(merged.items())
        fam.samples[key] = fam.samples.get(key, 0) + v

    def table(self, name: str, type_: str, help_: str, values: Mapping | None, label: str, **labels) -> None:
        """One sample per numeric entry of ``values``, its key as ``label``."""
        for k, v in sorted((values or {}).items()):
            self.add(name, type_, help_, v, **{label: k}, **labels)

    def events(self, prefix: str, help_: str, values: Mapping | None, **labels) -> None:
        """A table of counters: ``<prefix>_events_total{event=...}``, and the ones counting
        bytes (named ``..._bytes``) apart in ``<prefix>_bytes_total``: one unit per family."""
        values = values or {}
        self.table(f"{prefix}_events_total", COUNTER, help_,
                   {k: v for k, v in values.items() if not k.endswith("_bytes")}, "event", **labels)
        self.table(f"{prefix}_bytes_total", COUNTER, help_ + " (bytes)",
                   {k: v for k, v in values.items() if k.endswith("_bytes")}, "event", **labels)

    def text(self) -> str:
        out = []
        for fam in self.families.values():
            if not fam.samples:
                continue
            out.append(f"# HELP {fam.name} {escape_help(fam.help)}")
            out.append(f"# TYPE {fam.name} {fam.type}")
            for key, value in fam.samples.items():
                labels = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in key)
                out.append(f"{fam.name}{{{labels}}} {format_value(value)}" if labels
                           else f"{fam.name} {format_value(value)}")
        return "\n".join(out) + "\n" if out else ""


# --- what every daemon has -------------------------------------------------------------------

def _common(x: Exposition, doc: dict) -> None:
    x.add("cyphonic_uptime_seconds", GAUGE, "Seconds since the daemon started.", doc.get("uptime_s"))
    x.table("cyphonic_drops_total", COUNTER, "Datagrams, packets and frames the daemon dropped, by reason "
            "(the drops table of the status).", doc.get("drops"), "reason")
    x.table("cyphonic_errors_total", COUNTER, "Socket, TUN and handler errors, by kind.", doc.get("errors"), "reason")
    for row in doc.get("sockets") or []:
        labels = {"socket": row.get("socket", ""), "local": row.get("local", "")}
        x.add("cyphonic_socket_kernel_drops_total", COUNTER, "Datagrams the kernel dropped on the socket "
              "(SO_MEMINFO sk_drops: receive buffer overflows; NFQUEUE: queue and netlink overflows). "
              "Absent when it cannot be read.", row.get("kernel_drops"), **labels)
        x.add("cyphonic_socket_receive_queue_bytes", GAUGE, "Bytes waiting in the socket's receive buffer.",
              row.get("rx_queued_bytes"), **labels)
        x.add("cyphonic_socket_receive_buffer_bytes", GAUGE, "The socket's receive buffer size (SO_RCVBUF).",
              row.get("rcvbuf_bytes"), **labels)
    for h in doc.get("health") or []:
        x.add("cyphonic_health_warning", GAUGE, "A health warning that holds now (1), by code, severity and "
              "subject (cyphonic.health).", 1, code=h.get("code", ""), severity=h.get("severity", ""),
              subject=h.get("subject", ""))
        x.add("cyphonic_health_warning_since_seconds", GAUGE, "Since when the health warning holds "
              "(Unix time).", h.get("since"), code=h.get("code", ""), subject=h.get("subject", ""))


def _node_or_adapter(x: Exposition, doc: dict) -> None:
    ident, cloud = doc.get("identity") or {}, doc.get("cloud") or {}
    x.add("cyphonic_info", GAUGE, "The daemon's identity (always 1).", 1, fqdn=ident.get("fqdn"),
          vip4=ident.get("vip4"))
    x.add("cyphonic_cloud_link_up", GAUGE, "1 while the daemon's own link to the cloud is ready.",
          cloud.get("state") == "ready")
    x.add("cyphonic_clock_offset_seconds", GAUGE, "The cloud's clock minus this one's, learned at the last "
          "login (certificates are checked on the cloud's time).", cloud.get("clock_offset_s"))
    _common(x, doc)
    x.add("cyphonic_tunnels", GAUGE, "Tunnels the daemon knows.", len(doc.get("tunnels") or []))
    for t in doc.get("tunnels") or []:
        labels = {"peer": t.get("peer"), "vip4": t.get("vip4")}
        if "gn" in t:
            labels["gn"] = t["gn"]
        x.add("cyphonic_tunnel_up", GAUGE, "1 while the tunnel has a live session.", bool(t.get("up")), **labels)
        x.add("cyphonic_tunnel_receive_bytes_total", COUNTER, "Inner bytes received through the tunnel.",
              t.get("rx_bytes"), **labels)
        x.add("cyphonic_tunnel_transmit_bytes_total", COUNTER, "Inner bytes sent through the tunnel.",
              t.get("tx_bytes"), **labels)
        x.add("cyphonic_tunnel_receive_packets_total", COUNTER, "Inner packets received through the tunnel.",
              t.get("rx_packets"), **labels)
        x.add("cyphonic_tunnel_transmit_packets_total", COUNTER, "Inner packets sent through the tunnel.",
              t.get("tx_packets"), **labels)
        x.add("cyphonic_tunnel_last_handshake_age_seconds", GAUGE, "Seconds since the tunnel's last handshake.",
              t.get("last_handshake_age_s"), **labels)
    path = doc.get("data_path") or {}
    x.add("cyphonic_data_path_busy_polls_total", COUNTER, "Busy polls for the answer to a lone packet.",
          path.get("busy_polls"))
    x.add("cyphonic_data_path_idle_cpus", GAUGE, "Idle CPUs, as the busy polling last sampled them.",
          path.get("idle_cpus"))
    x.table("cyphonic_errors_total", COUNTER, "Socket, TUN and handler errors, by kind.",
            {f"handler_{k}": v for k, v in (path.get("handler_errors") or {}).items()}, "reason")


def node_metrics(doc: dict) -> Exposition:
    x = Exposition(daemon="node")
    _node_or_adapter(x, doc)
    x.add("cyphonic_interface_up", GAUGE, "1 while the TUN interface exists.", bool((doc.get("interface") or {})
                                                                                   .get("present")))
    x.events("cyphonic_dns", "The DNS stub's counters, by event.", (doc.get("dns") or {}).get("counters"))
    return x


_WORKER_COUNTERS = {"sealed": ("cyphonic_worker_sealed_packets_total", "Packets a worker sealed and sent."),
                    "sealed_bytes": ("cyphonic_worker_sealed_bytes_total", "Inner bytes a worker sealed and sent.")}


def adapter_metrics(doc: dict) -> Exposition:
    x = Exposition(daemon="adapter")
    _node_or_adapter(x, doc)
    gns = doc.get("general_nodes") or []
    x.add("cyphonic_general_nodes", GAUGE, "General nodes the adapter serves.", len(gns))
    for g in gns:
        labels = {"gn": g.get("name"), "mac": g.get("mac")}
        x.add("cyphonic_general_node_cloud_link_up", GAUGE, "1 while the general node's link to the cloud "
              "is ready.", g.get("cloud") == "ready", **labels)
        x.add("cyphonic_general_node_lease_expires_in_seconds", GAUGE, "Seconds until the general node's "
              "DHCP lease expires (absent without a lease).", g.get("lease_expires_in_s"), **labels)
    for w in doc.get("workers") or []:
        labels = {"worker": w.get("index"), "queue": w.get("queue")}
        x.add("cyphonic_worker_up", GAUGE, "1 while the packet handling worker runs.", bool(w.get("alive")),
              **labels)
        x.add("cyphonic_worker_sessions", GAUGE, "Send sessions the worker holds.", w.get("sessions"), **labels)
        for key, (name, help_) in _WORKER_COUNTERS.items():
            x.add(name, COUNTER, help_, w.get(key, 0), **labels)
    x.add("cyphonic_worker_restarts_total", COUNTER, "Workers that died and were restarted.",
          doc.get("worker_restarts"))
    path = doc.get("data_path") or {}
    x.add("cyphonic_data_path_heads_ups_total", COUNTER, "Heads-ups of the workers before a lone packet.",
          path.get("heads_ups"))
    dhcp = doc.get("dhcp") or {}
    x.events("cyphonic_dhcp", "The DHCP server's counters, by event.", dhcp.get("counters"))
    x.add("cyphonic_dhcp_leases", GAUGE, "DHCP leases in the lease table.", dhcp.get("leases"))
    x.events("cyphonic_arp", "The proxy ARP responder's counters, by event.", (doc.get("arp") or {}).get("counters"))
    x.events("cyphonic_dns", "The LAN resolver's counters, by event.", doc.get("dns"))
    return x


def cloud_metrics(doc: dict) -> Exposition:
    x = Exposition(daemon="cloud")
    x.add("cyphonic_info", GAUGE, "The daemon's identity (always 1).", 1,
          services=",".join(doc.get("services") or []))
    if isinstance(doc.get("written"), (int, float)) and isinstance(doc.get("started"), (int, float)):
        doc = {**doc, "uptime_s": round(doc["written"] - doc["started"], 1)}
    relay = doc.get("relay") or {}
    cluster = doc.get("cluster") or {}
    doc = {**doc, "drops": {**{f"control_{k}": v for k, v in (doc.get("control_drops") or {}).items()},
                            **{f"relay_{k}": v for k, v in (relay.get("drops") or {}).items()},
                            **dict((cluster.get("drops") or {}).items())},
           "errors": {**(doc.get("socket_errors") or {}),
                      **{f"relay_{k}": v for k, v in (doc.get("relay_socket_errors") or {}).items()}}}
    _common(x, doc)
    x.events("cyphonic_cloud", "The AS and NMS messages and their outcomes, by event.", doc.get("counters"))
    x.events("cyphonic_cloud_nms", "The NMS's counters, by event.", doc.get("nms"))
    x.events("cyphonic_control", "The cloud's control channel counters, by event.", doc.get("control"))
    x.add("cyphonic_control_sessions", GAUGE, "Control channel sessions with nodes.", doc.get("sessions"))
    if isinstance(doc.get("registrations"), list):
        x.add("cyphonic_cloud_registered_nodes", GAUGE, "Nodes registered with the NMS.", len(doc["registrations"]))
    x.add("cyphonic_cloud_relayed_routes", GAUGE, "Relayed routes this instance owns (moved off a dead relay).",
          doc.get("relayed_routes"))
    if cluster:
        x.add("cyphonic_cloud_instance_info", GAUGE, "This instance among those sharing the database (always 1).",
              1, instance=cluster.get("instance_id"), tag=cluster.get("tag"))
        for state in ("alive", "dead"):
            x.add("cyphonic_cloud_instances", GAUGE, "Instances in the database this one sees, by state.",
                  len(cluster.get(state) or []), state=state)
        x.add("cyphonic_cloud_relays_alive", GAUGE, "Relays (TRS instances) alive.", len(cluster.get("relays") or []))
        x.events("cyphonic_cloud_bus", "Messages between instances and heartbeat failures, by event.",
                 cluster.get("counters"))
    if relay:
        x.events("cyphonic_relay", "The TRS's counters, by event.", relay.get("counters"))
        x.add("cyphonic_relay_sessions", GAUGE, "Relay sessions.", relay.get("sessions"))
        x.add("cyphonic_relay_sessions_max", GAUGE, "Relay sessions at most.", relay.get("max_sessions"))
        x.add("cyphonic_relay_bound_sides", GAUGE, "Sides of relay sessions bound to an address.",
              relay.get("bound_sides"))
        x.add("cyphonic_relay_queued_datagrams", GAUGE, "Datagrams queued to send.", relay.get("queued"))
    return x


def metrics(doc: dict) -> Exposition:
    kind = doc.get("kind")
    if kind == "node":
        return node_metrics(doc)
    if kind == "adapter":
        return adapter_metrics(doc)
    if kind == "cloud" or "services" in doc:
        return cloud_metrics(doc)
    raise ValueError(f"not a status document of a CYPHONIC daemon (kind {kind!r})")


def exposition(doc: dict) -> str:
    """The status document ``doc`` in the text format 0.0.4."""
    return metrics(doc).text()
