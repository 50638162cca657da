"""`cyphonic-adapter` configuration (``/etc/cyphonic/adapter.toml``), every key checked.

On the appliance this file is written by `cyphonic-provision` (appliance/provision.py) from
the boot partition's ``cyphonic.toml``; it then names the enrollment token by file
(``gn_token_file``, 0600 under the state directory) instead of holding it, and lists the
general nodes to enroll (``general_nodes``).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass

from cyphonic import constants as C
from cyphonic.cloud.keys import parse_cloud_key
from cyphonic.errors import CyphonicError
from cyphonic.node.config import (check_cloud_keys, check_cloud_nms, parse_cloud_addresses, parse_hostport,
                                   typed_values)

from cyphonic.busy_poll import BUSY_POLL_US_DEFAULT, BUSY_POLL_US_MAX

from .constants import INJECT_BATCH_DEFAULT, MAX_WORKERS, MIN_MTU, NFQ_GSO_DEFAULT

DEFAULTS = {
    "cloud": "", "cloud_key": "", "cloud_nms": "",
    "gn_token": "",                 # (reusable) enrollment token the adapter uses for its general nodes
    "gn_token_file": "",            # read for gn_token when that is "" (the appliance keeps it 0600 there)
    "token": "",                    # the adapter's own enrollment token ("" = gn_token)
    "name": "",                     # the adapter's own name ("" = its hostname)
    "port": 47199,                  # the adapter's own UDP port (its identity's cloud link)
    "state_dir": "/var/lib/cyphonic",
    "lan_interface": "lan0", "wan_interface": "wan0",
    "lan_address": "100.127.255.254",  # the adapter on the LAN: router and DNS for the general nodes
    "prefix": "100.64.0.0/10",      # the overlay prefix (must be the cloud's)
    "gn_port_base": 47200,          # general node i uses UDP port base + i on the WAN side
    "workers": 0,                   # NFQUEUE workers; 0 = one per core (at most MAX_WORKERS)
    "queue_first": 0,
    "busy_poll_us": BUSY_POLL_US_DEFAULT,  # poll this long for the answer to a lone packet; 0 = never (ReplyWait)
    "inject_batch": INJECT_BATCH_DEFAULT,   # the way back: one frame per merged TCP run (false: a packet per send)
    "nfq_gso": NFQ_GSO_DEFAULT,     # the workers read super-packets from their queues (F_GSO) and cut them
    "mtu": C.DEFAULT_INNER_MTU,
    "lease_s": 3600,
    "dns_upstream": "none",         # "host:port" forwards other names (passthrough), "none" refuses them
    "passthrough": False,           # LAN -> WAN in clear (off: zero trust)
    "auto_enroll": False,           # serve unknown MACs by enrolling them automatically
    "status_socket": "/run/cyphonic/adapter.sock",
    "metrics_file": "/run/cyphonic/metrics/adapter.prom",   # Prometheus textfile every 5 s; "" = off
    "general_nodes": [],            # [{mac, name, group}]: enrolled at start when not in the registry
}
GENERAL_NODE_KEYS = {"mac": True, "name": True, "group": False}   # key -> required


class AdapterConfigError(CyphonicError):
    pass


@dataclass(frozen=True)
class ConfiguredGeneralNode:
    """One entry of ``general_nodes``: enrolled like ``cyadm gn add MAC --name NAME --group GROUP``."""
    mac: str
    name: str
    group: str = ""


@dataclass(frozen=True)
class AdapterConfig:
    cloud: str
    cloud_key: str
    cloud_nms: str
    gn_token: str
    gn_token_file: str
    token: str
    name: str
    port: int
    state_dir: str
    lan_interface: str
    wan_interface: str
    lan_address: str
    prefix: str
    gn_port_base: int
    workers: int
    queue_first: int
    busy_poll_us: int
    inject_batch: bool
    nfq_gso: bool
    mtu: int
    lease_s: int
    dns_upstream: str
    passthrough: bool
    auto_enroll: bool
    status_socket: str
    metrics_file: str
    general_nodes: tuple = ()       # of ConfiguredGeneralNode

    @property
    def cloud_addrs(self) -> tuple[tuple[str, int], ...]:
        """Every cloud instance as configured (a list, a comma-separated string, or one
        host:port; names are resolved at start, ``cyphonic.node.config.resolve_cloud``)."""
        return parse_cloud_addresses(self.cloud, "cloud")

    @property
    def cloud_addr(self):
        """The first cloud instance (callers from before there were several)."""
        return self.cloud_addrs[0]

    @property
    def nms_addr(self):
        return parse_hostport(self.cloud_nms, "cloud_nms") if self.cloud_nms else None

    @property
    def nworkers(self) -> int:
        return self.workers or min(os.cpu_count() or 1, MAX_WORKERS)


def parse_config(doc: dict, source: str = "<config>") -> AdapterConfig:
    def fail(key, what):
        return AdapterConfigError(f"{source}: {key}: {what}")

    values = typed_values(check_cloud_keys(doc, fail), DEFAULTS, fail)
    for k in ("cloud", "cloud_key"):
        if not values[k]:
            raise fail(k, "required")
    if values["gn_token_file"] and not os.path.isabs(values["gn_token_file"]):
        raise fail("gn_token_file", "must be an absolute path")
    if values["metrics_file"] and not os.path.isabs(values["metrics_file"]):
        raise fail("metrics_file", "must be an absolute path (or \"\" for none)")
    values["general_nodes"] = parse_general_nodes(values["general_nodes"], fail)
    cfg = AdapterConfig(**values)
    try:
        cfg.cloud_addrs, cfg.nms_addr
        check_cloud_nms(cfg.cloud_addrs, cfg.cloud_nms, fail)
        parse_cloud_key(cfg.cloud_key)
        net = ipaddress.IPv4Network(cfg.prefix)
        if ipaddress.IPv4Address(cfg.lan_address) not in net:
            raise fail("lan_address", f"must be inside prefix {cfg.prefix}")
    except ValueError as exc:
        raise fail("prefix", str(exc)) from None
    except AdapterConfigError:
        raise
    except CyphonicError as exc:
        raise AdapterConfigError(f"{source}: {exc}") from None
    if not 1 <= cfg.gn_port_base <= 65000:
        raise fail("gn_port_base", "must be 1..65000")
    if not 0 <= cfg.workers <= MAX_WORKERS:
        raise fail("workers", f"must be 0..{MAX_WORKERS} (0 = one per core)")
    if not 0 <= cfg.busy_poll_us <= BUSY_POLL_US_MAX:
        raise fail("busy_poll_us", f"must be 0..{BUSY_POLL_US_MAX} microseconds")
    if not MIN_MTU <= cfg.mtu <= C.MAX_INNER_PACKET_BYTES:
        raise fail("mtu", f"must be {MIN_MTU}..{C.MAX_INNER_PACKET_BYTES} bytes (sealed, a packet must fit one UDP datagram)")
    return cfg


def parse_general_nodes(items: list, fail) -> tuple:
    """``general_nodes``: a list of tables {mac, name, group?}; MACs and names checked as
    `cyadm gn add` checks them, none twice."""
    from .general_nodes import NAME_RE, GeneralNodeError, normalize_mac
    out, macs, names = [], set(), set()
    for i, item in enumerate(items):
        where = f"general_nodes[{i}]"
        if not isinstance(item, dict):
            raise fail(where, "must be a table {mac = ..., name = ...}")
        for k in item:
            if k not in GENERAL_NODE_KEYS:
                raise fail(f"{where}.{k}", "unknown key (mac, name, group)")
        for k, required in GENERAL_NODE_KEYS.items():
            if required and k not in item:
                raise fail(f"{where}.{k}", "required")
            if k in item and not isinstance(item[k], str):
                raise fail(f"{where}.{k}", "must be str")
        try:
            mac = normalize_mac(item["mac"])
        except GeneralNodeError as exc:
            raise fail(f"{where}.mac", str(exc)) from None
        name = item["name"]
        if not NAME_RE.match(name):
            raise fail(f"{where}.name", f"bad name {name!r}: lower-case letters, digits and hyphens, 1..63")
        if mac in macs:
            raise fail(f"{where}.mac", f"{mac} is listed twice")
        if name in names:
            raise fail(f"{where}.name", f"{name} is listed twice")
        macs.add(mac)
        names.add(name)
        out.append(ConfiguredGeneralNode(mac, name, item.get("group", "")))
    return tuple(out)


def read_token_file(path: str) -> str:
    """The token kept in ``gn_token_file`` (one line). Raises OSError when unreadable."""
    with open(path) as f:
        return f.read().strip()


def load_config(path: str) -> AdapterConfig:
    try:
        with open(path, "rb") as f:
            return parse_config(tomllib.load(f), path)
    except FileNotFoundError:
        raise AdapterConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise AdapterConfigError(f"{path}: not valid TOML: {exc}") from None
