"""Packet filter of the adapter: the nftables rules that steer general nodes' packets for
overlay addresses into NFQUEUE (the workers), drop everything else from the LAN (zero trust,
unless passthrough), allow DHCP and DNS to the adapter, and clamp TCP MSS.

One table, `inet cyphonic`, rendered from `nft/adapter.nft.in` and loaded with one `nft -f`
transaction (a reload replaces it atomically). Two ways to reach NFQUEUE:

- ``"nft"``: the nft `queue` statement in the table's chain `steer` (kernels with nft_queue,
  e.g. Raspberry Pi kernels).
- ``"xt"``: kernels without nft_queue (this development kernel: the `queue` statement fails
  with "No such file or directory"). The table is loaded with an empty chain `steer`, then one
  rule `-j NFQUEUE` is inserted into iptables-nft's `ip filter FORWARD` (same hook, same
  priority 0) from `nft/adapter-xt.iptables.in`, with `iptables-nft-restore --noflush` (one
  transaction). It carries the comment `cyphonic`, by which `unload()` finds it.

Either way the table's chain `forward` (priority filter + 10) drops every overlay-bound LAN
packet that reaches it: one that was not queued, or that a worker returned with ACCEPT.
A queue without a listener drops (no bypass): with the workers down nothing leaves in clear.

With ``manage_forwarding`` (default) `load()` turns IPv4 forwarding on as its LAST step and
`unload()` turns it off FIRST, so the kernel forwards only while the filter is complete
(forwarding is needed: the forward hook, where the steering sits, sees nothing without it).

Everything acts on the current network namespace (tests run it under `ip netns exec`).

CLI (for tests and the systemd unit)::

    python -m appliance.packet_filter load --lan lan0 --wan eth0 --prefix 100.64.0.0/10 \\
        --lan-address 10.9.0.1 [--queue-first 0 --queue-count 2] [--mtu 1420] [--passthrough]
    python -m appliance.packet_filter unload
    python -m appliance.packet_filter status          # JSON
    python -m appliance.packet_filter render ...      # print the ruleset(s), load nothing
    python -m appliance.packet_filter detect          # "nft" or "xt"
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from .constants import NFT_CMD_TIMEOUT_S

TABLE_FAMILY = "inet"
TABLE_NAME = "cyphonic"
COMMENT_TAG = "cyphonic"          # the iptables-nft rule's comment (how unload finds it)
MODES = ("nft", "xt")
MODE_ENV = "CYPHONIC_NFQUEUE_MODE"   # "nft" or "xt": skip the probe
NFT_DIR_ENV = "CYPHONIC_NFT_DIR"     # where the templates are, if not next to the package
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"

COUNTERS = ("queued", "overlay_unqueued", "lan_dropped", "wan_dropped", "passthrough_out",
            "lan_input_dropped", "dhcp_in", "dns_in")

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")   # no quotes, spaces or iptables '+'


class PacketFilterError(RuntimeError):
    """A load, unload or probe step failed. `stderr` holds the tool's own message."""

    def __init__(self, message: str, stderr: str = ""):
        self.stderr = stderr or ""
        detail = self.stderr.strip()
        super().__init__(f"{message}:\n{detail}" if detail else message)


def _default_queues() -> tuple[int, int]:
    return (0, os.cpu_count() or 1)        # one worker (queue) per core


@dataclass(frozen=True)
class PacketFilterConfig:
    lan_if: str                    # the LAN port (general nodes)
    wan_if: str                    # the WAN port
    prefix: str                    # the overlay's IPv4 prefix, e.g. "100.64.0.0/10"
    lan_address: str               # the adapter's address on the LAN (gateway, DHCP, DNS)
    queues: tuple[int, int] = field(default_factory=_default_queues)   # (first, count)
    mtu: int = 1420                # overlay (inner) MTU: overlay-bound TCP MSS = mtu - 40
    passthrough: bool = False      # LAN -> WAN in clear (masqueraded); off = zero trust
    allow_dhcp: bool = True        # udp 67 from the LAN to the adapter
    allow_dns: bool = True         # udp/tcp 53 from the LAN to the adapter's LAN address
    mode: str = "auto"             # "auto" (probe), "nft" or "xt"
    manage_forwarding: bool = True # load() enables net.ipv4.ip_forward last, unload() disables first

    def __post_init__(self) -> None:
        for name in ("lan_if", "wan_if"):
            v = getattr(self, name)
            if not isinstance(v, str) or not _IFNAME_RE.match(v):
                raise ValueError(f"{name}: bad interface name {v!r}")
        if self.lan_if == self.wan_if:
            raise ValueError("lan_if and wan_if must differ")
        try:
            net = ipaddress.IPv4Network(self.prefix, strict=True)
        except ValueError as e:
            raise ValueError(f"prefix: not an IPv4 network: {self.prefix!r} ({e})") from None
        object.__setattr__(self, "prefix", str(net))
        try:
            addr = ipaddress.IPv4Address(self.lan_address)
        except ValueError:
            raise ValueError(f"lan_address: not an IPv4 address: {self.lan_address!r}") from None
        object.__setattr__(self, "lan_address", str(addr))
        first, count = (int(x) for x in self.queues)
        if count < 1 or first < 0 or first + count - 1 > 65535:
            raise ValueError(f"queues: bad (first, count) {self.queues!r}")
        object.__setattr__(self, "queues", (first, count))
        if not 576 <= int(self.mtu) <= 65535:
            raise ValueError(f"mtu: {self.mtu!r} out of range")
        if self.mode not in ("auto", *MODES):
            raise ValueError(f"mode: {self.mode!r}, expected auto, nft or xt")

    @property
    def mss(self) -> int:
        return int(self.mtu) - 40          # IPv4 (20) + TCP (20) headers

    @property
    def queue_range(self) -> str:
        first, count = self.queues
        return str(first) if count == 1 else f"{first}-{first + count - 1}"


# --- running tools -----------------------------------------------------------------------------

def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


NFT = _tool("nft")
IPTABLES = _tool("iptables-nft")
IPTABLES_RESTORE = _tool("iptables-nft-restore")


def _run(argv: list[str], *, input: str | None = None, check: bool = True,
         what: str = "") -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, input=input, capture_output=True, text=True,
                           timeout=NFT_CMD_TIMEOUT_S)
    except FileNotFoundError:
        raise PacketFilterError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise PacketFilterError(f"{' '.join(argv[:4])} did not finish in {NFT_CMD_TIMEOUT_S} s") from None
    if check and r.returncode != 0:
        raise PacketFilterError(what or f"{' '.join(argv)} failed (exit {r.returncode})",
                                r.stderr or r.stdout)
    return r


def _have(path: str) -> bool:
    return os.path.exists(path) and os.access(path, os.X_OK)


# --- probing the kernel ------------------------------------------------------------------------

# `nft -c` sends the batch to the kernel and aborts it instead of committing, so the kernel's
# "no such expression" (ENOENT for `queue` without nft_queue) shows up in check mode as well
# (verified on this kernel): no namespace and no real change are needed. A kernel that has
# nft_queue as a module loads it on the way (nf_tables' module autoload works in check mode).
_PROBE = """table inet cyphonic_probe {
\tchain steer {
\t\ttype filter hook forward priority filter; policy accept;
\t\tip daddr 192.0.2.0/24 queue num 0
\t}
}
"""
_NO_QUEUE_MARKERS = ("No such file or directory", "Operation not supported")


@functools.cache
def _probe_queue_support() -> str:
    r = _run([NFT, "-c", "-f", "-"], input=_PROBE, check=False)
    if r.returncode == 0:
        return "nft"
    if "queue" in r.stderr and any(m in r.stderr for m in _NO_QUEUE_MARKERS):
        return "xt"
    raise PacketFilterError("could not probe the kernel's nft queue support", r.stderr)


def detect_queue_support(*, refresh: bool = False) -> str:
    """"nft" when the kernel takes the nft `queue` statement, else "xt" (use the xt NFQUEUE
    target through iptables-nft). Probed once per process with `nft -c`; `CYPHONIC_NFQUEUE_MODE`
    overrides it."""
    forced = os.environ.get(MODE_ENV, "").strip()
    if forced:
        if forced not in MODES:
            raise PacketFilterError(f"{MODE_ENV}={forced!r}: expected nft or xt")
        return forced
    if refresh:
        _probe_queue_support.cache_clear()
    return _probe_queue_support()


def _mode(config: PacketFilterConfig, mode: str | None = None) -> str:
    mode = mode or config.mode
    if mode == "auto":
        return detect_queue_support()
    if mode not in MODES:
        raise PacketFilterError(f"unknown mode {mode!r}")
    return mode


# --- rendering -----------------------------------------------------------------------------------

def template_dir() -> Path:
    """The folder with the templates: $CYPHONIC_NFT_DIR, the repository's `nft/`, or
    /usr/share/cyphonic/nft (the image)."""
    candidates = []
    if os.environ.get(NFT_DIR_ENV):
        candidates.append(Path(os.environ[NFT_DIR_ENV]))
    candidates += [Path(__file__).resolve().parent.parent / "nft", Path("/usr/share/cyphonic/nft")]
    for d in candidates:
        if (d / "adapter.nft.in").is_file():
            return d
    raise PacketFilterError("nft templates not found in " + ", ".join(map(str, candidates)))


def _template(name: str) -> Template:
    return Template((template_dir() / name).read_text())


def _lines(*rules: str) -> str:
    return "\n".join(f"\t\t{r}" for r in rules)


def render(config: PacketFilterConfig, mode: str | None = None) -> str:
    """The nft ruleset (table `inet cyphonic`) for `config`; `mode` "nft" puts the queue
    statement in chain `steer`, "xt" leaves it empty (see render_xt). Default: config.mode,
    "auto" probing the kernel."""
    mode = _mode(config, mode)
    c = config
    lan, wan, prefix = c.lan_if, c.wan_if, c.prefix
    if mode == "nft":
        steer = _lines(f'iifname "{lan}" ip daddr {prefix} counter name queued '
                       f"queue num {c.queue_range}")
    else:
        steer = _lines("# xt mode: the kernel has no nft queue; iptables-nft's ip filter FORWARD",
                       f"# (priority 0) holds: -i {lan} -d {prefix} -j NFQUEUE {_xt_queue_spec(c)}")
    if c.passthrough:
        passthrough_clamp = _lines(
            f'iifname "{lan}" oifname "{wan}" tcp flags syn tcp option maxseg size set rt mtu',
            f'iifname "{wan}" oifname "{lan}" tcp flags syn tcp option maxseg size set rt mtu')
        passthrough_forward = _lines(
            f'iifname "{lan}" oifname "{wan}" counter name passthrough_out accept',
            f'iifname "{wan}" oifname "{lan}" ct state established,related accept')
        nat_chain = (
            "\n\t# passthrough: masquerade what is forwarded out of the WAN port (the sources\n"
            "\t# that are not the adapter's own addresses: the LAN's)\n"
            "\tchain postrouting {\n"
            "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            f'\t\toifname "{wan}" fib saddr type != local masquerade\n'
            "\t}")
    else:
        passthrough_clamp = _lines("# passthrough off: nothing from the LAN is routed in clear")
        passthrough_forward = _lines("# passthrough off: zero trust")
        nat_chain = ""
    dhcp = (_lines('udp dport 67 counter name dhcp_in accept') if c.allow_dhcp
            else _lines("# DHCP not allowed"))
    dns = (_lines(f"ip daddr {c.lan_address} meta l4proto {{ tcp, udp }} th dport 53 "
                  f"counter name dns_in accept") if c.allow_dns else _lines("# DNS not allowed"))
    comment = (f"cyphonic adapter filter; mode={mode}; queues={c.queue_range}; "
               f"passthrough={'on' if c.passthrough else 'off'}; lan={lan}; wan={wan}; "
               f"prefix={prefix}")
    return _template("adapter.nft.in").substitute(
        table_comment=comment, lan_if=lan, wan_if=wan, prefix=prefix,
        lan_address=c.lan_address, mtu=int(c.mtu), mss=c.mss, queues=c.queue_range,
        steer_rule=steer, passthrough_clamp=passthrough_clamp,
        passthrough_forward=passthrough_forward, dhcp_rule=dhcp, dns_rule=dns,
        nat_chain=nat_chain)


def _xt_queue_spec(c: PacketFilterConfig) -> str:
    first, count = c.queues
    return f"--queue-num {first}" if count == 1 else f"--queue-balance {first}:{first + count - 1}"


def render_xt(config: PacketFilterConfig, delete_rules: list[str] | tuple[str, ...] = ()) -> str:
    """The iptables-nft-restore input of the xt path: delete `delete_rules` (as `-S` prints
    them: "-A FORWARD ...") and insert the NFQUEUE rule, in one transaction."""
    c = config
    deletes = "\n".join("-D" + r[2:] for r in delete_rules if r.startswith("-A "))
    return _template("adapter-xt.iptables.in").substitute(
        lan_if=c.lan_if, prefix=c.prefix, comment_tag=COMMENT_TAG,
        queue_spec=_xt_queue_spec(c), delete_rules=deletes)


# --- the xt rules ---------------------------------------------------------------------------------

def _is_ours(rule: str) -> bool:
    try:
        tokens = shlex.split(rule)
    except ValueError:
        return False
    return any(a == "--comment" and b == COMMENT_TAG for a, b in zip(tokens, tokens[1:]))


def _xt_rules(verbose: bool = False) -> list[str]:
    """Our rules in FORWARD, as `iptables-nft -S` prints them ([] when there is no ip filter
    table or no iptables-nft)."""
    if not _have(IPTABLES):
        return []
    argv = [IPTABLES, "-w", "5", "-t", "filter", "-S", "FORWARD"] + (["-v"] if verbose else [])
    r = _run(argv, check=False)
    if r.returncode != 0:
        return []            # no table / no chain: nothing of ours
    return [l.strip() for l in r.stdout.splitlines() if l.startswith("-A FORWARD") and _is_ours(l)]


def _xt_apply(config: PacketFilterConfig) -> None:
    if not (_have(IPTABLES) and _have(IPTABLES_RESTORE)):
        raise PacketFilterError("xt mode needs iptables-nft and iptables-nft-restore (package iptables)")
    text = render_xt(config, _xt_rules())
    _run([IPTABLES_RESTORE, "-w", "5", "--noflush"], input=text,
         what="iptables-nft-restore could not insert the NFQUEUE rule")


def _xt_remove() -> None:
    rules = _xt_rules()
    if rules:
        text = "*filter\n" + "\n".join("-D" + r[2:] for r in rules) + "\nCOMMIT\n"
        _run([IPTABLES_RESTORE, "-w", "5", "--noflush"], input=text,
             what="iptables-nft-restore could not delete the cyphonic rules")
    _drop_empty_ip_filter()


def _drop_empty_ip_filter() -> None:
    """Delete iptables-nft's `ip filter` table if it holds no rule and only accept-policy base
    chains (it then has no effect at all); typically the one our xt rule made appear."""
    r = _run([NFT, "-j", "list", "table", "ip", "filter"], check=False)
    if r.returncode != 0:
        return
    try:
        items = json.loads(r.stdout)["nftables"]
    except (ValueError, KeyError):
        return
    for it in items:
        if "rule" in it or "set" in it or "map" in it:
            return
        ch = it.get("chain")
        if ch is not None and (ch.get("hook") is None or ch.get("policy") != "accept"):
            return
    _run([NFT, "delete", "table", "ip", "filter"], check=False)


# --- load / unload / status --------------------------------------------------------------------

def _set_forwarding(on: bool) -> None:
    try:
        with open(IP_FORWARD, "w") as f:
            f.write("1\n" if on else "0\n")
    except OSError as e:
        raise PacketFilterError(f"cannot set {IP_FORWARD}: {e}") from None


def _forwarding() -> bool | None:
    try:
        with open(IP_FORWARD) as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def load(config: PacketFilterConfig) -> str:
    """Load (or atomically replace) the filter; returns the mode used ("nft" or "xt").

    Steps: the table (one nft transaction: on failure nothing changed); in xt mode the
    NFQUEUE rule (one iptables-nft transaction; stale cyphonic rules replaced); in nft mode
    stale cyphonic xt rules removed; then forwarding on (manage_forwarding). If a step after
    the table fails, everything is unloaded (forwarding off first) and PacketFilterError raised.
    """
    mode = _mode(config)
    text = render(config, mode)
    _run([NFT, "-f", "-"], input=text, what=f"nft could not load table {TABLE_FAMILY} {TABLE_NAME}")
    try:
        if mode == "xt":
            _xt_apply(config)
        elif _have(IPTABLES):
            _xt_remove()               # left over from an earlier xt-mode load
        if config.manage_forwarding:
            _set_forwarding(True)
    except BaseException:
        try:
            unload(manage_forwarding=config.manage_forwarding)
        except PacketFilterError:
            pass
        raise
    return mode


def unload(*, manage_forwarding: bool = True) -> None:
    """Remove the filter: forwarding off (manage_forwarding), our iptables-nft rules, the
    table, and iptables-nft's table if that is left empty. Idempotent: nothing loaded is fine.
    Tries every step; raises PacketFilterError at the end if one really failed."""
    errors: list[str] = []
    if manage_forwarding:
        try:
            _set_forwarding(False)
        except PacketFilterError as e:
            errors.append(str(e))
    if _have(IPTABLES) and _have(IPTABLES_RESTORE):
        try:
            _xt_remove()
        except PacketFilterError as e:
            errors.append(str(e))
    # declare, then delete: one transaction that succeeds whether the table exists or not
    r = _run([NFT, "-f", "-"], check=False,
             input=f"table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n")
    if r.returncode != 0:
        errors.append(f"nft could not delete table {TABLE_FAMILY} {TABLE_NAME}:\n{r.stderr.strip()}")
    if errors:
        raise PacketFilterError("unload incomplete", "\n".join(errors))


def _parse_comment(comment: str) -> dict[str, str]:
    out = {}
    for part in comment.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out[k] = v
    return out


def status() -> dict:
    """What is loaded: {"loaded", "mode", "steering", "passthrough", "queues", "forwarding",
    "counters": {name: {"packets", "bytes"}}, "xt_rules": [...]} ("queued" comes from the
    iptables-nft rule's counter in xt mode)."""
    out: dict = {"loaded": False, "mode": None, "steering": False, "passthrough": None,
                 "queues": None, "forwarding": _forwarding(), "counters": {}, "xt_rules": []}
    xt = _xt_rules(verbose=True)
    out["xt_rules"] = xt
    r = _run([NFT, "-j", "list", "table", TABLE_FAMILY, TABLE_NAME], check=False)
    if r.returncode != 0:
        return out
    try:
        items = json.loads(r.stdout)["nftables"]
    except (ValueError, KeyError) as e:
        raise PacketFilterError(f"cannot parse nft -j output: {e}") from None
    out["loaded"] = True
    # nft 1.0.6 leaves the table's comment out of its JSON: read it from the text listing
    t = _run([NFT, "list", "table", TABLE_FAMILY, TABLE_NAME], check=False)
    m = re.search(r'^table [a-z]+ \S+ \{\n\s*comment "([^"]*)"', t.stdout, re.M)
    info = _parse_comment(m.group(1)) if m else {}
    out["mode"] = info.get("mode")
    out["queues"] = info.get("queues")
    out["passthrough"] = {"on": True, "off": False}.get(info.get("passthrough", ""))
    nft_queue = False
    for it in items:
        if "counter" in it:
            c = it["counter"]
            out["counters"][c["name"]] = {"packets": c.get("packets", 0), "bytes": c.get("bytes", 0)}
        elif "rule" in it and it["rule"].get("chain") == "steer":
            nft_queue = nft_queue or any("queue" in e for e in it["rule"].get("expr", []))
    if out["mode"] == "xt":
        out["steering"] = bool(xt)
        pk = by = 0
        for rule in xt:
            m = re.search(r"-c (\d+) (\d+)", rule)
            if m:
                pk, by = pk + int(m.group(1)), by + int(m.group(2))
        out["counters"]["queued"] = {"packets": pk, "bytes": by}
    else:
        out["steering"] = nft_queue
    return out


# --- CLI -----------------------------------------------------------------------------------------

def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lan", required=True, help="LAN interface (general nodes)")
    p.add_argument("--wan", required=True, help="WAN interface")
    p.add_argument("--prefix", required=True, help="overlay IPv4 prefix, e.g. 100.64.0.0/10")
    p.add_argument("--lan-address", required=True, help="the adapter's LAN address")
    d_first, d_count = _default_queues()
    p.add_argument("--queue-first", type=int, default=d_first)
    p.add_argument("--queue-count", type=int, default=d_count, help="workers (default: cores)")
    p.add_argument("--mtu", type=int, default=1420, help="overlay MTU (MSS clamp = MTU - 40)")
    p.add_argument("--passthrough", action="store_true", help="let LAN -> WAN through (masqueraded)")
    p.add_argument("--no-dhcp", action="store_true", help="do not allow DHCP to the adapter")
    p.add_argument("--no-dns", action="store_true", help="do not allow DNS to the adapter")
    p.add_argument("--mode", choices=("auto",) + MODES, default="auto")
    p.add_argument("--no-forwarding", action="store_true",
                   help="leave net.ipv4.ip_forward alone")


def _config(a: argparse.Namespace) -> PacketFilterConfig:
    return PacketFilterConfig(
        lan_if=a.lan, wan_if=a.wan, prefix=a.prefix, lan_address=a.lan_address,
        queues=(a.queue_first, a.queue_count), mtu=a.mtu, passthrough=a.passthrough,
        allow_dhcp=not a.no_dhcp, allow_dns=not a.no_dns, mode=a.mode,
        manage_forwarding=not a.no_forwarding)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.packet_filter",
                                 description="Load, remove or show the adapter's nftables filter.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _config_args(sub.add_parser("load", help="load or atomically replace the filter"))
    pr = sub.add_parser("render", help="print the ruleset(s) without loading")
    _config_args(pr)
    pu = sub.add_parser("unload", help="remove the filter (idempotent)")
    pu.add_argument("--no-forwarding", action="store_true", help="leave net.ipv4.ip_forward alone")
    sub.add_parser("status", help="JSON: loaded, mode, counters")
    sub.add_parser("detect", help='print "nft" or "xt"')
    a = ap.parse_args(argv)
    try:
        if a.cmd == "load":
            mode = load(_config(a))
            print(f"loaded table {TABLE_FAMILY} {TABLE_NAME} (mode {mode})")
        elif a.cmd == "render":
            cfg = _config(a)
            mode = _mode(cfg)
            sys.stdout.write(render(cfg, mode))
            if mode == "xt":
                sys.stdout.write("\n# --- iptables-nft-restore --noflush input ---\n")
                sys.stdout.write(render_xt(cfg))
        elif a.cmd == "unload":
            unload(manage_forwarding=not a.no_forwarding)
            print(f"unloaded table {TABLE_FAMILY} {TABLE_NAME}")
        elif a.cmd == "status":
            print(json.dumps(status(), indent=2))
        elif a.cmd == "detect":
            print(detect_queue_support())
    except (PacketFilterError, ValueError) as e:
        print(f"packet_filter: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
