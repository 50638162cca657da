"""Signed A/B updates (issue 14): the rules, without processes, files or clocks.

The appliance has two root slots (A, B) and a data partition. ``cyadm update install`` has RAUC
write a signed bundle into the slot not booted, records ``pending.json`` and reboots; U-Boot gives
the new slot one boot (``boot-attempts-primary=1``). On that trial boot `cyphonic-update-gate`
asks the adapter every ``GATE_POLL_S`` until it is as healthy as it was when the update was
installed, within ``gate_s``: then the slot is marked good (``last.json``: committed), else it
is marked bad and the appliance reboots into the old slot (``last.json``: rolled-back and why).
A trial boot that never reaches the gate (crash, hang, watchdog reset, power cut) falls back in
U-Boot by itself; the old slot's gate finds ``pending.json`` still there and records why.

This module is the pure part (appliance/updater.py is the edge that runs rauc, systemctl and
fw_printenv and reads and writes the files):

- ``Pending`` and ``Last``: the two files, parsed strictly (``UpdateFileError`` on anything
  else); ``boot_action`` decides what a boot is (trial, fallback, installed-waiting-for-reboot,
  normal, or a broken pending.json);
- ``nodes_at_install``: which general nodes had a tunnel up and which carried data while the
  update was installed, from two status samples (plan §9 risk 6: a quiet PLC only needs its
  tunnel back, a node that was sending must receive data again);
- ``gate_verdict``: the trial's decision from one observation (the adapter's status answer, its
  unit's restarts and state, provisioning's outcome, the time since the gate started);
- ``parse_rauc_status`` / ``parse_rauc_info`` / ``rauc_message`` / ``parse_fw_env`` /
  ``parse_release``: what the tools print (RAUC 1.8's JSON: ``booted`` is the booted slot's
  bootname, or its device when the kernel command line has no ``rauc.slot=``; ``slot_status``
  only with ``--detailed``), and ``status_document`` / ``render_status``: ``cyadm update status``;
- ``needs_restore``: the data partition's ``FORMAT`` marker after a rollback.

What it must never do: roll back a committed slot. Only a readable ``pending.json`` whose target
is the booted slot starts a trial; a broken one is reported and the booted slot marked good;
``last.json`` is only ever shown, never a reason to act.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from dataclasses import asdict, dataclass, field

from cyphonic.errors import CyphonicError

from .constants import GATE_DEFAULT_S, GATE_MAX_RESTARTS, GATE_MAX_S, GATE_MIN_S, UPDATE_FILE_MAX_BYTES

SLOTS = ("A", "B")
COMMITTED, ROLLED_BACK = "committed", "rolled-back"
# what a boot is, for the gate (boot_action)
TRIAL, FALLBACK, WAITING_REBOOT, NORMAL, BROKEN_PENDING = (
    "trial", "fallback", "waiting-reboot", "normal", "broken-pending")
PASS, FAIL, WAIT = "pass", "fail", "wait"
GATE_PREFIX = "cyphonic-update-gate:"


class UpdateError(CyphonicError):
    """Something the operator must be told (the message says what and, where it can, what to do)."""


class UpdateFileError(UpdateError):
    """pending.json, last.json or the gate's settings are not what this code writes."""


def other_slot(slot: str) -> str:
    return {"A": "B", "B": "A"}[slot]


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --- the two files --------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeBaseline:
    """A general node at install time: its tunnel was up; and it was receiving data then."""
    tunnel: bool
    data: bool


@dataclass(frozen=True)
class Pending:
    """An installed update that is not committed yet (/data/update/pending.json)."""
    from_slot: str
    to_slot: str
    from_version: str
    to_version: str
    installed_at: float               # time.time() when it was installed
    boot_id: str                      # the boot it was installed in (the kernel's random boot_id)
    adapter_up: bool                  # the adapter answered then
    cloud_ready: bool                 # and was logged in to the cloud
    nodes: dict[str, NodeBaseline] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["installed"] = _iso(self.installed_at)
        return d

    @classmethod
    def from_json(cls, doc) -> "Pending":
        if not isinstance(doc, dict):
            raise UpdateFileError("not a JSON object")
        try:
            slots = (doc["from_slot"], doc["to_slot"])
            if slots not in (("A", "B"), ("B", "A")):
                raise UpdateFileError(f"slots {slots!r} are not A to B or B to A")
            nodes = {}
            raw_nodes = doc.get("nodes", {})
            if not isinstance(raw_nodes, dict):
                raise UpdateFileError("nodes: not an object")
            for name, n in raw_nodes.items():
                if not (isinstance(n, dict) and isinstance(n.get("tunnel"), bool) and isinstance(n.get("data"), bool)):
                    raise UpdateFileError(f"nodes.{name}: not {{tunnel, data}}")
                nodes[str(name)] = NodeBaseline(n["tunnel"], n["data"])
            p = cls(from_slot=slots[0], to_slot=slots[1], from_version=_str(doc, "from_version"),
                    to_version=_str(doc, "to_version"), installed_at=_num(doc, "installed_at"),
                    boot_id=_str(doc, "boot_id"), adapter_up=_bool(doc, "adapter_up"),
                    cloud_ready=_bool(doc, "cloud_ready"), nodes=nodes)
        except KeyError as exc:
            raise UpdateFileError(f"{exc.args[0]}: missing") from None
        return p


@dataclass(frozen=True)
class Last:
    """The last update's outcome (/data/update/last.json)."""
    outcome: str                      # COMMITTED or ROLLED_BACK
    from_slot: str
    to_slot: str
    from_version: str
    to_version: str
    installed_at: float
    finished_at: float
    reason: str = ""                  # rolled-back: why
    gate_duration_s: float | None = None   # committed: how long the gate took
    acknowledged: bool = False        # rolled-back: `cyadm update ack` was run (the LED stops)

    def to_json(self) -> dict:
        d = asdict(self)
        d["installed"], d["finished"] = _iso(self.installed_at), _iso(self.finished_at)
        return d

    @classmethod
    def from_json(cls, doc) -> "Last":
        if not isinstance(doc, dict):
            raise UpdateFileError("not a JSON object")
        try:
            outcome = doc["outcome"]
            if outcome not in (COMMITTED, ROLLED_BACK):
                raise UpdateFileError(f"outcome {outcome!r} is neither {COMMITTED} nor {ROLLED_BACK}")
            dur = doc.get("gate_duration_s")
            if dur is not None and (isinstance(dur, bool) or not isinstance(dur, (int, float))):
                raise UpdateFileError("gate_duration_s: not a number")
            return cls(outcome=outcome, from_slot=_str(doc, "from_slot"), to_slot=_str(doc, "to_slot"),
                       from_version=_str(doc, "from_version"), to_version=_str(doc, "to_version"),
                       installed_at=_num(doc, "installed_at"), finished_at=_num(doc, "finished_at"),
                       reason=str(doc.get("reason") or ""), gate_duration_s=dur,
                       acknowledged=bool(doc.get("acknowledged", False)))
        except KeyError as exc:
            raise UpdateFileError(f"{exc.args[0]}: missing") from None

    def about(self, pending: Pending) -> bool:
        """Whether this outcome is that of `pending`'s update."""
        return (self.installed_at, self.to_slot, self.to_version) == \
            (pending.installed_at, pending.to_slot, pending.to_version)


def _str(doc: dict, key: str) -> str:
    v = doc[key]
    if not isinstance(v, str):
        raise UpdateFileError(f"{key}: not a string")
    return v


def _num(doc: dict, key: str) -> float:
    v = doc[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UpdateFileError(f"{key}: not a number")
    return float(v)


def _bool(doc: dict, key: str) -> bool:
    v = doc[key]
    if not isinstance(v, bool):
        raise UpdateFileError(f"{key}: not true or false")
    return v


def parse_file(raw: bytes, cls):
    """pending.json or last.json's bytes -> ``cls`` (Pending or Last), or ``UpdateFileError``."""
    if len(raw) > UPDATE_FILE_MAX_BYTES:
        raise UpdateFileError(f"larger than {UPDATE_FILE_MAX_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UpdateFileError(f"not JSON ({exc})") from None
    return cls.from_json(doc)


def committed(p: Pending, now: float, gate_duration_s: float) -> Last:
    return Last(COMMITTED, p.from_slot, p.to_slot, p.from_version, p.to_version, p.installed_at, now,
                gate_duration_s=round(gate_duration_s, 1))


def rolled_back(p: Pending, now: float, reason: str) -> Last:
    return Last(ROLLED_BACK, p.from_slot, p.to_slot, p.from_version, p.to_version, p.installed_at, now,
                reason=reason)


def rolled_back_unacknowledged(last: Last | None) -> bool:
    """The LED shows `rolled-back` while this holds (appliance/led.py)."""
    return last is not None and last.outcome == ROLLED_BACK and not last.acknowledged


# --- what a boot is ------------------------------------------------------------------------------

def boot_action(booted: str, pending: Pending | None, pending_broken: bool, boot_id: str) -> str:
    """TRIAL: the booted slot is the one the pending update went to. FALLBACK: an update is pending
    but the other slot booted (the trial failed the gate, or crashed, hung, was reset, lost power,
    and U-Boot went back). WAITING_REBOOT: installed in this very boot (``--no-reboot``), nothing
    to decide yet. BROKEN_PENDING: pending.json cannot be read: the booted slot is kept (marked
    good), never rolled back on a broken file. NORMAL: nothing pending."""
    if pending_broken:
        return BROKEN_PENDING
    if pending is None:
        return NORMAL
    if boot_id and pending.boot_id == boot_id:
        return WAITING_REBOOT
    if booted == pending.to_slot:
        return TRIAL
    return FALLBACK


def fallback_reason(pending: Pending, last: Last | None) -> str:
    """Why the trial of `pending` ended on the old slot: what the gate wrote, when it wrote it."""
    if last is not None and last.outcome == ROLLED_BACK and last.about(pending) and last.reason:
        return last.reason
    return (f"the trial boot of slot {pending.to_slot} (version {pending.to_version}) did not reach the health "
            f"gate (crash, hang or watchdog reset)")


# --- the health gate ------------------------------------------------------------------------------

def _rows_of(status: dict, name: str) -> list[dict]:
    return [t for t in status.get("tunnels") or [] if isinstance(t, dict) and t.get("gn") == name]


def _rx(row: dict) -> int:
    v = row.get("rx_bytes")
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _answered(status) -> bool:
    return isinstance(status, dict) and "error" not in status


def cloud_state(status) -> str | None:
    if not _answered(status):
        return None
    cloud = status.get("cloud")
    return cloud.get("state") if isinstance(cloud, dict) else None


def nodes_at_install(before: dict | None, after: dict | None) -> dict[str, NodeBaseline]:
    """The general nodes with a tunnel up in `after` (the later sample), and whether one of their
    tunnels received data between `before` and `after` (the same peer's ``rx_bytes`` grew).
    Without two answers nobody counts as carrying data: the gate then asks only for tunnels."""
    if not _answered(after):
        return {}
    out = {}
    names = sorted({t.get("gn") for t in after.get("tunnels") or [] if isinstance(t, dict) and t.get("up")
                    and isinstance(t.get("gn"), str)})
    for name in names:
        earlier = {t.get("peer"): _rx(t) for t in _rows_of(before, name)} if _answered(before) else {}
        data = any(t.get("peer") in earlier and _rx(t) > earlier[t.get("peer")]
                   for t in _rows_of(after, name) if t.get("up"))
        out[name] = NodeBaseline(tunnel=True, data=data)
    return out


@dataclass(frozen=True)
class Observation:
    """What the gate sees at one moment of the trial."""
    status: dict | None               # the adapter's answer to `status` (None: no answer)
    restarts: int | None              # systemctl show -p NRestarts cyphonic-adapter (None: unknown)
    unit_state: str                   # its ActiveState ("active", "activating", "failed", ...)
    provision: dict | None            # /run/cyphonic/provision.json
    elapsed_s: float                  # since the gate started


@dataclass(frozen=True)
class Verdict:
    decision: str                     # PASS, FAIL or WAIT
    reason: str = ""                  # FAIL: why; WAIT: what is still missing


def missing(pending: Pending, status: dict | None) -> list[str]:
    """What the adapter still lacks, compared with when the update was installed."""
    if not pending.adapter_up:
        return []                     # nothing ran to compare with: booting to the gate is enough
    if not _answered(status):
        return ["the adapter does not answer on its status socket"]
    out = []
    state = cloud_state(status)
    if pending.cloud_ready and state != "ready":
        out.append(f"the adapter is not logged in to the cloud (state {state or 'unknown'})")
    for name, base in sorted(pending.nodes.items()):
        up = [t for t in _rows_of(status, name) if t.get("up")]
        if base.tunnel and not up:
            out.append(f"general node {name} has no tunnel up")
        elif base.data and not any(_rx(t) > 0 for t in up):
            out.append(f"general node {name} has received no data")
    return out


def gate_verdict(pending: Pending, obs: Observation, gate_s: float) -> Verdict:
    """PASS when nothing is missing; FAIL at once when the adapter's unit failed, restarted
    GATE_MAX_RESTARTS times or provisioning failed (while the adapter ran before the update), or
    when something is still missing after `gate_s`; else WAIT."""
    if pending.adapter_up:
        if obs.restarts is not None and obs.restarts >= GATE_MAX_RESTARTS:
            return Verdict(FAIL, f"the adapter restarted {obs.restarts} times")
        if obs.unit_state == "failed":
            return Verdict(FAIL, "the adapter's service failed")
        if isinstance(obs.provision, dict) and obs.provision.get("state") in ("error", "not-provisioned"):
            errors = obs.provision.get("errors") or []
            first = errors[0] if errors and isinstance(errors[0], str) else obs.provision.get("state")
            return Verdict(FAIL, f"provisioning failed: {first}")
    lacking = missing(pending, obs.status)
    if not lacking:
        return Verdict(PASS)
    if obs.elapsed_s >= gate_s:
        return Verdict(FAIL, f"not healthy after {gate_s:.0f} s: " + "; ".join(lacking))
    return Verdict(WAIT, "; ".join(lacking))


def parse_gate_conf(text: str | None) -> tuple[int, str]:
    """/etc/cyphonic/update.toml (written by cyphonic-provision from [update]) -> (gate_s, a
    problem to log or ""). A missing or broken file gives the default: the gate must run."""
    if text is None:
        return GATE_DEFAULT_S, ""
    try:
        v = tomllib.loads(text).get("gate_s", GATE_DEFAULT_S)
    except tomllib.TOMLDecodeError as exc:
        return GATE_DEFAULT_S, f"not TOML ({exc}); gate_s {GATE_DEFAULT_S} is used"
    if isinstance(v, bool) or not isinstance(v, int) or not GATE_MIN_S <= v <= GATE_MAX_S:
        return GATE_DEFAULT_S, f"gate_s {v!r} is not an integer {GATE_MIN_S}..{GATE_MAX_S}; {GATE_DEFAULT_S} is used"
    return v, ""


# --- the console lines (the QEMU test waits for these) -----------------------------------------------

def line_committed(slot: str, version: str, seconds: float) -> str:
    return f"{GATE_PREFIX} committed slot {slot} (version {version}) after {seconds:.0f} s"


def line_trial_failed(slot: str, reason: str) -> str:
    return f"{GATE_PREFIX} trial of slot {slot} failed: {reason}; rolling back"


def line_rolled_back(slot: str, reason: str) -> str:
    return f"{GATE_PREFIX} rolled back to slot {slot}: {reason}"


def line_good(slot: str) -> str:
    return f"{GATE_PREFIX} slot {slot} is good (no update pending)"


# --- state across versions -----------------------------------------------------------------------

FORMAT_FILE = "FORMAT"     # in the state directory: an integer; none means format 1


def parse_format(text: str | None) -> int:
    """The state directory's format (``FORMAT``); a missing or unreadable marker is format 1,
    the format before any marker existed."""
    if text is None:
        return 1
    try:
        n = int(text.strip())
    except ValueError:
        return 1
    return n if n >= 1 else 1


def needs_restore(format_now: int, format_before: int) -> bool:
    """After a rollback: the state must be put back from the snapshot taken at install when the
    trial's version migrated it to a format the old version does not know."""
    return format_now > format_before


# --- what the tools print ----------------------------------------------------------------------------

def rauc_message(stdout: str, stderr: str) -> str:
    """RAUC's reason for a refusal: the last ``LastError:`` line of `rauc install`, else the last
    line on stderr that is not a progress message, else the last line."""
    lines = [ln.strip() for ln in (stdout + "\n" + stderr).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "LastError:" in ln:
            return ln.split("LastError:", 1)[1].strip()
    err = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    useful = [ln for ln in err if not ln.startswith("rauc-Message") and not re.match(r"Installing `.*` failed", ln)]
    for candidates in (useful, err, lines):
        if candidates:
            return candidates[-1]
    return "rauc gave no reason"


def parse_rauc_info(text: str, compatible: str) -> dict:
    """`rauc info --output-format=json` -> {compatible, version, description, build}; refuses a
    bundle for another system."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise UpdateError("bundle refused: rauc info printed no JSON") from None
    if not isinstance(doc, dict):
        raise UpdateError("bundle refused: rauc info printed no JSON object")
    got = doc.get("compatible")
    if got != compatible:
        raise UpdateError(f"bundle refused: it is for {got!r}, this appliance is {compatible!r}")
    version = doc.get("version")
    if not isinstance(version, str) or not version:
        raise UpdateError("bundle refused: it has no version")
    return {k: doc.get(k) for k in ("compatible", "version", "description", "build")}


def parse_rauc_status(text: str) -> dict:
    """`rauc status --detailed --output-format=json` -> {compatible, booted (bootname), primary
    (bootname), slots: [{name, bootname, device, state, boot_status, version, build, installed,
    activated}]} for the slots that have a bootname (the root slots), in bootname order."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise UpdateError("rauc status printed no JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("slots"), list):
        raise UpdateError("rauc status printed no slots")
    slots = []
    for entry in doc["slots"]:
        if not isinstance(entry, dict):
            continue
        for name, s in entry.items():
            if not isinstance(s, dict) or not s.get("bootname"):
                continue
            st = s.get("slot_status") if isinstance(s.get("slot_status"), dict) else {}
            bundle = st.get("bundle") if isinstance(st.get("bundle"), dict) else {}
            installed = st.get("installed") if isinstance(st.get("installed"), dict) else {}
            activated = st.get("activated") if isinstance(st.get("activated"), dict) else {}
            slots.append({"name": name, "bootname": s["bootname"], "device": s.get("device"),
                          "state": s.get("state"), "boot_status": s.get("boot_status"),
                          "version": bundle.get("version"), "build": bundle.get("build"),
                          "installed": installed.get("timestamp"), "activated": activated.get("timestamp")})
    slots.sort(key=lambda s: s["bootname"])
    by_name = {s["name"]: s["bootname"] for s in slots}
    raw_booted = doc.get("booted")
    booted = next((s["bootname"] for s in slots if raw_booted in (s["bootname"], s["device"])), None)
    if booted is None:
        booted = next((s["bootname"] for s in slots if s["state"] == "booted"), None)
    return {"compatible": doc.get("compatible"), "booted": booted,
            "primary": by_name.get(doc.get("boot_primary")), "slots": slots}


def booted_from_cmdline(cmdline: str) -> str | None:
    """The slot U-Boot booted: ``rauc.slot=A`` on the kernel command line."""
    m = re.search(r"(?:^|\s)rauc\.slot=(\S+)", cmdline)
    return m.group(1) if m and m.group(1) in SLOTS else None


def parse_fw_env(text: str) -> dict[str, str]:
    """`fw_printenv NAME...`: NAME=VALUE lines (an undefined name is an error line: skipped)."""
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            out[name] = value.strip()
    return out


def parse_release(text: str | None) -> dict:
    """/etc/cyphonic-release: ``cyphonic-adapter-<version>-<arch> <git describe>``."""
    if not text or not text.strip():
        return {"name": None, "version": None, "build": None}
    name, _, build = text.strip().partition(" ")
    m = re.fullmatch(r"cyphonic-adapter-(.+)-(arm64|armhf|amd64)", name)
    return {"name": name, "version": m.group(1) if m else None, "build": build.strip() or None}


# --- cyadm update status -----------------------------------------------------------------------

def status_document(*, rauc: dict, fw_env: dict, release: dict, pending: Pending | None, pending_problem: str,
                    last: Last | None, last_problem: str, booted: str | None) -> dict:
    """The JSON of `cyadm update status --json`."""
    trial = None
    if pending is not None:
        trial = {**pending.to_json(), "state": "trial" if booted == pending.to_slot else
                 ("waiting for reboot" if booted == pending.from_slot else "unknown")}
    return {"booted": booted, "primary": rauc.get("primary"), "compatible": rauc.get("compatible"),
            "release": release, "slots": rauc.get("slots", []), "boot_env": fw_env,
            "pending": trial, "pending_problem": pending_problem or None,
            "last": last.to_json() if last else None, "last_problem": last_problem or None}


def render_status(doc: dict) -> list[str]:
    """`cyadm update status` for people."""
    rel = doc.get("release") or {}
    lines = [f"booted slot {doc.get('booted') or '?'}: {rel.get('name') or 'release unknown'}"
             + (f" ({rel['build']})" if rel.get("build") else "")]
    env = doc.get("boot_env") or {}
    for s in doc.get("slots", []):
        b = s["bootname"]
        mark = "booted" if b == doc.get("booted") else (s.get("state") or "?")
        tries = env.get(f"BOOT_{b}_LEFT")
        version = s.get("version") or (f"{rel['version']} (as flashed)" if b == doc.get("booted") and rel.get("version")
                                       else "unknown")
        lines.append(f"  slot {b} ({s.get('device') or '?'}): {mark}, {s.get('boot_status') or '?'}"
                     + (", next boot" if b == doc.get("primary") else "")
                     + f"; version {version}"
                     + (f", installed {s['installed']}" if s.get("installed") else "")
                     + (f"; boot attempts left {tries}" if tries is not None else ""))
    if env.get("BOOT_ORDER") is not None:
        lines.append(f"  boot order {env['BOOT_ORDER']}")
    p = doc.get("pending")
    if doc.get("pending_problem"):
        lines.append(f"pending update: unreadable ({doc['pending_problem']})")
    elif p:
        what = {"trial": "on trial now: the health gate commits it or rolls back",
                "waiting for reboot": "installed, not booted yet: reboot to try it"}.get(p["state"], p["state"])
        lines.append(f"pending update: {p['from_version']} (slot {p['from_slot']}) -> {p['to_version']} "
                     f"(slot {p['to_slot']}), installed {p.get('installed')}: {what}")
    last = doc.get("last")
    if doc.get("last_problem"):
        lines.append(f"last update: unknown (last.json unreadable: {doc['last_problem']})")
    elif last:
        lines.append(summary_of_last(last))
    elif not p:
        lines.append("last update: none")
    return lines


def summary_of_last(last: dict) -> str:
    if last["outcome"] == COMMITTED:
        dur = last.get("gate_duration_s")
        return (f"last update: {last['to_version']} committed on slot {last['to_slot']} at {last.get('finished')}"
                + (f" (health gate passed after {dur:.0f} s)" if isinstance(dur, (int, float)) else ""))
    return (f"last update: {last['to_version']} ROLLED BACK to {last['from_version']} (slot {last['from_slot']}) "
            f"at {last.get('finished')}: {last.get('reason')}"
            + ("" if last.get("acknowledged") else " (the LED shows it until `cyadm update ack`)"))


def summary_line(pending: Pending | None, pending_problem: str, last: Last | None, last_problem: str,
                 booted: str | None) -> str | None:
    """One line for `cyadm status`: None when there is nothing to say."""
    if pending_problem:
        return f"update: pending.json unreadable ({pending_problem}); see cyadm update status"
    if pending is not None:
        if booted == pending.to_slot:
            return f"update: {pending.to_version} on trial in slot {pending.to_slot} (health gate running)"
        return f"update: {pending.to_version} installed in slot {pending.to_slot}, waiting for a reboot"
    if last_problem:
        return f"update: last.json unreadable ({last_problem})"
    if last is not None:
        return summary_of_last(last.to_json()).replace("last update: ", "update: last ", 1)
    return None
