"""Signed A/B updates (issue 14): appliance/update.py (the rules) and appliance/updater.py (the
edge), without root.

- The health gate's decision as a pure function: pass, pass with a quiet node, fail on restarts,
  on a failed unit, on provisioning, on timeout; what a boot is (trial, fallback, waiting for
  its reboot, normal, broken pending.json).
- The gate run on every boot against a fake runner (rauc, systemctl) and a scripted adapter:
  the exact console lines the QEMU test waits for, last.json, pending.json removed or kept,
  which rauc marks are made. A broken pending.json or last.json never rolls a slot back.
- pending.json / last.json round trips and refusals; the state snapshot restored after a
  rollback only when the trial migrated its FORMAT (a fake format bump).
- Getting the bundle: real loopback sockets (a closed port, a 404, a server that never answers,
  http.server serving the file), stdin, a bundle larger than the free space.
- `cyadm update install` refusing at rauc info and at rauc install: nothing changed;
  `cyadm update status` rendered from RAUC 1.8's own JSON (src/main.c r_status_formatter_json:
  slot_status only with --detailed; booted is the bootname from rauc.slot=).
- With the host's rauc (Debian's, 1.8): a tiny verity bundle signed by a throw-away CA made with
  openssl is accepted; one signed by another CA and a truncated one are refused with RAUC's words.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from appliance import update as U
from appliance import updater
from appliance.updater import Result, System, UpdatePaths

COMPATIBLE = "cyphonic-adapter-rpi-arm64"


# --- helpers ----------------------------------------------------------------------------------------

def adapter(cloud="ready", tunnels=()):
    return {"kind": "adapter", "cloud": {"state": cloud}, "tunnels": list(tunnels), "health": []}


def tunnel(gn, peer="peer1.example", up=True, rx=0):
    return {"gn": gn, "peer": peer, "vip4": "100.64.0.9", "up": up, "rx_bytes": rx, "tx_bytes": 0}


def pending(**kw) -> U.Pending:
    base = dict(from_slot="A", to_slot="B", from_version="0.1.0", to_version="0.2.0", installed_at=1000.0,
                boot_id="boot-1", adapter_up=True, cloud_ready=True,
                nodes={"camera1": U.NodeBaseline(tunnel=True, data=True),
                       "plc1": U.NodeBaseline(tunnel=True, data=False)})
    base.update(kw)
    return U.Pending(**base)


def obs(status=None, restarts=0, unit="active", provision=None, elapsed=0.0) -> U.Observation:
    return U.Observation(status=status, restarts=restarts, unit_state=unit,
                         provision=provision if provision is not None else {"state": "ok"}, elapsed_s=elapsed)


# RAUC 1.8, `rauc status --detailed --output-format=json` on slot A after installing into B (one line as
# rauc prints it; the order of "slots" is a hash table's)
RAUC_STATUS_AFTER_INSTALL = (
    '{"compatible":"cyphonic-adapter-rpi-arm64","variant":null,"booted":"A","boot_primary":"rootfs.1",'
    '"slots":[{"rootfs.1":{"class":"rootfs","device":"/dev/disk/by-partuuid/43594850-03","type":"ext4",'
    '"bootname":"B","state":"inactive","parent":null,"mountpoint":null,"boot_status":"good","slot_status":'
    '{"bundle":{"compatible":"cyphonic-adapter-rpi-arm64","version":"0.2.0","description":"CYPHONIC adapter",'
    '"build":"v0.2.0-3-g1a2b3c4"},"checksum":{"sha256":"2db66c96cf6b5b4cae8e95c03a51104aa4f7be8680d30d7a1bc3e1b'
    '538ab063d","size":536870912},"installed":{"timestamp":"2026-12-06T08:01:12Z","count":1},"status":"ok"}}},'
    '{"rootfs.0":{"class":"rootfs","device":"/dev/disk/by-partuuid/43594850-02","type":"ext4","bootname":"A",'
    '"state":"booted","parent":null,"mountpoint":"/","boot_status":"good","slot_status":{"bundle":'
    '{"compatible":null}}}}]}')


class FakeRunner:
    """rauc, systemctl and fw_printenv as scripted answers; every call recorded."""

    def __init__(self, answers: dict | None = None) -> None:
        self.calls: list[list[str]] = []
        self.answers = {
            ("rauc", "--version"): Result(0, "rauc 1.8\n", ""),
            ("rauc", "status", "--detailed"): Result(0, RAUC_STATUS_AFTER_INSTALL, ""),
            ("rauc", "status", "mark-good"): Result(0, "rauc status: marked slot rootfs.0 as good\n", ""),
            ("rauc", "status", "mark-bad"): Result(0, "rauc status: marked slot rootfs.1 as bad\n", ""),
            ("rauc", "info"): Result(0, json.dumps({"compatible": COMPATIBLE, "version": "0.2.0",
                                                     "description": "CYPHONIC adapter", "build": "v0.2.0",
                                                     "hooks": [], "images": []}), ""),
            ("rauc", "install"): Result(0, "installing\n100% Installing done.\n", "Installing `x` succeeded\n"),
            ("systemctl", "show"): Result(0, "NRestarts=0\nActiveState=active\n", ""),
            ("systemctl", "reboot"): Result(0, "", ""),
            ("systemctl", "try-restart"): Result(0, "", ""),
            ("fw_printenv",): Result(0, "BOOT_ORDER=B A\nBOOT_A_LEFT=3\nBOOT_B_LEFT=1\n", ""),
        }
        self.answers.update(answers or {})

    def __call__(self, argv, timeout):
        self.calls.append(list(argv))
        for n in range(len(argv), 0, -1):
            if tuple(argv[:n]) in self.answers:
                return self.answers[tuple(argv[:n])]
        return Result(127, "", f"{argv[0]}: not found")

    def made(self, *prefix) -> list[list[str]]:
        return [c for c in self.calls if tuple(c[:len(prefix)]) == prefix]


class FakeSystem(System):
    """The adapter's answers come from a script (one per ask; the last one repeats)."""

    def __init__(self, paths, runner, answers=(None,)) -> None:
        super().__init__(paths, runner)
        self.answers = list(answers)
        self.asked = 0

    def adapter_status(self, timeout=0.0):
        self.asked += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def site(tmp_path) -> UpdatePaths:
    p = UpdatePaths(update_dir=str(tmp_path / "data/update"), state_dir=str(tmp_path / "data/cyphonic"),
                    release=str(tmp_path / "etc/cyphonic-release"), system_conf=str(tmp_path / "etc/rauc/system.conf"),
                    keyring=str(tmp_path / "etc/rauc/keyring.pem"), boot_env=str(tmp_path / "boot/cyboot.env"),
                    gate_conf=str(tmp_path / "etc/cyphonic/update.toml"), cmdline=str(tmp_path / "proc/cmdline"),
                    boot_id=str(tmp_path / "proc/boot_id"), adapter_socket=str(tmp_path / "run/adapter.sock"),
                    provision_status=str(tmp_path / "run/provision.json"))
    for d in ("data/update", "data/cyphonic", "etc/rauc", "etc/cyphonic", "boot", "proc", "run"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    Path(p.system_conf).write_text(f"[system]\ncompatible={COMPATIBLE}\nbootloader=uboot\n")
    Path(p.release).write_text("cyphonic-adapter-0.1.0-arm64 v0.1.0\n")
    Path(p.boot_env).write_bytes(b"\x12\x34\x56\x78BOOT_ORDER=A B\x00\x00")
    Path(p.gate_conf).write_text("gate_s = 60\n")
    Path(p.provision_status).write_text('{"state": "ok", "errors": []}')
    Path(p.state_dir, "leases.json").write_text('{"leases": 1}')
    boot(p, "A", "boot-1")
    return p


def boot(p: UpdatePaths, slot: str, boot_id: str) -> None:
    Path(p.cmdline).write_text(f"console=ttyAMA0 root=PARTUUID=43594850-0{2 if slot == 'A' else 3} rauc.slot={slot} rw\n")
    Path(p.boot_id).write_text(boot_id + "\n")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def gate(system: System) -> tuple[int, list[str]]:
    lines: list[str] = []
    clock = Clock()
    rc = updater.run_gate(system, out=lines.append, clock=lambda: 5000.0 + clock.t, monotonic=clock.monotonic,
                          sleep=clock.sleep)
    return rc, lines


def write_pending(p: UpdatePaths, pend: U.Pending) -> None:
    Path(p.pending).write_text(json.dumps(pend.to_json()))
    shutil.copytree(p.state_dir, p.snapshot)


def read_last(p: UpdatePaths) -> U.Last:
    return U.parse_file(Path(p.last).read_bytes(), U.Last)


# --- the gate's decision (pure) ---------------------------------------------------------------------

def test_gate_passes_when_as_healthy_as_before():
    st = adapter(tunnels=[tunnel("camera1", rx=840), tunnel("plc1", rx=0)])
    assert U.gate_verdict(pending(), obs(st, elapsed=12), 300) == U.Verdict(U.PASS)


def test_gate_passes_with_a_quiet_node_that_only_has_its_tunnel_back():
    """Risk 6: plc1 sent nothing while the update was installed: its tunnel up is enough."""
    st = adapter(tunnels=[tunnel("camera1", rx=1), tunnel("plc1", rx=0)])
    assert U.gate_verdict(pending(), obs(st), 300).decision == U.PASS


def test_gate_waits_then_fails_on_timeout_with_what_is_missing():
    st = adapter(tunnels=[tunnel("camera1", rx=0), tunnel("plc1", up=False)])
    v = U.gate_verdict(pending(), obs(st, elapsed=10), 300)
    assert v.decision == U.WAIT
    assert "general node camera1 has received no data" in v.reason and "general node plc1 has no tunnel up" in v.reason
    v = U.gate_verdict(pending(), obs(st, elapsed=300), 300)
    assert v.decision == U.FAIL and v.reason.startswith("not healthy after 300 s: ")
    v = U.gate_verdict(pending(), obs(None, elapsed=301), 300)
    assert v == U.Verdict(U.FAIL, "not healthy after 300 s: the adapter does not answer on its status socket")
    v = U.gate_verdict(pending(), obs(adapter("reconnecting"), elapsed=5), 300)
    assert "not logged in to the cloud (state reconnecting)" in v.reason


def test_gate_fails_early_on_restarts_a_failed_unit_or_provisioning():
    assert U.gate_verdict(pending(), obs(None, restarts=3, elapsed=4), 300) == \
        U.Verdict(U.FAIL, "the adapter restarted 3 times")
    assert U.gate_verdict(pending(), obs(None, restarts=2, elapsed=4), 300).decision == U.WAIT
    assert U.gate_verdict(pending(), obs(None, unit="failed"), 300).reason == "the adapter's service failed"
    v = U.gate_verdict(pending(), obs(None, provision={"state": "error", "errors": ["[cloud] key: bad"]}), 300)
    assert v == U.Verdict(U.FAIL, "provisioning failed: [cloud] key: bad")


def test_gate_asks_only_for_what_worked_before():
    """Installed while the adapter did not run (not provisioned yet): booting is enough. Installed
    while the cloud was unreachable: the cloud is not asked for."""
    assert U.gate_verdict(pending(adapter_up=False, cloud_ready=False, nodes={}), obs(None, restarts=7), 300) \
        == U.Verdict(U.PASS)
    no_cloud = pending(cloud_ready=False, nodes={})
    assert U.gate_verdict(no_cloud, obs(adapter("reconnecting")), 300).decision == U.PASS


def test_nodes_at_install_tells_sending_from_quiet_nodes():
    before = adapter(tunnels=[tunnel("camera1", rx=100), tunnel("plc1", rx=50), tunnel("old", up=False, rx=9)])
    after = adapter(tunnels=[tunnel("camera1", rx=900), tunnel("plc1", rx=50), tunnel("old", up=False, rx=9)])
    assert U.nodes_at_install(before, after) == {"camera1": U.NodeBaseline(True, True),
                                                 "plc1": U.NodeBaseline(True, False)}
    assert U.nodes_at_install(None, after) == {"camera1": U.NodeBaseline(True, False),
                                               "plc1": U.NodeBaseline(True, False)}
    assert U.nodes_at_install(before, None) == {}
    assert U.nodes_at_install(before, {"error": "x"}) == {}


@pytest.mark.parametrize("booted,pend,broken,boot_id,expected", [
    ("A", None, False, "boot-2", U.NORMAL),
    ("B", pending(), False, "boot-2", U.TRIAL),
    ("A", pending(), False, "boot-2", U.FALLBACK),          # U-Boot went back (or the gate rebooted)
    ("A", pending(), False, "boot-1", U.WAITING_REBOOT),    # installed with --no-reboot, this boot
    ("B", None, True, "boot-2", U.BROKEN_PENDING),
    ("A", None, True, "boot-2", U.BROKEN_PENDING),
])
def test_boot_action(booted, pend, broken, boot_id, expected):
    assert U.boot_action(booted, pend, broken, boot_id) == expected


def test_fallback_reason_is_the_gates_own_when_it_wrote_one():
    p = pending()
    default = U.fallback_reason(p, None)
    assert default == ("the trial boot of slot B (version 0.2.0) did not reach the health gate "
                       "(crash, hang or watchdog reset)")
    assert U.fallback_reason(p, U.rolled_back(p, 2000.0, "the adapter restarted 3 times")) == \
        "the adapter restarted 3 times"
    older = U.rolled_back(pending(installed_at=10.0), 20.0, "an older update's reason")
    assert U.fallback_reason(p, older) == default


def test_gate_conf():
    assert U.parse_gate_conf(None) == (300, "")
    assert U.parse_gate_conf("gate_s = 45\n") == (45, "")
    assert U.parse_gate_conf("gate_s = 5\n")[0] == 300 and "30..3600" in U.parse_gate_conf("gate_s = 5\n")[1]
    assert U.parse_gate_conf("gate_s = [\n")[0] == 300
    assert U.parse_gate_conf("gate_s = true\n")[0] == 300


# --- the two files --------------------------------------------------------------------------------

def test_pending_and_last_round_trip():
    p = pending()
    assert U.parse_file(json.dumps(p.to_json()).encode(), U.Pending) == p
    assert p.to_json()["installed"] == "1970-01-01T00:16:40Z"
    for last in (U.committed(p, 1300.0, 41.26), U.rolled_back(p, 1300.0, "why")):
        assert U.parse_file(json.dumps(last.to_json()).encode(), U.Last) == last
    assert U.committed(p, 1300.0, 41.26).gate_duration_s == 41.3


@pytest.mark.parametrize("raw,why", [
    (b"", "not JSON"),
    (b"{garbage", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"from_slot": "A"}', "to_slot: missing"),
    (b'{"from_slot": "A", "to_slot": "A"}', "not A to B or B to A"),
    (b" " * (2 << 20), "larger than"),
])
def test_broken_pending_is_an_update_file_error(raw, why):
    with pytest.raises(U.UpdateFileError, match=why):
        U.parse_file(raw, U.Pending)


def test_pending_fields_are_type_checked():
    doc = pending().to_json()
    for key, bad in (("installed_at", "yesterday"), ("adapter_up", 1), ("boot_id", 7), ("nodes", [])):
        with pytest.raises(U.UpdateFileError):
            U.Pending.from_json({**doc, key: bad})
    with pytest.raises(U.UpdateFileError, match="nodes.x"):
        U.Pending.from_json({**doc, "nodes": {"x": {"tunnel": "yes", "data": False}}})
    with pytest.raises(U.UpdateFileError, match="outcome"):
        U.Last.from_json({**U.committed(pending(), 1.0, 1.0).to_json(), "outcome": "maybe"})


# --- the gate on every boot (fake rauc and systemctl) --------------------------------------------------

def test_normal_boot_marks_the_slot_good(site):
    runner = FakeRunner()
    rc, lines = gate(FakeSystem(site, runner))
    assert rc == 0 and lines == ["cyphonic-update-gate: slot A is good (no update pending)"]
    assert runner.made("rauc", "status", "mark-good") == [["rauc", "status", "mark-good", "booted"]]
    assert not runner.made("rauc", "status", "mark-bad") and not runner.made("systemctl", "reboot")
    assert Path(site.boot_env).with_suffix(".bak").read_bytes() == Path(site.boot_env).read_bytes()


def test_not_an_ab_image_does_nothing(site):
    os.unlink(site.system_conf)
    runner = FakeRunner()
    rc, lines = gate(FakeSystem(site, runner))
    assert rc == 0 and "not an A/B image" in lines[0] and runner.calls == []


def test_trial_passes_and_commits(site):
    write_pending(site, pending())
    boot(site, "B", "boot-2")
    healthy = adapter(tunnels=[tunnel("camera1", rx=400), tunnel("plc1")])
    system = FakeSystem(site, FakeRunner(), answers=[None, None, adapter("logging in"), healthy])
    rc, lines = gate(system)
    assert rc == 0
    assert lines[-1] == "cyphonic-update-gate: committed slot B (version 0.2.0) after 6 s"
    assert any("waiting: the adapter does not answer" in ln for ln in lines)
    last = read_last(site)
    assert last.outcome == U.COMMITTED and last.gate_duration_s == 6.0 and last.to_slot == "B"
    assert not os.path.exists(site.pending) and not os.path.exists(site.snapshot)
    assert system.run.made("rauc", "status", "mark-good") == [["rauc", "status", "mark-good", "booted"]]
    assert not system.run.made("systemctl", "reboot")


def test_trial_fails_on_restarts_then_the_old_slot_records_the_rollback(site):
    write_pending(site, pending())
    boot(site, "B", "boot-2")
    runner = FakeRunner({("systemctl", "show"): Result(0, "NRestarts=3\nActiveState=activating\n", "")})
    rc, lines = gate(FakeSystem(site, runner))
    assert lines[-1] == "cyphonic-update-gate: trial of slot B failed: the adapter restarted 3 times; rolling back"
    assert runner.made("rauc", "status", "mark-bad") == [["rauc", "status", "mark-bad", "booted"]]
    assert runner.made("systemctl", "reboot")
    assert read_last(site).reason == "the adapter restarted 3 times"
    assert os.path.exists(site.pending)                  # the old slot's gate finishes the rollback

    boot(site, "A", "boot-3")                             # U-Boot: B has no attempts left
    runner = FakeRunner()
    rc, lines = gate(FakeSystem(site, runner))
    assert lines == ["cyphonic-update-gate: rolled back to slot A: the adapter restarted 3 times"]
    assert runner.made("rauc", "status", "mark-bad") == [["rauc", "status", "mark-bad", "other"]]
    assert runner.made("rauc", "status", "mark-good") == [["rauc", "status", "mark-good", "booted"]]
    assert not os.path.exists(site.pending) and not os.path.exists(site.snapshot)
    last = read_last(site)
    assert last.outcome == U.ROLLED_BACK and last.reason == "the adapter restarted 3 times"
    assert U.rolled_back_unacknowledged(last)


def test_trial_that_rauc_cannot_commit_goes_back(site):
    """mark-good is tried again (rauc's service may be starting); when it never works the trial is
    not committed, and the slot has no boot attempt left anyway: back now, with the reason."""
    write_pending(site, pending(nodes={}))
    boot(site, "B", "boot-2")
    runner = FakeRunner({("rauc", "status", "mark-good"): Result(1, "", "rauc mark: Failed to connect to D-Bus\n")})
    rc, lines = gate(FakeSystem(site, runner, answers=[adapter()]))
    assert len(runner.made("rauc", "status", "mark-good")) == 4
    assert lines[-1] == ("cyphonic-update-gate: trial of slot B failed: rauc cannot mark it good (rauc mark: Failed to "
                         "connect to D-Bus); rolling back")
    assert runner.made("systemctl", "reboot") and read_last(site).outcome == U.ROLLED_BACK


def test_a_gate_that_cannot_write_last_json_still_rolls_back(site):
    write_pending(site, pending())
    boot(site, "B", "boot-2")
    runner = FakeRunner({("systemctl", "show"): Result(0, "NRestarts=0\nActiveState=failed\n", "")})
    system = FakeSystem(site, runner)

    def no_space(path, obj):
        raise OSError(28, "No space left on device")
    system.write = no_space
    rc, lines = gate(system)
    assert lines[-2] == "cyphonic-update-gate: trial of slot B failed: the adapter's service failed; rolling back"
    assert lines[-1] == f"cyphonic-update-gate: cannot write {site.last}: No space left on device"
    assert runner.made("rauc", "status", "mark-bad") and runner.made("systemctl", "reboot")


def test_trial_fails_on_timeout(site):
    write_pending(site, pending())
    boot(site, "B", "boot-2")
    runner = FakeRunner()
    rc, lines = gate(FakeSystem(site, runner, answers=[adapter(tunnels=[tunnel("plc1")])]))
    assert lines[-1] == ("cyphonic-update-gate: trial of slot B failed: not healthy after 60 s: general node camera1 "
                         "has no tunnel up; rolling back")
    assert runner.made("systemctl", "reboot")


def test_fallback_after_a_trial_that_never_reached_the_gate(site):
    write_pending(site, pending())
    boot(site, "A", "boot-2")                             # B crashed / hung / was reset: U-Boot went back
    runner = FakeRunner()
    rc, lines = gate(FakeSystem(site, runner))
    assert lines == ["cyphonic-update-gate: rolled back to slot A: the trial boot of slot B (version 0.2.0) did not "
                     "reach the health gate (crash, hang or watchdog reset)"]
    assert read_last(site).outcome == U.ROLLED_BACK
    assert runner.made("rauc", "status", "mark-bad") == [["rauc", "status", "mark-bad", "other"]]


def test_installed_without_reboot_waits(site):
    write_pending(site, pending(boot_id="boot-1"))
    runner = FakeRunner()
    rc, lines = gate(FakeSystem(site, runner))
    assert "waits for a reboot" in lines[0] and not runner.made("rauc", "status")
    assert os.path.exists(site.pending)


def test_broken_pending_keeps_the_booted_slot(site):
    Path(site.pending).write_text('{"from_slot": "A", "to_slot": ')
    boot(site, "B", "boot-2")
    runner = FakeRunner()
    rc, lines = gate(FakeSystem(site, runner))
    assert "pending.json: not JSON" in lines[0] and "slot B is kept and marked good" in lines[0]
    assert lines[-1] == "cyphonic-update-gate: slot B is good (no update pending)"
    assert not runner.made("rauc", "status", "mark-bad") and not runner.made("systemctl", "reboot")
    assert not os.path.exists(site.pending) and os.path.exists(site.pending + ".broken")


def test_broken_last_json_is_only_shown(site):
    Path(site.last).write_bytes(b"\x00\x01 not json")
    runner = FakeRunner()
    rc, lines = gate(FakeSystem(site, runner))
    assert "it is only shown, never acted on" in lines[0]
    assert lines[-1] == "cyphonic-update-gate: slot A is good (no update pending)"
    assert not runner.made("rauc", "status", "mark-bad")


# --- state across versions --------------------------------------------------------------------------

def test_rollback_restores_the_state_the_trial_migrated(site):
    """A fake format bump: version 0.2.0 migrated the state to FORMAT 2 during its trial (against
    the rule "migrate only after commit"); back on 0.1.0 the copy taken at install comes back and
    the adapter is restarted on it."""
    write_pending(site, pending())
    state = Path(site.state_dir)
    (state / "FORMAT").write_text("2\n")
    (state / "leases.json").write_text('{"leases-v2": 1}')
    (state / "gn").mkdir()
    boot(site, "A", "boot-2")
    runner = FakeRunner()
    rc, lines = gate(FakeSystem(site, runner))
    assert "migrated to format 2" in lines[0] and "format 1" in lines[0]
    assert (state / "leases.json").read_text() == '{"leases": 1}'
    assert not (state / "FORMAT").exists() and not (state / "gn").exists()
    assert runner.made("systemctl", "try-restart")


def test_rollback_keeps_the_state_when_the_format_did_not_change(site):
    write_pending(site, pending())
    (Path(site.state_dir) / "leases.json").write_text('{"leases": 2}')      # a lease given during the trial
    boot(site, "A", "boot-2")
    runner = FakeRunner()
    gate(FakeSystem(site, runner))
    assert (Path(site.state_dir) / "leases.json").read_text() == '{"leases": 2}'
    assert not runner.made("systemctl", "try-restart")


def test_format_marker():
    assert U.parse_format(None) == 1 and U.parse_format("3\n") == 3 and U.parse_format("x") == 1
    assert U.needs_restore(2, 1) and not U.needs_restore(1, 1) and not U.needs_restore(1, 2)


def test_snapshot_is_whole_or_absent(tmp_path):
    state = tmp_path / "state"
    (state / "gn/020000000000").mkdir(parents=True)
    (state / "gn/020000000000/identity").write_bytes(b"key")
    os.chmod(state / "gn/020000000000/identity", 0o600)
    updater.snapshot_state(str(state), str(tmp_path / "snap"))
    copy = tmp_path / "snap/gn/020000000000/identity"
    assert copy.read_bytes() == b"key" and (copy.stat().st_mode & 0o777) == 0o600
    assert not (tmp_path / "snap.tmp").exists()


# --- getting the bundle (real sockets) -----------------------------------------------------------------

@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "v2.raucb").write_bytes(b"bundle-bytes" * 1000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_fetch_downloads_a_served_file(http_server, tmp_path):
    dest = tmp_path / "incoming.raucb"
    n = updater.fetch_url(f"{http_server}/v2.raucb", str(dest), free=1 << 30)
    assert n == 12000 and dest.read_bytes() == b"bundle-bytes" * 1000


def test_fetch_404_is_a_clear_message(http_server, tmp_path):
    dest = tmp_path / "incoming.raucb"
    with pytest.raises(U.UpdateError, match=r"^cannot fetch http://127\.0\.0\.1:\d+/nope\.raucb: HTTP 404 "):
        updater.fetch_url(f"{http_server}/nope.raucb", str(dest), free=1 << 30)
    assert not dest.exists()


def test_fetch_from_a_closed_port(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                                    # nobody listens there now
    with pytest.raises(U.UpdateError, match=rf"^cannot fetch http://127\.0\.0\.1:{port}/x\.raucb: connection refused$"):
        updater.fetch_url(f"http://127.0.0.1:{port}/x.raucb", str(tmp_path / "in"), free=1 << 30)
    assert not (tmp_path / "in").exists()


def test_fetch_from_a_server_that_never_answers(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)                                                  # accepts the connection, says nothing
    try:
        with pytest.raises(U.UpdateError, match=r"cannot fetch .*: no answer"):
            updater.fetch_url(f"http://127.0.0.1:{s.getsockname()[1]}/x.raucb", str(tmp_path / "in"),
                              connect_timeout_s=0.3, free=1 << 30)
    finally:
        s.close()
    assert not (tmp_path / "in").exists()


def test_fetch_refuses_a_bundle_larger_than_the_free_space(http_server, tmp_path):
    with pytest.raises(U.UpdateError, match="does not fit on /data"):
        updater.fetch_url(f"{http_server}/v2.raucb", str(tmp_path / "in"), free=updater.DATA_RESERVE_BYTES + 100)
    assert not (tmp_path / "in").exists()


def test_fetch_bad_urls(tmp_path):
    for url in ("http://", "http://[::1"):
        with pytest.raises(U.UpdateError, match="^cannot fetch "):
            updater.fetch_url(url, str(tmp_path / "in"), free=1 << 30)


def test_stdin(tmp_path):
    dest = tmp_path / "incoming.raucb"
    assert updater.read_stdin(io.BytesIO(b"x" * 3_000_000), str(dest), free=1 << 30) == 3_000_000
    assert dest.stat().st_size == 3_000_000 and (dest.stat().st_mode & 0o777) == 0o600
    with pytest.raises(U.UpdateError, match="nothing on stdin"):
        updater.read_stdin(io.BytesIO(b""), str(dest), free=1 << 30)
    with pytest.raises(U.UpdateError, match="does not fit"):
        updater.read_stdin(io.BytesIO(b"x" * 3_000_000), str(dest), free=updater.DATA_RESERVE_BYTES + 10)
    assert not dest.exists()


# --- cyadm update install ------------------------------------------------------------------------------

def install(site, runner, source, answers=None, **kw):
    before = adapter(tunnels=[tunnel("camera1", rx=100), tunnel("plc1", rx=7)])
    after = adapter(tunnels=[tunnel("camera1", rx=900), tunnel("plc1", rx=7)])
    system = FakeSystem(site, runner, answers=answers or [before, after])
    log: list[str] = []
    result = updater.install(source, system, log=log.append, clock=lambda: 1234.0, sleep=lambda s: None, **kw)
    return result, log


def test_install_records_pending_and_reboots(site, tmp_path):
    bundle = tmp_path / "v2.raucb"
    bundle.write_bytes(b"b" * 100)
    runner = FakeRunner()
    result, log = install(site, runner, str(bundle))
    assert result["to_slot"] == "B" and result["to_version"] == "0.2.0" and result["from_version"] == "0.1.0"
    pend = U.parse_file(Path(site.pending).read_bytes(), U.Pending)
    assert (pend.from_slot, pend.to_slot, pend.boot_id, pend.installed_at) == ("A", "B", "boot-1", 1234.0)
    assert pend.nodes == {"camera1": U.NodeBaseline(True, True), "plc1": U.NodeBaseline(True, False)}
    assert pend.adapter_up and pend.cloud_ready
    assert (Path(site.snapshot) / "leases.json").read_text() == '{"leases": 1}'
    assert runner.made("rauc", "info") == [["rauc", "info", f"--keyring={site.keyring}", "--output-format=json",
                                            str(bundle)]]
    assert runner.made("rauc", "install") == [["rauc", "install", str(bundle)]]
    assert runner.made("systemctl", "reboot") and bundle.exists()        # the operator's own file is kept
    assert any("up to 60 s" in ln for ln in log)


def test_install_no_reboot(site, tmp_path):
    bundle = tmp_path / "v2.raucb"
    bundle.write_bytes(b"b")
    runner = FakeRunner()
    result, log = install(site, runner, str(bundle), reboot=False)
    assert not runner.made("systemctl", "reboot") and "--no-reboot" in log[-1]


def unchanged(site):
    assert not os.path.exists(site.pending) and not os.path.exists(site.snapshot)
    assert not os.path.exists(site.incoming)


def test_install_refused_by_rauc_info_changes_nothing(site):
    runner = FakeRunner({("rauc", "info"): Result(
        1, "", "rauc-Message: 08:00:00.000: Reading bundle: /data/update/incoming.raucb\nrauc-Message: 08:00:00.001: "
               "Verifying bundle signature... \nsignature verification failed: Verify error: unable to get local "
               "issuer certificate\n")})
    with pytest.raises(U.UpdateError) as e:
        install(site, runner, "-", stdin=io.BytesIO(b"not really a bundle"))
    assert str(e.value) == "bundle refused: signature verification failed: Verify error: unable to get local issuer certificate"
    unchanged(site)
    assert not runner.made("rauc", "install") and not runner.made("systemctl", "reboot")


def test_install_refused_by_rauc_install_changes_nothing(site, http_server):
    runner = FakeRunner({("rauc", "install"): Result(
        1, "installing\n  0% Installing\nLastError: Failed to check bundle identifier: Invalid bundle format\n",
        "Installing `/data/update/incoming.raucb` failed\n")})
    with pytest.raises(U.UpdateError, match="^bundle refused: Failed to check bundle identifier: Invalid bundle format$"):
        install(site, runner, f"{http_server}/v2.raucb")
    unchanged(site)


def test_install_refuses_another_systems_bundle(site, tmp_path):
    bundle = tmp_path / "x.raucb"
    bundle.write_bytes(b"b")
    runner = FakeRunner({("rauc", "info"): Result(0, json.dumps({"compatible": "someone-else", "version": "9"}), "")})
    with pytest.raises(U.UpdateError, match="^bundle refused: it is for 'someone-else', this appliance is "
                                            "'cyphonic-adapter-rpi-arm64'$"):
        install(site, runner, str(bundle))
    unchanged(site)


def test_install_from_a_url_that_does_not_answer_changes_nothing(site):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    runner = FakeRunner()
    with pytest.raises(U.UpdateError, match="^cannot fetch .*: connection refused$"):
        install(site, runner, f"http://127.0.0.1:{port}/v2.raucb")
    unchanged(site)
    assert not runner.made("rauc", "info")


def test_install_during_a_trial_is_refused(site, tmp_path):
    write_pending(site, pending())
    boot(site, "B", "boot-2")
    with pytest.raises(U.UpdateError, match="on trial in slot B now"):
        install(site, FakeRunner(), str(tmp_path / "x.raucb"))


def test_install_without_rauc_or_ab_image(site, tmp_path):
    with pytest.raises(U.UpdateError, match="rauc is not installed"):
        install(site, FakeRunner({("rauc", "--version"): Result(127, "", "rauc: not found")}), "x")
    os.unlink(site.system_conf)
    with pytest.raises(U.UpdateError, match="not an A/B image"):
        install(site, FakeRunner(), "x")


def test_install_of_a_missing_file(site):
    with pytest.raises(U.UpdateError, match="no such file: /nonexistent.raucb"):
        install(site, FakeRunner(), "/nonexistent.raucb")


# --- cyadm update status, ack, and the line in cyadm status -------------------------------------------

def test_parse_rauc_status_of_rauc_1_8():
    st = U.parse_rauc_status(RAUC_STATUS_AFTER_INSTALL)
    assert st["booted"] == "A" and st["primary"] == "B" and st["compatible"] == COMPATIBLE
    assert [(s["bootname"], s["name"], s["state"], s["boot_status"], s["version"]) for s in st["slots"]] == \
        [("A", "rootfs.0", "booted", "good", None), ("B", "rootfs.1", "inactive", "good", "0.2.0")]
    assert st["slots"][1]["installed"] == "2026-12-06T08:01:12Z"
    # booted as a device (no rauc.slot= on the command line), no --detailed, no primary
    doc = json.loads(RAUC_STATUS_AFTER_INSTALL)
    doc["booted"], doc["boot_primary"] = "/dev/disk/by-partuuid/43594850-03", None
    for entry in doc["slots"]:
        for s in entry.values():
            s.pop("slot_status")
    st = U.parse_rauc_status(json.dumps(doc))
    assert st["booted"] == "B" and st["primary"] is None and st["slots"][1]["version"] is None
    for bad in ("", "[]", '{"slots": 3}'):
        with pytest.raises(U.UpdateError):
            U.parse_rauc_status(bad)


def test_update_status_document_and_rendering(site):
    write_pending(site, pending())
    Path(site.last).write_text(json.dumps(U.rolled_back(pending(installed_at=10.0, to_version="0.1.9"), 99.0,
                                                        "the adapter restarted 3 times").to_json()))
    runner = FakeRunner()
    doc = updater.status(FakeSystem(site, runner))
    assert set(doc) == {"booted", "primary", "compatible", "release", "slots", "boot_env", "pending",
                        "pending_problem", "last", "last_problem"}
    assert doc["booted"] == "A" and doc["primary"] == "B"
    assert doc["boot_env"] == {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "1"}
    assert doc["release"] == {"name": "cyphonic-adapter-0.1.0-arm64", "version": "0.1.0", "build": "v0.1.0"}
    assert doc["pending"]["state"] == "waiting for reboot" and doc["last"]["outcome"] == "rolled-back"
    text = "\n".join(U.render_status(doc))
    assert text.splitlines()[0] == "booted slot A: cyphonic-adapter-0.1.0-arm64 (v0.1.0)"
    assert ("  slot B (/dev/disk/by-partuuid/43594850-03): inactive, good, next boot; version 0.2.0, installed "
            "2026-12-06T08:01:12Z; boot attempts left 1") in text
    assert "  boot order B A" in text
    assert "pending update: 0.1.0 (slot A) -> 0.2.0 (slot B)" in text and "reboot to try it" in text
    assert "last update: 0.1.9 ROLLED BACK to 0.1.0 (slot A) at 1970-01-01T00:01:39Z: the adapter restarted 3 times" \
        in text
    json.dumps(doc)                                                     # --json can print it


def test_update_status_with_broken_files(site):
    Path(site.pending).write_text("nonsense")
    Path(site.last).write_text("[1, 2]")
    doc = updater.status(FakeSystem(site, FakeRunner()))
    text = "\n".join(U.render_status(doc))
    assert "pending update: unreadable" in text and "last update: unknown (last.json unreadable" in text


def test_update_status_when_rauc_fails(site):
    with pytest.raises(U.UpdateError, match="rauc status failed: rauc status: error"):
        updater.status(FakeSystem(site, FakeRunner({("rauc", "status", "--detailed"): Result(
            1, "", "rauc status: error\n")})))


def test_ack_and_summary_line(site):
    assert updater.summary(site) is None
    p = pending()
    Path(site.last).write_text(json.dumps(U.rolled_back(p, 99.0, "the adapter restarted 3 times").to_json()))
    line = updater.summary(site)
    assert line.startswith("update: last 0.2.0 ROLLED BACK to 0.1.0") and "cyadm update ack" in line
    system = FakeSystem(site, FakeRunner())
    assert updater.acknowledge(system).startswith("acknowledged: the rollback of 0.2.0")
    assert read_last(site).acknowledged and not U.rolled_back_unacknowledged(read_last(site))
    assert "cyadm update ack" not in updater.summary(site)
    write_pending(site, p)
    assert updater.summary(site) == "update: 0.2.0 installed in slot B, waiting for a reboot"
    boot(site, "B", "boot-2")
    assert updater.summary(site) == "update: 0.2.0 on trial in slot B (health gate running)"
    Path(site.last).write_text(json.dumps(U.committed(p, 99.0, 5).to_json()))
    assert updater.acknowledge(system) == "nothing to acknowledge: the last update did not roll back"


def test_cyadm_update_commands(site, monkeypatch):
    from click.testing import CliRunner

    from appliance import cyadm
    monkeypatch.setattr(cyadm, "_update_system", lambda: FakeSystem(site, FakeRunner()))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    r = CliRunner().invoke(cyadm.main, ["update", "status"])
    assert r.exit_code == 1 and "needs root" in r.output
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    r = CliRunner().invoke(cyadm.main, ["update", "status", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["booted"] == "A"
    r = CliRunner().invoke(cyadm.main, ["update", "status"])
    assert r.exit_code == 0 and "last update: none" in r.output
    r = CliRunner().invoke(cyadm.main, ["update", "install", "/nonexistent.raucb", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout) == {"installed": False, "error": "no such file: /nonexistent.raucb"}
    r = CliRunner().invoke(cyadm.main, ["update", "ack"])
    assert r.exit_code == 0 and "nothing to acknowledge" in r.output
    r = CliRunner().invoke(cyadm.main, ["update", "install", "--help"])
    for opt in ("--no-reboot", "--json", "--timeout"):
        assert opt in r.output


def test_cyadm_status_has_one_line_about_updates(site, monkeypatch, capsys):
    from appliance import cyadm
    monkeypatch.setattr(cyadm, "_update_system", lambda: FakeSystem(site, FakeRunner()))
    cyadm._print_update_line()
    assert capsys.readouterr().out == ""                                # no update yet: nothing
    Path(site.last).write_text(json.dumps(U.committed(pending(), 99.0, 41).to_json()))
    cyadm._print_update_line()
    assert capsys.readouterr().out == ("\n  update: last 0.2.0 committed on slot B at 1970-01-01T00:01:39Z "
                                       "(health gate passed after 41 s)\n")


def test_gate_entry_point_is_installed():
    import tomllib
    scripts = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cyphonic-update-gate"] == "appliance.updater:gate_main"


# --- with the host's rauc: real signatures ----------------------------------------------------------------

OPENSSL_CNF = """[req]
distinguished_name = dn
[dn]
[v3_ca]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_leaf]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _run(argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)
    assert r.returncode == 0, f"{argv}: {r.stderr}"


def make_ca_and_signer(d: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA (EC P-256) and a signing certificate issued by it, as image/README.md ("Update keys") makes them."""
    cnf = d / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(["openssl", "req", "-x509", "-new", *ec, "-keyout", d / f"{name}-ca.key", "-out", d / f"{name}-ca.pem",
          "-days", "3650", "-subj", f"/O=test/CN={name} update CA", "-config", cnf, "-extensions", "v3_ca"])
    _run(["openssl", "req", "-new", *ec, "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
          "-subj", f"/O=test/CN={name} update signing", "-config", cnf])
    _run(["openssl", "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / f"{name}-ca.pem", "-CAkey",
          d / f"{name}-ca.key", "-CAcreateserial", "-out", d / f"{name}.pem", "-days", "3650",
          "-extfile", cnf, "-extensions", "v3_leaf"])
    return d / f"{name}-ca.pem", d / f"{name}.pem", d / f"{name}.key"


def test_real_bundles_accepted_and_refused(tmp_path, site):
    for tool in ("rauc", "mksquashfs", "openssl"):
        assert shutil.which(tool), f"{tool} is missing: `make setup` installs it (rauc, squashfs-tools, openssl)"
    ca, cert, key = make_ca_and_signer(tmp_path, "good")
    _, rogue_cert, rogue_key = make_ca_and_signer(tmp_path, "rogue")
    content = tmp_path / "bundle"
    content.mkdir()
    (content / "rootfs.ext4").write_bytes(os.urandom(64 << 10))
    (content / "manifest.raucm").write_text(
        f"[update]\ncompatible={COMPATIBLE}\nversion=0.2.0\ndescription=CYPHONIC adapter\nbuild=v0.2.0-test\n"
        "[bundle]\nformat=verity\n[image.rootfs]\nfilename=rootfs.ext4\n")
    for name, c, k in (("good", cert, key), ("rogue", rogue_cert, rogue_key)):
        _run(["rauc", "bundle", f"--cert={c}", f"--key={k}", content, tmp_path / f"{name}.raucb"])
    good = tmp_path / "good.raucb"
    truncated = tmp_path / "truncated.raucb"
    truncated.write_bytes(good.read_bytes()[:20000])

    system = System(UpdatePaths(**{**site.__dict__, "keyring": str(ca)}))
    info = system.bundle_info(str(good))
    assert info == {"compatible": COMPATIBLE, "version": "0.2.0", "description": "CYPHONIC adapter",
                    "build": "v0.2.0-test"}
    with pytest.raises(U.UpdateError, match=r"^bundle refused: signature verification failed: Verify error: "):
        system.bundle_info(str(tmp_path / "rogue.raucb"))
    with pytest.raises(U.UpdateError, match=r"^bundle refused: Invalid bundle format: "):
        system.bundle_info(str(truncated))


def test_the_gate_unit_fits_the_code():
    """rootfs-overlay's cyphonic-update-gate.service: a oneshot after the adapter, with /data and the
    boot partition mounted, its lines on the console, and a start timeout above the longest gate."""
    import configparser
    from appliance.constants import GATE_MAX_S
    unit = Path(__file__).resolve().parent.parent / "rootfs-overlay/etc/systemd/system/cyphonic-update-gate.service"
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(unit.read_text())
    assert cp["Service"]["Type"] == "oneshot" and cp["Service"]["RemainAfterExit"] == "yes"
    assert {"cyphonic-adapter.service", "network-online.target", "dbus.service"} <= set(cp["Unit"]["After"].split())
    assert set(cp["Unit"]["RequiresMountsFor"].split()) == {"/data", "/boot/firmware"}
    assert cp["Service"]["ExecStart"] == "/opt/cyphonic/venv/bin/cyphonic-update-gate"
    assert cp["Service"]["StandardOutput"] == "journal+console"
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    timeout = cp["Service"]["TimeoutStartSec"]
    assert timeout.endswith("min") and int(timeout[:-3]) * 60 > GATE_MAX_S + 120
    assert UpdatePaths().update_dir == "/data/update" and UpdatePaths().boot_env.startswith("/boot/firmware/")
