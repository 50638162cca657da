"""`cyphonic-cloud`: run and administer the cloud (AS, NMS, TRS).

    cyphonic-cloud init [--domain D] [--prefix P] [--state-dir DIR]
    cyphonic-cloud serve
    cyphonic-cloud enroll NAME [--group G]... [--reusable] [--expires 7d|12h|3600s|never]
    cyphonic-cloud nodes [--json]
    cyphonic-cloud revoke NAME
    cyphonic-cloud policy show [--json] | policy set FILE
    cyphonic-cloud instances [--json] [--forget ID]
    cyphonic-cloud stats [--json]
    cyphonic-cloud metrics
    cyphonic-cloud db upgrade
    cyphonic-cloud db copy --from SRC --to DST

The config file is ``--config`` (or ``$CYPHONIC_CLOUD_CONFIG``, default
``/etc/cyphonic/cloud.toml``). Exit codes: 0 done, 1 refused or failed (the
message on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import tomllib

import click

from ..errors import CyphonicError
from . import authentication, policy as pol
from .config import CloudConfig, ConfigError, example_config, load_config
from .keys import create_keys
from .store import SCHEMA_VERSION, Store, StoreError, open_store

DEFAULT_CONFIG = "/etc/cyphonic/cloud.toml"


def fail(message: str) -> None:
    click.echo(f"cyphonic-cloud: {message}", err=True)
    sys.exit(1)


def _config(ctx: click.Context) -> CloudConfig:
    try:
        return load_config(ctx.obj["config"])
    except ConfigError as exc:
        fail(str(exc))


def _store(cfg: CloudConfig, *, upgrade: bool = False) -> Store:
    try:
        return open_store(cfg.database_target, upgrade=upgrade)
    except StoreError as exc:
        fail(str(exc))


def parse_duration(text: str) -> float | None:
    if text in ("never", "0"):
        return None
    m = re.fullmatch(r"(\d+)\s*([smhdw]?)", text.strip())
    if not m:
        raise click.BadParameter(f"{text!r}: use a number with s, m, h, d or w, or 'never'")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return float(n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit])


@click.group()
@click.option("--config", "config_path", envvar="CYPHONIC_CLOUD_CONFIG", default=DEFAULT_CONFIG,
              show_default=True, help="The cloud's TOML config file.")
@click.pass_context
def main(ctx: click.Context, config_path: str) -> None:
    """Run and administer the CYPHONIC cloud (AS, NMS, TRS)."""
    ctx.obj = {"config": config_path}


@main.command()
@click.option("--domain", help="Overlay domain (FQDN = <name>.<domain>).")
@click.option("--prefix", help="Virtual IPv4 prefix, e.g. 100.64.0.0/10.")
@click.option("--state-dir", help="Where keys and the database live.")
@click.option("--listen4", help="IPv4 address to listen on.")
@click.option("--listen6", help="IPv6 address to listen on (\"\" disables IPv6).")
@click.pass_context
def init(ctx, domain, prefix, state_dir, listen4, listen6) -> None:
    """Create the config (if missing), the CA and service keys; print the cloud key."""
    path = ctx.obj["config"]
    if not os.path.exists(path):
        text = example_config()
        for key, value in (("domain", domain), ("prefix", prefix), ("state_dir", state_dir),
                           ("listen4", listen4), ("listen6", listen6)):
            if value is not None:
                text, n = re.subn(rf'(?m)^{key} = .*$', f"{key} = {json.dumps(value)}", text)
                if n != 1:
                    fail(f"internal: no {key} line in the example config")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "x") as f:
            f.write(text)
        click.echo(f"wrote {path}")
    elif any(v is not None for v in (domain, prefix, state_dir, listen4, listen6)):
        fail(f"{path} exists: edit it instead of passing options to init")
    cfg = _config(ctx)
    try:
        keys = create_keys(str(cfg.state_dir))
    except CyphonicError as exc:
        fail(str(exc))
    store = _store(cfg)
    store.set_meta("domain", cfg.domain)
    store.set_meta("prefix", str(cfg.prefix))
    store.close()
    click.echo(f"created keys in {cfg.state_dir} (0600)")
    click.echo(f"overlay domain {cfg.domain}, virtual prefix {cfg.prefix}")
    click.echo(f"cloud key (nodes pin this): {keys.cloud_key}")


@main.command()
@click.pass_context
def serve(ctx) -> None:
    """Run the services named in the config until SIGTERM."""
    from .server import serve as _serve
    cfg = _config(ctx)
    try:
        sys.exit(asyncio.run(_serve(cfg)))
    except (CyphonicError, OSError) as exc:
        fail(str(exc))


@main.command()
@click.argument("name")
@click.option("--group", "groups", multiple=True, help="Group (repeatable); default: default.")
@click.option("--reusable", is_flag=True, help="Many nodes may enroll with it (names NAME-n or their hint).")
@click.option("--expires", default=None, help="Lifetime: 7d, 12h, 3600s or never (default from config).")
@click.pass_context
def enroll(ctx, name, groups, reusable, expires) -> None:
    """Print an enrollment token for a node called NAME."""
    cfg = _config(ctx)
    lifetime = cfg.token_lifetime_s if expires is None else parse_duration(expires)
    store = _store(cfg)
    try:
        if not reusable and store.get_identity_by_name(name) is not None:
            fail(f"a node named {name} exists (revoke it first, or pick another name)")
        token = authentication.create_token(store, name, time.time(), groups=tuple(groups) or ("default",),
                                            reusable=reusable, lifetime_s=lifetime)
    except CyphonicError as exc:
        fail(str(exc))
    finally:
        store.close()
    click.echo(token)


def _read_stats(cfg: CloudConfig) -> dict | None:
    from .server import stats_path
    try:
        with open(stats_path(cfg)) as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return None
    return stats if time.time() - stats.get("written", 0) < 30 else None


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def nodes(ctx, as_json) -> None:
    """List enrolled nodes (and whether they are registered now)."""
    cfg = _config(ctx)
    store = _store(cfg)
    try:
        idents = store.list_identities()
        # Where each node is registered: the shared table, good while its instance is alive
        now = time.time()
        alive = {i.instance_id for i in store.list_instances() if i.alive(now)}
        regs = {r.static_public: r for r in store.list_registrations() if r.instance_id in alive}
    except StoreError as exc:
        fail(str(exc))
    finally:
        store.close()
    # An instance alone keeps its registrations to itself: its stats file has them
    stats = _read_stats(cfg) or {}
    here = {r["fqdn"]: r for r in stats.get("registrations", [])}
    here_id = (stats.get("cluster") or {}).get("instance_id")
    rows = []
    for i in idents:
        shared, local = regs.get(i.static_public), here.get(i.fqdn)
        rows.append({"name": i.name, "fqdn": i.fqdn, "vip4": i.vip4, "groups": list(i.groups),
                     "revoked": i.revoked, "serial": i.serial, "registered": bool(shared or local),
                     "instance": shared.instance_id if shared else (here_id if local else None),
                     "observed": shared.observed if shared else (local or {}).get("observed"),
                     "nat": shared.nat if shared else (local or {}).get("nat")})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'NAME':16} {'FQDN':36} {'VIP':15} {'GROUPS':16} {'STATE':12} {'INSTANCE':20} OBSERVED")
    for r in rows:
        state = "revoked" if r["revoked"] else ("registered" if r["registered"] else "offline")
        click.echo(f"{r['name']:16} {r['fqdn']:36} {r['vip4']:15} {','.join(r['groups']):16} {state:12} "
                   f"{r['instance'] or '-':20} {r['observed'] or '-'}{' (NAT)' if r['nat'] else ''}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--forget", "forget", metavar="ID", help="Remove a dead instance's row (and free its tag).")
@click.pass_context
def instances(ctx, as_json, forget) -> None:
    """The cloud instances sharing this database: what each serves, whether it is alive, how many
    nodes are registered at it (docs/cloud.md, "Several instances")."""
    cfg = _config(ctx)
    store = _store(cfg)
    now = time.time()
    try:
        if forget:
            rec = next((i for i in store.list_instances() if i.instance_id == forget), None)
            if rec is not None and rec.alive(now):
                fail(f"instance {forget!r} is alive (heartbeat {now - rec.heartbeat:.1f} s ago): stop it first")
            store.forget_instance(forget)
            click.echo(f"forgot instance {forget}")
            return
        recs = store.list_instances()
        counts = store.count_registrations()
    except StoreError as exc:
        fail(str(exc))
    finally:
        store.close()
    stats = _read_stats(cfg) or {}           # an instance alone keeps its registrations to itself
    if (stats.get("cluster") or {}).get("instance_id") and "registrations" in stats:
        counts.setdefault(stats["cluster"]["instance_id"], len(stats["registrations"]))
    rows = []
    for i in recs:
        state = "alive" if i.alive(now) else ("stopped" if i.heartbeat == 0 else "dead")
        rows.append({"instance_id": i.instance_id, "tag": i.tag, "services": list(i.services), "state": state,
                     "heartbeat_age_s": None if i.heartbeat == 0 else round(now - i.heartbeat, 1),
                     "nodes": counts.get(i.instance_id, 0) if state == "alive" else 0,
                     "signaling": list(i.signaling), "relay": list(i.relay), "host": i.host, "pid": i.pid,
                     "started": i.started})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'INSTANCE':24} {'TAG':>4} {'SERVICES':12} {'STATE':12} {'NODES':>6} {'HOST':16} {'PID':>7}  ADDRESSES")
    for r in rows:
        state = r["state"] if r["state"] != "dead" else f"dead {r['heartbeat_age_s']:.0f}s"
        click.echo(f"{r['instance_id']:24} {r['tag']:>4} {','.join(r['services']):12} {state:12} {r['nodes']:>6} "
                   f"{r['host']:16} {r['pid']:>7}  {' '.join(r['signaling'] + r['relay']) or '-'}")


@main.command()
@click.argument("name")
@click.pass_context
def revoke(ctx, name) -> None:
    """Revoke node NAME: its certificates are refused from now on (a running cloud applies it within 5 s)."""
    cfg = _config(ctx)
    store = _store(cfg)
    try:
        ident = store.revoke(name, time.time())
    except CyphonicError as exc:
        fail(str(exc))
    finally:
        store.close()
    click.echo(f"revoked {ident.fqdn} ({ident.vip4}); its address is never given to another node")


@main.group()
def policy() -> None:
    """Show or set the tunnel policy (docs/cloud.md)."""


@policy.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_show(ctx, as_json) -> None:
    cfg = _config(ctx)
    store = _store(cfg)
    current = store.get_policy()
    store.close()
    doc = current or pol.DEFAULT_POLICY
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"default = {json.dumps(doc['default'])}" + ("" if current else "    # built-in default"))
    for rule in doc["rules"]:
        click.echo(f"[[rules]]\nfrom = {json.dumps(rule['from'])}\nto = {json.dumps(rule['to'])}\n"
                   f"action = {json.dumps(rule['action'])}")


@policy.command("set")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def policy_set(ctx, file) -> None:
    """Replace the policy with FILE (TOML or JSON)."""
    try:
        with open(file, "rb") as f:
            raw = f.read()
        doc = json.loads(raw) if file.endswith(".json") else tomllib.loads(raw.decode())
        doc = pol.validate(doc)
    except (ValueError, tomllib.TOMLDecodeError, pol.PolicyError) as exc:
        fail(f"{file}: {exc}")
    cfg = _config(ctx)
    store = _store(cfg)
    store.set_policy(doc)
    store.close()
    click.echo(f"policy set: default {doc['default']}, {len(doc['rules'])} rules (a running cloud applies it within 5 s)")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def stats(ctx, as_json) -> None:
    """Counters of the running cloud process."""
    cfg = _config(ctx)
    st = _read_stats(cfg)
    if st is None:
        from .server import stats_path
        fail(f"no recent {stats_path(cfg)}: is `cyphonic-cloud serve` running with this config?")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"pid {st['pid']}, services {', '.join(st['services'])}, up {time.time() - st['started']:.0f} s")
    click.echo(f"control sessions {st.get('sessions', 0)}, registered nodes {st.get('registered', 0)}")
    cl = st.get("cluster")
    if cl:
        click.echo(f"instance {cl.get('instance_id')} (tag {cl.get('tag')}): alive {', '.join(cl.get('alive') or []) or '-'}; "
                   f"dead {', '.join(cl.get('dead') or []) or '-'}; relays {', '.join(cl.get('relays') or []) or '-'}"
                   + (f"; database: {cl['last_error']}" if cl.get("last_error") else ""))
        for section in ("counters", "drops"):
            if cl.get(section):
                click.echo(f"cluster_{section}: " + ", ".join(f"{k}={v}" for k, v in sorted(cl[section].items())))
    for section in ("counters", "nms", "control", "control_drops", "relay", "socket_errors", "relay_socket_errors"):
        values = st.get(section)
        if values:
            flat = values if section != "relay" else {k: v for k, v in values.items() if not isinstance(v, (dict, list))}
            click.echo(f"{section}: " + ", ".join(f"{k}={v}" for k, v in sorted(flat.items())))
    if st.get("relay", {}).get("drops"):
        click.echo("relay_drops: " + ", ".join(f"{k}={v}" for k, v in sorted(st["relay"]["drops"].items())))
    sockets = st.get("sockets") or []
    if sockets:
        click.echo("kernel_drops: " + ", ".join(f"{r['socket']}={r['kernel_drops']}" for r in sockets))
    from ..health import describe
    for line in describe(st.get("health", []), time.time()):
        click.echo(f"health: {line}")


@main.command()
@click.pass_context
def metrics(ctx) -> None:
    """The running cloud's counters in the Prometheus text format 0.0.4 (from the stats file
    it writes every 2 s; the names: docs/architecture.md)."""
    from ..metrics import exposition
    cfg = _config(ctx)
    st = _read_stats(cfg)
    if st is None:
        from .server import stats_path
        fail(f"no recent {stats_path(cfg)}: is `cyphonic-cloud serve` running with this config?")
    click.echo(exposition({"kind": "cloud", **st}), nl=False)


@main.group()
def db() -> None:
    """The database's schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx) -> None:
    """Bring the database's schema to this program's version (creates it when empty).

    Run it once after installing a new cyphonic, before starting the new
    version's instances; a schema newer than this program is refused.
    """
    cfg = _config(ctx)
    store = _store(cfg, upgrade=True)
    found = store.schema_version_found  # type: ignore[attr-defined]
    store.close()
    if found == SCHEMA_VERSION:
        click.echo(f"schema version {SCHEMA_VERSION}: up to date")
    else:
        click.echo(f"schema version {found} -> {SCHEMA_VERSION}")


@db.command("copy")
@click.option("--from", "source", required=True, metavar="SRC",
              help="The database the cloud uses now: sqlite:PATH, a path or postgresql://...")
@click.option("--to", "destination", required=True, metavar="DST",
              help="A new, empty database: postgresql://..., sqlite:PATH or a path.")
def db_copy(source, destination) -> None:
    """Copy the cloud's persistent state from SRC into the empty DST (no node re-enrolls).

    Identities, tokens (hashes), serials, revocations, the policy, meta and the
    serial counter are copied in one transaction; registrations and other
    runtime tables are not (nodes register again by themselves). Both must be at
    this program's schema version; stop the cloud first, then point `database`
    at DST. Reads no config: SRC and DST are the arguments.
    """
    from .store_copy import copy_database
    try:
        report = copy_database(source, destination)
    except StoreError as exc:
        fail(str(exc))
    click.echo(f"copied {report.source} -> {report.destination} "
               f"(schema version {report.schema_version})")
    for table, n in report.rows.items():
        click.echo(f"  {table:16} {n:6} row(s)")
    if report.meta_already_there:
        click.echo(f"  meta already in the destination with the same value: "
                   f"{', '.join(report.meta_already_there)}")
    if report.not_copied:
        click.echo(f"not copied (runtime; nodes register again): {', '.join(report.not_copied)}")


if __name__ == "__main__":
    main()
