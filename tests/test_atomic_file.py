"""cyphonic/atomic_file.py: the one durable atomic write (temp file, fsync, rename, fsync of the
directory) for every key, certificate, lease, registry, token and state file.

- the result has the content and exactly the mode asked (0600 by default), whatever the umask,
  and the temporary file has that mode before the first byte is written;
- nothing is left next to the file; an existing file is replaced by a new inode;
- a failure at any step before the rename leaves the old file intact and no temporary file;
- the file is fsynced before the rename and the directory after it;
- a crash's leftover temporary file (even a symlink planted at the name) is harmless;
- the former copies (write_secret, write_stats, provision's
  write_atomic, the lease store, the GN registry, the cloud config) go through it, with their
  formats and modes unchanged;
- no other module of the product renames or fsyncs files by itself (a grep).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cyphonic import atomic_file
from cyphonic.atomic_file import (
    fsync_dir, remove_stale_temps, write_atomic, write_atomic_if_changed, write_json_atomic,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parent.parent


def perms(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def umask():
    """Set a umask for the test, restore the old one after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def my_temp(path) -> str:
    return f"{path}.tmp.{os.getpid()}.{threading.get_native_id()}"


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- the result ------------------------------------------------------------------------------

def test_content_and_default_mode_0600_even_with_a_permissive_umask(tmp_path, umask):
    umask(0o000)
    p = tmp_path / "identity.key"
    write_atomic(p, b"secret\n")
    assert p.read_bytes() == b"secret\n"
    assert perms(p) == 0o600
    assert os.listdir(tmp_path) == ["identity.key"]          # no temporary file left


def test_the_mode_asked_is_exact_whatever_the_umask(tmp_path, umask):
    umask(0o077)
    write_atomic(tmp_path / "a", b"x", mode=0o644)
    assert perms(tmp_path / "a") == 0o644
    umask(0o000)
    write_atomic(tmp_path / "b", b"x", mode=0o640)
    assert perms(tmp_path / "b") == 0o640


def test_mode_none_sets_no_mode(tmp_path, umask, monkeypatch):
    """For the FAT boot partition: created 0644 minus the umask, never fchmod-ed."""
    umask(0o022)
    monkeypatch.setattr(os, "fchmod", lambda *a: pytest.fail("fchmod with mode=None"))
    write_atomic(tmp_path / "cyphonic.toml", b"x", mode=None)
    assert perms(tmp_path / "cyphonic.toml") == 0o644


def test_the_temporary_file_is_never_readable_by_others(tmp_path, umask, monkeypatch):
    umask(0o000)
    seen = []
    real_write = os.write

    def spy(fd, data):
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", spy)
    write_atomic(tmp_path / "k", b"secret")
    assert seen and all(m == 0o600 for m in seen)


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    data = bytes(range(256)) * 10
    write_atomic(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == data


def test_an_existing_file_is_replaced_by_a_new_inode(tmp_path):
    p = tmp_path / "leases.json"
    write_atomic(p, b"old")
    old_inode = os.stat(p).st_ino
    with open(p, "rb") as reader:                 # a reader of the old file keeps the old file
        write_atomic(p, b"new, longer content")
        assert reader.read() == b"old"
    assert p.read_bytes() == b"new, longer content"
    assert os.stat(p).st_ino != old_inode         # renamed over, never rewritten in place
    assert os.listdir(tmp_path) == ["leases.json"]


def test_text_and_json_variants(tmp_path):
    write_text_atomic(tmp_path / "t", "é\n")
    assert (tmp_path / "t").read_bytes() == "é\n".encode()
    doc = {"general_nodes": [{"mac": "02:00:00:00:00:01", "name": "cam1"}]}
    write_json_atomic(tmp_path / "j", doc)
    assert (tmp_path / "j").read_text() == json.dumps(doc, indent=1)    # the state files' format
    write_json_atomic(tmp_path / "s", {"b": b"x"}, mode=0o644, indent=None, default=str)
    assert (tmp_path / "s").read_text() == '{"b": "b\'x\'"}'
    assert perms(tmp_path / "j") == 0o600 and perms(tmp_path / "s") == 0o644


def test_write_if_changed_does_not_rewrite_an_identical_file(tmp_path):
    p = tmp_path / "token"
    assert write_atomic_if_changed(p, b"t\n") is True
    ino = os.stat(p).st_ino
    assert write_atomic_if_changed(p, b"t\n") is False
    assert os.stat(p).st_ino == ino
    os.chmod(p, 0o644)
    assert write_atomic_if_changed(p, b"t\n") is True                    # the mode is repaired
    assert perms(p) == 0o600
    os.chmod(p, 0o644)
    assert write_atomic_if_changed(p, b"t\n", mode=None) is False        # no mode: bytes only
    assert write_atomic_if_changed(p, b"u\n") is True and p.read_bytes() == b"u\n"


# --- failures --------------------------------------------------------------------------------

@pytest.fixture
def old_file(tmp_path):
    p = tmp_path / "general_nodes.json"
    write_atomic(p, b"the old registry")
    return p


def assert_untouched(p):
    assert p.read_bytes() == b"the old registry"
    assert perms(p) == 0o600
    assert os.listdir(p.parent) == [p.name], "a temporary file was left behind"


def test_a_failure_mid_write_leaves_the_old_file_and_no_temp(old_file, monkeypatch):
    real_write = os.write

    def half(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", half)
    with pytest.raises(OSError):
        write_atomic(old_file, b"the new registry, much longer than the old one")
    assert_untouched(old_file)


def test_a_failing_file_fsync_leaves_the_old_file_and_no_temp(old_file, monkeypatch):
    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        write_atomic(old_file, b"new")
    assert_untouched(old_file)


def test_a_failing_rename_leaves_the_old_file_and_no_temp(old_file, monkeypatch):
    def fail(a, b):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomic(old_file, b"new")
    assert_untouched(old_file)


def test_an_interrupt_mid_write_leaves_the_old_file_and_no_temp(old_file, monkeypatch):
    def interrupt(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(old_file, b"new")
    assert_untouched(old_file)


# --- durability ------------------------------------------------------------------------------

def test_file_fsynced_before_the_rename_and_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind, os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.fspath(a), os.fspath(b)))
        return real_replace(a, b)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    p = tmp_path / "certificate"
    write_atomic(p, b"cert")
    r = next(i for i, e in enumerate(events) if e[0] == "replace")
    before, after = events[:r], events[r + 1:]
    assert ("fsync", "file", events[r][1]) in before, "the data must be on disk before the rename"
    assert ("fsync", "dir", str(tmp_path)) in after, "the directory must be fsynced after the rename"
    assert events[r][2] == str(p)


def test_fsync_dir_tolerates_a_file_system_that_cannot_but_not_io_errors(tmp_path, monkeypatch):
    def unsupported(fd):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(os, "fsync", unsupported)
    fsync_dir(tmp_path)                                   # e.g. FAT through some drivers

    def io_error(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OSError):
        fsync_dir(tmp_path)


# --- leftovers of a crash --------------------------------------------------------------------

def test_a_leftover_temp_with_our_name_is_overwritten(tmp_path):
    p = tmp_path / "token"
    Path(my_temp(p)).write_bytes(b"half of an old wri")   # a crash; the pid came again at boot
    write_atomic(p, b"token\n")
    assert p.read_bytes() == b"token\n"
    assert os.listdir(tmp_path) == ["token"]


def test_a_symlink_planted_at_the_temp_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    p = tmp_path / "d" / "identity.key"
    p.parent.mkdir()
    os.symlink(victim, my_temp(p))
    write_atomic(p, b"secret")
    assert victim.read_bytes() == b"do not touch"
    assert p.read_bytes() == b"secret" and not p.is_symlink()
    assert os.listdir(p.parent) == ["identity.key"]


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    p = tmp_path / "general_nodes.json"
    dead = Path(f"{p}.tmp.{dead_pid()}.1")
    live = Path(f"{p}.tmp.1.1")                           # pid 1 exists: maybe a write in progress
    other = tmp_path / "other.json.tmp.99999.1"           # another file's: not ours to judge
    for f in (dead, live, other):
        f.write_bytes(b"{")
    write_atomic(p, b"{}")
    assert not dead.exists() and live.exists() and other.exists()
    assert remove_stale_temps(p, any_owner=True) == 1     # the sole writer, at its start
    assert not live.exists() and other.exists()


def test_a_leftover_is_never_read(tmp_path):
    """The lease store starts from the old file next to a half-written temporary file."""
    from appliance.leases import LeaseStore
    p = tmp_path / "leases.json"
    s = LeaseStore(p)
    s.bind("02:00:00:00:00:01", "100.64.0.2", 1.8e9, 100)
    Path(f"{p}.tmp.{dead_pid()}.7").write_bytes(b'{"format": "cyph')
    again = LeaseStore(p)
    assert again.warnings == [] and again.get("02:00:00:00:00:01").vip == "100.64.0.2"
    assert os.listdir(tmp_path) == ["leases.json"]


# --- the former copies go through it, formats and modes unchanged -----------------------------

def test_former_copies_use_it(tmp_path, monkeypatch, umask):
    umask(0o022)
    from appliance import provision
    from appliance.general_nodes import Registry
    from cyphonic.cloud.config import write_default_config
    from cyphonic.cloud.keys import read_secret, write_secret
    from cyphonic.cloud.server import write_stats

    calls = []
    real = atomic_file.write_atomic

    def spy(path, data, *, mode=0o600):
        calls.append((os.path.basename(os.fspath(path)), mode))
        return real(path, data, mode=mode)
    monkeypatch.setattr(atomic_file, "write_atomic", spy)
    for mod in ("cyphonic.cloud.keys", "appliance.leases"):
        monkeypatch.setattr(sys.modules[mod], "write_atomic", spy)

    write_secret(str(tmp_path / "ca.key"), b"\x01" * 32)
    assert (tmp_path / "ca.key").read_text() == "01" * 32 + "\n"
    assert read_secret(str(tmp_path / "ca.key"), 32) == b"\x01" * 32

    write_stats(str(tmp_path / "stats.json"), {"n": 1, "t": b"x"})
    assert (tmp_path / "stats.json").read_text() == '{"n": 1, "t": "b\'x\'"}'

    write_json_atomic(str(tmp_path / "login.json"), {"fqdn": "a.example"})
    assert (tmp_path / "login.json").read_text() == '{\n "fqdn": "a.example"\n}'

    reg = Registry(str(tmp_path / "state"))
    reg.add("02:00:00:00:00:01", "cam1")
    assert json.loads((tmp_path / "state" / "general_nodes.json").read_text())["general_nodes"][0]["name"] == "cam1"

    assert provision.write_atomic(str(tmp_path / "st" / "token"), b"tok\n", 0o600, dir_mode=0o700) is True
    assert provision.write_atomic(str(tmp_path / "st" / "token"), b"tok\n", 0o600, dir_mode=0o700) is False
    assert perms(tmp_path / "st") == 0o700

    write_default_config(tmp_path / "cloud.toml")

    from appliance.leases import LeaseStore
    LeaseStore(tmp_path / "leases.json").bind("02:00:00:00:00:01", "100.64.0.2", 1.8e9, 100)

    assert calls == [("ca.key", 0o600), ("stats.json", 0o644), ("login.json", 0o600),
                     ("general_nodes.json", 0o600), ("token", 0o600), ("cloud.toml", 0o644),
                     ("leases.json", 0o600)]
    for name, mode in calls:
        found = next(tmp_path.rglob(name))
        assert perms(found) == mode, name


# --- one copy only ---------------------------------------------------------------------------

PRODUCT = ("cyphonic", "appliance")
# Writing a file by hand: renaming over it, fsyncing it, or a temporary file of one's own.
HAND_ROLLED = re.compile(r"\bos\.(replace|rename|renames|fsync|fdatasync)\s*\(|\bshutil\.move\s*\(|"
                         r"\.rename\s*\(|\btempfile\.(mkstemp|NamedTemporaryFile)\s*\(")
# Renames that are not writes; each one found exactly once, so this list cannot go stale.
ALLOWED = {
    # a lease file that cannot be read is moved aside to <path>.corrupt for inspection
    ("appliance/leases.py", "os.replace(self.path, aside)"),
    # a registry that cannot be read is moved aside to <path>.corrupt for inspection
    ("appliance/general_nodes.py", 'os.replace(self.path, self.path + ".corrupt")'),
    # an update bundle (hundreds of MiB) is streamed to disk, not held in memory: fsync at the
    # end; a download that fails or is cut is removed (never used half-written)
    ("appliance/updater.py", "os.fsync(out.fileno())"),
    # the state snapshot is a directory: copied beside it, then renamed into place
    ("appliance/updater.py", "os.replace(tmp, snapshot)"),
    # a pending.json that cannot be read is moved aside to pending.json.broken for inspection
    ("appliance/updater.py", 'os.replace(p.pending, p.pending + ".broken")'),
}


def test_files_are_written_only_through_atomic_file():
    found, allowed_seen = [], set()
    for pkg in PRODUCT:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            if rel == "cyphonic/atomic_file.py":
                continue
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if not HAND_ROLLED.search(code):
                    continue
                hit = next((a for a in ALLOWED if a[0] == rel and a[1] in code), None)
                if hit is None:
                    found.append(f"{rel}:{n}: {line.strip()}")
                else:
                    allowed_seen.add(hit)
    assert not found, ("write files with cyphonic/atomic_file.py (or allowlist a rename that is "
                       "not a write in this test):\n" + "\n".join(found))
    assert allowed_seen == ALLOWED, f"stale allowlist entries: {ALLOWED - allowed_seen}"
