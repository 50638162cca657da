"""`cyphonic-node` configuration: a TOML file, every key checked, errors that name the key.

See ``docs/node.md`` and the commented example (``example_config()``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, fields

from .. import constants as C
from ..busy_poll import BUSY_POLL_US_DEFAULT, BUSY_POLL_US_MAX
from ..cloud.keys import parse_cloud_key
from ..errors import CyphonicError

EXAMPLE = """\
# cyphonic-node configuration (TOML). Keys not given take the defaults shown.

# The cloud: address of the Authentication + Node Management services, and its key
# (printed by `cyphonic-cloud init`). Both are required.
# Several cloud instances: a list, ["198.51.100.1:47101", "198.51.100.2:47101"], or one
# "host:port" whose name has several A/AAAA records. The node uses one at a time, probes it
# every 2 s, and moves to the next within seconds when it goes silent.
cloud = "198.51.100.1:47101"
cloud_key = "cyk1:<CA public key hex>:<signaling public key hex>"
# With several instances, which one to start at: "spread" picks one by this node's key (nodes
# given the same list spread over the instances), "listed" the first listed.
cloud_order = "spread"
# A separate Node Management Service, if it runs apart from the AS ("" = same as cloud);
# only with a single cloud address.
cloud_nms = ""

# Enrollment token from `cyphonic-cloud enroll NAME`: used once, at the first start.
# token_file is read instead when token is empty (and may be deleted afterwards).
token = ""
token_file = ""
# The name this node asks for (the cloud may choose another for reusable tokens).
name = ""

# Keys (0600), the certificate and the cached login live here.
state_dir = "/var/lib/cyphonic-node"

# UDP port for tunnels and signaling (one socket per address family); 0 = any free port.
port = 47100
listen4 = "0.0.0.0"
listen6 = "::"          # "" disables IPv6

# The TUN interface carrying the overlay.
interface = "cy0"
mtu = 1408              # 1500 - IPv6 48 - relay 12 - tunnel 32
# TUN offloads (IFF_VNET_HDR): "merge" (the default; whole packets read, one TCP flow's
# segments merged into one write on the way in), "full" (also TSO reads of up to 64 KB, cut
# and checksummed by the daemon), "off" or false (a plain TUN); true means the default. Falls
# back to a simpler mode where the kernel refuses (`cyphonic-node status` says why).
tun_offload = "merge"

# The DNS stub: overlay names bring tunnels up; other names go upstream.
dns_listen = "127.0.0.53:53"
dns_upstream = ""       # "host:port"; "" = the first nameserver of /etc/resolv.conf, "none" = refuse
dns_hold_s = 8.0        # how long a query for an overlay name waits for its tunnel

# cyadm talks to the daemon here.
status_socket = "/run/cyphonic/node.sock"

# Prometheus metrics (`cyadm metrics` shows the same) written here every 5 s for
# node_exporter's textfile collector (--collector.textfile.directory=/run/cyphonic/metrics);
# "" = not written.
metrics_file = "/run/cyphonic/metrics/node.prom"

# After sending a lone packet of its own (a ping, a request), poll for the answer this many
# microseconds instead of sleeping, while answers come that quickly and at least 0.75 CPUs
# stood idle over the last 0.1 s (never when all CPUs are busy); 0 = never.
busy_poll_us = 500
"""

DEFAULTS = {
    "cloud": "", "cloud_key": "", "cloud_nms": "", "cloud_order": "spread", "token": "", "token_file": "", "name": "",
    "state_dir": "/var/lib/cyphonic-node", "port": 47100, "listen4": "0.0.0.0", "listen6": "::",
    "interface": "cy0", "mtu": C.DEFAULT_INNER_MTU, "tun_offload": "merge",
    "dns_listen": "127.0.0.53:53", "dns_upstream": "",
    "dns_hold_s": 8.0, "status_socket": "/run/cyphonic/node.sock", "busy_poll_us": BUSY_POLL_US_DEFAULT,
    "metrics_file": "/run/cyphonic/metrics/node.prom",
}


class NodeConfigError(CyphonicError):
    pass


TUN_OFFLOAD_MODES = ("merge", "full", "off")   # cyphonic.node.tun.MODES
TUN_OFFLOAD_TRUE = "merge"   # what `tun_offload = true` means: the faster mode on the bench


def tun_offload_mode(value) -> str | None:
    """``tun_offload`` as a mode: a mode's name, true (the default mode) or false ("off");
    None for anything else."""
    if value is True:
        return TUN_OFFLOAD_TRUE
    if value is False:
        return "off"
    if isinstance(value, str) and value in TUN_OFFLOAD_MODES:
        return value
    return None


def typed_values(doc: dict, defaults: dict, fail) -> dict:
    """The defaults overlaid with a TOML document's keys, each of its default's type (an integer
    is taken for a float); an unknown key or a wrong type is ``fail(key, why)``. Shared by the
    node daemon's and the adapter's configuration."""
    unknown = set(doc) - set(defaults)
    if unknown:
        raise fail(sorted(unknown)[0], "unknown key")
    values = dict(defaults)
    for key, value in doc.items():
        want = type(defaults[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise fail(key, f"must be {want.__name__}, not {type(value).__name__}")
        values[key] = value
    return values


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        p = int(port)
        if not sep or not 0 < p < 65536:
            raise ValueError
    except ValueError:
        raise NodeConfigError(f"{what}: expected address:port (e.g. 192.0.2.1:47101 or [::1]:47101), "
                              f"not {text!r}") from None
    return host, p


# --- the cloud's addresses: one, a list, or a name with several records -------------------------

_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def is_dns_name(host: str) -> bool:
    """A host name (RFC 1123 labels), not an IP address gone wrong (the last label is not all
    digits: 10.0.0.300 is a bad address, not a name)."""
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    return 0 < len(name) <= 253 and all(_LABEL_RE.match(x) for x in labels) and not labels[-1].isdigit()


def parse_cloud_entry(text: str, what: str) -> tuple[str, int]:
    """One cloud address: ``host:port``, the host an IP address ([v6] in brackets) or a DNS name."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    ok = False
    try:
        p = int(port)
        if sep and host and 0 < p < 65536:
            try:
                ipaddress.ip_address(host)
                ok = True
            except ValueError:
                ok = not bracketed and is_dns_name(host)
    except ValueError:
        pass
    if not ok:
        raise NodeConfigError(f"{what}: expected host:port (e.g. 192.0.2.1:47101, [2001:db8::1]:47101 or "
                              f"cloud.example.net:47101), not {text!r}")
    return host, p


def parse_cloud_addresses(value, what: str = "cloud") -> tuple[tuple[str, int], ...]:
    """The cloud's instances as configured: one ``host:port``, a comma-separated string of them,
    or a list of them; in order, none twice. Names are not resolved here (``resolve_cloud``)."""
    if isinstance(value, str):
        items = [(what, x) for x in value.split(",")] if value.strip() else []
    elif isinstance(value, (list, tuple)):
        items = [(f"{what}[{i}]", x) for i, x in enumerate(value)]
    else:
        raise NodeConfigError(f"{what}: must be a string or a list of strings, not {type(value).__name__}")
    if not items:
        raise NodeConfigError(f"{what}: no address (give host:port, or a list of them)")
    out: list[tuple[str, int]] = []
    for where, item in items:
        if not isinstance(item, str):
            raise NodeConfigError(f"{where}: must be a string (host:port), not {type(item).__name__}")
        if not item.strip():
            raise NodeConfigError(f"{where}: empty entry in {value!r}" if isinstance(value, str)
                                  else f"{where}: empty")
        addr = parse_cloud_entry(item, where)
        if addr in out:
            raise NodeConfigError(f"{where}: {item.strip()} is listed twice")
        out.append(addr)
    return tuple(out)


def cloud_text(value) -> str:
    """A TOML list of addresses as the one string the config keeps (``a, b``)."""
    return ", ".join(x.strip() for x in value) if isinstance(value, list) else value


def check_cloud_keys(doc: dict, fail) -> dict:
    """``cloud`` may be a TOML list of strings: checked here (``fail("cloud[1]", why)``), and
    kept as one comma-separated string, so that ``typed_values`` sees a string."""
    value = doc.get("cloud")
    if not isinstance(value, list):
        return doc
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise fail(f"cloud[{i}]", f"must be a string (host:port), not {type(item).__name__}")
    if not value:
        raise fail("cloud", "empty list (give at least one host:port)")
    try:
        parse_cloud_addresses(value, "cloud")      # here, so that errors name the entry (cloud[1])
    except NodeConfigError as exc:
        raise fail(*str(exc).split(": ", 1)) from None
    return {**doc, "cloud": cloud_text(value)}


def check_cloud_nms(addrs: tuple, cloud_nms: str, fail) -> None:
    if cloud_nms and len(addrs) > 1:
        raise fail("cloud_nms", f"only with a single cloud address (cloud lists {len(addrs)}); "
                                "several instances each serve AS and NMS: leave cloud_nms empty")


def is_address(host: str) -> bool:
    """An IP address, not a DNS name."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def resolve_cloud(addrs, *, what: str = "cloud", single: bool = False,
                  getaddrinfo=socket.getaddrinfo) -> tuple[tuple[str, int], ...]:
    """The edge's step, once at start (blocking: call it from a thread): each DNS name becomes
    one instance per A/AAAA record, in the resolver's order; addresses stay as they are; none
    twice. ``single``: a split AS/NMS setup (cloud_nms), where a name must give one address."""
    out: list[tuple[str, int]] = []
    for host, port in addrs:
        try:
            ipaddress.ip_address(host)
            found = [(host, port)]
        except ValueError:
            try:
                infos = getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except (OSError, UnicodeError) as exc:
                raise NodeConfigError(f"{what}: cannot resolve {host}: {exc}") from None
            found = [(str(info[4][0]), port) for info in infos]
            if not found:
                raise NodeConfigError(f"{what}: {host} has no address")
        for a in found:
            if a not in out:
                out.append(a)
    if single and len(out) > 1:
        raise NodeConfigError(f"{what}: resolves to {len(out)} addresses, but cloud_nms needs a single "
                              "cloud address")
    return tuple(out)


@dataclass(frozen=True)
class NodeConfig:
    cloud: str
    cloud_key: str
    cloud_nms: str
    cloud_order: str
    token: str
    token_file: str
    name: str
    state_dir: str
    port: int
    listen4: str
    listen6: str
    interface: str
    mtu: int
    tun_offload: str        # one of TUN_OFFLOAD_MODES (true and false mapped at parsing)
    dns_listen: str
    dns_upstream: str
    dns_hold_s: float
    status_socket: str
    busy_poll_us: int
    metrics_file: str

    @property
    def cloud_addrs(self) -> tuple[tuple[str, int], ...]:
        """Every cloud instance as configured (names not resolved: ``resolve_cloud``)."""
        return parse_cloud_addresses(self.cloud, "cloud")

    @property
    def cloud_addr(self) -> tuple[str, int]:
        """The first cloud instance (callers from before there were several)."""
        return self.cloud_addrs[0]

    @property
    def nms_addr(self) -> tuple[str, int] | None:
        return parse_hostport(self.cloud_nms, "cloud_nms") if self.cloud_nms else None

    @property
    def dns_addr(self) -> tuple[str, int]:
        return parse_hostport(self.dns_listen, "dns_listen")


def parse_config(doc: dict, source: str = "<config>", base_dir: str = ".") -> NodeConfig:
    def fail(key: str, what: str) -> NodeConfigError:
        return NodeConfigError(f"{source}: {key}: {what}")

    doc = dict(check_cloud_keys(doc, fail))
    offload = tun_offload_mode(doc.get("tun_offload", DEFAULTS["tun_offload"]))
    if offload is None:
        raise fail("tun_offload", f'must be "merge", "full", "off", true or false, not {doc["tun_offload"]!r}')
    doc.pop("tun_offload", None)
    values = typed_values(doc, DEFAULTS, fail)
    values["tun_offload"] = offload
    for key in ("state_dir", "token_file", "status_socket", "metrics_file"):
        if values[key] and not os.path.isabs(values[key]):
            values[key] = os.path.normpath(os.path.join(base_dir, values[key]))
    if not values["cloud"]:
        raise fail("cloud", "required (address:port of the cloud)")
    if not values["cloud_key"]:
        raise fail("cloud_key", "required (printed by `cyphonic-cloud init`)")
    cfg = NodeConfig(**values)
    try:
        cfg.cloud_addrs, cfg.nms_addr, cfg.dns_addr
        parse_cloud_key(cfg.cloud_key)
    except CyphonicError as exc:
        raise NodeConfigError(f"{source}: {exc}") from None
    check_cloud_nms(cfg.cloud_addrs, cfg.cloud_nms, fail)
    if cfg.cloud_order not in ("spread", "listed"):
        raise fail("cloud_order", f'must be "spread" or "listed", not {cfg.cloud_order!r}')
    if not 0 <= cfg.port < 65536:
        raise fail("port", "must be 0..65535")
    if not 576 <= cfg.mtu <= 65000:
        raise fail("mtu", "must be 576..65000")
    if not cfg.interface or len(cfg.interface) > 15:
        raise fail("interface", "must be 1..15 characters")
    if not cfg.listen4 and not cfg.listen6:
        raise fail("listen4", "listen4 and listen6 cannot both be empty")
    if cfg.dns_upstream not in ("", "none"):
        try:
            parse_hostport(cfg.dns_upstream, "dns_upstream")
        except CyphonicError as exc:
            raise NodeConfigError(f"{source}: {exc}") from None
    if not 0.1 <= cfg.dns_hold_s <= 60:
        raise fail("dns_hold_s", "must be 0.1..60 seconds")
    if not 0 <= cfg.busy_poll_us <= BUSY_POLL_US_MAX:
        raise fail("busy_poll_us", f"must be 0..{BUSY_POLL_US_MAX} microseconds")
    return cfg


def load_config(path: str) -> NodeConfig:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise NodeConfigError(f"{path}: no such file (an example: `cyphonic-node --example-config`)") from None
    except tomllib.TOMLDecodeError as exc:
        raise NodeConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(doc, path, os.path.dirname(os.path.abspath(path)))


def example_config() -> str:
    return EXAMPLE


def _check_defaults_documented() -> None:
    names = {f.name for f in fields(NodeConfig)}
    assert names == set(DEFAULTS), names ^ set(DEFAULTS)


_check_defaults_documented()
