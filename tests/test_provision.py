"""First-boot provisioning of the appliance (appliance/provision.py, `cyphonic-provision`)
against a fake boot partition, /etc, state directory, /run and /sys/class/net in tmp_path.

- A good file gives adapter.toml (no token in it), the token 0600 in the state directory,
  networkd files, the guard ruleset, hostname and SSH keys; the boot file keeps every byte but
  the token line, which becomes a comment.
- A missing file: not provisioned at the first boot (exit 1), fine later (the kept copy).
- A broken file: an error naming the key, exit 1, nothing under /etc or the state changed.
- The token is never lost: a crash between storing it and rewriting the boot file leaves it
  in both places, and the next boot finishes the move.
- The adapter's side: config.py reads gn_token_file and general_nodes, the controller enrolls
  general_nodes idempotently, cyadm status shows the provisioning errors.
The rulesets pass `nft -c` (root: tests marked `root`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import config as adapter_config
from appliance import provision as pv
from appliance.provision import Interface, Paths, plan, remove_token_line

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "rootfs-overlay/usr/share/cyphonic/cyphonic.toml.example"
EARLY_GUARD = ROOT / "rootfs-overlay/usr/share/cyphonic/nft/guard-early.nft"
CLOUD_KEY = "cyk1:" + "ab" * 32 + ":" + "cd" * 32
TOKEN = "0123456789ab." + "5a" * 16
TOKEN2 = "ba9876543210." + "a5" * 16
SSH_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop")
END0_MAC, USB_MAC = "dc:a6:32:00:00:01", "00:e0:4c:68:00:02"
IFACES = [Interface("end0", END0_MAC, True), Interface("eth1", USB_MAC, True), Interface("lo", "", False),
          Interface("wlan0", "dc:a6:32:00:00:03", False)]

GOOD = f"""# my adapter
hostname = "adapter1"
ssh_authorized_keys = ["{SSH_KEY}"]

[cloud]
address = "203.0.113.10:47101"
key = "{CLOUD_KEY}"
token = "{TOKEN}"   # from cyphonic-cloud enroll site1 --reusable

[ports]
wan = "end0"
lan = "auto"

[wan]
address = "dhcp"

[[general_node]]
mac = "52:54:00:12:34:56"
name = "camera1"

[[general_node]]
mac = "52-54-00-12-34-57"
name = "plc1"
group = "plcs"

[adapter]
mtu = 1400
passthrough = false
"""


# --- the fake machine ---------------------------------------------------------------------------------

def fake_iface(net: Path, name: str, mac: str, *, kind: int = 1, device: bool = True,
               wireless: bool = False) -> None:
    d = net / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "ifindex").write_text(f"{len(list(net.iterdir()))}\n")
    (d / "address").write_text(mac + "\n")
    (d / "type").write_text(f"{kind}\n")
    if device:
        (d / "device").mkdir(exist_ok=True)
    if wireless:
        (d / "wireless").mkdir(exist_ok=True)


@pytest.fixture
def site(tmp_path):
    net = tmp_path / "sys-class-net"
    fake_iface(net, "end0", END0_MAC)
    fake_iface(net, "eth1", USB_MAC)
    fake_iface(net, "lo", "00:00:00:00:00:00", kind=772, device=False)
    fake_iface(net, "wlan0", "dc:a6:32:00:00:03", wireless=True)
    fake_iface(net, "veth0", "aa:bb:cc:00:00:09", device=False)
    for d in ("boot", "etc", "run", "root"):
        (tmp_path / d).mkdir()
    return Paths(boot=str(tmp_path / "boot"), etc=str(tmp_path / "etc"), state=str(tmp_path / "state"),
                 run=str(tmp_path / "run"), sys_class_net=str(net), root_home=str(tmp_path / "root"))


def argv(p: Paths, *extra) -> list[str]:
    return ["--boot", p.boot, "--etc", p.etc, "--state", p.state, "--run", p.run, "--sys-class-net",
            p.sys_class_net, "--root-home", p.root_home, "--no-load", *extra]


def boot(p: Paths, capsys=None, *extra) -> tuple[int, str]:
    rc = pv.main(argv(p, *extra))
    out = capsys.readouterr().out if capsys else ""
    return rc, out


def write_boot(p: Paths, text: str | bytes) -> Path:
    f = Path(p.boot_file)
    f.write_bytes(text.encode() if isinstance(text, str) else text)
    return f


def status(p: Paths) -> dict:
    return json.loads(Path(p.status_file).read_text())


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def snapshot(*dirs) -> dict:
    out = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                out[os.path.join(root, f)] = Path(root, f).read_bytes()
    return out


def plan_of(text: str, interfaces=IFACES, **kw):
    return plan(tomllib.loads(text), interfaces, **kw)


# --- a good file ----------------------------------------------------------------------------------------

def test_good_file_provisions_everything(site, capsys):
    write_boot(site, GOOD)
    rc, out = boot(site, capsys)
    assert rc == 0, out
    assert "ok: WAN end0, LAN eth1, 2 general node(s)" in out
    conf_path = Path(site.etc, "cyphonic/adapter.toml")
    conf_text = conf_path.read_text()
    assert TOKEN not in conf_text and TOKEN.split(".")[1] not in conf_text
    cfg = adapter_config.load_config(str(conf_path))
    assert (cfg.lan_interface, cfg.wan_interface) == ("eth1", "end0")
    assert cfg.cloud == "203.0.113.10:47101" and cfg.cloud_key == CLOUD_KEY
    assert cfg.gn_token == "" and cfg.gn_token_file == os.path.join(site.state, "token")
    assert cfg.state_dir == site.state and cfg.mtu == 1400 and cfg.passthrough is False
    assert cfg.general_nodes == (adapter_config.ConfiguredGeneralNode("52:54:00:12:34:56", "camera1", ""),
                                 adapter_config.ConfiguredGeneralNode("52:54:00:12:34:57", "plc1", "plcs"))
    # the token: 0600 in a 0700 directory, and readable the way the adapter reads it
    assert adapter_config.read_token_file(cfg.gn_token_file) == TOKEN
    assert mode(cfg.gn_token_file) == 0o600 and mode(site.state) == 0o700
    assert Path(site.etc, "hostname").read_text() == "adapter1\n"
    keys = Path(site.root_home, ".ssh/authorized_keys")
    assert SSH_KEY + "\n" in keys.read_text()
    assert mode(keys) == 0o600 and mode(keys.parent) == 0o700
    st = status(site)
    assert st["state"] == "ok" and st["errors"] == [] and st["boot_file"] == site.boot_file
    assert (st["lan"], st["wan"]) == ("eth1", "end0") and re.match(r"\d{4}-\d\d-\d\dT", st["time"])
    assert Path(site.state, pv.PROVISIONED_COPY).exists() and mode(Path(site.state, pv.PROVISIONED_COPY)) == 0o600
    assert TOKEN not in Path(site.state, pv.PROVISIONED_COPY).read_text()


def test_networkd_files(site):
    write_boot(site, GOOD)
    assert boot(site) [0] == 0
    wan = Path(site.run, "systemd/network/10-cyphonic-wan.network").read_text()
    lan = Path(site.run, "systemd/network/10-cyphonic-lan.network").read_text()
    assert "[Match]\nName=end0\n" in wan and "DHCP=ipv4" in wan and "ClientIdentifier=mac" in wan
    assert "[Match]\nName=eth1\n" in lan
    for line in ("Address=100.127.255.254/32", "LinkLocalAddressing=no", "IPv6AcceptRA=no", "DHCP=no",
                 "RequiredForOnline=no", "ConfigureWithoutCarrier=yes"):
        assert line in lan.splitlines(), line
    static = GOOD.replace('address = "dhcp"', 'address = "192.0.2.10/24"\ngateway = "192.0.2.1"\n'
                                               'dns = ["192.0.2.1", "2001:db8::53"]')
    p = plan_of(static)
    assert not p.errors, p.errors
    wan = p.file("run", "systemd/network/10-cyphonic-wan.network").decode()
    assert "DHCP" not in wan
    assert [l for l in wan.splitlines() if l.split("=")[0] in ("Address", "Gateway", "DNS")] == \
        ["Address=192.0.2.10/24", "Gateway=192.0.2.1", "DNS=192.0.2.1", "DNS=2001:db8::53"]


def test_lan_address_from_adapter_section_reaches_networkd_and_guard():
    p = plan_of(GOOD.replace("mtu = 1400", 'mtu = 1400\nlan_address = "100.100.0.1"'))
    assert not p.errors, p.errors
    assert "Address=100.100.0.1/32" in p.file("run", "systemd/network/10-cyphonic-lan.network").decode()
    assert "ip daddr 100.100.0.1 icmp type echo-request accept" in p.file("run", pv.GUARD_FILE).decode()


def test_guard_ruleset_shape():
    off = plan_of(GOOD).file("run", pv.GUARD_FILE).decode()
    assert "table inet cyphonic_guard" in off and "delete table inet cyphonic_guard" in off
    assert "type filter hook forward priority filter + 20; policy drop;" in off
    assert "type filter hook input priority filter + 20;" in off
    assert 'iifname != "eth1" accept' in off and "accept" not in off.split("chain forward")[1].split("}")[0]
    on = plan_of(GOOD.replace("passthrough = false", "passthrough = true")).file("run", pv.GUARD_FILE).decode()
    assert 'iifname "eth1" oifname "end0" accept' in on
    assert 'iifname "end0" oifname "eth1" ct state established,related accept' in on


@pytest.mark.root
@pytest.mark.parametrize("passthrough", [False, True])
def test_guard_rulesets_pass_nft_check(tmp_path, passthrough):
    if os.geteuid() != 0:
        pytest.fail("nft -c needs root; CI runs as root")
    text = pv.guard_ruleset("eth1", "end0", "100.127.255.254", passthrough)
    f = tmp_path / "guard.nft"
    f.write_text(text)
    for path in (f, EARLY_GUARD):
        r = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@pytest.mark.root
def test_guard_loads_and_replaces_the_early_guard_in_a_namespace(tmp_path):
    """Loaded for real in a fresh network namespace: the early guard, then the guard (same table,
    one transaction); what is listed afterwards has the input chain and the forward drop."""
    if os.geteuid() != 0:
        pytest.fail("needs root; CI runs as root")
    ns = f"cyprov{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        f = tmp_path / "guard.nft"
        f.write_text(pv.guard_ruleset("eth1", "end0", "100.127.255.254", False))
        for path in (EARLY_GUARD, f, f):       # twice: a reload replaces it
            r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", str(path)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        listed = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "cyphonic_guard"],
                                capture_output=True, text=True, check=True).stdout
        assert "policy drop" in listed and "chain input" in listed and listed.count("chain forward") == 1
    finally:
        subprocess.run(["ip", "netns", "del", ns])


# --- the token ------------------------------------------------------------------------------------------

def test_token_line_becomes_a_comment_and_nothing_else_changes(site):
    before = write_boot(site, GOOD).read_bytes()
    assert boot(site)[0] == 0
    after = Path(site.boot_file).read_bytes()
    b, a = before.split(b"\n"), after.split(b"\n")
    assert len(a) == len(b)
    changed = [i for i, (x, y) in enumerate(zip(b, a)) if x != y]
    assert len(changed) == 1 and TOKEN.encode() in b[changed[0]]
    assert re.fullmatch(rb"# token moved to the appliance at first boot \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)",
                        a[changed[0]])
    assert TOKEN.encode() not in after
    doc = tomllib.loads(after.decode())
    assert "token" not in doc["cloud"] and doc["cloud"]["key"] == CLOUD_KEY


@pytest.mark.parametrize("variant", ["crlf", "bom", "dotted", "quoted", "no-final-newline"])
def test_token_line_in_other_spellings(site, variant):
    text = GOOD
    if variant == "crlf":
        text = GOOD.replace("\n", "\r\n")
    elif variant == "bom":
        text = "\ufeff" + GOOD
    elif variant == "dotted":          # cloud.token = ... at the top level, no [cloud] table
        head, rest = GOOD.split("[cloud]\n")
        text = (head + f'cloud.address = "203.0.113.10:47101"\ncloud.key = "{CLOUD_KEY}"\n'
                f'cloud.token = "{TOKEN}"\n\n[ports]' + rest.split("[ports]")[1])
    elif variant == "quoted":
        text = GOOD.replace(f'token = "{TOKEN}"', f"'token' = '{TOKEN}'")
    elif variant == "no-final-newline":
        text = GOOD.rstrip("\n")
    before = write_boot(site, text).read_bytes()
    assert boot(site)[0] == 0, status(site)
    after = Path(site.boot_file).read_bytes()
    assert TOKEN.encode() not in after and b"# token moved to the appliance" in after
    assert before.count(b"\r\n") == after.count(b"\r\n")
    assert after.startswith(b"\xef\xbb\xbf") == before.startswith(b"\xef\xbb\xbf")
    assert len(after.splitlines()) == len(before.splitlines())
    assert adapter_config.read_token_file(os.path.join(site.state, "token")) == TOKEN


def test_remove_token_line_refuses_what_it_cannot_do_safely():
    note = "# moved"
    assert remove_token_line(f'[cloud]\ntoken = """\n{TOKEN}"""\n', note) is None    # multi-line string
    assert remove_token_line(f'cloud = {{ token = "{TOKEN}" }}\n', note) is None       # inline table
    assert remove_token_line('[cloud]\nkey = "x"\n', note) is None                     # no token at all
    assert remove_token_line(f'[other]\ntoken = "{TOKEN}"\n', note) is None            # not [cloud]'s
    assert remove_token_line(f'[cloud]\ntoken = "{TOKEN}"\n', note) == "[cloud]\n# moved\n"


def test_a_token_that_cannot_be_removed_is_stored_and_reported(site):
    text = GOOD.replace(f'token = "{TOKEN}"   # from cyphonic-cloud enroll site1 --reusable',
                        f'token = """\n{TOKEN}"""')            # a multi-line string: two lines
    before = write_boot(site, text).read_bytes()
    assert boot(site)[0] == 0
    assert Path(site.boot_file).read_bytes() == before
    assert adapter_config.read_token_file(os.path.join(site.state, "token")) == TOKEN
    assert any("could not be removed" in w for w in status(site)["warnings"])


def test_second_boot_needs_no_token_and_rewrites_nothing(site, capsys):
    write_boot(site, GOOD)
    assert boot(site, capsys)[0] == 0
    before = snapshot(site.etc, site.state, site.boot, site.root_home)
    mtimes = {f: os.stat(f).st_mtime_ns for f in before}
    shutil.rmtree(Path(site.run))                      # /run is a tmpfs: empty at every boot
    rc, out = boot(site, capsys)
    assert rc == 0, out
    assert snapshot(site.etc, site.state, site.boot, site.root_home) == before
    assert {f: os.stat(f).st_mtime_ns for f in before} == mtimes      # not even rewritten (SD card wear)
    assert Path(site.run, "cyphonic/guard.nft").exists()
    assert Path(site.run, "systemd/network/10-cyphonic-lan.network").exists()


def test_a_new_token_in_the_file_replaces_the_stored_one(site):
    write_boot(site, GOOD)
    assert boot(site)[0] == 0
    text = Path(site.boot_file).read_text()
    text = re.sub(r"# token moved to the appliance at first boot \([^)]*\)", f'token = "{TOKEN2}"', text)
    write_boot(site, text)
    assert boot(site)[0] == 0
    assert adapter_config.read_token_file(os.path.join(site.state, "token")) == TOKEN2
    assert TOKEN2 not in Path(site.boot_file).read_text()
    assert mode(os.path.join(site.state, "token")) == 0o600


def test_crash_between_storing_the_token_and_rewriting_the_boot_file(site, monkeypatch):
    write_boot(site, GOOD)
    real = pv.write_atomic

    def crash_on_boot_file(path, *a, **kw):
        if path == site.boot_file:
            raise KeyboardInterrupt("power cut")
        return real(path, *a, **kw)
    monkeypatch.setattr(pv, "write_atomic", crash_on_boot_file)
    with pytest.raises(KeyboardInterrupt):
        pv.provision(site, load=False, log=lambda s: None)
    # the token is in both places now: never in none
    assert TOKEN in Path(site.boot_file).read_text()
    assert adapter_config.read_token_file(os.path.join(site.state, "token")) == TOKEN
    monkeypatch.setattr(pv, "write_atomic", real)
    assert boot(site)[0] == 0                       # the next boot finishes the move
    assert TOKEN not in Path(site.boot_file).read_text()
    assert adapter_config.read_token_file(os.path.join(site.state, "token")) == TOKEN


def test_token_not_stored_means_boot_file_untouched(site, monkeypatch):
    before = write_boot(site, GOOD).read_bytes()

    def fail(paths, token):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pv, "store_token", fail)
    assert boot(site)[0] == 1
    assert Path(site.boot_file).read_bytes() == before
    assert any("cannot store the token" in e for e in status(site)["errors"])
    assert not Path(site.etc, "cyphonic/adapter.toml").exists()


# --- missing and broken files ---------------------------------------------------------------------------

def test_missing_file_at_first_boot(site, capsys, monkeypatch, tmp_path):
    console = tmp_path / "console"
    console.write_text("")
    monkeypatch.setattr(pv, "CONSOLE", str(console))
    rc, out = boot(site, capsys, "--console")
    assert rc == 1
    assert "NOT PROVISIONED" in out and "cyphonic.toml.example" in out and site.boot_file in out
    assert "NOT PROVISIONED" in console.read_text()
    st = status(site)
    assert st["state"] == "not-provisioned" and st["errors"] == [f"{site.boot_file} is missing"]
    assert not Path(site.etc, "cyphonic").exists() and not Path(site.run, "systemd").exists()


def test_missing_file_after_provisioning_keeps_the_last_good_config(site, capsys):
    write_boot(site, GOOD)
    assert boot(site)[0] == 0
    conf = Path(site.etc, "cyphonic/adapter.toml").read_bytes()
    os.unlink(site.boot_file)
    shutil.rmtree(Path(site.run))
    rc, out = boot(site, capsys)
    assert rc == 0, out
    st = status(site)
    assert st["state"] == "ok" and st["source"].endswith(pv.PROVISIONED_COPY)
    assert Path(site.etc, "cyphonic/adapter.toml").read_bytes() == conf
    assert Path(site.run, "systemd/network/10-cyphonic-wan.network").exists()
    assert Path(site.run, "cyphonic/guard.nft").exists()


def test_broken_toml_at_first_boot(site, capsys, monkeypatch, tmp_path):
    console = tmp_path / "console"
    console.write_text("")
    monkeypatch.setattr(pv, "CONSOLE", str(console))
    write_boot(site, GOOD.replace('hostname = "adapter1"', 'hostname = "adapter1'))
    rc, out = boot(site, capsys, "--console")
    assert rc == 1
    assert "ERROR in" in out and "not valid TOML" in out and "line 2" in out
    assert "edit cyphonic.toml on the boot partition" in out and "ERROR" in console.read_text()
    st = status(site)
    assert st["state"] == "error" and "not valid TOML" in st["errors"][0]
    assert not Path(site.etc, "cyphonic").exists() and not Path(site.state, "token").exists()
    assert TOKEN in Path(site.boot_file).read_text()     # not half-understood: not touched


def test_broken_file_after_provisioning_changes_no_state_but_keeps_the_wan_up(site, capsys):
    write_boot(site, GOOD)
    assert boot(site)[0] == 0
    kept = snapshot(site.etc, site.state, site.root_home)
    shutil.rmtree(Path(site.run))
    write_boot(site, Path(site.boot_file).read_text().replace('lan = "auto"', 'lan = "auto"\nspeed = 100'))
    rc, out = boot(site, capsys)
    assert rc == 1
    assert "[ports] speed: unknown key" in out
    assert snapshot(site.etc, site.state, site.root_home) == kept          # nothing changed, nothing deleted
    st = status(site)
    assert st["state"] == "error" and st["errors"] == ["[ports] speed: unknown key (known: wan, lan)"]
    # the last good network files and guard: the WAN comes up for SSH, the LAN stays closed
    assert "Name=end0" in Path(site.run, "systemd/network/10-cyphonic-wan.network").read_text()
    assert "policy drop" in Path(site.run, "cyphonic/guard.nft").read_text()
    assert any("last good" in w for w in st["warnings"])


def test_a_port_gone_after_provisioning_keeps_only_the_wan_up(site, capsys):
    write_boot(site, GOOD.replace('lan = "auto"', 'lan = "eth1"'))
    assert boot(site)[0] == 0
    shutil.rmtree(Path(site.run))
    shutil.rmtree(Path(site.sys_class_net, "eth1"))          # the USB adapter is not plugged in
    os.unlink(site.boot_file)                                 # and the card's file is gone too
    rc, out = boot(site, capsys)
    assert rc == 1 and "[ports] lan: no interface named eth1" in out
    assert "Name=end0" in Path(site.run, "systemd/network/10-cyphonic-wan.network").read_text()
    assert not Path(site.run, "systemd/network/10-cyphonic-lan.network").exists()
    assert any("WAN port (end0)" in w for w in status(site)["warnings"])


def test_not_utf8(site, capsys):
    write_boot(site, GOOD.encode().replace(b"adapter1", b"adapter\xe91"))
    rc, out = boot(site, capsys)
    assert rc == 1 and "not UTF-8" in out


def test_every_problem_is_listed_at_once(site, capsys):
    write_boot(site, GOOD.replace('address = "203.0.113.10:47101"', 'address = "nowhere"')
               .replace('lan = "auto"', 'lan = "eth7"').replace("mtu = 1400", 'mtu = "big"'))
    rc, out = boot(site, capsys)
    assert rc == 1
    errors = status(site)["errors"]
    assert len(errors) == 3, errors
    for e in errors:
        assert f"  - {e}" in out


# --- each validation error names its key ----------------------------------------------------------------

def _without(line_start: str) -> str:
    return "".join(l for l in GOOD.splitlines(keepends=True) if not l.startswith(line_start))


BAD = [
    ("unknown top-level key", GOOD.replace("hostname =", "colud = 1\nhostname ="), "colud: unknown key"),
    ("unknown key in [cloud]", GOOD.replace("[cloud]\n", '[cloud]\nadress = "x"\n'), "[cloud] adress: unknown key"),
    ("unknown table", GOOD + "\n[wifi]\nssid = \"x\"\n", "wifi: unknown key"),
    ("single-bracket general_node", GOOD.replace("[[general_node]]\nmac = \"52-54", "[general_node]\nmac = \"52-54")
     .replace("[[general_node]]\nmac = \"52:54:00:12:34:56\"\nname = \"camera1\"\n", ""), "double brackets"),
    ("hostname type", GOOD.replace('hostname = "adapter1"', "hostname = 5"), "hostname: must be a string"),
    ("hostname value", GOOD.replace('hostname = "adapter1"', 'hostname = "My_Adapter"'), "hostname: 'My_Adapter'"),
    ("ssh keys type", GOOD.replace(f'ssh_authorized_keys = ["{SSH_KEY}"]', f'ssh_authorized_keys = "{SSH_KEY}"'),
     "ssh_authorized_keys: must be a list"),
    ("ssh key", GOOD.replace(SSH_KEY, "ssh-ed25519 AAAAnotakey me"), "ssh_authorized_keys[0]"),
    ("ssh key with options", GOOD.replace(SSH_KEY, 'from=\\"10.0.0.1\\" ' + SSH_KEY), "ssh_authorized_keys[0]"),
    ("cloud address missing", _without("address = \"203"), "[cloud] address: required"),
    ("cloud address bad", GOOD.replace("203.0.113.10:47101", "cloud.example.net"), "[cloud] address"),
    ("cloud key missing", _without("key = "), "[cloud] key: required"),
    ("cloud key bad", GOOD.replace(CLOUD_KEY, "cyk1:1234"), "[cloud] key: not a cloud key"),
    ("token bad", GOOD.replace(TOKEN, "hunter2"), "[cloud] token: not an enrollment token"),
    ("token missing at first boot", _without("token = "), "[cloud] token: required at the first boot"),
    ("token type", GOOD.replace(f'"{TOKEN}"', "12345"), "[cloud] token: must be a string"),
    ("cloud not a table", _without("address = \"203").replace("[cloud]\n", 'cloud = "x"\n[cloud2]\n')
     .replace(f'key = "{CLOUD_KEY}"\n', "").replace(f'token = "{TOKEN}"   # from cyphonic-cloud enroll site1 '
                                                    f'--reusable\n', ""), "cloud: must be a table"),
    ("bad MAC", GOOD.replace("52:54:00:12:34:56", "52:54:00:12:34"), "[[general_node]] #1 mac: not a MAC address"),
    ("multicast MAC", GOOD.replace("52:54:00:12:34:56", "01:00:5e:00:00:01"), "#1 mac: 01:00:5e:00:00:01 is a multicast"),
    ("general node name", GOOD.replace('name = "camera1"', 'name = "Camera 1"'), "[[general_node]] #1 name"),
    ("general node name missing", GOOD.replace('name = "camera1"\n', ""), "[[general_node]] #1 name: required"),
    ("general node unknown key", GOOD.replace('name = "camera1"\n', 'name = "camera1"\nip = "1.2.3.4"\n'),
     "[[general_node]] #1 ip: unknown key"),
    ("general node twice", GOOD.replace("52-54-00-12-34-57", "52:54:00:12:34:56"), "#2 mac: 52:54:00:12:34:56 is listed twice"),
    ("general node name twice", GOOD.replace('name = "plc1"', 'name = "camera1"'), "#2 name: camera1 is listed twice"),
    ("port not found", GOOD.replace('wan = "end0"', 'wan = "eth9"'), "[ports] wan: no interface named eth9"),
    ("port MAC not found", GOOD.replace('lan = "auto"', 'lan = "02:00:00:00:00:99"'),
     "[ports] lan: no interface with MAC 02:00:00:00:00:99"),
    ("port bad value", GOOD.replace('lan = "auto"', 'lan = "my usb thing"'), "[ports] lan: 'my usb thing' is neither"),
    ("port type", GOOD.replace('lan = "auto"', "lan = 1"), "[ports] lan: must be a string"),
    ("wan == lan", GOOD.replace('lan = "auto"', 'lan = "end0"'), "[ports] wan and lan: both are end0"),
    ("wan == lan by MAC", GOOD.replace('lan = "auto"', f'lan = "{END0_MAC.upper()}"'), "both are end0"),
    ("both auto", GOOD.replace('wan = "end0"', 'wan = "auto"'), "at most one of them may be \"auto\""),
    ("wan address", GOOD.replace('address = "dhcp"', 'address = "192.0.2.10"'), "[wan] address: '192.0.2.10'"),
    ("wan address junk", GOOD.replace('address = "dhcp"', 'address = "static"'), "[wan] address"),
    ("wan gateway with dhcp", GOOD.replace('address = "dhcp"', 'address = "dhcp"\ngateway = "192.0.2.1"'),
     "[wan] gateway: only with a static address"),
    ("wan gateway outside", GOOD.replace('address = "dhcp"', 'address = "192.0.2.10/24"\ngateway = "198.51.100.1"'),
     "[wan] gateway: 198.51.100.1 is not inside 192.0.2.0/24"),
    ("wan dns", GOOD.replace('address = "dhcp"', 'address = "192.0.2.10/24"\ndns = ["dns.example"]'),
     "[wan] dns[0]: 'dns.example' is not an IP address"),
    ("wan dns type", GOOD.replace('address = "dhcp"', 'address = "192.0.2.10/24"\ndns = "192.0.2.1"'),
     "[wan] dns: must be a list"),
    ("adapter unknown", GOOD.replace("mtu = 1400", "mtu = 1400\nturbo = true"), "[adapter] turbo: unknown key"),
    ("adapter type", GOOD.replace("mtu = 1400", 'mtu = "1400"'), "[adapter] mtu: must be an integer"),
    ("adapter bool type", GOOD.replace("passthrough = false", "passthrough = 0"), "[adapter] passthrough: must be true or false"),
    ("adapter key set elsewhere", GOOD.replace("mtu = 1400", 'mtu = 1400\nlan_interface = "eth1"'),
     "[adapter] lan_interface: not here: set by [ports] lan"),
    ("adapter token", GOOD.replace("mtu = 1400", f'mtu = 1400\ngn_token = "{TOKEN}"'), "[adapter] gn_token: not here"),
    ("adapter semantic", GOOD.replace("mtu = 1400", 'mtu = 1400\nlan_address = "192.168.1.1"'),
     "[adapter] lan_address: must be inside prefix"),
    ("update gate_s too short", GOOD + "\n[update]\ngate_s = 10\n", "[update] gate_s: must be an integer 30..3600"),
    ("update gate_s too long", GOOD + "\n[update]\ngate_s = 3601\n", "[update] gate_s: must be an integer 30..3600"),
    ("update gate_s type", GOOD + "\n[update]\ngate_s = \"5m\"\n", "[update] gate_s: must be an integer"),
    ("update gate_s bool", GOOD + "\n[update]\ngate_s = true\n", "[update] gate_s: must be an integer"),
    ("update unknown", GOOD + "\n[update]\ngate = 60\n", "[update] gate: unknown key"),
]


def test_update_gate_s_reaches_the_gate():
    """[update] gate_s goes to /etc/cyphonic/update.toml, which cyphonic-update-gate reads
    (appliance/update.py parse_gate_conf); without it the file says the default."""
    from appliance.update import parse_gate_conf
    p = plan_of(GOOD + "\n[update]\ngate_s = 90\n")
    assert not p.errors, p.errors
    assert tomllib.loads(p.file("etc", pv.UPDATE_CONF).decode()) == {"gate_s": 90}
    assert parse_gate_conf(p.file("etc", pv.UPDATE_CONF).decode()) == (90, "")
    p = plan_of(GOOD)
    assert parse_gate_conf(p.file("etc", pv.UPDATE_CONF).decode()) == (300, "")


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD])
def test_validation_error_names_the_key(text, expected):
    p = plan_of(text)
    assert p.errors, "no error"
    assert any(expected in e for e in p.errors), p.errors
    assert p.outputs == []


def test_auto_with_two_or_no_other_ethernet_ports():
    three = IFACES + [Interface("eth2", "00:e0:4c:68:00:07", True)]
    p = plan_of(GOOD, three)
    assert any('[ports] lan: "auto" found 2 Ethernet ports besides end0 (eth1, eth2)' in e for e in p.errors), p.errors
    assert not p.ports_pending
    p = plan_of(GOOD, [i for i in IFACES if i.name != "eth1"])
    assert any('"auto" found no Ethernet port besides end0' in e for e in p.errors), p.errors
    assert p.ports_pending                        # the USB adapter may still come: worth waiting for


# --- interfaces -----------------------------------------------------------------------------------------

def test_read_interfaces_from_sysfs(site):
    got = {i.name: i for i in pv.read_interfaces(site.sys_class_net)}
    assert got["end0"] == Interface("end0", END0_MAC, True)
    assert got["eth1"] == Interface("eth1", USB_MAC, True)
    assert got["lo"] == Interface("lo", "", False)
    assert not got["wlan0"].ethernet and not got["veth0"].ethernet   # wireless, virtual
    assert pv.read_interfaces(site.sys_class_net + "-nothing") == []


@pytest.mark.parametrize("ports,expected", [
    ('wan = "end0"\nlan = "eth1"', ("end0", "eth1")),
    ('wan = "end0"\nlan = "auto"', ("end0", "eth1")),
    (f'wan = "{END0_MAC.upper().replace(":", "-")}"\nlan = "{USB_MAC}"', ("end0", "eth1")),
    ('wan = "auto"\nlan = "end0"', ("eth1", "end0")),
    ('lan = "eth1"', ("end0", "eth1")),            # wan defaults to end0
    ('', ("end0", "eth1")),                        # both default
])
def test_port_resolution(ports, expected):
    text = GOOD.replace('wan = "end0"\nlan = "auto"', ports)
    p = plan_of(text)
    assert not p.errors, p.errors
    assert (p.wan, p.lan) == expected
    conf = tomllib.loads(p.file("etc", pv.ADAPTER_CONF).decode())
    assert (conf["wan_interface"], conf["lan_interface"]) == expected


def test_a_named_port_that_is_not_ethernet_is_a_warning():
    p = plan_of(GOOD.replace('lan = "auto"', 'lan = "wlan0"'))
    assert not p.errors and p.lan == "wlan0"
    assert any("wlan0 does not look like a wired Ethernet port" in w for w in p.warnings)


def test_waits_for_a_late_usb_adapter(site, capsys):
    os.rename(Path(site.sys_class_net, "eth1"), Path(site.sys_class_net).parent / "eth1-later")
    write_boot(site, GOOD)

    def plug_in():
        time.sleep(0.6)
        os.rename(Path(site.sys_class_net).parent / "eth1-later", Path(site.sys_class_net, "eth1"))
    t = threading.Thread(target=plug_in)
    t.start()
    rc, out = boot(site, capsys, "--wait-s", "5")
    t.join()
    assert rc == 0, out
    assert status(site)["lan"] == "eth1"


def test_an_interface_udev_has_not_named_yet_is_waited_for(site, capsys):
    """The kernel's eth0 is renamed end0 (or enx<MAC>) by udev moments after it appears: while
    udev runs (/run/udev/control), only interfaces in its database (/run/udev/data/n<ifindex>)
    count, so "auto" neither picks a name about to change nor finds two candidates."""
    udev = Path(site.run, "udev")
    (udev / "data").mkdir(parents=True)
    (udev / "control").write_text("")
    index = {n: Path(site.sys_class_net, n, "ifindex").read_text().strip() for n in ("end0", "eth1", "lo")}
    for n in ("end0", "lo"):
        (udev / "data" / f"n{index[n]}").write_text("")
    fake_iface(Path(site.sys_class_net), "eth0", "dc:a6:32:00:00:05")     # not yet renamed: not in udev's db
    got = [i.name for i in pv._interfaces(site)]
    assert got == ["end0", "lo"]
    write_boot(site, GOOD)

    def udev_done():
        time.sleep(0.6)
        (udev / "data" / f"n{index['eth1']}").write_text("")
    t = threading.Thread(target=udev_done)
    t.start()
    rc, out = boot(site, capsys, "--wait-s", "5")
    t.join()
    assert rc == 0, out
    assert status(site)["lan"] == "eth1"


# --- the files' formats ---------------------------------------------------------------------------------

def test_toml_writer_round_trips_awkward_strings():
    doc = {"a": 'quote " backslash \\ tab \t nl \n del \x7f é 😀', "n": 3, "b": True, "l": ["x", "y"],
           "general_nodes": [{"mac": "52:54:00:12:34:56", "name": "c1"}, {"mac": "52:54:00:12:34:57", "name": "c2"}]}
    assert tomllib.loads(pv.toml_document(doc)) == doc
    assert tomllib.loads(pv.toml_document({"general_nodes": []})) == {"general_nodes": []}


def test_example_file_is_valid_once_filled_in():
    text = EXAMPLE.read_text()
    doc = tomllib.loads(text)                     # parses as it is
    assert set(doc) <= set(pv.SCHEMA[""])
    filled = text.replace("cyk1:<64 hex digits>:<64 hex digits>", CLOUD_KEY) \
        .replace("<token printed by cyphonic-cloud enroll>", TOKEN)
    p = plan_of(filled)
    assert not p.errors, p.errors
    # every commented-out [adapter] setting is valid too
    uncommented = re.sub(r"^# (\w+ = .*?)\s+#.*$", r"\1", filled.split("[adapter]")[1], flags=re.M)
    p = plan_of(filled.split("[adapter]")[0] + "[adapter]" + uncommented)
    assert not p.errors, p.errors
    assert "dns_upstream" in tomllib.loads(p.file("etc", pv.ADAPTER_CONF).decode())
    # and the commented-out keys elsewhere are keys of the schema
    for key in re.findall(r"^# (\w+) = ", text, flags=re.M):
        assert any(key in keys for keys in pv.SCHEMA.values()) or key in adapter_config.DEFAULTS, key


def test_provision_cli_is_installed_with_the_documented_options():
    r = subprocess.run([sys.executable, "-m", "appliance.provision", "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    for opt in ("--boot", "--etc", "--state", "--run", "--sys-class-net", "--no-load", "--console"):
        assert opt in r.stdout
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cyphonic-provision"] == "appliance.provision:main"
    assert scripts["cyphonic-led"] == "appliance.led:main"


# --- the adapter's side ---------------------------------------------------------------------------------

def test_config_parses_gn_token_file_and_general_nodes():
    base = {"cloud": "192.0.2.1:47101", "cloud_key": CLOUD_KEY}
    cfg = adapter_config.parse_config(base)
    assert cfg.gn_token_file == "" and cfg.general_nodes == ()
    cfg = adapter_config.parse_config({**base, "gn_token_file": "/var/lib/cyphonic/token", "general_nodes": [
        {"mac": "52-54-00-12-34-56", "name": "cam1"}, {"mac": "52:54:00:12:34:57", "name": "cam2", "group": "g"}]})
    assert cfg.gn_token_file == "/var/lib/cyphonic/token"
    assert cfg.general_nodes == (adapter_config.ConfiguredGeneralNode("52:54:00:12:34:56", "cam1"),
                                 adapter_config.ConfiguredGeneralNode("52:54:00:12:34:57", "cam2", "g"))
    for bad, msg in [
        ({"gn_token_file": "token"}, "gn_token_file: must be an absolute path"),
        ({"gn_token_file": 1}, "gn_token_file: must be str"),
        ({"general_nodes": {"mac": "x"}}, "general_nodes: must be list"),
        ({"general_nodes": ["52:54:00:12:34:56"]}, "general_nodes[0]: must be a table"),
        ({"general_nodes": [{"mac": "52:54:00:12:34:56"}]}, "general_nodes[0].name: required"),
        ({"general_nodes": [{"mac": "nope", "name": "a"}]}, "general_nodes[0].mac: not a MAC"),
        ({"general_nodes": [{"mac": "52:54:00:12:34:56", "name": "A B"}]}, "general_nodes[0].name: bad name"),
        ({"general_nodes": [{"mac": "52:54:00:12:34:56", "name": "a", "ip": "1"}]}, "general_nodes[0].ip: unknown"),
        ({"general_nodes": [{"mac": "52:54:00:12:34:56", "name": "a"}, {"mac": "52:54:00:12:34:56", "name": "b"}]},
         "general_nodes[1].mac: 52:54:00:12:34:56 is listed twice"),
    ]:
        with pytest.raises(adapter_config.AdapterConfigError, match=re.escape(msg)):
            adapter_config.parse_config({**base, **bad})


def test_cyadm_status_shows_the_provisioning_errors(site, monkeypatch, tmp_path):
    from appliance import cyadm
    write_boot(site, GOOD.replace('lan = "auto"', 'lan = "eth7"'))
    assert boot(site)[0] == 1
    monkeypatch.setenv("CYPHONIC_PROVISION_STATUS", site.status_file)
    runner = CliRunner()
    r = runner.invoke(cyadm.main, ["--socket", str(tmp_path / "no.sock"), "status"])
    assert r.exit_code == 1
    assert "provisioning at boot" in r.output and ": error" in r.output
    assert "- [ports] lan: no interface named eth7" in r.output and "edit cyphonic.toml" in r.output
    r = runner.invoke(cyadm.main, ["--socket", str(tmp_path / "no.sock"), "status", "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.output[r.output.index("{"):r.output.rindex("}") + 1])
    assert doc["provision"]["state"] == "error" and doc["provision"]["errors"][0].startswith("[ports] lan")
    # without a provision.json (an ordinary host): as before, only the socket problem
    monkeypatch.setenv("CYPHONIC_PROVISION_STATUS", str(tmp_path / "none.json"))
    r = runner.invoke(cyadm.main, ["--socket", str(tmp_path / "no.sock"), "status"])
    assert r.exit_code == 1 and "provisioning" not in r.output
