"""Configuration of cyphonic-cloud (cyphonic.cloud.config).

- The defaults are the documented ones, and the generated example file loads
  back to exactly them.
- Every mistake is a ``ConfigError`` whose message names the file and the key
  (and, for a typo, the key that was probably meant).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import fields
from pathlib import Path

import pytest

from cyphonic.cloud.config import (
    CloudConfig, ConfigError, example_config, load_config, write_default_config,
)
from cyphonic.errors import CyphonicError


def write(tmp_path: Path, text: str, name: str = "cloud.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults():
    c = CloudConfig()
    assert c.state_dir == Path("/var/lib/cyphonic-cloud")
    assert c.database == ""
    assert c.database_path == Path("/var/lib/cyphonic-cloud/cloud.sqlite3")
    assert c.domain == "overlay.cyphonic.example"
    assert c.prefix == ipaddress.IPv4Network("100.64.0.0/10")
    assert (c.listen4, c.listen6) == ("0.0.0.0", "::")
    assert (c.signaling_port, c.relay_port) == (47101, 47102)
    assert c.services == ("as", "nms", "trs")
    assert (c.cert_lifetime_s, c.token_lifetime_s) == (86400, 604800)
    assert (c.registration_lifetime_s, c.keepalive_interval_s) == (120, 25)
    assert (c.public_relay_host4, c.public_relay_host6) == ("", "")
    assert (c.relay_host4, c.relay_host6) == ("", "")  # wildcard listeners: nothing to tell
    assert c.log_level == "info"
    with pytest.raises(Exception):
        c.domain = "x"  # type: ignore[misc]


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == CloudConfig()


def test_example_round_trips(tmp_path):
    text = example_config()
    for f in fields(CloudConfig):
        assert f"\n{f.name} = " in text, f.name
    comments = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert len(comments) > len(fields(CloudConfig))
    assert load_config(write(tmp_path, text)) == CloudConfig()


def test_write_default_config(tmp_path):
    p = write_default_config(tmp_path / "etc" / "cloud.toml")
    assert p.read_text() == example_config()
    assert load_config(p) == CloudConfig()
    with pytest.raises(ConfigError, match=f"{p}.*already exists"):
        write_default_config(p)
    p.write_text("# mine\n")
    write_default_config(p, overwrite=True)
    assert p.read_text() == example_config()
    assert [x.name for x in p.parent.iterdir()] == ["cloud.toml"]  # no temp file left


def test_everything_set(tmp_path):
    p = write(tmp_path, """
state_dir = "state"
database = "db/cloud.db"
domain = "lab.example"
prefix = "10.77.0.0/16"
listen4 = "192.0.2.10"
listen6 = ""
signaling_port = 5000
relay_port = 5001
services = ["trs"]
cert_lifetime_s = 3600
token_lifetime_s = 60.5
registration_lifetime_s = 30
keepalive_interval_s = 2.5
public_relay_host4 = "198.51.100.7"
public_relay_host6 = "2001:db8::7"
log_level = "debug"
""")
    c = load_config(p)
    assert c.state_dir == tmp_path / "state"         # relative to the file
    assert c.database_path == tmp_path / "db" / "cloud.db"
    assert c.domain == "lab.example"
    assert c.prefix == ipaddress.IPv4Network("10.77.0.0/16")
    assert (c.listen4, c.listen6) == ("192.0.2.10", "")
    assert (c.signaling_port, c.relay_port, c.services) == (5000, 5001, ("trs",))
    assert (c.cert_lifetime_s, c.token_lifetime_s) == (3600.0, 60.5)
    assert (c.registration_lifetime_s, c.keepalive_interval_s) == (30.0, 2.5)
    assert (c.relay_host4, c.relay_host6) == ("198.51.100.7", "2001:db8::7")
    assert c.log_level == "debug"


def test_relay_host_defaults_to_specific_listen_address(tmp_path):
    c = load_config(write(tmp_path, 'listen4 = "192.0.2.1"\nlisten6 = "2001:db8::1"\n'))
    assert (c.relay_host4, c.relay_host6) == ("192.0.2.1", "2001:db8::1")
    c = load_config(write(tmp_path, 'state_dir = "/srv/c"\ndatabase = "/x/y.db"\n'))
    assert (c.state_dir, c.database_path) == (Path("/srv/c"), Path("/x/y.db"))


@pytest.mark.parametrize("text, key, what", [
    ('domain = "Overlay.Example"', "domain", "lower-case DNS name"),
    ('domain = "-bad.example"', "domain", "not a valid"),
    ('domain = "a..b"', "domain", "not a valid"),
    ('domain = ""', "domain", "not a valid"),
    ("domain = 5", "domain", "must be a string, not an integer"),
    ('prefix = "10.0.0.1/24"', "prefix", "host bits set"),
    ('prefix = "10.0.0.0/31"', "prefix", "at least 4"),
    ('prefix = "10.0.0.0/32"', "prefix", "at least 4"),
    ('prefix = "fd00::/64"', "prefix", "not an IPv4 network"),
    ('prefix = "nonsense"', "prefix", "not an IPv4 network"),
    ("prefix = 10", "prefix", "must be a string"),
    ('listen4 = "::1"', "listen4", "not an IPv4 address"),
    ('listen6 = "192.0.2.1"', "listen6", "not an IPv6 address"),
    ('listen4 = ""\nlisten6 = ""', "listen4", "listen nowhere"),
    ("signaling_port = 0", "signaling_port", "not a port number"),
    ("signaling_port = 65536", "signaling_port", "not a port number"),
    ('signaling_port = "4500"', "signaling_port", "must be an integer, not a string"),
    ("signaling_port = true", "signaling_port", "must be an integer, not a boolean"),
    ("relay_port = -1", "relay_port", "not a port number"),
    ("relay_port = 4500.0", "relay_port", "must be an integer, not a float"),
    ("relay_port = 47101", "relay_port", "also signaling_port"),
    ("services = []", "services", "at least one"),
    ('services = ["as", "dns"]', "services", "'dns' is not a service"),
    ('services = ["as", "as"]', "services", "twice"),
    ('services = "as"', "services", "must be an array"),
    ("cert_lifetime_s = 0", "cert_lifetime_s", "not a positive number"),
    ("token_lifetime_s = -5", "token_lifetime_s", "not a positive number"),
    ('registration_lifetime_s = "2m"', "registration_lifetime_s", "number of seconds"),
    ("keepalive_interval_s = inf", "keepalive_interval_s", "not a positive number"),
    ("keepalive_interval_s = nan", "keepalive_interval_s", "not a positive number"),
    ("keepalive_interval_s = 120", "keepalive_interval_s", "less than registration_lifetime_s"),
    ('public_relay_host4 = "0.0.0.0"', "public_relay_host4", "unspecified"),
    ('public_relay_host4 = "relay.example"', "public_relay_host4", "not an IPv4 address"),
    ('public_relay_host6 = "::"', "public_relay_host6", "unspecified"),
    ('log_level = "verbose"', "log_level", "not a log level"),
    ('log_level = "INFO"', "log_level", "not a log level"),
    ('state_dir = ""', "state_dir", "must not be empty"),
    ("state_dir = 5", "state_dir", "must be a string"),
    ("database = false", "database", "must be a string"),
    ("[domain]\nx = 1", "domain", "must be a string, not a table"),
])
def test_bad_values_name_file_and_key(tmp_path, text, key, what):
    p = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {key}: "), msg
    assert what in msg, msg


def test_unknown_key_rejected(tmp_path):
    p = write(tmp_path, 'prefx = "10.0.0.0/8"\n')
    with pytest.raises(ConfigError, match=f"^{p}: prefx: unknown key; did you mean 'prefix'"):
        load_config(p)
    p = write(tmp_path, "[tls]\ncert = 'x'\n")
    with pytest.raises(ConfigError, match=f"^{p}: tls: unknown key$"):
        load_config(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"{p}: configuration file not found"):
        load_config(p)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(tmp_path)  # a directory
    p = write(tmp_path, "domain = \n")
    with pytest.raises(ConfigError, match=f"{p}: not valid TOML"):
        load_config(p)
    p.write_bytes(b'domain = "\xff"\n')
    with pytest.raises(ConfigError, match=str(p)):
        load_config(p)
    if os.geteuid() != 0:  # root reads anything
        p.write_text("")
        p.chmod(0)
        with pytest.raises(ConfigError, match=f"{p}: cannot read"):
            load_config(p)


def test_config_error_is_a_cyphonic_error():
    assert issubclass(ConfigError, CyphonicError)
