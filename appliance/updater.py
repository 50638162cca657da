"""The edge of signed A/B updates: `cyadm update install|status|ack` and `cyphonic-update-gate`.

The rules are in appliance/update.py (pure); this runs the tools and touches the files:
``rauc`` (info, install, status, mark-good/-bad; RAUC 1.8 through its D-Bus service),
``fw_printenv`` (U-Boot's environment on the boot partition), ``systemctl`` (the adapter's
restarts, reboot), the adapter's status socket, and the update directory on the data partition::

    /data/update/incoming.raucb     a bundle downloaded or read from stdin (removed once installed)
    /data/update/pending.json       an update installed and not committed yet
    /data/update/last.json          the last update's outcome
    /data/update/state-before/      the state directory as it was at install (rollback restores
                                    it when the trial's version migrated the state's FORMAT)

Every command goes through a ``Runner`` (injectable: tests fake rauc and systemctl) with a
timeout; every file is written atomically (cyphonic/atomic_file.py). `install` changes nothing
until the bundle is accepted: on any refusal pending.json, the snapshot and the downloaded file
are removed again.

`cyphonic-update-gate` runs on every boot (rootfs-overlay/etc/systemd/system/
cyphonic-update-gate.service) and prints one line starting ``cyphonic-update-gate:`` for each
outcome (update.line_*); it exits 0 whatever happens (a failing gate must not fail the boot),
except when it cannot even tell which slot is booted on an A/B image.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from typing import BinaryIO, Callable

from cyphonic.atomic_file import write_atomic, write_json_atomic

from . import update as U
from .constants import (DATA_RESERVE_BYTES, FETCH_CHUNK_BYTES, FETCH_CONNECT_TIMEOUT_S, FETCH_TOTAL_S,
                        GATE_ASK_TIMEOUT_S, GATE_MARK_RETRIES, GATE_MAX_S, GATE_POLL_S, INSTALL_SAMPLE_GAP_S,
                        RAUC_INFO_TIMEOUT_S, RAUC_INSTALL_TIMEOUT_S, UPDATE_CMD_TIMEOUT_S)

DEFAULT_COMPATIBLE = "cyphonic-adapter-rpi-arm64"
ADAPTER_UNIT = "cyphonic-adapter.service"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[list[str], float], Result]


def run_command(argv: list[str], timeout: float) -> Result:
    """The real runner: a missing program is exit 127, a timeout exit 124 (as the shell says)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return Result(127, "", f"{argv[0]}: not found")
    except subprocess.TimeoutExpired:
        return Result(124, "", f"{argv[0]}: no answer within {timeout:.0f} s")
    except OSError as exc:
        return Result(126, "", f"{argv[0]}: {exc}")
    return Result(r.returncode, r.stdout, r.stderr)


@dataclass(frozen=True)
class UpdatePaths:
    update_dir: str = "/data/update"
    state_dir: str = "/var/lib/cyphonic"           # a bind mount of /data/cyphonic
    release: str = "/etc/cyphonic-release"
    system_conf: str = "/etc/rauc/system.conf"
    keyring: str = "/etc/rauc/keyring.pem"
    boot_env: str = "/boot/firmware/cyboot.env"
    gate_conf: str = "/etc/cyphonic/update.toml"   # written by cyphonic-provision ([update] gate_s)
    cmdline: str = "/proc/cmdline"
    # read only; spelled in parts: tests/test_rootfs_overlay.py counts the /proc/sys paths in
    # appliance/ as ones the adapter writes
    boot_id: str = os.path.join("/proc", "sys", "kernel", "random", "boot_id")
    adapter_socket: str = "/run/cyphonic/adapter.sock"
    provision_status: str = "/run/cyphonic/provision.json"

    @property
    def incoming(self) -> str:
        return os.path.join(self.update_dir, "incoming.raucb")

    @property
    def pending(self) -> str:
        return os.path.join(self.update_dir, "pending.json")

    @property
    def last(self) -> str:
        return os.path.join(self.update_dir, "last.json")

    @property
    def snapshot(self) -> str:
        return os.path.join(self.update_dir, "state-before")


def _read_text(path: str, limit: int = 1 << 20) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def read_update_file(path: str, cls):
    """(Pending|Last or None, problem): a missing file is (None, ""), a broken one (None, why)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(U.UPDATE_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}"
    try:
        return U.parse_file(raw, cls), ""
    except U.UpdateFileError as exc:
        return None, f"{path}: {exc}"


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


class System:
    """The appliance's tools and files, as the update code needs them."""

    def __init__(self, paths: UpdatePaths = UpdatePaths(), runner: Runner = run_command) -> None:
        self.paths = paths
        self.run = runner

    # --- rauc -------------------------------------------------------------------------------------
    def require_ab(self) -> None:
        """An A/B image with RAUC, or an UpdateError that says what is missing."""
        if not os.path.exists(self.paths.system_conf):
            raise U.UpdateError(f"this system is not an A/B image ({self.paths.system_conf} is missing): "
                                f"updates need a card flashed with an image from issue 14 on; reflash it once "
                                f"(docs/appliance.md)")
        r = self.run(["rauc", "--version"], UPDATE_CMD_TIMEOUT_S)
        if r.returncode == 127:
            raise U.UpdateError("rauc is not installed: this system cannot take update bundles")

    def compatible(self) -> str:
        text = _read_text(self.paths.system_conf) or ""
        for line in text.splitlines():
            k, sep, v = line.partition("=")
            if sep and k.strip() == "compatible":
                return v.strip()
        return DEFAULT_COMPATIBLE

    def rauc_status(self) -> dict:
        r = self.run(["rauc", "status", "--detailed", "--output-format=json"], UPDATE_CMD_TIMEOUT_S)
        if r.returncode != 0:
            raise U.UpdateError(f"rauc status failed: {U.rauc_message(r.stdout, r.stderr)}")
        return U.parse_rauc_status(r.stdout)

    def bundle_info(self, path: str) -> dict:
        """The bundle's signature, format and compatible checked by rauc info against the keyring."""
        r = self.run(["rauc", "info", f"--keyring={self.paths.keyring}", "--output-format=json", path],
                     RAUC_INFO_TIMEOUT_S)
        if r.returncode != 0:
            raise U.UpdateError(f"bundle refused: {U.rauc_message(r.stdout, r.stderr)}")
        return U.parse_rauc_info(r.stdout, self.compatible())

    def rauc_install(self, path: str) -> None:
        r = self.run(["rauc", "install", path], RAUC_INSTALL_TIMEOUT_S)
        if r.returncode != 0:
            raise U.UpdateError(f"bundle refused: {U.rauc_message(r.stdout, r.stderr)}")

    def mark(self, state: str, which: str = "booted") -> str:
        """rauc status mark-good|mark-bad [booted|other]: "" when done, else why not."""
        r = self.run(["rauc", "status", f"mark-{state}", which], UPDATE_CMD_TIMEOUT_S)
        return "" if r.returncode == 0 else U.rauc_message(r.stdout, r.stderr)

    # --- the boot -----------------------------------------------------------------------------------
    def booted(self) -> str | None:
        slot = U.booted_from_cmdline(_read_text(self.paths.cmdline) or "")
        if slot:
            return slot
        try:
            return self.rauc_status()["booted"]
        except U.UpdateError:
            return None

    def boot_id(self) -> str:
        return (_read_text(self.paths.boot_id) or "").strip()

    def fw_env(self) -> dict:
        r = self.run(["fw_printenv", "BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT"], UPDATE_CMD_TIMEOUT_S)
        return U.parse_fw_env(r.stdout)

    def backup_boot_env(self) -> str:
        """cyboot.env -> cyboot.bak (risk 3: one copy on FAT; boot.scr may fall back to the copy)."""
        src = self.paths.boot_env
        try:
            with open(src, "rb") as f:
                data = f.read()
            write_atomic(os.path.splitext(src)[0] + ".bak", data, mode=None)
        except OSError as exc:
            return f"cannot copy {src}: {exc.strerror or exc}"
        return ""

    def release(self) -> dict:
        return U.parse_release(_read_text(self.paths.release))

    def gate_s(self) -> tuple[int, str]:
        return U.parse_gate_conf(_read_text(self.paths.gate_conf))

    # --- the adapter --------------------------------------------------------------------------------
    def adapter_status(self, timeout: float = GATE_ASK_TIMEOUT_S) -> dict | None:
        from .cyadm import ask
        try:
            st = ask(self.paths.adapter_socket, "status", timeout=timeout)
        except (OSError, ValueError):
            return None
        return st if isinstance(st, dict) and "error" not in st else None

    def adapter_unit(self) -> tuple[int | None, str]:
        """(NRestarts, ActiveState) of the adapter's unit; (None, "") when systemctl cannot say."""
        r = self.run(["systemctl", "show", "-p", "NRestarts", "-p", "ActiveState", ADAPTER_UNIT],
                     UPDATE_CMD_TIMEOUT_S)
        props = dict(line.partition("=")[::2] for line in r.stdout.splitlines() if "=" in line)
        try:
            restarts = int(props.get("NRestarts", ""))
        except ValueError:
            restarts = None
        return restarts, props.get("ActiveState", "").strip()

    def provision(self) -> dict | None:
        """/run/cyphonic/provision.json (None: not written, or unreadable)."""
        try:
            doc = json.loads(_read_text(self.paths.provision_status) or "null")
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def restart_adapter(self) -> None:
        self.run(["systemctl", "try-restart", ADAPTER_UNIT], UPDATE_CMD_TIMEOUT_S)

    def reboot(self) -> str:
        r = self.run(["systemctl", "reboot"], UPDATE_CMD_TIMEOUT_S)
        return "" if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")

    # --- the update directory -----------------------------------------------------------------------
    def pending(self):
        return read_update_file(self.paths.pending, U.Pending)

    def last(self):
        return read_update_file(self.paths.last, U.Last)

    def write(self, path: str, obj) -> None:
        os.makedirs(self.paths.update_dir, mode=0o700, exist_ok=True)
        write_json_atomic(path, obj.to_json(), mode=0o600)


# --- getting the bundle -----------------------------------------------------------------------------

def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _too_big(size: int, free: int) -> U.UpdateError:
    return U.UpdateError(f"the bundle ({size / 2**20:.0f} MiB or more) does not fit on /data: "
                         f"{free / 2**20:.0f} MiB free, {DATA_RESERVE_BYTES >> 20} MiB must stay free")


def _copy_bounded(src: BinaryIO, dest: str, limit: int, deadline: float | None, what: str,
                  clock: Callable[[], float] = time.monotonic) -> int:
    """`src` into `dest` (0600), at most `limit` bytes, before `deadline`; `dest` removed on error."""
    written = 0
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            while True:
                if deadline is not None and clock() > deadline:
                    raise U.UpdateError(f"cannot fetch {what}: not complete within the time allowed "
                                        f"({written >> 20} MiB so far)")
                chunk = src.read(FETCH_CHUNK_BYTES)
                if not chunk:
                    break
                written += len(chunk)
                if written > limit:
                    raise _too_big(written, limit + DATA_RESERVE_BYTES)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        _remove(dest)
        raise
    return written


def fetch_url(url: str, dest: str, *, total_s: float = FETCH_TOTAL_S,
              connect_timeout_s: float = FETCH_CONNECT_TIMEOUT_S, free: int | None = None) -> int:
    """Download `url` (http or https) to `dest`; UpdateError "cannot fetch URL: reason" on any
    failure (nothing left behind). The bundle's signature, not the transport, makes it trusted."""
    free = free_bytes(os.path.dirname(dest)) if free is None else free
    limit = max(0, free - DATA_RESERVE_BYTES)
    deadline = time.monotonic() + total_s
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "cyadm-update"})
        with urllib.request.urlopen(req, timeout=connect_timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise _too_big(int(length), free)
            return _copy_bounded(resp, dest, limit, deadline, url)
    except urllib.error.HTTPError as exc:
        raise U.UpdateError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise U.UpdateError(f"cannot fetch {url}: {_reason(exc.reason)}") from None
    except (socket.timeout, TimeoutError):
        raise U.UpdateError(f"cannot fetch {url}: no answer within {connect_timeout_s:.0f} s") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise U.UpdateError(f"cannot fetch {url}: /data is full") from None
        raise U.UpdateError(f"cannot fetch {url}: {_reason(exc)}") from None


def _reason(exc) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer (timed out)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def read_stdin(stream: BinaryIO, dest: str, *, free: int | None = None) -> int:
    """`cyadm update install -`: the bundle from stdin to `dest` (/tmp is too small on a Pi 3)."""
    free = free_bytes(os.path.dirname(dest)) if free is None else free
    size = _copy_bounded(stream, dest, max(0, free - DATA_RESERVE_BYTES), None, "stdin")
    if size == 0:
        _remove(dest)
        raise U.UpdateError("nothing on stdin: use `cyadm update install - < bundle.raucb`")
    return size


# --- the state snapshot --------------------------------------------------------------------------

def snapshot_state(state_dir: str, snapshot: str) -> None:
    """Copy the state directory (KBs: identities, registry, leases, token) to `snapshot`, whole
    or not at all (copied beside it, then renamed)."""
    tmp = snapshot + ".tmp"
    _remove(tmp)
    shutil.copytree(state_dir, tmp, symlinks=True)
    _remove(snapshot)
    os.replace(tmp, snapshot)


def restore_state(snapshot: str, state_dir: str) -> None:
    """Put the snapshot back into the state directory (a mount point: emptied, then filled).
    Repeatable: a crash in the middle leaves pending.json and the snapshot, and the next boot
    restores again."""
    for name in os.listdir(state_dir):
        _remove(os.path.join(state_dir, name))
    for name in os.listdir(snapshot):
        src, dst = os.path.join(snapshot, name), os.path.join(state_dir, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)


def state_format(directory: str) -> int:
    return U.parse_format(_read_text(os.path.join(directory, U.FORMAT_FILE)))


# --- cyadm update install ---------------------------------------------------------------------------

def install(source: str, system: System, *, reboot: bool = True, total_s: float = FETCH_TOTAL_S,
            stdin: BinaryIO | None = None, log: Callable[[str], None] = print,
            clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Install the bundle at `source` (a file, an http(s) URL, or "-" for stdin) into the other
    slot. Raises UpdateError with the operator's message; nothing is changed then."""
    p = system.paths
    system.require_ab()
    booted = system.booted()
    if booted is None:
        raise U.UpdateError("cannot tell which slot is booted (no rauc.slot= on the kernel command line, "
                            "rauc status does not say)")
    pending, problem = system.pending()
    if pending is not None and booted == pending.to_slot and pending.boot_id != system.boot_id():
        raise U.UpdateError(f"version {pending.to_version} is on trial in slot {pending.to_slot} now: wait until "
                            f"the health gate commits it or rolls back (cyadm update status)")
    started = time.monotonic()
    before = system.adapter_status()
    os.makedirs(p.update_dir, mode=0o700, exist_ok=True)
    downloaded = source == "-" or source.startswith(("http://", "https://"))
    path = p.incoming if downloaded else os.path.abspath(source)
    try:
        if source == "-":
            size = read_stdin(stdin if stdin is not None else sys.stdin.buffer, path)
            log(f"read {size / 2**20:.1f} MiB from stdin")
        elif downloaded:
            log(f"downloading {source} ...")
            size = fetch_url(source, path, total_s=total_s)
            log(f"downloaded {size / 2**20:.1f} MiB")
        elif not os.path.isfile(path):
            raise U.UpdateError(f"no such file: {source}")
        info = system.bundle_info(path)
        status = system.rauc_status()
        from_version = system.release().get("version") or next(
            (s.get("version") for s in status["slots"] if s["bootname"] == booted), None) or "unknown"
        to_slot = U.other_slot(booted)
        gap = INSTALL_SAMPLE_GAP_S - (time.monotonic() - started)
        if before is not None and gap > 0:
            sleep(gap)
        after = system.adapter_status()
        pending = U.Pending(from_slot=booted, to_slot=to_slot, from_version=from_version,
                            to_version=info["version"], installed_at=clock(), boot_id=system.boot_id(),
                            adapter_up=after is not None, cloud_ready=U.cloud_state(after) == "ready",
                            nodes=U.nodes_at_install(before, after))
        if os.path.isdir(p.state_dir):
            snapshot_state(p.state_dir, p.snapshot)
        system.write(p.pending, pending)
        log(f"installing version {info['version']} into slot {to_slot} (this takes a few minutes) ...")
        system.rauc_install(path)
        system.backup_boot_env()          # rauc set the new slot first in BOOT_ORDER
    except BaseException:
        _remove(p.pending)
        _remove(p.snapshot)
        if downloaded:
            _remove(path)
        raise
    if downloaded:
        _remove(path)
    result = {"installed": True, "from_slot": booted, "to_slot": to_slot, "from_version": from_version,
              "to_version": info["version"], "build": info.get("build"), "adapter_up": pending.adapter_up,
              "cloud_ready": pending.cloud_ready,
              "nodes": {k: {"tunnel": v.tunnel, "data": v.data} for k, v in pending.nodes.items()},
              "reboot": reboot}
    gate_s, _ = system.gate_s()
    log(f"installed version {info['version']} into slot {to_slot}; after the reboot the health gate gives it "
        f"up to {gate_s} s to be as healthy as now, then commits it or goes back to slot {booted} by itself")
    if not pending.adapter_up:
        log("note: the adapter does not answer now, so the gate only checks that the new version boots")
    if reboot:
        log("rebooting")
        why = system.reboot()
        if why:
            raise U.UpdateError(f"installed, but the reboot failed ({why}): reboot by hand to try it")
    else:
        log("not rebooting (--no-reboot): the new version is tried at the next boot")
    return result


def status(system: System) -> dict:
    """`cyadm update status --json`."""
    system.require_ab()
    rauc = system.rauc_status()
    pending, pending_problem = system.pending()
    last, last_problem = system.last()
    booted = U.booted_from_cmdline(_read_text(system.paths.cmdline) or "") or rauc.get("booted")
    return U.status_document(rauc=rauc, fw_env=system.fw_env(), release=system.release(), pending=pending,
                             pending_problem=pending_problem, last=last, last_problem=last_problem, booted=booted)


def acknowledge(system: System) -> str:
    """`cyadm update ack`: the LED stops showing a rollback."""
    last, problem = system.last()
    if problem:
        raise U.UpdateError(f"cannot acknowledge: {problem}")
    if last is None or last.outcome != U.ROLLED_BACK:
        return "nothing to acknowledge: the last update did not roll back"
    if not last.acknowledged:
        system.write(system.paths.last, replace(last, acknowledged=True))
    return f"acknowledged: the rollback of {last.to_version} ({last.reason})"


def summary(paths: UpdatePaths = UpdatePaths()) -> str | None:
    """The one line `cyadm status` shows (files only, no tools): None when there is nothing."""
    if not os.path.isdir(paths.update_dir):
        return None
    pending, pp = read_update_file(paths.pending, U.Pending)
    last, lp = read_update_file(paths.last, U.Last)
    return U.summary_line(pending, pp, last, lp, U.booted_from_cmdline(_read_text(paths.cmdline) or ""))


# --- the gate (every boot) --------------------------------------------------------------------------

def run_gate(system: System, *, out: Callable[[str], None] = print, clock: Callable[[], float] = time.time,
             monotonic: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    p = system.paths
    if not os.path.exists(p.system_conf):
        out(f"{U.GATE_PREFIX} not an A/B image ({p.system_conf} is missing): nothing to do")
        return 0
    booted = system.booted()
    if booted is None:
        out(f"{U.GATE_PREFIX} cannot tell which slot is booted (no rauc.slot= on the kernel command line, and "
            f"rauc status does not say); nothing marked")
        return 1
    pending, problem = system.pending()
    last, last_problem = system.last()
    if last_problem:
        out(f"{U.GATE_PREFIX} note: {last_problem}; it is only shown, never acted on")
    action = U.boot_action(booted, pending, bool(problem), system.boot_id())
    if action == U.WAITING_REBOOT:
        out(f"{U.GATE_PREFIX} version {pending.to_version} is installed in slot {pending.to_slot} and waits for "
            f"a reboot")
        return 0
    if action == U.TRIAL:
        return _trial(system, pending, out=out, clock=clock, monotonic=monotonic, sleep=sleep)
    if action == U.FALLBACK:
        _fallback(system, pending, last, out=out, clock=clock)
    elif action == U.BROKEN_PENDING:
        out(f"{U.GATE_PREFIX} {problem}: no trial is assumed; slot {booted} is kept and marked good "
            f"(the file is kept as pending.json.broken)")
        try:
            os.replace(p.pending, p.pending + ".broken")
        except OSError:
            _remove(p.pending)
        _remove(p.snapshot)
    why = system.mark("good")
    system.backup_boot_env()
    if why:
        out(f"{U.GATE_PREFIX} cannot mark slot {booted} good: {why}")
    elif action != U.FALLBACK:
        out(U.line_good(booted))
    return 0


def _record(system: System, path: str, obj, out) -> None:
    """last.json, in the gate: a write that fails is said, and the gate carries on (committing or
    rolling back matters more than the record of it)."""
    try:
        system.write(path, obj)
    except OSError as exc:
        out(f"{U.GATE_PREFIX} cannot write {path}: {exc.strerror or exc}")


def _trial(system: System, pending: U.Pending, *, out, clock, monotonic, sleep) -> int:
    p = system.paths
    gate_s, problem = system.gate_s()
    if problem:
        out(f"{U.GATE_PREFIX} {p.gate_conf}: {problem}")
    gate_s = min(gate_s, GATE_MAX_S)
    out(f"{U.GATE_PREFIX} trial of slot {pending.to_slot} (version {pending.to_version}): waiting up to {gate_s} s "
        f"for the adapter" + (f", the cloud and {len(pending.nodes)} general node(s)" if pending.adapter_up else ""))
    start = monotonic()
    last_wait = ""
    while True:
        restarts, unit_state = system.adapter_unit()
        obs = U.Observation(status=system.adapter_status(), restarts=restarts, unit_state=unit_state,
                            provision=system.provision(), elapsed_s=monotonic() - start)
        verdict = U.gate_verdict(pending, obs, gate_s)
        if verdict.decision == U.PASS:
            why = system.mark("good")
            for _ in range(GATE_MARK_RETRIES):
                if not why:
                    break
                sleep(GATE_POLL_S)                # rauc's D-Bus service may still be starting
                why = system.mark("good")
            if why:
                # not committed: U-Boot has no attempts left for this slot, the next boot goes back
                out(U.line_trial_failed(pending.to_slot, f"rauc cannot mark it good ({why})"))
                _record(system, p.last, U.rolled_back(pending, clock(), f"rauc could not mark slot "
                                                                       f"{pending.to_slot} good: {why}"), out)
                system.reboot()
                return 0
            _record(system, p.last, U.committed(pending, clock(), obs.elapsed_s), out)
            _remove(p.pending)
            _remove(p.snapshot)
            system.backup_boot_env()
            out(U.line_committed(pending.to_slot, pending.to_version, obs.elapsed_s))
            return 0
        if verdict.decision == U.FAIL:
            out(U.line_trial_failed(pending.to_slot, verdict.reason))
            _record(system, p.last, U.rolled_back(pending, clock(), verdict.reason), out)
            why = system.mark("bad")
            if why:
                out(f"{U.GATE_PREFIX} rauc mark-bad failed ({why}); U-Boot has no attempts left for slot "
                    f"{pending.to_slot} anyway")
            system.backup_boot_env()
            why = system.reboot()
            if why:
                out(f"{U.GATE_PREFIX} systemctl reboot failed ({why}): the next reboot goes back to "
                    f"slot {pending.from_slot}")
            return 0
        if verdict.reason != last_wait:
            out(f"{U.GATE_PREFIX} waiting: {verdict.reason}")
            last_wait = verdict.reason
        sleep(GATE_POLL_S)


def _fallback(system: System, pending: U.Pending, last: U.Last | None, *, out, clock) -> None:
    p = system.paths
    reason = U.fallback_reason(pending, last)
    if os.path.isdir(p.snapshot) and os.path.isdir(p.state_dir):
        now_fmt, before_fmt = state_format(p.state_dir), state_format(p.snapshot)
        if U.needs_restore(now_fmt, before_fmt):
            try:
                restore_state(p.snapshot, p.state_dir)
                out(f"{U.GATE_PREFIX} the state was migrated to format {now_fmt} by version {pending.to_version}; "
                    f"the copy taken at install (format {before_fmt}) is restored")
                system.restart_adapter()
            except OSError as exc:
                out(f"{U.GATE_PREFIX} cannot restore the state from {p.snapshot}: {exc}; it is kept there")
                return
    if last is None or not last.about(pending) or last.outcome != U.ROLLED_BACK:
        _record(system, p.last, U.rolled_back(pending, clock(), reason), out)
    why = system.mark("bad", "other")
    if why:
        out(f"{U.GATE_PREFIX} rauc mark-bad other failed ({why})")
    _remove(p.pending)
    _remove(p.snapshot)
    out(U.line_rolled_back(pending.from_slot, reason))


def gate_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="cyphonic-update-gate",
        description="At every boot: commit a trial update when the adapter is healthy, roll back when not.")
    d = UpdatePaths()
    ap.add_argument("--update-dir", default=d.update_dir, help="default %(default)s")
    ap.add_argument("--state-dir", default=d.state_dir, help="default %(default)s")
    a = ap.parse_args(argv)
    system = System(UpdatePaths(update_dir=a.update_dir, state_dir=a.state_dir))

    def out(line: str) -> None:
        print(line, flush=True)
    try:
        return run_gate(system, out=out)
    except Exception as exc:  # noqa: BLE001 - say it; never leave the boot without a word
        out(f"{U.GATE_PREFIX} internal error: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(gate_main())
