"""`cyphonic-provision`: turns the one file the user edits into the appliance's configuration.

The user edits ``cyphonic.toml`` on the Pi's FAT boot partition (``/boot/firmware``) from any
computer (schema: ``rootfs-overlay/usr/share/cyphonic/cyphonic.toml.example``, docs/appliance.md).
At EVERY boot, before systemd-networkd and cyphonic-adapter, this writes:

- ``/etc/cyphonic/adapter.toml`` (the adapter's own format, appliance/config.py), ports
  resolved to real interface names, the token only by reference (``gn_token_file``);
- ``/etc/cyphonic/update.toml``: ``gate_s`` from ``[update]`` (default 300), read by
  `cyphonic-update-gate` on a trial boot (appliance/updater.py);
- ``/var/lib/cyphonic/token`` (0600, directory 0700): the enrollment token, moved there from
  the boot file, whose token line then becomes a comment (the rest kept byte for byte);
- ``/run/systemd/network/10-cyphonic-{wan,lan}.network`` for systemd-networkd;
- ``/run/cyphonic/guard.nft`` (table ``inet cyphonic_guard``, real port names), loaded with
  ``nft -f``; it replaces the early guard (``/usr/share/cyphonic/nft/guard-early.nft``);
- ``/etc/hostname`` and ``/root/.ssh/authorized_keys`` when the file sets them;
- ``/run/cyphonic/provision.json``: the outcome, for ``cyadm status`` and the LED.

Split as the rest of the project is: ``plan()`` is pure (the parsed file, the interfaces and
what is stored in, a ``Plan`` of files and errors out), ``remove_token_line()`` is pure, and
``provision()`` is the thin edge that reads and writes.

What it must never do:
- lose the token: it is written and fsynced under the state directory BEFORE the boot file is
  rewritten, so a crash between the steps leaves it in at least one place;
- let the adapter run on a half-understood file: any unknown key, wrong type or bad value is
  an error, the exit code is 1 (the adapter's unit requires this one, so it does not start and
  the LAN port stays closed) and nothing under /etc or the state directory is changed;
- delete existing state. A missing boot file after a good provisioning is fine: the copy kept
  in the state directory (``cyphonic.toml.provisioned``) is used again.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field

from cyphonic.atomic_file import write_atomic_if_changed, write_json_atomic
from cyphonic.cloud.authentication import parse_token
from cyphonic.cloud.keys import parse_cloud_key
from cyphonic.errors import CyphonicError
from cyphonic.node.config import parse_cloud_addresses

from . import config as adapter_config
from .general_nodes import NAME_RE, GeneralNodeError, normalize_mac
from .constants import (GATE_DEFAULT_S, GATE_MAX_S, GATE_MIN_S, PROVISION_NFT_TIMEOUT_S,
                        PROVISION_WAIT_STEP_S)

BOOT_FILE = "cyphonic.toml"
EXAMPLE_FILE = "cyphonic.toml.example"
TOKEN_FILE = "token"                                  # under the state directory
PROVISIONED_COPY = "cyphonic.toml.provisioned"        # under the state directory: the last good file
ADAPTER_CONF = "cyphonic/adapter.toml"                # under --etc
UPDATE_CONF = "cyphonic/update.toml"                  # under --etc: cyphonic-update-gate's settings
NETWORK_DIR = "systemd/network"                       # under --run
WAN_NETWORK = "10-cyphonic-wan.network"
LAN_NETWORK = "10-cyphonic-lan.network"
GUARD_FILE = "cyphonic/guard.nft"                     # under --run
STATUS_FILE = "cyphonic/provision.json"               # under --run
GUARD_TABLE = "cyphonic_guard"                        # family inet
CONSOLE = "/dev/console"
DEFAULT_WAN_PORT = "end0"                             # the Pi 4's own Ethernet port

# The boot file's schema: section -> {key: type}. "" is the top level. Everything else is an
# error naming the key. [adapter] is checked against appliance/config.py's own keys.
SCHEMA: dict[str, dict[str, type]] = {
    "": {"hostname": str, "ssh_authorized_keys": list, "cloud": dict, "ports": dict, "wan": dict,
         "general_node": list, "adapter": dict, "update": dict},
    "cloud": {"address": (str, list), "key": str, "token": str},   # address: one host:port or a list
    "ports": {"wan": str, "lan": str},
    "wan": {"address": str, "gateway": str, "dns": list},
    "general_node": {"mac": str, "name": str, "group": str},
    "update": {"gate_s": int},
}
# adapter.toml keys that [adapter] may not set: they come from elsewhere in the file or from here.
ADAPTER_KEYS_SET_ELSEWHERE = {
    "cloud": "[cloud] address", "cloud_key": "[cloud] key", "gn_token": "[cloud] token",
    "token": "[cloud] token", "gn_token_file": "cyphonic-provision (the token's file)",
    "lan_interface": "[ports] lan", "wan_interface": "[ports] wan",
    "general_nodes": "[[general_node]]", "state_dir": "cyphonic-provision (--state)",
    "status_socket": "the image (cyadm and the LED read /run/cyphonic/adapter.sock)",
}
TYPE_NAMES = {str: "a string", list: "a list", dict: "a table", int: "an integer", bool: "true or false",
              (str, list): "a string or a list of strings"}
SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                 "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
_MAC_LIKE_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
_HOSTNAME_RE = NAME_RE   # one label, lower case: also the adapter's own overlay name
FIX_HINT = ("edit cyphonic.toml on the boot partition (see cyphonic.toml.example next to it), "
            "then reboot")


# --- inputs and outputs of the pure part ----------------------------------------------------------

@dataclass(frozen=True)
class Interface:
    name: str
    mac: str              # lower-case aa:bb:cc:dd:ee:ff ("" when it has none)
    ethernet: bool        # a wired Ethernet port (not loopback, wireless, bridge, veth...)


@dataclass(frozen=True)
class Output:
    """One file to write: `path` relative to the directory of `root` ("etc", "run", "state", "home")."""
    root: str
    path: str
    content: bytes
    mode: int = 0o644


@dataclass
class Plan:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    token: str | None = None          # a token found in the file: to keep in <state>/token
    hostname: str | None = None
    wan: str = ""
    lan: str = ""
    ports_pending: bool = False       # an error that may go away when the interfaces appear
    wan_network: str = ""             # the WAN port's networkd file, when [ports] wan and [wan] are good

    def file(self, root: str, path: str) -> bytes | None:
        for o in self.outputs:
            if o.root == root and o.path == path:
                return o.content
        return None


# --- the pure part --------------------------------------------------------------------------------

def plan(doc: dict, interfaces: list[Interface], *, state_dir: str = "/var/lib/cyphonic",
         have_token: bool = False) -> Plan:
    """Everything to write for the parsed boot file `doc`, or the errors (each naming its key).

    `interfaces`: what the machine has; `state_dir`: where the adapter keeps its state (named in
    adapter.toml); `have_token`: a token is stored already (an earlier boot moved it)."""
    p = Plan()
    err = p.errors.append
    _check_keys(doc, "", "", err)
    cloud = _table(doc, "cloud", err)
    ports = _table(doc, "ports", err)
    wan_cfg = _table(doc, "wan", err)
    adapter = _table(doc, "adapter", err)
    update = _table(doc, "update", err)

    # [cloud]
    address, key = cloud.get("address"), cloud.get("key")
    if not address:
        err("[cloud] address: required (the cloud's AS+NMS address:port, e.g. 203.0.113.10:47101, or a list "
            "of the cloud instances' addresses)")
    elif isinstance(address, (str, list)) and all(isinstance(x, str) for x in (address if isinstance(address, list)
                                                                            else [address])):
        try:
            parse_cloud_addresses(address, "[cloud] address")
        except CyphonicError as exc:
            err(str(exc))
    if not key:
        err("[cloud] key: required (the cloud key `cyphonic-cloud init` printed, cyk1:...)")
    elif isinstance(key, str):
        try:
            parse_cloud_key(key)
        except CyphonicError as exc:
            err(f"[cloud] key: {exc}")
    token = cloud.get("token")
    if isinstance(token, str) and token.strip():
        if parse_token(token.strip().encode("utf-8", "replace")) is None:
            err("[cloud] token: not an enrollment token (use the line `cyphonic-cloud enroll NAME "
                "--reusable` printed)")
        else:
            p.token = token.strip()
    elif not have_token and (token is None or isinstance(token, str)):
        err("[cloud] token: required at the first boot (none is stored on the appliance yet): "
            "an enrollment token from `cyphonic-cloud enroll NAME --reusable`")

    # hostname, ssh keys
    hostname = doc.get("hostname")
    if isinstance(hostname, str):
        if not _HOSTNAME_RE.match(hostname):
            err(f"hostname: {hostname!r} is not a host name (lower-case letters, digits and hyphens, "
                f"1..63, no dots)")
        else:
            p.hostname = hostname
    keys = doc.get("ssh_authorized_keys")
    if isinstance(keys, list):
        for i, k in enumerate(keys):
            why = _ssh_key_problem(k)
            if why:
                err(f"ssh_authorized_keys[{i}]: {why}")

    # [ports]
    p.wan, p.lan = _resolve_ports(ports, interfaces, p)

    # [wan]
    n = len(p.errors)
    wan_network = _wan_network(p.wan, wan_cfg, err)
    if p.wan and wan_network and len(p.errors) == n:
        p.wan_network = wan_network

    # [[general_node]]
    gns = []
    items = doc.get("general_node", [])
    for i, item in enumerate(items if isinstance(items, list) else []):
        where = f"[[general_node]] #{i + 1}"
        if not isinstance(item, dict):
            err(f"{where}: must be a table ([[general_node]] with mac and name)")
            continue
        _check_keys(item, "general_node", where, err)
        entry = {}
        mac, name, group = item.get("mac"), item.get("name"), item.get("group", "")
        if mac is None:
            err(f"{where} mac: required")
        elif isinstance(mac, str):
            try:
                entry["mac"] = normalize_mac(mac)
            except GeneralNodeError as exc:
                err(f"{where} mac: {exc}")
        if name is None:
            err(f"{where} name: required")
        elif isinstance(name, str):
            if NAME_RE.match(name):
                entry["name"] = name
            else:
                err(f"{where} name: {name!r}: lower-case letters, digits and hyphens, 1..63")
        if isinstance(group, str) and group:
            entry["group"] = group
        if "mac" in entry and any(g["mac"] == entry["mac"] for g in gns):
            err(f"{where} mac: {entry['mac']} is listed twice")
        elif "name" in entry and any(g["name"] == entry["name"] for g in gns):
            err(f"{where} name: {entry['name']} is listed twice")
        elif len(entry) >= 2:
            gns.append(entry)

    # [adapter]: any adapter.toml key but those set elsewhere, typed as appliance/config.py wants
    extra = {}
    for k, v in adapter.items():
        if k in ADAPTER_KEYS_SET_ELSEWHERE:
            err(f"[adapter] {k}: not here: set by {ADAPTER_KEYS_SET_ELSEWHERE[k]}")
        elif k not in adapter_config.DEFAULTS:
            err(f"[adapter] {k}: unknown key (see docs/adapter.md for the adapter's keys)")
        elif not _same_type(v, adapter_config.DEFAULTS[k]):
            err(f"[adapter] {k}: must be {TYPE_NAMES.get(type(adapter_config.DEFAULTS[k]), '?')}")
        else:
            extra[k] = v

    # [update]: the health gate of a trial boot (appliance/update.py)
    gate_s = update.get("gate_s", GATE_DEFAULT_S)      # its type: _check_keys
    if isinstance(gate_s, int) and not isinstance(gate_s, bool) and not GATE_MIN_S <= gate_s <= GATE_MAX_S:
        err(f"[update] gate_s: must be an integer {GATE_MIN_S}..{GATE_MAX_S} (seconds the adapter has, after "
            f"an update, to be as healthy as before; default {GATE_DEFAULT_S})")

    if p.errors:
        return p

    conf = {"cloud": address, "cloud_key": key, "gn_token_file": os.path.join(state_dir, TOKEN_FILE),
            "state_dir": state_dir, "lan_interface": p.lan, "wan_interface": p.wan, **extra,
            "general_nodes": gns}
    try:
        cfg = adapter_config.parse_config(conf, "[adapter]")
    except adapter_config.AdapterConfigError as exc:
        err(str(exc).replace("[adapter]: ", "[adapter] ", 1))
        return p

    p.outputs.append(Output("etc", ADAPTER_CONF, adapter_toml(conf).encode()))
    p.outputs.append(Output("etc", UPDATE_CONF, toml_document({"gate_s": gate_s}).encode()))
    p.outputs.append(Output("run", f"{NETWORK_DIR}/{WAN_NETWORK}", wan_network.encode()))
    p.outputs.append(Output("run", f"{NETWORK_DIR}/{LAN_NETWORK}", lan_network(p.lan, cfg.lan_address).encode()))
    p.outputs.append(Output("run", GUARD_FILE, guard_ruleset(p.lan, p.wan, cfg.lan_address,
                                                             cfg.passthrough).encode()))
    if p.hostname:
        p.outputs.append(Output("etc", "hostname", f"{p.hostname}\n".encode()))
    if isinstance(keys, list):
        p.outputs.append(Output("home", ".ssh/authorized_keys", authorized_keys(keys).encode(), 0o600))
    return p


def _same_type(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    return isinstance(value, type(default))


def _check_keys(table: dict, section: str, where: str, err) -> None:
    schema = SCHEMA[section]
    label = where or (f"[{section}]" if section else "")
    for k, v in table.items():
        name = f"{label} {k}".strip()
        if k not in schema:
            if not section and k in ("general_nodes", "node", "gn"):
                err(f"{name}: unknown key (general nodes are [[general_node]] tables)")
            else:
                err(f"{name}: unknown key (known: {', '.join(schema)})")
        elif k == "general_node" and isinstance(v, dict):
            err(f"{name}: write [[general_node]] (double brackets), one per device")
        elif not isinstance(v, schema[k]) or isinstance(v, bool):
            err(f"{name}: must be {TYPE_NAMES[schema[k]]}, not {_toml_type(v)}")
        elif isinstance(v, list) and k != "general_node" and not all(isinstance(x, str) for x in v):
            err(f"{name}: must be a list of strings")


def _toml_type(v) -> str:
    if isinstance(v, bool):
        return "true/false"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}.get(
        type(v), type(v).__name__)


def _table(doc: dict, name: str, err) -> dict:
    t = doc.get(name, {})
    if not isinstance(t, dict):
        return {}           # _check_keys reported it
    if name != "adapter":
        _check_keys(t, name, "", err)
    return t


def _ssh_key_problem(line) -> str:
    import base64
    import binascii
    if not isinstance(line, str):
        return "must be a string"
    if "\n" in line or "\r" in line:
        return "one key per string, without line breaks"
    parts = line.strip().split(None, 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        return (f"not an OpenSSH public key (expected '<type> <base64> [comment]' with type one of "
                f"{', '.join(SSH_KEY_TYPES[:3])}...; options before the key are not supported)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return "the key's base64 part does not decode"
    n = int.from_bytes(blob[:4], "big")
    if len(blob) < 4 + n or blob[4:4 + n] != parts[0].encode():
        return f"the key's data is not a {parts[0]} key"
    return ""


def _resolve_ports(ports: dict, interfaces: list[Interface], p: Plan) -> tuple[str, str]:
    """[ports] wan and lan -> interface names. Each: an interface name, a MAC address, or "auto"
    (the one Ethernet port that is not the other one)."""
    specs = {"wan": ports.get("wan", DEFAULT_WAN_PORT), "lan": ports.get("lan", "auto")}
    if not all(isinstance(s, str) for s in specs.values()):
        return "", ""       # _check_keys reported it
    have = ", ".join(f"{i.name} ({i.mac or 'no MAC'}{', Ethernet' if i.ethernet else ''})"
                     for i in interfaces) or "none"
    names = {}
    for role, spec in specs.items():
        if spec == "auto":
            continue
        if _MAC_LIKE_RE.match(spec):
            mac = spec.lower().replace("-", ":")
            found = [i for i in interfaces if i.mac == mac]
            if not found:
                p.errors.append(f"[ports] {role}: no interface with MAC {mac} (interfaces here: {have})")
                p.ports_pending = True
                continue
            names[role] = found[0].name
        elif not _IFNAME_RE.match(spec):
            p.errors.append(f"[ports] {role}: {spec!r} is neither an interface name, a MAC address nor \"auto\"")
        elif not any(i.name == spec for i in interfaces):
            p.errors.append(f"[ports] {role}: no interface named {spec} (interfaces here: {have})")
            p.ports_pending = True
        else:
            names[role] = spec
            if not next(i for i in interfaces if i.name == spec).ethernet:
                p.warnings.append(f"[ports] {role}: {spec} does not look like a wired Ethernet port")
    autos = [role for role, spec in specs.items() if spec == "auto"]
    if len(autos) == 2:
        p.errors.append("[ports] wan and lan: at most one of them may be \"auto\"")
    elif autos and len(names) == 1:
        role, other = autos[0], names[next(iter(names))]
        cands = [i.name for i in interfaces if i.ethernet and i.name != other]
        if len(cands) == 1:
            names[role] = cands[0]
        elif not cands:
            p.errors.append(f"[ports] {role}: \"auto\" found no Ethernet port besides {other} (interfaces here: "
                            f"{have}); plug in the USB Ethernet adapter, or name the port")
            p.ports_pending = True
        else:
            p.errors.append(f"[ports] {role}: \"auto\" found {len(cands)} Ethernet ports besides {other} "
                            f"({', '.join(cands)}); name one, by interface name or MAC address")
    wan, lan = names.get("wan", ""), names.get("lan", "")
    if wan and wan == lan:
        p.errors.append(f"[ports] wan and lan: both are {wan}; they must be two different ports")
    return wan, lan


HEADER = ("# Written by cyphonic-provision at every boot from cyphonic.toml on the boot partition:\n"
          "# edit that file, not this one.\n")


def _wan_network(wan: str, cfg: dict, err) -> str:
    address = cfg.get("address", "dhcp")
    gateway, dns = cfg.get("gateway"), cfg.get("dns")
    if not isinstance(address, str):
        return ""
    # Online only with an IPv4 address: the adapter starts after network-online.target and
    # reads its WAN address then; an IPv6 link-local address alone must not count.
    lines = [HEADER.rstrip("\n"), "# The WAN port: towards the LAN/Internet and the cloud.", "[Match]",
             f"Name={wan}", "", "[Link]", "RequiredFamilyForOnline=ipv4", "", "[Network]"]
    if address == "dhcp":
        for k in ("gateway", "dns"):
            if k in cfg:
                err(f"[wan] {k}: only with a static address (address = \"192.0.2.10/24\"); "
                    f"with dhcp the DHCP server gives it")
        lines += ["DHCP=ipv4", "", "[DHCPv4]", "ClientIdentifier=mac"]
        return "\n".join(lines) + "\n"
    try:
        if "/" not in address:
            raise ValueError("give the prefix length, e.g. 192.0.2.10/24")
        iface = ipaddress.IPv4Interface(address)
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address) \
                and iface.network.prefixlen < 31:
            raise ValueError("that is the network's own or its broadcast address")
    except ValueError as exc:
        err(f"[wan] address: {address!r} is neither \"dhcp\" nor an IPv4 address with prefix length "
            f"(e.g. 192.0.2.10/24): {exc}")
        return ""
    lines.append(f"Address={iface.with_prefixlen}")
    if isinstance(gateway, str):
        try:
            gw = ipaddress.IPv4Address(gateway)
            if gw not in iface.network:
                err(f"[wan] gateway: {gateway} is not inside {iface.network}")
            lines.append(f"Gateway={gw}")
        except ValueError:
            err(f"[wan] gateway: {gateway!r} is not an IPv4 address")
    for i, d in enumerate(dns if isinstance(dns, list) else []):
        try:
            lines.append(f"DNS={ipaddress.ip_address(d)}")
        except ValueError:
            err(f"[wan] dns[{i}]: {d!r} is not an IP address")
    return "\n".join(lines) + "\n"


def lan_network(lan: str, lan_address: str) -> str:
    """The LAN port as the adapter wants it (the controller's _setup_lan does the same if it is
    missing): up, with lan_address/32 and nothing else; the adapter serves DHCP and DNS there and
    adds a /32 route per general node. Configured with no cable in (the adapter binds DNS to the
    address) and kept when the cable goes, so the adapter's sockets stay valid."""
    return "\n".join([
        HEADER.rstrip("\n"),
        "# The LAN port: the general nodes' side. cyphonic-adapter serves DHCP and DNS on",
        f"# {lan_address} here and answers ARP for overlay addresses; nothing else is offered.",
        "[Match]", f"Name={lan}", "",
        "[Link]", "RequiredForOnline=no", "",
        "[Network]", f"Address={lan_address}/32", "DHCP=no", "LinkLocalAddressing=no", "IPv6AcceptRA=no",
        "LLDP=no", "EmitLLDP=no", "LLMNR=no", "MulticastDNS=no", "ConfigureWithoutCarrier=yes",
        "IgnoreCarrierLoss=yes", "KeepConfiguration=static"]) + "\n"


def guard_ruleset(lan: str, wan: str, lan_address: str, passthrough: bool) -> str:
    """Table inet cyphonic_guard with the real port names. It stands behind the adapter's own
    table (inet cyphonic, priorities filter and filter + 10) and holds while the adapter is not
    running: nothing is forwarded (queued packets never reach priority filter + 20; passthrough
    adds LAN -> WAN and established WAN -> LAN, as the adapter's table does), and from the LAN
    port the appliance itself answers only DHCP, DNS and ping (never SSH)."""
    forward = ([f'iifname "{lan}" oifname "{wan}" accept',
                f'iifname "{wan}" oifname "{lan}" ct state established,related accept']
               if passthrough else ["# passthrough off: nothing is forwarded in clear"])
    rules = "\n".join(f"\t\t{r}" for r in forward)
    return f"""#!/usr/sbin/nft -f
# The CYPHONIC appliance's guard, written by cyphonic-provision at every boot: do not edit.
# LAN {lan}, WAN {wan}, LAN address {lan_address}, passthrough {'on' if passthrough else 'off'}.
# It replaces the early guard (/usr/share/cyphonic/nft/guard-early.nft, same table) in one
# transaction. The adapter's own table (inet cyphonic, priorities filter and filter + 10) does
# the real filtering; this one holds when the adapter is not running.
table inet {GUARD_TABLE}
delete table inet {GUARD_TABLE}

table inet {GUARD_TABLE} {{
\tchain forward {{
\t\ttype filter hook forward priority filter + 20; policy drop;
{rules}
\t}}

\tchain input {{
\t\ttype filter hook input priority filter + 20; policy accept;
\t\tiifname != "{lan}" accept
\t\tct state established,related accept
\t\tudp dport 67 accept
\t\tip daddr {lan_address} meta l4proto {{ tcp, udp }} th dport 53 accept
\t\tip daddr {lan_address} icmp type echo-request accept
\t\tdrop
\t}}
}}
"""


def authorized_keys(keys: list[str]) -> str:
    return (HEADER + "# (ssh_authorized_keys; root logs in by key only)\n"
            + "".join(k.strip() + "\n" for k in keys))


# --- adapter.toml ---------------------------------------------------------------------------------

def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list) and all(not isinstance(x, dict) for x in v):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as a TOML value")


def toml_document(doc: dict) -> str:
    """A flat TOML document: scalars and lists first, then each list of tables as [[key]]
    (all the adapter's config needs; the standard library reads TOML but does not write it)."""
    lines, tables = [], []
    for k, v in doc.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        elif isinstance(v, list) and not v and k == "general_nodes":
            lines.append(f"{k} = []")
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, items in tables:
        for item in items:
            lines += ["", f"[[{k}]]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def adapter_toml(conf: dict) -> str:
    return (HEADER + "# The enrollment token is in gn_token_file (0600), never here.\n\n"
            + toml_document(conf))


# --- the token line -------------------------------------------------------------------------------

_HEADER_RE = re.compile(r"^[ \t]*\[(\[)?[ \t]*([^\[\]]*?)[ \t]*\]\]?[ \t]*(#.*)?$")
_CLOUD_TOKEN_RE = re.compile(r"""^[ \t]*(token|"token"|'token')[ \t]*=""")
_DOTTED_TOKEN_RE = re.compile(r"""^[ \t]*(cloud|"cloud"|'cloud')[ \t]*\.[ \t]*(token|"token"|'token')[ \t]*=""")


def token_note(now: float) -> str:
    return f"# token moved to the appliance at first boot ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now))})"


def remove_token_line(text: str, note: str) -> str | None:
    """`text` with the line that sets [cloud] token replaced by `note` (its line ending kept, every
    other byte the same), or None when that cannot be done safely (no such single line, or the
    result would not parse to the same file without the token)."""
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    try:
        before = tomllib.loads(text[len(bom):])
    except tomllib.TOMLDecodeError:
        return None
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text[len(bom):])
    table = ""
    hit = None
    for i, line in enumerate(lines):
        body = line.rstrip("\r\n")
        m = _HEADER_RE.match(body)
        if m:
            table = "" if m.group(1) else m.group(2).replace(" ", "").replace('"', "").replace("'", "")
            continue
        if (table == "cloud" and _CLOUD_TOKEN_RE.match(body)) or (table == "" and _DOTTED_TOKEN_RE.match(body)):
            if hit is not None:
                return None
            hit = i
    if hit is None:
        return None
    ending = lines[hit][len(lines[hit].rstrip("\r\n")):]
    lines[hit] = note + ending
    out = bom + "".join(lines)
    try:
        after = tomllib.loads(out[len(bom):])
    except tomllib.TOMLDecodeError:
        return None
    want = json.loads(json.dumps(before, default=str))
    want.get("cloud", {}).pop("token", None)
    return out if json.loads(json.dumps(after, default=str)) == want else None


def parse_boot_file(raw: bytes) -> tuple[dict | None, str, str]:
    """(document, text, error): the boot file's bytes as TOML (a UTF-8 byte order mark, which some
    editors write, is allowed)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, "", f"not UTF-8 text (byte {exc.start}): save it as UTF-8"
    try:
        return tomllib.loads(text.removeprefix("\ufeff")), text, ""
    except tomllib.TOMLDecodeError as exc:
        return None, text, f"not valid TOML: {exc}"


# --- the edge: interfaces, files, nft, console ----------------------------------------------------

def read_interfaces(sys_class_net: str, udev_data: str | None = None) -> list[Interface]:
    """The interfaces as /sys/class/net shows them. Ethernet = type 1 (ARPHRD_ETHER) with a device
    behind it (not veth, bridge, ...) and no wireless.

    With `udev_data` (/run/udev/data, when udevd runs), an interface udev has not processed yet is
    left out: its name is not final (the kernel's eth0 becomes end0 or enx<MAC> moments later),
    and a port named too early would match no networkd file. The caller waits for it."""
    out = []
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        return []
    for name in names:
        d = os.path.join(sys_class_net, name)

        def read(f, d=d):
            try:
                with open(os.path.join(d, f)) as fh:
                    return fh.read().strip()
            except OSError:
                return ""
        if udev_data is not None and not os.path.exists(os.path.join(udev_data, f"n{read('ifindex')}")):
            continue
        mac = read("address").lower()
        kind = read("type")
        wireless = os.path.exists(os.path.join(d, "wireless")) or os.path.exists(os.path.join(d, "phy80211"))
        ethernet = kind == "1" and os.path.exists(os.path.join(d, "device")) and not wireless
        out.append(Interface(name, mac if _MAC_LIKE_RE.match(mac) and mac != "00:00:00:00:00:00" else "", ethernet))
    return out


def _interfaces(paths: Paths) -> list[Interface]:
    udev = os.path.join(paths.run, "udev")
    running = os.path.exists(os.path.join(udev, "control"))
    return read_interfaces(paths.sys_class_net, os.path.join(udev, "data") if running else None)


def write_atomic(path: str, data: bytes, mode: int = 0o644, *, dir_mode: int = 0o755,
                 chmod: bool = True) -> bool:
    """The directory (created with ``dir_mode`` if missing), then the file, atomically and durably
    (cyphonic/atomic_file.py) with exactly ``mode`` (none with ``chmod=False``: the FAT boot
    partition). False when the file already held exactly this (nothing written: an SD card wears)."""
    os.makedirs(os.path.dirname(path), mode=dir_mode, exist_ok=True)
    return write_atomic_if_changed(path, data, mode=mode if chmod else None)


@dataclass(frozen=True)
class Paths:
    boot: str = "/boot/firmware"
    etc: str = "/etc"
    state: str = "/var/lib/cyphonic"
    run: str = "/run"
    sys_class_net: str = "/sys/class/net"
    root_home: str = "/root"

    def of(self, root: str, rel: str) -> str:
        base = {"etc": self.etc, "run": self.run, "state": self.state, "home": self.root_home,
                "boot": self.boot}[root]
        return os.path.join(base, rel)

    @property
    def boot_file(self) -> str:
        return os.path.join(self.boot, BOOT_FILE)

    @property
    def token_file(self) -> str:
        return os.path.join(self.state, TOKEN_FILE)

    @property
    def provisioned_copy(self) -> str:
        return os.path.join(self.state, PROVISIONED_COPY)

    @property
    def status_file(self) -> str:
        return os.path.join(self.run, STATUS_FILE)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _stored_token(paths: Paths) -> str:
    raw = _read(paths.token_file)
    return raw.decode("utf-8", "replace").strip() if raw else ""


def store_token(paths: Paths, token: str) -> bool:
    """<state>/token (0600, directory 0700), fsynced. False when it held this token already."""
    os.makedirs(paths.state, mode=0o700, exist_ok=True)
    os.chmod(paths.state, 0o700)
    return write_atomic(paths.token_file, token.encode() + b"\n", 0o600, dir_mode=0o700)


def load_guard(path: str) -> str:
    """nft -f: '' when loaded, else the reason."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        r = subprocess.run([nft, "-f", path], capture_output=True, text=True, timeout=PROVISION_NFT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nft -f {path}: {exc}"
    return "" if r.returncode == 0 else f"nft -f {path} failed: {(r.stderr or r.stdout).strip()}"


@dataclass
class Outcome:
    state: str                      # "ok", "not-provisioned" or "error"
    errors: list[str]
    warnings: list[str]
    boot_file: str
    source: str                     # which file was used ("" when none)
    lan: str = ""
    wan: str = ""
    general_nodes: int = 0

    @property
    def exit_code(self) -> int:
        return 0 if self.state == "ok" else 1


def provision(paths: Paths, *, now: float | None = None, load: bool = True, wait_s: float = 0.0,
              log=print) -> Outcome:
    """Read the boot file and the interfaces, write what the plan says, in the safe order."""
    now = time.time() if now is None else now
    boot_raw = _read(paths.boot_file)
    copy_raw = _read(paths.provisioned_copy)
    source = paths.boot_file
    if boot_raw is None:
        if copy_raw is None:
            if os.path.exists(paths.of("etc", ADAPTER_CONF)):
                return Outcome("ok", [], [f"{paths.boot_file} is missing and {paths.of('etc', ADAPTER_CONF)} was not "
                                          f"written by cyphonic-provision: it is used as it is (no network files "
                                          f"or guard written)"], paths.boot_file, "")
            return Outcome("not-provisioned", [f"{paths.boot_file} is missing"], [], paths.boot_file, "")
        boot_raw, source = copy_raw, paths.provisioned_copy   # the boot file is optional after the first boot
    doc, text, problem = parse_boot_file(boot_raw)
    stored = _stored_token(paths)
    if doc is None:
        outcome = Outcome("error", [f"{source}: {problem}"], [], paths.boot_file, source)
        _fallback_runtime_files(paths, copy_raw, stored, outcome, load)
        return outcome
    deadline = time.monotonic() + wait_s
    while True:
        p = plan(doc, _interfaces(paths), state_dir=paths.state, have_token=bool(stored))
        waiting = p.ports_pending and all(e.startswith("[ports]") for e in p.errors)
        if not (p.errors and waiting and time.monotonic() < deadline):
            break
        time.sleep(PROVISION_WAIT_STEP_S)   # the USB adapter may still be on its way
    outcome = Outcome("ok", [], list(p.warnings), paths.boot_file, source, p.lan, p.wan)
    if p.errors:
        outcome.state, outcome.errors = "error", list(p.errors)
        _fallback_runtime_files(paths, copy_raw, stored, outcome, load)
        return outcome
    outcome.general_nodes = len(doc.get("general_node", []))

    # 1. the token, first (fsync): from here on it can never be lost
    if p.token and p.token != stored:
        try:
            store_token(paths, p.token)
            log(f"cyphonic-provision: {'new ' if stored else ''}enrollment token stored in {paths.token_file}")
        except OSError as exc:
            outcome.state = "error"
            outcome.errors.append(f"cannot store the token in {paths.token_file}: {exc}; the boot file is left as it is")
            return outcome
    # 2. the files (each atomic; unchanged ones are not rewritten)
    sanitized = text
    if p.token:
        sanitized = remove_token_line(text, token_note(now))
    try:
        for o in p.outputs:
            if o.root == "home":
                os.makedirs(os.path.join(paths.root_home, ".ssh"), mode=0o700, exist_ok=True)
                os.chmod(os.path.join(paths.root_home, ".ssh"), 0o700)
            write_atomic(paths.of(o.root, o.path), o.content, o.mode)
        keep = sanitized if sanitized is not None else text   # no token line removed: 0600 anyway
        write_atomic(paths.provisioned_copy, keep.encode(), 0o600, dir_mode=0o700)
    except OSError as exc:
        outcome.state = "error"
        outcome.errors.append(f"cannot write {getattr(exc, 'filename', '') or 'a file'}: {exc.strerror or exc}")
        return outcome
    # 3. the token off the boot partition (only now: it is safe in the state directory)
    if p.token and source == paths.boot_file:
        if sanitized is None:
            outcome.warnings.append("[cloud] token: stored, but could not be removed from the boot file (write "
                                    "it on one line, token = \"...\", inside [cloud]); delete it by hand")
        else:
            try:
                write_atomic(paths.boot_file, sanitized.encode("utf-8"), chmod=False)
                log(f"cyphonic-provision: token removed from {paths.boot_file}")
            except OSError as exc:
                outcome.warnings.append(f"[cloud] token: stored, but {paths.boot_file} could not be rewritten "
                                        f"({exc}); delete the token line by hand")
    # 4. the running system
    if load:
        if p.hostname:
            try:
                socket.sethostname(p.hostname)
            except OSError as exc:
                outcome.warnings.append(f"hostname: cannot set it now ({exc}); /etc/hostname is written")
        why = load_guard(paths.of("run", GUARD_FILE))
        if why:
            outcome.state = "error"
            outcome.errors.append(why)
    return outcome


def _fallback_runtime_files(paths: Paths, copy_raw: bytes | None, stored: str, outcome: Outcome,
                            load: bool) -> None:
    """An error: /etc and the state stay as they are and the adapter does not start; but the
    network files and the guard of the last good file are written to /run, so that the WAN port
    comes up (SSH, to look) while the LAN port stays closed. When even the last good file does
    not fit any more (a port is gone), its WAN port alone, if that is still there."""
    if copy_raw is None:
        return
    doc, _, _ = parse_boot_file(copy_raw)
    if doc is None:
        return
    p = plan(doc, _interfaces(paths), state_dir=paths.state, have_token=bool(stored))
    if p.errors and p.wan_network:
        try:
            write_atomic(paths.of("run", f"{NETWORK_DIR}/{WAN_NETWORK}"), p.wan_network.encode())
        except OSError:
            return
        outcome.warnings.append(f"the WAN port ({p.wan}) of the last good cyphonic.toml is configured (SSH); the "
                                f"LAN port stays down and closed, the adapter does not start")
        return
    if p.errors:
        return
    try:
        for o in p.outputs:
            if o.root == "run":
                write_atomic(paths.of(o.root, o.path), o.content, o.mode)
    except OSError:
        return
    outcome.warnings.append("the network files and the guard of the last good cyphonic.toml are in place: the "
                            "WAN port comes up (SSH), the LAN port stays closed, the adapter does not start")
    if load:
        why = load_guard(paths.of("run", GUARD_FILE))
        if why:
            outcome.errors.append(why)


def status_doc(outcome: Outcome, now: float) -> dict:
    return {"state": outcome.state, "errors": outcome.errors, "warnings": outcome.warnings,
            "boot_file": outcome.boot_file, "source": outcome.source,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "lan": outcome.lan,
            "wan": outcome.wan, "general_nodes": outcome.general_nodes}


def message(outcome: Outcome) -> str:
    """What the console shows: what is wrong and how to fix it."""
    if outcome.state == "ok" and not outcome.source:
        lines = ["cyphonic-provision: ok: no cyphonic.toml; the adapter's configuration is used as it is"]
    elif outcome.state == "ok":
        lines = [f"cyphonic-provision: ok: WAN {outcome.wan or '-'}, LAN {outcome.lan or '-'}, "
                 f"{outcome.general_nodes} general node(s) in the file"
                 + (f" (from {outcome.source})" if outcome.source and outcome.source != outcome.boot_file else "")]
    elif outcome.state == "not-provisioned":
        lines = [f"cyphonic-provision: NOT PROVISIONED: {outcome.boot_file} is missing.",
                 "  The adapter stays off and its LAN port closed until the file is there.",
                 "  To fix: put the SD card in a computer, copy cyphonic.toml.example on the boot partition",
                 "  to cyphonic.toml, fill in [cloud] address, key and token and the [[general_node]]",
                 "  entries, put the card back and boot again."]
    else:
        n = len(outcome.errors)
        lines = [f"cyphonic-provision: ERROR in {outcome.source or outcome.boot_file} ({n} problem{'s' * (n != 1)}); "
                 f"the adapter stays off and its LAN port closed:"]
        lines += [f"  - {e}" for e in outcome.errors]
        lines.append(f"  To fix: {FIX_HINT}.")
    lines += [f"  note: {w}" for w in outcome.warnings]
    return "\n".join(lines)


def _to_console(text: str) -> None:
    try:
        with open(CONSOLE, "w") as c:
            c.write(text.replace("\n", "\r\n") + "\r\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="cyphonic-provision",
        description="Configure the CYPHONIC appliance from cyphonic.toml on the boot partition (runs at every boot).")
    d = Paths()
    ap.add_argument("--boot", default=d.boot, help="the boot partition, holding cyphonic.toml (default %(default)s)")
    ap.add_argument("--etc", default=d.etc, help="where cyphonic/adapter.toml and hostname go (default %(default)s)")
    ap.add_argument("--state", default=d.state, help="the adapter's state directory: the token (default %(default)s)")
    ap.add_argument("--run", default=d.run, help="runtime files: networkd, guard, provision.json (default %(default)s)")
    ap.add_argument("--sys-class-net", default=d.sys_class_net, help="the interfaces (default %(default)s)")
    ap.add_argument("--root-home", default=d.root_home, help="root's home, for .ssh/authorized_keys (default %(default)s)")
    ap.add_argument("--no-load", action="store_true", help="write files only: no nft -f, no hostname change")
    ap.add_argument("--console", action="store_true", help=f"also print the outcome on {CONSOLE}")
    ap.add_argument("--wait-s", type=float, default=0.0,
                    help="wait up to this long for the ports to appear (a USB adapter is slow; default 0)")
    a = ap.parse_args(argv)
    paths = Paths(a.boot, a.etc, a.state, a.run, a.sys_class_net, a.root_home)
    now = time.time()
    try:
        outcome = provision(paths, now=now, load=not a.no_load, wait_s=a.wait_s)
    except Exception as exc:  # noqa: BLE001 - whatever happened, say so and keep the LAN closed
        outcome = Outcome("error", [f"internal error: {type(exc).__name__}: {exc}"], [], paths.boot_file, "")
    try:
        os.makedirs(os.path.dirname(paths.status_file), mode=0o755, exist_ok=True)
        write_json_atomic(paths.status_file, status_doc(outcome, now), mode=0o644)
    except OSError as exc:
        print(f"cyphonic-provision: cannot write {paths.status_file}: {exc}", file=sys.stderr)
    text = message(outcome)
    print(text, flush=True)
    if a.console and (outcome.state != "ok" or outcome.warnings):
        _to_console(text)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
