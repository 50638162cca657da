"""`cyadm`: the admin CLI of the node daemon (``cyphonic-node``) and the adapter appliance
(``cyphonic-adapter``).

It never touches the data path: it asks the daemon over its Unix socket
(one JSON request line, one JSON answer line), as `tailscale status` asks
tailscaled. Every listing has ``--json``; ``cyadm metrics`` prints the status in the
Prometheus text format (``cyphonic.metrics``).

Exit codes a script can rely on:
  0  the daemon answered and reports no error-level health warning
  1  the daemon could not be reached or answered an error
  2  bad usage
  3  the daemon answered, with at least one error-level health warning
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import click

from cyphonic.health import describe

from .constants import FETCH_TOTAL_S

DEFAULT_SOCKETS = ("/run/cyphonic/adapter.sock", "/run/cyphonic/node.sock")
PROVISION_STATUS = "/run/cyphonic/provision.json"     # written by cyphonic-provision at boot
PROVISION_STATUS_ENV = "CYPHONIC_PROVISION_STATUS"
EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_UNHEALTHY = 0, 1, 2, 3


def ask(path: str, cmd: str = "status", timeout: float = 5.0, **args) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 16 << 20:
                raise ValueError("answer too large")
    finally:
        s.close()
    return json.loads(buf)


def _socket_path(explicit: str | None) -> str:
    if explicit:
        return explicit
    for p in DEFAULT_SOCKETS:
        if os.path.exists(p):
            return p
    return DEFAULT_SOCKETS[-1]


def _age(seconds) -> str:
    if seconds is None:
        return "never"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _bytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@click.group()
@click.option("--socket", "socket_path", envvar="CYADM_SOCKET", default=None,
              help="The daemon's status socket (default: the adapter's, else the node's).")
@click.pass_context
def main(ctx: click.Context, socket_path: str | None) -> None:
    """Ask the CYPHONIC daemon (node or adapter) how it is."""
    ctx.obj = {"socket": _socket_path(socket_path)}


def _status(ctx, cmd: str = "status", *, provision: bool = False, as_json: bool = False, **args) -> dict:
    """Ask the daemon; when it cannot be reached, say so (and with `provision`, show what the
    appliance's provisioning at boot reported: the usual reason the adapter is not running) and
    exit 1."""
    path = ctx.obj["socket"]
    try:
        return ask(path, cmd, **args)
    except FileNotFoundError:
        problem = f"no daemon socket at {path}: is cyphonic-node (or cyphonic-adapter) running?"
    except (ConnectionRefusedError, socket.timeout, OSError, ValueError) as exc:
        problem = f"cannot talk to the daemon at {path}: {exc}"
    click.echo(f"cyadm: {problem}", err=True)
    if provision:
        doc = read_provision_status()
        if as_json:
            click.echo(json.dumps({"provision": doc, "error": problem}, indent=2))
        elif doc is not None:
            _print_provision(doc)
    sys.exit(EXIT_UNREACHABLE)


def read_provision_status() -> dict | None:
    """/run/cyphonic/provision.json ($CYPHONIC_PROVISION_STATUS), None when there is none."""
    path = os.environ.get(PROVISION_STATUS_ENV) or PROVISION_STATUS
    try:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"state": "unreadable", "errors": [f"{path}: {exc}"], "path": path}
    return {**doc, "path": path}


def _print_provision(doc: dict) -> None:
    state = doc.get("state", "?")
    click.echo(f"provisioning at boot ({doc.get('path')}, {doc.get('time', '?')}): {state}")
    if doc.get("boot_file"):
        click.echo(f"  boot file {doc['boot_file']}"
                   + (f" (used {doc['source']})" if doc.get("source") and doc["source"] != doc["boot_file"] else ""))
    for e in doc.get("errors", []):
        click.echo(f"  - {e}")
    for w in doc.get("warnings", []):
        click.echo(f"  note: {w}")
    if state in ("error", "not-provisioned"):
        click.echo("  To fix: edit cyphonic.toml on the boot partition (see cyphonic.toml.example next to it), "
                   "then reboot.")
    elif state == "ok":
        click.echo(f"  the adapter should be running (WAN {doc.get('wan') or '-'}, LAN {doc.get('lan') or '-'}): "
                   "journalctl -u cyphonic-adapter")


def _exit_for(st: dict) -> None:
    if any(h.get("severity") == "error" for h in st.get("health", [])):
        sys.exit(EXIT_UNHEALTHY)
    sys.exit(EXIT_OK)


def _via(cloud: dict) -> str:
    """Which cloud instance the link uses, when there are several to choose from."""
    return f" via instance {cloud.get('instance')}" if len(cloud.get("instances") or []) > 1 else ""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx, as_json) -> None:
    """The identity, the cloud link, every tunnel and the health warnings."""
    st = _status(ctx, provision=True, as_json=as_json)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        _exit_for(st)
    if st.get("kind") == "adapter":
        _print_adapter(st)
        _exit_for(st)
    ident, cloud = st.get("identity", {}), st.get("cloud", {})
    exp = ident.get("cert_expires")
    click.echo(f"{ident.get('fqdn') or '(not enrolled)'}  {ident.get('vip4') or '-'}  "
               f"{st.get('kind', 'daemon')} pid {st.get('pid')}, up {st.get('uptime_s', 0):.0f}s")
    if exp:
        cloud_now = time.time() + (cloud.get("clock_offset_s") or 0)     # validity is on the cloud's clock
        click.echo(f"  certificate serial {ident.get('cert_serial')}, expires in {(exp - cloud_now) / 3600:.1f} h")
    obs = cloud.get("observed")
    click.echo(f"  cloud {cloud.get('address')}: {cloud.get('state')}" + _via(cloud)
               + (f", seen as {obs}{' (behind NAT)' if cloud.get('nat') else ''}" if obs else ""))
    iface = st.get("interface", {})
    if iface:
        click.echo(f"  interface {iface.get('name')} mtu {iface.get('mtu')}"
                   f"{'' if iface.get('present') else ' (not present)'}; udp port {st.get('udp_port')}")
    dns = st.get("dns", {})
    if dns:
        click.echo(f"  dns {dns.get('listen')}: {'serving' if dns.get('running') else 'not running'}")
    tunnels = st.get("tunnels", [])
    if tunnels:
        click.echo(f"\n  {'PEER':34} {'VIP':15} {'PATH':9} {'ENDPOINT':24} {'HANDSHAKE':10} {'RX':>10} {'TX':>10}")
        for t in tunnels:
            click.echo(f"  {t['peer']:34} {t['vip4']:15} {t['path']:9} {str(t.get('endpoint') or '-'):24} "
                       f"{_age(t.get('last_handshake_age_s')):10} {_bytes(t.get('rx_bytes')):>10} "
                       f"{_bytes(t.get('tx_bytes')):>10}")
    else:
        click.echo("\n  no tunnels")
    _print_drops(st)
    _print_health(st)
    _exit_for(st)


def _print_drops(st: dict) -> None:
    """What was dropped: the daemon's own drops (the three biggest reasons) and the kernel's
    on its sockets; ``--json`` has every reason and every socket."""
    drops = {k: v for k, v in (st.get("drops") or {}).items() if isinstance(v, int) and v > 0}
    if drops:
        top = sorted(drops.items(), key=lambda kv: -kv[1])[:3]
        click.echo(f"\n  dropped {sum(drops.values())}: " + ", ".join(f"{k} {v}" for k, v in top)
                   + (", ..." if len(drops) > 3 else ""))
    rows = st.get("sockets") or []
    kernel = [(r.get("socket"), r["kernel_drops"]) for r in rows
              if isinstance(r.get("kernel_drops"), int) and r["kernel_drops"] > 0]
    if kernel:
        click.echo(f"  kernel dropped {sum(n for _, n in kernel)}: " + ", ".join(f"{k} {n}" for k, n in kernel))
    unreadable = [str(r.get("socket")) for r in rows if not isinstance(r.get("kernel_drops"), int)]
    if unreadable:
        click.echo(f"  kernel drops unavailable on {', '.join(unreadable)}")


def _print_health(st: dict) -> None:
    """The health warnings (``cyphonic.health``): errors first, each with how long it holds."""
    health = st.get("health", [])
    if health:
        click.echo("\n  health:")
        for line in describe(health, time.time()):
            click.echo(f"    {line}")


def _print_adapter(st: dict) -> None:
    lan = st.get("lan", {})
    ident, cloud = st.get("identity", {}), st.get("cloud", {})
    click.echo(f"{ident.get('fqdn') or '(adapter not logged in)'}  {ident.get('vip4') or '-'}  cyphonic-adapter pid "
               f"{st.get('pid')}, up {st.get('uptime_s', 0):.0f}s")
    click.echo(f"  LAN {lan.get('interface')} {lan.get('address')}; packet filter: "
               f"{st.get('packet_filter') or 'not loaded'} NFQUEUE path")
    obs = cloud.get("observed")
    click.echo(f"  cloud {cloud.get('address')}: {cloud.get('state')}" + _via(cloud)
               + (f", seen as {obs}{' (behind NAT)' if cloud.get('nat') else ''}" if obs else "")
               + f"; general nodes' links: {cloud.get('general_nodes')}")
    gns = st.get("general_nodes", [])
    click.echo(f"\n  {'GENERAL NODE':14} {'MAC':18} {'FQDN':30} {'VIP':15} {'LEASE':9} CLOUD")
    for g in gns:
        lease = f"{g['lease_expires_in_s']}s" if g.get("lease_expires_in_s") else "-"
        click.echo(f"  {g['name']:14} {g['mac']:18} {str(g.get('fqdn') or '-'):30} {str(g.get('vip4') or '-'):15} "
                   f"{lease:9} {g.get('cloud')}" + (f" via {g['instance']}" if g.get("instance") else ""))
    tunnels = st.get("tunnels", [])
    if tunnels:
        click.echo(f"\n  {'FROM':10} {'PEER':28} {'VIP':15} {'PATH':9} {'ENDPOINT':22} {'HANDSHAKE':10} "
                   f"{'RX':>10} {'TX':>10}")
        for t in tunnels:
            click.echo(f"  {t['gn']:10} {t['peer']:28} {t['vip4']:15} {t['path']:9} {str(t.get('endpoint') or '-'):22} "
                       f"{_age(t.get('last_handshake_age_s')):10} {_bytes(t.get('rx_bytes')):>10} "
                       f"{_bytes(t.get('tx_bytes')):>10}")
    workers = st.get("workers", [])
    click.echo("\n  workers: " + "; ".join(
        f"#{w['index']} queue {w['queue']} pid {w['pid']} {'up' if w.get('alive') else 'DOWN'} "
        f"sealed {w.get('sealed', 0)} dropped {sum(v for k, v in w.items() if k.startswith('drop_'))}"
        for w in workers) + (f"; restarts {st.get('worker_restarts')}" if st.get("worker_restarts") else ""))
    _print_unknown_macs(st.get("dhcp", {}).get("unknown_macs") or {})
    _print_update_line()
    _print_drops(st)
    _print_health(st)


def _print_update_line() -> None:
    """One line about the last or pending update (files on /data only; nothing on a non-A/B card)."""
    from .updater import summary
    line = summary(_update_system().paths)
    if line:
        click.echo(f"\n  {line}")


UNKNOWN_MACS_SHOWN = 5      # the text shows the most recent few; --json has them all


def _print_unknown_macs(u: dict) -> None:
    """The devices that asked for a lease and are not enrolled (``cyadm gn add MAC`` serves one)."""
    if u.get("warning"):
        click.echo(f"\n  note: {u['warning']}")
    if not u.get("total"):
        return
    now = time.time()
    macs = u.get("macs", [])
    click.echo(f"\n  unknown MACs asking for a lease: {u['total']} requests, the last {_age(now - u['last_seen'])}"
               if u.get("last_seen") is not None else f"\n  unknown MACs asking for a lease: {u['total']} requests")
    for m in macs[:UNKNOWN_MACS_SHOWN]:
        click.echo(f"    {m['mac']}  {m['count']} requests, last {_age(now - m['last_seen'])}, "
                   f"first {_age(now - m['first_seen'])}")
    if len(macs) > UNKNOWN_MACS_SHOWN:
        click.echo(f"    ... and {len(macs) - UNKNOWN_MACS_SHOWN} more (cyadm status --json)")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def tunnels(ctx, as_json) -> None:
    """Only the tunnels."""
    st = _status(ctx)
    rows = st.get("tunnels", [])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for t in rows:
            click.echo(f"{t['peer']} {t['vip4']} {t['path']} {t.get('endpoint') or '-'} "
                       f"rx {t.get('rx_bytes', 0)} tx {t.get('tx_bytes', 0)}")
    _exit_for(st)


@main.command()
@click.pass_context
def metrics(ctx) -> None:
    """The status in the Prometheus text format 0.0.4 (the names: docs/architecture.md).
    Exit 0 whenever the daemon answered: health is in cyphonic_health_warning."""
    from cyphonic.metrics import exposition
    click.echo(exposition(_status(ctx)), nl=False)


@main.group()
def config() -> None:
    """The adapter's configuration file."""


@config.command("check")
@click.argument("path", default="/etc/cyphonic/adapter.toml")
def config_check(path) -> None:
    """Check an adapter config file (exit 0 if good, 1 with the reason if not)."""
    from .config import AdapterConfigError, load_config
    try:
        cfg = load_config(path)
    except AdapterConfigError as exc:
        click.echo(f"cyadm: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    click.echo(f"{path}: ok (cloud {cfg.cloud}, LAN {cfg.lan_interface} {cfg.lan_address}, WAN "
               f"{cfg.wan_interface}, prefix {cfg.prefix}, {cfg.nworkers} workers, "
               f"passthrough {'on' if cfg.passthrough else 'off'})")


@main.group()
def gn() -> None:
    """General nodes of an adapter: add, remove, list (by MAC)."""


def _answer(reply: dict) -> None:
    if "error" in reply:
        click.echo(f"cyadm: {reply['error']}", err=True)
        sys.exit(EXIT_UNREACHABLE)


@gn.command("add")
@click.argument("mac")
@click.option("--name", required=True, help="Its name: the FQDN becomes NAME.<overlay domain>.")
@click.option("--group", default="", help="Group (needs a token enrolled with it).")
@click.option("--token", default="", help="An enrollment token for this node (default: the adapter's).")
@click.pass_context
def gn_add(ctx, mac, name, group, token) -> None:
    """Enroll the general node with this MAC."""
    reply = _status(ctx, "gn_add", mac=mac, name=name, group=group, token=token)
    _answer(reply)
    click.echo(f"added {reply['name']} ({reply['mac']}): it logs in to the cloud now, then gets its lease")


@gn.command("remove")
@click.argument("mac")
@click.pass_context
def gn_remove(ctx, mac) -> None:
    """Stop serving the general node with this MAC."""
    _answer(_status(ctx, "gn_remove", mac=mac))
    click.echo(f"removed {mac}")


@gn.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def gn_list(ctx, as_json) -> None:
    rows = _status(ctx, "gn_list").get("general_nodes", [])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'MAC':18} {'NAME':14} {'FQDN':32} {'VIP':15} {'LEASE':10} CLOUD")
    for r in rows:
        lease = f"{r['lease_expires_in_s']}s" if r.get("lease_expires_in_s") else "-"
        click.echo(f"{r['mac']:18} {r['name']:14} {str(r.get('fqdn') or '-'):32} {str(r.get('vip4') or '-'):15} "
                   f"{lease:10} {r.get('cloud')}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def leases(ctx, as_json) -> None:
    """DHCP leases of the adapter's general nodes."""
    rows = [r for r in _status(ctx, "gn_list").get("general_nodes", []) if r.get("lease_expires_in_s")]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['mac']} {r['vip4']} {r['name']} expires in {r['lease_expires_in_s']} s")


# --- signed A/B updates (appliance/updater.py, appliance/update.py) -----------------------------

def _update_system():
    from .updater import System
    return System()


def _need_root() -> None:
    if os.geteuid() != 0:
        click.echo("cyadm update: needs root (rauc and the data partition): run it as root", err=True)
        sys.exit(EXIT_UNREACHABLE)


@main.group()
def update() -> None:
    """Signed A/B updates: install a bundle, see the slots and the last update's outcome."""


@update.command("install")
@click.argument("source")
@click.option("--no-reboot", is_flag=True, help="Install only; the new version is tried at the next boot.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable outcome.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1, 24 * 3600), default=FETCH_TOTAL_S, show_default=True,
              help="A URL: give up when the download takes longer than this (seconds).")
def update_install(source, no_reboot, as_json, timeout_s) -> None:
    """Install the bundle SOURCE (a .raucb file, an http(s) URL, or - for stdin) into the slot not
    booted, then reboot into it; the health gate commits it or rolls back."""
    from .update import UpdateError
    from .updater import install
    _need_root()

    def log(line: str) -> None:
        click.echo(line, err=as_json)
    try:
        result = install(source, _update_system(), reboot=not no_reboot, total_s=timeout_s, log=log)
    except (UpdateError, OSError) as exc:
        if as_json:
            click.echo(json.dumps({"installed": False, "error": str(exc)}, indent=2))
        click.echo(f"cyadm update: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    if as_json:
        click.echo(json.dumps(result, indent=2))


@update.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def update_status(as_json) -> None:
    """The slots, their versions, which is booted and good, a pending update and the last outcome."""
    from .update import UpdateError, render_status
    from .updater import status as update_status_doc
    _need_root()
    try:
        doc = update_status_doc(_update_system())
    except (UpdateError, OSError) as exc:
        click.echo(f"cyadm update: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for line in render_status(doc):
            click.echo(line)


@update.command("ack")
def update_ack() -> None:
    """Acknowledge a rollback: the LED stops showing it."""
    from .update import UpdateError
    from .updater import acknowledge
    _need_root()
    try:
        click.echo(acknowledge(_update_system()))
    except (UpdateError, OSError) as exc:
        click.echo(f"cyadm update: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)


if __name__ == "__main__":
    main()
