"""rootfs-overlay/: the files laid over the appliance image's root (systemd units, sysctls, fstab,
journald, watchdog, SSH, first-boot scripts).

- The units pass `systemd-analyze verify` in a throw-away root: this host's systemd unit files
  (the image's systemd is the same Debian bookworm 252), a stand-in for Debian's ssh.service,
  stub executables at every path the units run, and the units enabled the way image/build.sh
  enables them. The whole boot transaction (default.target) is verified too, so an ordering
  cycle with systemd's own units fails here, not on a Pi. The harness is shown to catch a bad
  key and a cycle, so an empty output means something.
- What the units promise, read from them: the adapter's capabilities and sandbox, checked
  against what the code does (every /proc/sys path appliance/ writes is writable, the state and
  runtime directories are the config's defaults, the options passed exist); exposure scores.
- sysctl.d: every key exists in this kernel; the network part applied with systemd-sysctl in a
  fresh network namespace and read back (the rp_filter glob included).
- fstab, journald, watchdog, networkd and sshd settings as text.
- growroot: the disk-finding logic against fake sysfs trees (SD card, virtio, NVMe, a following
  partition, no room, not a partition), then the whole script against a real sparse image on
  a loop device, under the unit's capability bounding set. wait-time-sync's three exits.
- Hygiene: nothing world-writable, no CRLF, scripts executable and clean (bash -n and lint
  checks), units not executable, the overlay's README lists every file.

The loop-device, namespace and sysctl tests need root (marker `root`); CI runs as root.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OVERLAY = REPO / "rootfs-overlay"
UNIT_DIR = OVERLAY / "etc/systemd/system"
UNITS = sorted(p.name for p in UNIT_DIR.glob("*.service"))
TIMERS = sorted(p.name for p in UNIT_DIR.glob("*.timer"))   # started by a service's OnFailure=, no [Install]
GROWROOT = OVERLAY / "usr/lib/cyphonic/growroot"
WAIT_TIME_SYNC = OVERLAY / "usr/lib/cyphonic/wait-time-sync"
SCRIPTS = sorted((OVERLAY / "usr/lib/cyphonic").iterdir())
HOST_UNITS = Path("/usr/lib/systemd/system")
SYSTEMD_SYSCTL = "/lib/systemd/systemd-sysctl"
EXPECTED_UNITS = {"cyphonic-adapter.service", "cyphonic-growroot.service", "cyphonic-guard.service",
                  "cyphonic-led.service", "cyphonic-provision.service", "cyphonic-ssh-keygen.service",
                  "cyphonic-update-gate.service"}


# --- helpers -------------------------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}: keys may repeat (SystemCallFilter=, ExecStart=),
    continuation lines joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def words(unit: dict, section: str, key: str) -> set[str]:
    return {w for v in values(unit, section, key) for w in v.split()}


def one(unit: dict, section: str, key: str) -> str:
    vs = values(unit, section, key)
    assert len(vs) == 1, f"[{section}] {key}= expected once, found {vs}"
    return vs[0]


def exec_paths(unit: dict) -> list[str]:
    """The programs a service runs (ExecStart=, ExecStartPre=, ...), prefixes like '-' removed."""
    out = []
    for k, v in unit.get("Service", []):
        if k.startswith("Exec") and v:
            out.append(v.lstrip("-@:+!").split()[0])
    return out


def run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 120)
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def ini(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str
    cp.read_string(path.read_text())
    return cp


def timespan_us(span: str) -> int:
    r = run(["systemd-analyze", "timespan", span])
    assert r.returncode == 0, r.stderr
    m = re.search(r"μs:\s*(\d+)", r.stdout)
    assert m, r.stdout
    return int(m.group(1))


STUB = "#!/bin/sh\nexit 0\n"

SSH_STANDIN = """\
# Stand-in for Debian bookworm's ssh.service (openssh-server is not installed here): its
# dependencies and ordering, which is what the boot transaction is checked for.
[Unit]
Description=OpenBSD Secure Shell server (stand-in)
After=network.target auditd.service
ConditionPathExists=!/etc/ssh/sshd_not_to_be_run

[Service]
ExecStartPre=/usr/sbin/sshd -t
ExecStart=/usr/sbin/sshd -D
Type=notify
RuntimeDirectory=sshd

[Install]
WantedBy=multi-user.target
Alias=sshd.service
"""


def _stub(root: Path, path: str) -> None:
    if not path.startswith("/"):
        path = "/usr/bin/" + path          # a bare name: found through PATH
    target = root / path.lstrip("/")
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(STUB)
    target.chmod(0o755)


def build_root(tmp: Path, units: dict[str, str] | None = None) -> Path:
    """A root for `systemd-analyze --root`: merged /usr as in the image, this host's systemd units,
    ssh.service's stand-in, the overlay's units and scripts (or `units` instead), stubs for every
    program the units run, and the units enabled as image/build.sh enables them."""
    root = tmp / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    for d in ("bin", "sbin", "lib"):
        (root / d).symlink_to(f"usr/{d}")
    (root / "usr/bin").mkdir()
    (root / "usr/sbin").mkdir()
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/lib/systemd/system/ssh.service").write_text(SSH_STANDIN)
    etc_units = root / "etc/systemd/system"
    etc_units.mkdir(parents=True)
    if units is None:
        units = {name: (UNIT_DIR / name).read_text() for name in UNITS + TIMERS}
    for name, text in units.items():
        (etc_units / name).write_text(text)
    (root / "usr/lib/cyphonic").mkdir(parents=True)
    for s in SCRIPTS:
        shutil.copy2(s, root / "usr/lib/cyphonic" / s.name)
    for unit_file in list((root / "usr/lib/systemd/system").glob("*.service")) + list(etc_units.glob("*.service")):
        if unit_file.is_symlink():
            continue
        for p in exec_paths(parse_unit(unit_file)):
            _stub(root, p)
    with_install = [n for n, t in units.items() if re.search(r"^\[Install\]", t, re.M)]
    r = run(["systemctl", f"--root={root}", "--quiet", "enable",
             "systemd-networkd.service", "systemd-timesyncd.service", "ssh.service", *with_install])
    assert r.returncode == 0, r.stderr
    return root


def verify(root: Path, *targets: str) -> str:
    r = run(["systemd-analyze", "verify", f"--root={root}", "--man=no", *targets])
    return (r.stdout + r.stderr).strip() + ("" if r.returncode == 0 else f"\n(exit {r.returncode})")


@pytest.fixture(scope="module")
def vroot(tmp_path_factory) -> Path:
    return build_root(tmp_path_factory.mktemp("units"))


# --- the units -----------------------------------------------------------------------------------

def test_the_expected_units_are_there():
    assert set(UNITS) == EXPECTED_UNITS and TIMERS == ["cyphonic-adapter-retry.timer"]
    for name in UNITS:
        assert values(parse_unit(UNIT_DIR / name), "Install", "WantedBy"), f"{name}: no [Install] WantedBy="


@pytest.mark.parametrize("name", UNITS + TIMERS)
def test_unit_passes_systemd_analyze_verify(vroot, name):
    out = verify(vroot, str(vroot / "etc/systemd/system" / name))
    assert out == "", f"systemd-analyze verify {name}:\n{out}"


def test_boot_transaction_has_no_cycle_or_error(vroot):
    """default.target pulls in everything enabled (ours, systemd-networkd, timesyncd, ssh): the
    transaction systemd computes at boot, checked for ordering cycles and bad references."""
    assert verify(vroot, "default.target") == ""
    wants = vroot / "etc/systemd/system"
    assert (wants / "sysinit.target.wants/cyphonic-guard.service").is_symlink()
    assert (wants / "ssh.service.wants/cyphonic-ssh-keygen.service").is_symlink()
    for n in ("cyphonic-adapter", "cyphonic-provision", "cyphonic-led", "cyphonic-growroot", "cyphonic-update-gate"):
        assert (wants / f"multi-user.target.wants/{n}.service").is_symlink(), n


def test_the_verify_harness_catches_mistakes(tmp_path):
    """An unknown key and an ordering cycle both show up as output: the empty output above means
    something."""
    units = {name: (UNIT_DIR / name).read_text() for name in UNITS}
    units["cyphonic-led.service"] = units["cyphonic-led.service"].replace(
        "NoNewPrivileges=yes", "NoNewPrivileges=yes\nProtectSystem=stricter\nFrobnicate=yes")
    units["cyphonic-guard.service"] = units["cyphonic-guard.service"].replace(
        "After=systemd-modules-load.service", "After=systemd-modules-load.service cyphonic-adapter.service")
    root = build_root(tmp_path, units)
    out = verify(root, str(root / "etc/systemd/system/cyphonic-led.service"))
    assert "Frobnicate" in out and "stricter" in out
    out = verify(root, "default.target")
    assert "ordering cycle" in out


def test_exposure_scores(vroot):
    """systemd's own measure of a service's sandbox (0 best, 10 worst): the adapter and the LED,
    the long-running ones, stay low."""
    for name, limit in (("cyphonic-adapter.service", 30), ("cyphonic-led.service", 20)):
        r = run(["systemd-analyze", "security", "--offline=yes", f"--root={vroot}", f"--threshold={limit}",
                 "--no-pager", name])
        assert r.returncode == 0, f"{name} above {limit / 10}:\n{r.stdout[-300:]}{r.stderr}"


def test_boot_order_of_guard_provision_and_adapter():
    guard = parse_unit(UNIT_DIR / "cyphonic-guard.service")
    assert one(guard, "Unit", "DefaultDependencies") == "no"
    assert "network-pre.target" in words(guard, "Unit", "Before")
    assert "network-pre.target" in words(guard, "Unit", "Wants")
    assert exec_paths(guard) == ["/usr/sbin/nft"]
    assert one(guard, "Service", "ExecStart").split()[-1] == "/usr/share/cyphonic/nft/guard-early.nft"
    assert (OVERLAY / "usr/share/cyphonic/nft/guard-early.nft").is_file()
    assert values(guard, "Service", "ExecStop") == []          # the guard is never taken down
    assert one(guard, "Install", "WantedBy") == "sysinit.target"

    prov = parse_unit(UNIT_DIR / "cyphonic-provision.service")
    assert "cyphonic-guard.service" in words(prov, "Unit", "Requires")
    assert "cyphonic-guard.service" in words(prov, "Unit", "After")
    assert {"systemd-networkd.service", "cyphonic-adapter.service", "ssh.service"} <= words(prov, "Unit", "Before")
    assert {"/boot/firmware", "/var/lib/cyphonic"} <= words(prov, "Unit", "RequiresMountsFor")
    assert "/var/lib/cyphonic" in words(parse_unit(UNIT_DIR / "cyphonic-adapter.service"), "Unit", "RequiresMountsFor")
    assert one(prov, "Service", "Type") == "oneshot" and one(prov, "Service", "RemainAfterExit") == "yes"
    assert "console" in one(prov, "Service", "StandardOutput")
    # networkd (user systemd-network) must read the .network files it writes: default umask
    assert values(prov, "Service", "UMask") == []

    ad = parse_unit(UNIT_DIR / "cyphonic-adapter.service")
    assert "cyphonic-provision.service" in words(ad, "Unit", "Requires")
    assert {"cyphonic-provision.service", "systemd-networkd.service", "network-online.target"} <= words(ad, "Unit", "After")
    assert "network-online.target" in words(ad, "Unit", "Wants")

    led = parse_unit(UNIT_DIR / "cyphonic-led.service")
    # the LED shows "booting" and a failed provisioning: it depends on nothing of ours
    assert not {w for w in words(led, "Unit", "After") | words(led, "Unit", "Requires") if w.startswith("cyphonic-")}
    assert one(led, "Service", "Restart") == "always"


def test_adapter_restart_stop_and_directories():
    from appliance.config import DEFAULTS
    ad = parse_unit(UNIT_DIR / "cyphonic-adapter.service")
    assert one(ad, "Service", "Restart") == "on-failure"
    # back at once after a crash (a general node's ping within 3 s of a kill -9: the start itself
    # takes most of that), a crash loop stopped by the start limit ...
    assert timespan_us(one(ad, "Service", "RestartSec")) <= 500_000
    interval = timespan_us(one(ad, "Unit", "StartLimitIntervalSec"))
    assert interval > 0 and 3 <= int(one(ad, "Unit", "StartLimitBurst")) <= 20
    # ... and never given up on: its OnFailure= timer starts it again once the limit's window passed
    timer_name = one(ad, "Unit", "OnFailure")
    timer = parse_unit(UNIT_DIR / timer_name)
    assert one(timer, "Timer", "Unit") == "cyphonic-adapter.service"
    assert timespan_us(one(timer, "Timer", "OnActiveSec")) > interval
    assert one(timer, "Timer", "RemainAfterElapse") == "no"       # elapsed, it can be armed again
    assert "Install" not in timer
    assert one(ad, "Service", "KillMode") == "mixed"
    assert timespan_us(one(ad, "Service", "TimeoutStopSec")) == 10_000_000
    # the config's defaults are where systemd makes the directories
    state = one(ad, "Service", "StateDirectory")
    assert DEFAULTS["state_dir"] == f"/var/lib/{state}"
    assert one(ad, "Service", "StateDirectoryMode") == "0700"
    runtime = one(ad, "Service", "RuntimeDirectory")
    assert os.path.dirname(DEFAULTS["status_socket"]) == f"/run/{runtime}"
    assert one(ad, "Service", "RuntimeDirectoryPreserve") == "yes"   # provision.json lives there too


def test_adapter_capabilities_and_sandbox_fit_the_code():
    ad = parse_unit(UNIT_DIR / "cyphonic-adapter.service")
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert words(ad, "Service", "CapabilityBoundingSet") == caps
    assert words(ad, "Service", "AmbientCapabilities") == caps
    assert words(ad, "Service", "RestrictAddressFamilies") == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"}
    for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                      ("PrivateTmp", "yes"), ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
                      ("ProtectControlGroups", "yes"), ("LockPersonality", "yes"),
                      ("SystemCallArchitectures", "native")):
        assert one(ad, "Service", key) == want, key
    # ctypes (scapy, the workers' prctl) needs W+X memory: MemoryDenyWriteExecute must stay off
    assert values(ad, "Service", "MemoryDenyWriteExecute") in ([], ["no"])
    assert values(ad, "Service", "PrivateNetwork") in ([], ["no"])    # it configures the host's ports

    # Every /proc/sys file the adapter's code writes is under a ReadWritePaths= entry (the rest of
    # /proc/sys is read-only with ProtectKernelTunables=yes).
    writable = words(ad, "Service", "ReadWritePaths")
    written = set()
    for src in (REPO / "appliance").glob("*.py"):
        for m in re.finditer(r"/proc/sys/[A-Za-z0-9_./{}]+", src.read_text()):
            written.add(m.group(0))
    assert written, "no /proc/sys path found in appliance/: the check looks in the wrong place"
    for path in written:
        assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), \
            f"the adapter writes {path}, which its unit leaves read-only"

    # ExecStart's program is the venv's console script, and its options exist.
    from appliance import packet_filter
    env = " ".join(values(ad, "Service", "Environment"))
    assert f"{packet_filter.NFT_DIR_ENV}=/usr/share/cyphonic/nft" in env


def test_exec_start_programs_and_options_exist():
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    entry = dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+):\w+"', scripts.group(1), re.M))
    overlay_programs = {"/" + str(p.relative_to(OVERLAY)) for p in SCRIPTS}
    image_programs = {"/usr/sbin/nft", "/usr/bin/ssh-keygen"}   # nftables, openssh-client
    for name in UNITS:
        unit = parse_unit(UNIT_DIR / name)
        for k, v in unit.get("Service", []):
            if not k.startswith("Exec"):
                continue
            argv = v.lstrip("-@:+!").split()
            prog = argv[0]
            if prog.startswith("/opt/cyphonic/venv/bin/"):
                script = prog.rsplit("/", 1)[1]
                assert script in entry, f"{name}: {script} is not a console script in pyproject.toml"
                options = [a for a in argv[1:] if a.startswith("--")]
                if options:
                    r = run([sys.executable, "-m", entry[script], "--help"], cwd=REPO)
                    assert r.returncode == 0, r.stderr
                    for o in options:
                        assert o in r.stdout, f"{name}: {script} has no {o} option"
            else:
                assert prog in overlay_programs | image_programs, f"{name}: runs {prog}, which the image lacks"


def test_led_and_helpers_are_confined():
    led = parse_unit(UNIT_DIR / "cyphonic-led.service")
    assert values(led, "Service", "CapabilityBoundingSet") == [""]
    assert words(led, "Service", "RestrictAddressFamilies") == {"AF_UNIX"}
    assert one(led, "Service", "PrivateNetwork") == "yes"
    assert "/proc/sys" in words(led, "Service", "ReadOnlyPaths")
    # /sys must stay writable for the LED's trigger and brightness
    assert values(led, "Service", "ProtectKernelTunables") in ([], ["no"])

    keygen = parse_unit(UNIT_DIR / "cyphonic-ssh-keygen.service")
    # on the data partition: an update keeps the host key
    assert one(keygen, "Unit", "ConditionPathExists") == "!/data/ssh/ssh_host_ed25519_key"
    assert "/data" in words(keygen, "Unit", "RequiresMountsFor")
    sshd = (OVERLAY / "etc/ssh/sshd_config.d/cyphonic.conf").read_text()
    assert re.findall(r"(?m)^HostKey (\S+)", sshd) == ["/data/ssh/ssh_host_ed25519_key"]
    assert "ssh.service" in words(keygen, "Unit", "Before")
    assert one(keygen, "Install", "WantedBy") == "ssh.service"
    assert values(keygen, "Service", "CapabilityBoundingSet") == [""]

    grow = parse_unit(UNIT_DIR / "cyphonic-growroot.service")
    # either marker missing runs it (the conditions are "triggering": |); both are on /data
    assert sorted(values(grow, "Unit", "ConditionPathExists")) == ["|!/data/.data-grown", "|!/data/.root-grown"]
    starts = values(grow, "Service", "ExecStart")
    assert [s.split()[-1] for s in starts] == ["/", "/data"]
    assert [s.split()[1:3] for s in starts] == [["--marker", "/data/.root-grown"], ["--marker", "/data/.data-grown"]]
    assert words(grow, "Service", "CapabilityBoundingSet") == {"CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"}
    assert "--marker) MARKER=" in GROWROOT.read_text()


# --- sysctl.d ------------------------------------------------------------------------------------

SYSCTL = OVERLAY / "etc/sysctl.d/90-cyphonic.conf"


def sysctl_entries() -> list[tuple[str, str]]:
    out = []
    for line in SYSCTL.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key = value: {line!r}"
        out.append((key.strip(), value.strip()))
    return out


def test_sysctl_keys_exist_and_values_are_numbers():
    entries = sysctl_entries()
    keys = [k for k, _ in entries]
    assert len(keys) == len(set(keys)), "a key is set twice"
    for key, value in entries:
        assert re.fullmatch(r"-?\d+", value), f"{key}: {value!r}"
        pattern = "/proc/sys/" + key.replace(".", "/")
        matches = list(Path("/").glob(pattern.lstrip("/"))) if "*" in key else [Path(pattern)]
        assert matches and all(m.exists() for m in matches), f"{key}: no {pattern} in this kernel"
    d = dict(entries)
    # forwarding is the adapter's to turn on, last, once its filter is complete (nft/README.md)
    assert d["net.ipv4.ip_forward"] == "0"
    from appliance.packet_filter import IP_FORWARD, PacketFilterConfig
    assert IP_FORWARD == "/proc/sys/net/ipv4/ip_forward"
    assert PacketFilterConfig(lan_if="lan0", wan_if="wan0", prefix="100.64.0.0/10",
                              lan_address="100.127.255.254").manage_forwarding
    # strict everywhere: the kernel takes the larger of "all" and the interface's value
    assert d["net.ipv4.conf.all.rp_filter"] == d["net.ipv4.conf.default.rp_filter"] == "1"
    assert d["net.ipv4.conf.*.rp_filter"] == "1"
    assert d["net.ipv6.conf.all.forwarding"] == "0"
    assert int(d["kernel.panic"]) > 0


@pytest.mark.root
def test_sysctl_network_part_applies_in_a_fresh_namespace():
    """systemd-sysctl itself reads the file (globs and all) in a new network namespace; only
    per-namespace net.* keys are applied, so the host is untouched."""
    if os.geteuid() != 0:
        pytest.fail("needs root (a network namespace); CI runs as root")
    script = (f"{SYSTEMD_SYSCTL} --prefix=/net/ipv4/conf --prefix=/net/ipv4/ip_forward "
              f"--prefix=/net/ipv6/conf {SYSCTL} || exit 9; "
              "for f in ipv4/ip_forward ipv4/conf/all/rp_filter ipv4/conf/lo/rp_filter "
              "ipv4/conf/default/rp_filter ipv4/conf/all/arp_ignore ipv4/conf/all/send_redirects "
              "ipv6/conf/all/forwarding; do echo \"$f=$(cat /proc/sys/net/$f)\"; done")
    r = run(["unshare", "--net", "sh", "-c", script])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    got = dict(line.split("=") for line in r.stdout.split())
    assert got == {"ipv4/ip_forward": "0", "ipv4/conf/all/rp_filter": "1", "ipv4/conf/lo/rp_filter": "1",
                   "ipv4/conf/default/rp_filter": "1", "ipv4/conf/all/arp_ignore": "1",
                   "ipv4/conf/all/send_redirects": "0", "ipv6/conf/all/forwarding": "0"}


# --- fstab, journald, watchdog, networkd ----------------------------------------------------------

def test_fstab():
    rows = [line.split() for line in (OVERLAY / "etc/fstab").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert all(len(r) == 6 for r in rows), rows
    by_mount = {r[1]: r for r in rows}
    assert set(by_mount) == {"/", "/data", "/var/lib/cyphonic", "/boot/firmware", "/tmp"}
    src, _, fstype, opts, dump, passno = by_mount["/"]
    opts = opts.split(",")
    # the booted slot's partition, whichever of A and B the kernel command line names
    assert (src, fstype, passno) == ("/dev/root", "ext4", "1")
    assert {"noatime", "errors=remount-ro"} <= set(opts) and "ro" not in opts
    src, _, fstype, opts, dump, passno = by_mount["/data"]
    assert (src, fstype, passno) == ("LABEL=CYDATA", "ext4", "2")
    assert {"noatime", "nofail"} <= set(opts.split(","))
    src, _, fstype, opts, dump, passno = by_mount["/var/lib/cyphonic"]
    assert (src, fstype) == ("/data/cyphonic", "none")
    assert {"bind", "x-systemd.requires-mounts-for=/data"} <= set(opts.split(","))
    src, _, fstype, opts, dump, passno = by_mount["/boot/firmware"]
    opts = opts.split(",")
    assert (src, fstype, passno) == ("LABEL=CYBOOT", "vfat", "2")
    assert "umask=0077" in opts                  # the token is on it until first boot
    assert "ro" not in opts                      # provision rewrites cyphonic.toml
    assert "noatime" in opts and "nofail" in opts
    # no shorter wait for the device than systemd's 90 s: under TCG udev took over 30 s to find it
    for o in opts:
        if o.startswith("x-systemd.device-timeout="):
            assert timespan_us(o.split("=", 1)[1]) >= 90_000_000, o
    assert by_mount["/tmp"][2] == "tmpfs"
    # the labels are the ones image/build.sh gives the partitions
    build = (REPO / "image/build.sh").read_text()
    assert re.search(r"mkfs\.vfat .*-n CYBOOT", build) and re.search(r"mkfs\.ext4 .*-L CYDATA", build)


def test_rauc_system_conf_matches_the_image_and_boot_script():
    """The slots RAUC writes are the partitions build.sh makes and boot.scr boots; the
    compatible string is the one build.sh signs bundles for; the variables are RAUC's."""
    conf = ini(OVERLAY / "etc/rauc/system.conf")
    build = (REPO / "image/build.sh").read_text()
    disk_id = re.search(r"(?m)^DISK_ID=0x([0-9a-f]{8})\b", build).group(1)
    assert conf["system"]["compatible"] == re.search(r"(?m)^COMPATIBLE=(\S+)", build).group(1)
    assert conf["system"]["bootloader"] == "uboot"
    assert conf["system"]["data-directory"].startswith("/data/")
    assert "-plain" in conf["system"]["bundle-formats"]
    assert conf["system"]["boot-attempts-primary"] == "1"
    assert conf["keyring"]["path"] == "/etc/rauc/keyring.pem" and "etc/rauc/keyring.pem" in build
    slots = {conf[s]["bootname"]: conf[s]["device"] for s in conf if s.startswith("slot.rootfs.")}
    assert slots == {"A": f"/dev/disk/by-partuuid/{disk_id}-02", "B": f"/dev/disk/by-partuuid/{disk_id}-03"}
    boot = (REPO / "image/boot.cmd").read_text()
    assert "setenv cy_part 2" in boot and "setenv cy_part 3" in boot
    for name in ("BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT", "rauc.slot=", "root=PARTUUID="):
        assert name in boot, name
    fw = [l.split() for l in (OVERLAY / "etc/fw_env.config").read_text().splitlines()
          if l.strip() and not l.startswith("#")]
    assert fw == [["/boot/firmware/cyboot.env", "0x0000", "0x4000"]]
    assert "0x4000" in boot and "mkenvimage -s 0x4000" in build


def test_journald_watchdog_networkd_resolved():
    j = ini(OVERLAY / "etc/systemd/journald.conf.d/cyphonic.conf")["Journal"]
    assert j["Storage"] == "volatile"
    assert re.fullmatch(r"\d+M", j["RuntimeMaxUse"]) and int(j["RuntimeMaxUse"][:-1]) <= 64
    w = ini(OVERLAY / "etc/systemd/system.conf.d/watchdog.conf")["Manager"]
    # bcm2835_wdt accepts at most 15 s; more is refused and systemd then runs without a watchdog
    for key in ("RuntimeWatchdogSec", "RebootWatchdogSec"):
        assert 0 < timespan_us(w[key]) <= 15_000_000, key
    n = ini(OVERLAY / "etc/systemd/networkd.conf.d/cyphonic.conf")["Network"]
    assert n["ManageForeignRoutes"] == "no"
    assert not (OVERLAY / "etc/systemd/network").exists()   # ports are configured in /run by provision
    r = ini(OVERLAY / "etc/systemd/resolved.conf.d/cyphonic.conf")["Resolve"]
    assert r["LLMNR"] == "no" and r["MulticastDNS"] == "no"


def test_hostname_and_hosts():
    name = (OVERLAY / "etc/hostname").read_text()
    assert name == "cyphonic-adapter\n"
    hosts = (OVERLAY / "etc/hosts").read_text().split("\n")
    assert "127.0.0.1\tlocalhost" in hosts
    assert any(line.split()[:2] == ["127.0.1.1", "cyphonic-adapter"] for line in hosts if line)


# --- SSH -----------------------------------------------------------------------------------------

SSHD = OVERLAY / "etc/ssh/sshd_config.d/cyphonic.conf"


def test_sshd_config_key_login_only():
    """Checked as text (openssh-server is not installed here): Debian's sshd_config includes
    /etc/ssh/sshd_config.d/*.conf first and the first value of a keyword wins."""
    assert SSHD.name.endswith(".conf")
    settings: dict[str, list[str]] = {}
    for line in SSHD.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        assert not key.lower() == "match", "no Match blocks in a drop-in: they swallow what follows"
        settings.setdefault(key.lower(), []).append(value.strip())
    single = {k: v[0] for k, v in settings.items()}
    assert all(len(v) == 1 for k, v in settings.items() if k != "hostkey"), settings
    assert single["permitrootlogin"] == "prohibit-password"
    assert single["passwordauthentication"] == "no"
    assert single["kbdinteractiveauthentication"] == "no"
    assert single["permitemptypasswords"] == "no"
    assert single["authenticationmethods"] == "publickey"
    assert single["pubkeyauthentication"] == "yes"
    # the one host key is the one cyphonic-ssh-keygen.service makes
    keygen = one(parse_unit(UNIT_DIR / "cyphonic-ssh-keygen.service"), "Service", "ExecStart").split()
    assert settings["hostkey"] == [keygen[keygen.index("-f") + 1]]
    assert keygen[keygen.index("-t") + 1] == "ed25519"


# --- growroot: the disk-finding logic against fake sysfs trees --------------------------------------

def fake_sysfs(tmp: Path, disk: str, devpath: str, disk_sectors: int,
               parts: list[tuple[int, int, int, str]]) -> Path:
    """parts: (number, start, size, MAJ:MIN). Laid out as the kernel does: the partitions inside
    the disk's directory, /sys/dev/block/MAJ:MIN a relative symlink to them."""
    sysfs = tmp / "sys"
    ddir = sysfs / "devices" / devpath / disk
    ddir.mkdir(parents=True)
    (ddir / "size").write_text(f"{disk_sectors}\n")
    (sysfs / "dev/block").mkdir(parents=True, exist_ok=True)
    for number, start, size, devno in parts:
        suffix = f"p{number}" if disk[-1].isdigit() else str(number)
        pdir = ddir / f"{disk}{suffix}"
        pdir.mkdir()
        for k, v in (("partition", number), ("start", start), ("size", size), ("dev", devno)):
            (pdir / k).write_text(f"{v}\n")
        (sysfs / "dev/block" / devno).symlink_to(os.path.relpath(pdir, sysfs / "dev/block"))
    return sysfs


def growroot_dry(sysfs: Path, devno: str, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CYPHONIC_SYSFS=str(sysfs), CYPHONIC_GROWROOT_DEVNO=devno,
               CYPHONIC_GROWROOT_MARKER=str(tmp / "marker"))
    return run(["bash", str(GROWROOT), "--dry-run"], env=env)


def plan_of(r: subprocess.CompletedProcess) -> dict[str, str]:
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("disk=")]
    assert len(line) == 1, r.stdout
    return dict(w.split("=", 1) for w in line[0].split())


GIB = 2 * 1024 * 1024    # sectors


@pytest.mark.parametrize("disk,devpath,devno", [
    ("mmcblk0", "platform/emmc2bus/fe340000.mmc/mmc_host/mmc0/mmc0:0001/block", "179:2"),   # Pi 4 SD card
    ("vda", "pci0000:00/0000:00:02.0/virtio1/block", "254:2"),                              # QEMU virt
    ("nvme0n1", "pci0000:00/0000:01:00.0/nvme/nvme0", "259:2"),
    ("sda", "platform/scb/fd500000.pcie/usb2/2-1/host0/target0:0:0/0:0:0:0/block", "8:2"),  # USB boot
])
def test_growroot_finds_the_disk_and_partition(tmp_path, disk, devpath, devno):
    sysfs = fake_sysfs(tmp_path, disk, devpath, 16 * GIB,
                       [(1, 8192, 524288, devno[:-1] + "1"), (2, 532480, 4 * GIB, devno)])
    plan = plan_of(growroot_dry(sysfs, devno, tmp_path))
    suffix = "p2" if disk[-1].isdigit() else "2"
    assert plan == {"disk": f"/dev/{disk}", "partition": "2", "device": f"/dev/{disk}{suffix}",
                    "start": "532480", "size": str(4 * GIB), "disk_size": str(16 * GIB),
                    "free": str(16 * GIB - 532480 - 4 * GIB), "action": "grow"}
    assert not (tmp_path / "marker").exists()


def test_growroot_leaves_a_full_disk_or_a_following_partition_alone(tmp_path):
    # the partition already ends 8 MiB before the end: not worth it
    sysfs = fake_sysfs(tmp_path / "a", "mmcblk0", "platform/mmc/block", 4 * GIB,
                       [(1, 8192, 524288, "179:1"), (2, 532480, 4 * GIB - 532480 - 16384, "179:2")])
    assert plan_of(growroot_dry(sysfs, "179:2", tmp_path))["action"] == "none"
    # a third partition after the root: nothing to grow into
    sysfs = fake_sysfs(tmp_path / "b", "vda", "virtio/block", 16 * GIB,
                       [(1, 8192, 524288, "254:1"), (2, 532480, GIB, "254:2"), (3, 532480 + GIB, GIB, "254:3")])
    r = growroot_dry(sysfs, "254:2", tmp_path)
    assert plan_of(r)["action"] == "none" and "vda3 follows vda2" in r.stdout


def test_growroot_gives_up_quietly_on_what_it_cannot_grow(tmp_path):
    sysfs = fake_sysfs(tmp_path, "vda", "virtio/block", 16 * GIB, [(1, 2048, GIB, "254:1")])
    # the whole disk (no partition table): not a partition; an unknown device number: nothing
    (sysfs / "dev/block/254:0").symlink_to("../../devices/virtio/block/vda")
    for devno, why in (("254:0", "is not a partition"), ("7:99", "not a partition")):
        r = growroot_dry(sysfs, devno, tmp_path)
        assert r.returncode == 0 and why in r.stdout and "disk=" not in r.stdout, r.stdout
        assert "not fatal" in r.stdout
    # not ext4 (asked of the real mount table): /proc is proc
    r = run(["bash", str(GROWROOT), "--dry-run", "/proc"],
            env=dict(os.environ, CYPHONIC_GROWROOT_MARKER=str(tmp_path / "m")))
    assert r.returncode == 0 and "not ext4" in r.stdout and "disk=" not in r.stdout


# --- growroot: the whole script against a real image on a loop device ------------------------------

def _caps_of(unit: str) -> list[str]:
    return sorted(words(parse_unit(UNIT_DIR / unit), "Service", "CapabilityBoundingSet"))


def _have_cap(number: int) -> bool:
    eff = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("CapEff:")]
    return bool(int(eff[0].split()[1], 16) >> number & 1)


CAP_SYS_RESOURCE = 24


@pytest.mark.root
def test_growroot_grows_a_real_partition_on_a_loop_device(tmp_path):
    """A 200 MiB sparse image with a FAT partition and a 60 MiB ext4 root (as the image has),
    mounted; growroot runs under the unit's capability bounding set. The partition grows to the
    end of the disk, in the table and in the kernel, with the file system intact. resize2fs online
    needs CAP_SYS_RESOURCE: where this machine lacks it (a sandboxed CI VM) the script must say so,
    exit 0 and leave no marker; the file system is then grown offline to show the new partition
    is right, and the next run finds nothing to do and leaves the marker."""
    if os.geteuid() != 0:
        pytest.fail("needs root (loop devices, mount); CI runs as root")
    for tool in ("losetup", "partx", "sfdisk", "mkfs.ext4", "e2fsck", "resize2fs", "setpriv", "findmnt"):
        assert shutil.which(tool), f"{tool} is missing (Debian packages util-linux, fdisk, e2fsprogs)"
    img = tmp_path / "card.img"
    mnt = tmp_path / "root"
    mnt.mkdir()
    marker = tmp_path / "state/.root-grown"
    with open(img, "wb") as f:
        f.truncate(200 << 20)
    r = run(["sfdisk", "-q", str(img)],
            input="label: dos\nstart=8192, size=32768, type=c\nstart=40960, size=122880, type=83\n")
    assert r.returncode == 0, r.stderr
    r = run(["losetup", "--find", "--show", str(img)])
    loop = r.stdout.strip()
    assert loop.startswith("/dev/loop"), f"no loop device: {r.stderr}"
    mounted = False
    try:
        # Partitions through BLKPG from user space: works whether or not this kernel parses MBR
        # tables itself. Any left on this loop device by an earlier user go first (partitions
        # added with BLKPG survive a detach).
        run(["partx", "-d", loop])
        r = run(["partx", "-a", loop])
        name = os.path.basename(loop)
        part = f"{loop}p2"
        sys_part = Path(f"/sys/block/{name}/{name}p2")
        assert sys_part.exists(), f"partx -a {loop}: {r.stderr}"
        assert (int((sys_part / "start").read_text()), int((sys_part / "size").read_text())) == (40960, 122880)
        for argv in (["mkfs.ext4", "-q", "-L", "CYROOT", part], ["mount", part, str(mnt)]):
            r = run(argv)
            assert r.returncode == 0, f"{argv}: {r.stdout}{r.stderr}"
        mounted = True
        (mnt / "kept").write_text("the root's content\n")

        bounding = "-all," + ",".join("+" + c.lower()[4:] for c in _caps_of("cyphonic-growroot.service"))
        env = dict(os.environ, CYPHONIC_GROWROOT_MARKER=str(marker))
        cmd = ["setpriv", "--inh-caps=-all", f"--bounding-set={bounding}", "bash", str(GROWROOT), str(mnt)]
        r = run(cmd, env=env)
        assert r.returncode == 0, r.stderr
        assert f"partition {part} grown from 122880 to 368640 sectors" in r.stdout, r.stdout
        assert int((sys_part / "size").read_text()) == 368640           # the kernel's view
        table = run(["sfdisk", "-d", str(img)]).stdout
        assert re.search(r"start=\s*40960, size=\s*368640, type=83", table), table
        assert re.search(r"start=\s*8192, size=\s*32768, type=c", table), table

        if _have_cap(CAP_SYS_RESOURCE):
            assert "done:" in r.stdout and marker.exists(), r.stdout
        else:
            assert "resize2fs" in r.stdout and "failed" in r.stdout and "not fatal" in r.stdout, r.stdout
            assert not marker.exists()
            # (-f: the check just before is read-only, so it leaves no "checked" time behind. The
            # retries: a mount namespace created by another process while the file system was
            # mounted may hold it a moment longer, and then the exclusive open says EBUSY.)
            for argv in (["umount", str(mnt)], ["e2fsck", "-fn", part], ["resize2fs", "-f", part],
                         ["mount", part, str(mnt)]):
                for _ in range(50):
                    r = run(argv)
                    if r.returncode == 0 or "busy" not in (r.stdout + r.stderr).lower():
                        break
                    time.sleep(0.1)
                assert r.returncode == 0, f"{argv}: {r.stdout}{r.stderr}"
                mounted = argv[0] == "mount"
            r = run(cmd, env=env)
            assert r.returncode == 0 and "partition fills the disk" in r.stdout, r.stdout
            assert "Nothing to do" in r.stdout and marker.exists(), r.stdout
        assert (mnt / "kept").read_text() == "the root's content\n"
        blocks = run(["stat", "-f", "-c", "%b %S", str(mnt)]).stdout.split()
        assert int(blocks[0]) * int(blocks[1]) > 150 << 20                # the file system grew
        assert stat.S_IMODE(marker.parent.stat().st_mode) == 0o700
        # and once the marker is there, it does nothing at all
        r = run(cmd, env=env)
        assert r.returncode == 0 and "already done" in r.stdout
    finally:
        if mounted:
            run(["umount", str(mnt)])
        run(["partx", "-d", loop])
        run(["losetup", "-d", loop])


# --- wait-time-sync --------------------------------------------------------------------------------

def _wait(tmp: Path, *args: str, synced: bool = False, hctosys: str | None = None,
          waited: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    sysfs = tmp / "sys"
    (sysfs / "class/rtc/rtc0").mkdir(parents=True, exist_ok=True)
    if hctosys is not None:
        (sysfs / "class/rtc/rtc0/hctosys").write_text(hctosys + "\n")
    if synced:
        (tmp / "synchronized").touch()
    stamp = tmp / "run/.time-waited"
    if waited:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    env = dict(os.environ, CYPHONIC_SYSFS=str(sysfs), CYPHONIC_TIMESYNC_FILE=str(tmp / "synchronized"),
               CYPHONIC_TIME_WAITED=str(stamp))
    t0 = time.monotonic()
    r = run(["bash", str(WAIT_TIME_SYNC), *args], env=env)
    return r, time.monotonic() - t0


def test_wait_time_sync(tmp_path):
    r, took = _wait(tmp_path / "a", "30", synced=True)
    assert r.returncode == 0 and "synchronized by NTP after 0 s" in r.stdout and took < 5
    assert (tmp_path / "a/run/.time-waited").exists()
    r, took = _wait(tmp_path / "b", "30", hctosys="1")
    assert r.returncode == 0 and "real-time clock" in r.stdout and took < 5
    r, took = _wait(tmp_path / "c", "2", hctosys="0")
    assert r.returncode == 0 and "NOT synchronized after 2 s" in r.stdout and 2 <= took < 10
    assert (tmp_path / "c/run/.time-waited").exists()
    # a restarted adapter does not wait again in the same boot
    r, took = _wait(tmp_path / "d", "30", waited=True)
    assert r.returncode == 0 and r.stdout == "" and took < 5
    r, _ = _wait(tmp_path / "e", "soon")
    assert r.returncode == 0 and "whole number" in r.stderr
    unit = parse_unit(UNIT_DIR / "cyphonic-adapter.service")
    pre = one(unit, "Service", "ExecStartPre")
    assert pre.startswith("-/usr/lib/cyphonic/wait-time-sync ")     # "-": never stops the adapter
    # the stamp is in the adapter's runtime directory, which systemd creates before ExecStartPre
    assert "/run/" + one(unit, "Service", "RuntimeDirectory") + "/.time-waited" in WAIT_TIME_SYNC.read_text()


# --- hygiene -------------------------------------------------------------------------------------

def overlay_files() -> list[Path]:
    return sorted(p for p in OVERLAY.rglob("*") if p.is_file() or p.is_symlink())


def test_no_world_writable_setuid_or_crlf_and_units_not_executable():
    for p in [OVERLAY, *OVERLAY.rglob("*")]:
        mode = p.lstat().st_mode
        rel = p.relative_to(OVERLAY)
        assert not mode & stat.S_IWOTH, f"{rel} is world-writable"
        assert not mode & (stat.S_ISUID | stat.S_ISGID), f"{rel} is setuid/setgid"
        if not p.is_file():
            continue
        data = p.read_bytes()
        assert b"\r" not in data, f"{rel} has CR line ends"
        assert data.endswith(b"\n"), f"{rel} does not end with a newline"
        data.decode("utf-8")
        if p.parent == OVERLAY / "usr/lib/cyphonic":
            assert mode & 0o111 == 0o111, f"{rel} must be executable"
        elif "/etc/" in f"/{rel}":
            assert not mode & 0o111, f"{rel} must not be executable (systemd warns about units)"


def _lint_shell(path: Path) -> list[str]:
    """A few of shellcheck's checks that matter for these scripts (shellcheck is not a Debian
    package this project installs): bash -n, strict mode, no backticks, every variable read is
    set somewhere (or read with a default), and no unquoted expansion inside [ ]."""
    text = path.read_text()
    problems = []
    if not text.startswith("#!/bin/bash\n"):
        problems.append("shebang is not #!/bin/bash")
    r = run(["bash", "-n", str(path)])
    if r.returncode != 0:
        problems.append("bash -n: " + r.stderr)
    if not re.search(r"^set -u$", text, re.M):
        problems.append("no `set -u`")
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    if "`" in code:
        problems.append("backticks")
    assigned = set(re.findall(r"(?:^|[\s;(])([A-Za-z_]\w*)=", code))
    assigned |= set(re.findall(r"\bfor\s+([A-Za-z_]\w*)\s+in\b", code))
    assigned |= set(re.findall(r"\$\{([A-Za-z_]\w*):-", code))
    read = set(re.findall(r"\$([A-Za-z_]\w*)", code)) | set(re.findall(r"\$\{([A-Za-z_]\w*)", code))
    for name in sorted(read - assigned):
        problems.append(f"${name} is read but never set")
    for m in re.finditer(r"\[ ([^]\n]*) \]", code):
        inner = m.group(1)
        while re.search(r"\$\([^()]*\)", inner):            # command substitutions, innermost first
            inner = re.sub(r"\$\([^()]*\)", "\0", inner)
        inner = re.sub(r'"[^"]*"', '""', inner)
        if re.search(r"\$[A-Za-z_{(]|\0", inner):
            problems.append(f"unquoted expansion in [ {m.group(1)} ]")
    return problems


@pytest.mark.parametrize("script", [s.name for s in SCRIPTS])
def test_scripts_are_clean(script):
    assert _lint_shell(OVERLAY / "usr/lib/cyphonic" / script) == []


def test_the_lint_catches_what_it_claims(tmp_path):
    bad = tmp_path / "bad"
    bad.write_text('#!/bin/sh\nx=1\nif [ $x = 1 ]; then echo `date` $y; fi\n[ "$(cat "$x")" = $(cat f) ]\n')
    problems = " | ".join(_lint_shell(bad))
    for what in ("shebang", "set -u", "backticks", "$y is read but never set", "unquoted expansion in [ $x",
                 'unquoted expansion in [ "$(cat "$x")" = $(cat f) ]'):
        assert what in problems, problems


def test_readme_lists_every_file():
    readme = (OVERLAY / "README.md").read_text()
    for p in overlay_files():
        rel = str(p.relative_to(OVERLAY))
        if rel == "README.md":
            continue
        assert f"`{rel}`" in readme, f"rootfs-overlay/README.md does not list {rel}"
