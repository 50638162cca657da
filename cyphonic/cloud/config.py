"""Configuration of ``cyphonic-cloud``: one TOML file, checked strictly.

``load_config(path)`` reads the file with the standard library's ``tomllib``
and returns a frozen ``CloudConfig``. A key that is missing takes its default
(``CloudConfig()`` is the documented default configuration). Anything else
that is not exactly right is a ``ConfigError`` whose message names the file,
the key and what is wrong: unknown keys (a typo must not silently fall back to
a default), wrong types, bad prefixes, ports, services or names.

Relative paths (``state_dir``, ``database``) are taken relative to the
directory of the configuration file; a ``database`` that is a
``postgresql://`` URL is kept as it is.

``example_config()`` is the fully commented default file, generated from the
same table as the defaults so the two cannot drift; ``write_default_config``
writes it.

Never: read the clock, open sockets or create the state directory; this
module only parses.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..atomic_file import write_text_atomic
from ..errors import CyphonicError, ParseError
from ..wire.common import validate_fqdn
from .store import is_postgres_url

__all__ = ["CloudConfig", "ConfigError", "load_config", "example_config",
           "write_default_config", "SERVICES", "LOG_LEVELS"]

SERVICES = ("as", "nms", "trs")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DATABASE_FILE = "cloud.sqlite3"
MIN_PREFIX_ADDRESSES = 4   # network, broadcast and at least two nodes


class ConfigError(CyphonicError):
    """The configuration file is missing, unreadable or wrong; the message says where."""


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class CloudConfig:
    """Settings of one ``cyphonic-cloud`` process. The defaults are the documented ones."""

    state_dir: Path = field(default=Path("/var/lib/cyphonic-cloud"), metadata=_doc(
        "Directory of the cloud's keys and database."))
    database: str = field(default="", metadata=_doc(
        f'SQLite database file, or a "postgresql://user@host/dbname" URL (PostgreSQL or '
        f'CockroachDB; several cloud processes may share it). "" means <state_dir>/{DATABASE_FILE}.'))
    domain: str = field(default="overlay.cyphonic.example", metadata=_doc(
        "Overlay domain: a node's FQDN is <name>.<domain>."))
    prefix: ipaddress.IPv4Network = field(
        default=ipaddress.IPv4Network("100.64.0.0/10"), metadata=_doc(
            "Virtual IPv4 prefix the nodes' addresses come from (CGNAT range by default)."))
    listen4: str = field(default="0.0.0.0", metadata=_doc(
        'IPv4 address to listen on; "" disables IPv4.'))
    listen6: str = field(default="::", metadata=_doc(
        'IPv6 address to listen on; "" disables IPv6.'))
    signaling_port: int = field(default=47101, metadata=_doc(
        "UDP port of the control channel (AS and NMS)."))
    relay_port: int = field(default=47102, metadata=_doc(
        "UDP port of the Tunnel Relay Service (TRS)."))
    services: tuple[str, ...] = field(default=SERVICES, metadata=_doc(
        'Services this process runs, any of "as", "nms", "trs".'))
    cert_lifetime_s: float = field(default=86400.0, metadata=_doc(
        "Lifetime of a node certificate, seconds."))
    token_lifetime_s: float = field(default=604800.0, metadata=_doc(
        "Default expiry of an enrollment token, seconds."))
    registration_lifetime_s: float = field(default=120.0, metadata=_doc(
        "A node's registration expires after this many seconds without a keepalive."))
    keepalive_interval_s: float = field(default=25.0, metadata=_doc(
        "Keepalive interval told to nodes, seconds; less than registration_lifetime_s."))
    public_relay_host4: str = field(default="", metadata=_doc(
        'IPv4 address nodes reach the TRS at. "" means listen4 if it is a specific address.'))
    public_relay_host6: str = field(default="", metadata=_doc(
        'IPv6 address nodes reach the TRS at. "" means listen6 if it is a specific address.'))
    instance_id: str = field(default="", metadata=_doc(
        'Name of this process among the cloud instances sharing the database (`cyphonic-cloud '
        'instances`). "" means <hostname>:<signaling_port> (or <hostname>:<relay_port> for a TRS '
        'alone). Two running processes must not share one.'))
    log_level: str = field(default="info", metadata=_doc(
        "One of " + ", ".join(LOG_LEVELS) + "."))

    @property
    def database_is_postgres(self) -> bool:
        return is_postgres_url(self.database)

    @property
    def database_path(self) -> Path:
        """The SQLite file: ``database`` if set, else ``<state_dir>/cloud.sqlite3``."""
        if self.database_is_postgres:
            raise ValueError("database is a PostgreSQL URL, not a file")
        return Path(self.database) if self.database else self.state_dir / DATABASE_FILE

    @property
    def database_target(self) -> str:
        """What ``store.open_store`` takes: the PostgreSQL URL or the SQLite file's path."""
        return self.database if self.database_is_postgres else str(self.database_path)

    @property
    def effective_instance_id(self) -> str:
        if self.instance_id:
            return self.instance_id
        import socket
        port = self.signaling_port if ("as" in self.services or "nms" in self.services) else self.relay_port
        return f"{socket.gethostname()}:{port}"

    @property
    def relay_host4(self) -> str:
        """IPv4 address to tell nodes for the TRS, "" if there is none to tell."""
        if self.public_relay_host4:
            return self.public_relay_host4
        return self.listen4 if self.listen4 not in ("", "0.0.0.0") else ""

    @property
    def relay_host6(self) -> str:
        """IPv6 address to tell nodes for the TRS, "" if there is none to tell."""
        if self.public_relay_host6:
            return self.public_relay_host6
        if not self.listen6 or ipaddress.IPv6Address(self.listen6).is_unspecified:
            return ""
        return self.listen6


_FIELDS = {f.name: f for f in fields(CloudConfig)}


# --- Checks: each returns the value to store or raises ValueError(what is wrong) ---

def _want_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, not {_toml_type(v)}")
    return v


def _want_int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"must be an integer, not {_toml_type(v)}")
    return v


def _toml_type(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def _path(v: Any) -> Path:
    s = _want_str(v)
    if not s:
        raise ValueError("must not be empty")
    return Path(s)


def _domain(v: Any) -> str:
    s = _want_str(v)
    try:
        return validate_fqdn(s, "domain")
    except ParseError as e:
        raise ValueError(f"{s!r} is not a valid lower-case DNS name ({e})") from None


def _prefix(v: Any) -> ipaddress.IPv4Network:
    s = _want_str(v)
    try:
        net = ipaddress.IPv4Network(s, strict=True)
    except ValueError as e:
        raise ValueError(f"{s!r} is not an IPv4 network ({e})") from None
    if net.num_addresses < MIN_PREFIX_ADDRESSES:
        raise ValueError(f"{s!r} has {net.num_addresses} addresses; "
                         f"at least {MIN_PREFIX_ADDRESSES} are needed (a /30 or shorter)")
    return net


def _address(version: int, *, unspecified_ok: bool) -> Any:
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address

    def check(v: Any) -> str:
        s = _want_str(v)
        if not s:
            return s
        try:
            addr = cls(s)
        except ValueError:
            raise ValueError(f'{s!r} is not an IPv{version} address (use "" for none)') from None
        if addr.is_unspecified and not unspecified_ok:
            raise ValueError(f"{s!r} is the unspecified address; nodes cannot reach it")
        return str(addr)
    return check


def _port(v: Any) -> int:
    n = _want_int(v)
    if not 1 <= n <= 65535:
        raise ValueError(f"{n} is not a port number (1..65535)")
    return n


def _services(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ValueError(f"must be an array of strings, not {_toml_type(v)}")
    if not v:
        raise ValueError(f"must name at least one of {', '.join(SERVICES)}")
    out = []
    for s in v:
        if s not in SERVICES:
            raise ValueError(f"{s!r} is not a service (known: {', '.join(SERVICES)})")
        if s in out:
            raise ValueError(f"{s!r} is listed twice")
        out.append(s)
    return tuple(out)


def _seconds(v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f"must be a number of seconds, not {_toml_type(v)}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{v} is not a positive number of seconds")
    return float(v)


def _database(v: Any) -> str:
    v = _want_str(v)
    if "://" in v and not is_postgres_url(v):
        raise ValueError(f'{v.split("://")[0]!r} is not a database URL scheme: '
                         'use "postgresql://..." or a file path')
    return v


def _log_level(v: Any) -> str:
    s = _want_str(v)
    if s not in LOG_LEVELS:
        raise ValueError(f"{s!r} is not a log level (known: {', '.join(LOG_LEVELS)})")
    return s


def _instance_id(v: Any) -> str:
    s = _want_str(v)
    if len(s) > 200 or any(c.isspace() or not c.isprintable() for c in s):
        raise ValueError(f"{s!r}: at most 200 printable characters without spaces")
    return s


_CHECKS = {
    "state_dir": _path,
    "database": _database,
    "domain": _domain,
    "prefix": _prefix,
    "listen4": _address(4, unspecified_ok=True),
    "listen6": _address(6, unspecified_ok=True),
    "signaling_port": _port,
    "relay_port": _port,
    "services": _services,
    "cert_lifetime_s": _seconds,
    "token_lifetime_s": _seconds,
    "registration_lifetime_s": _seconds,
    "keepalive_interval_s": _seconds,
    "public_relay_host4": _address(4, unspecified_ok=False),
    "public_relay_host6": _address(6, unspecified_ok=False),
    "instance_id": _instance_id,
    "log_level": _log_level,
}
assert set(_CHECKS) == set(_FIELDS), "every CloudConfig field needs a check"


def parse_config(doc: dict[str, Any], source: str = "<config>",
                 base_dir: Path | None = None) -> CloudConfig:
    """Check a parsed TOML document; ``source`` names it in errors."""
    def fail(key: str, what: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {what}")

    values: dict[str, Any] = {}
    for key, raw in doc.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise fail(key, f"unknown key{hint}")
        try:
            values[key] = _CHECKS[key](raw)
        except ValueError as e:
            raise fail(key, str(e)) from None
    if base_dir is not None:
        if "state_dir" in values and not values["state_dir"].is_absolute():
            values["state_dir"] = base_dir / values["state_dir"]
        if (values.get("database") and not is_postgres_url(values["database"])
                and not os.path.isabs(values["database"])):
            values["database"] = str(base_dir / values["database"])
    cfg = CloudConfig(**values)

    if not cfg.listen4 and not cfg.listen6:
        raise fail("listen4", 'and listen6 are both "": the cloud would listen nowhere')
    if cfg.keepalive_interval_s >= cfg.registration_lifetime_s:
        raise fail("keepalive_interval_s",
                   f"{cfg.keepalive_interval_s:g} must be less than registration_lifetime_s "
                   f"({cfg.registration_lifetime_s:g}), or registrations expire between "
                   "keepalives")
    if "trs" in cfg.services and cfg.signaling_port == cfg.relay_port and (
            "as" in cfg.services or "nms" in cfg.services):
        raise fail("relay_port", f"{cfg.relay_port} is also signaling_port; "
                   "one process cannot bind both services to it")
    return cfg


def load_config(path: str | os.PathLike[str]) -> CloudConfig:
    """Read and check a ``cyphonic-cloud`` TOML file; raise ``ConfigError`` saying what is wrong."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file not found") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the configuration file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
    return parse_config(doc, str(p), p.parent)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string: JSON's escapes are valid TOML


def example_config() -> str:
    """The default configuration as a commented TOML file that ``load_config`` accepts."""
    lines = [
        "# cyphonic-cloud configuration (TOML).",
        "# Every key is optional; the values below are the defaults.",
        "# Unknown keys are errors. Relative paths are relative to this file's directory.",
        "",
    ]
    defaults = CloudConfig()
    for name, f in _FIELDS.items():
        lines.append(f"# {f.metadata['doc']}")
        lines.append(f"{name} = {_toml_value(getattr(defaults, name))}")
        lines.append("")
    return "\n".join(lines)


def write_default_config(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``example_config()`` to ``path`` atomically; refuse to replace a file unless told."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise ConfigError(f"{p}: already exists; not overwriting it")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(p, example_config(), mode=0o644)
    except OSError as e:
        raise ConfigError(f"{p}: cannot write the configuration file: {e.strerror or e}") from None
    return p

