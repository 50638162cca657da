"""Durable atomic file writes: the one way keys, certificates, leases, registries, tokens and
state files reach the disk.

``write_atomic(path, data)`` does, in this order:

1. creates a temporary file next to ``path`` (same directory, so same file system), named
   ``<path>.tmp.<pid>.<thread id>``, with ``O_CREAT | O_EXCL`` and the final mode from the start
   (``fchmod`` to it, whatever the umask): a secret is never readable by others, not even for
   a moment, and the temporary file is never an existing file or a symlink someone placed;
2. writes all the bytes (short writes are continued) and ``fsync``s the file;
3. ``os.replace``s it over ``path`` (atomic on POSIX file systems);
4. ``fsync``s the directory, so that the rename itself is on disk.

What it guarantees after a crash (``kill -9``, power cut) at any moment:

- ``path`` is either the complete old file (or absent, if there was none) or the complete new
  one; never a partial file, never a mix of both. Once ``write_atomic`` has returned, the new
  file survives a power cut.
- If anything fails before the rename (disk full, I/O error, an exception), the old file is
  untouched, the temporary file is removed and the error is raised. If fsyncing the directory
  fails after the rename, ``path`` already holds the new content but the error is raised,
  because its durability is not certain (a file system that simply cannot fsync a directory,
  e.g. some FAT drivers, is not an error: nothing more can be done there).
- A temporary file left by a crash is harmless: nobody reads ``<path>.tmp.*``. A later write
  by the same process and thread id (pids repeat at every boot) removes it and starts over, and
  every successful write removes the leftovers of processes that no longer exist.
  ``remove_stale_temps(path, any_owner=True)`` removes them all, for the sole writer of a file
  at its start.

Only the filesystem edge: no formats. ``write_json_atomic`` writes JSON the way the project's
state files are written (``indent=1``, no trailing newline) unless told otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from typing import Any

__all__ = ["write_atomic", "write_atomic_if_changed", "write_text_atomic", "write_json_atomic",
           "fsync_dir", "remove_stale_temps", "TEMP_INFIX"]

TEMP_INFIX = ".tmp."                 # temporary files are "<path>.tmp.<pid>.<thread id>"
DEFAULT_MODE = 0o600
UNSET_MODE_CREATE = 0o644            # mode=None: created like this (minus the umask), no fchmod

# fsync of a directory that the file system (or our permissions) cannot do: not an error.
_DIR_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                                   errno.EPERM, errno.EACCES})


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int | None = DEFAULT_MODE) -> None:
    """Replace ``path`` with ``data``, atomically and durably (see the module docstring).

    ``mode`` is the exact permission of the new file (0600 by default, whatever the umask).
    ``mode=None`` sets none: the file is created 0644 minus the umask and not chmod-ed, for
    file systems without Unix permissions (the FAT boot partition)."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    tmp, fd = _create_temp(path, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)         # the old file is untouched; no temporary file stays
        raise
    fsync_dir(d)
    try:
        remove_stale_temps(path)
    except OSError:
        pass                         # tidying only


def write_atomic_if_changed(path: str | os.PathLike[str], data: bytes, *,
                            mode: int | None = DEFAULT_MODE) -> bool:
    """``write_atomic``, unless ``path`` already holds exactly ``data`` (and, when ``mode`` is
    given, has exactly that mode): then nothing is written and the answer is False (an SD card
    wears; an unchanged file is not rewritten at every boot)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if f.read() == data and (mode is None or (os.fstat(f.fileno()).st_mode & 0o7777) == mode):
                return False
    except OSError:
        pass
    write_atomic(path, data, mode=mode)
    return True


def write_text_atomic(path: str | os.PathLike[str], text: str, *, mode: int | None = DEFAULT_MODE,
                      encoding: str = "utf-8") -> None:
    write_atomic(path, text.encode(encoding), mode=mode)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, mode: int | None = DEFAULT_MODE,
                      **json_kwargs: Any) -> None:
    """``obj`` as JSON (``json.dumps(obj, indent=1, **json_kwargs)``: pass ``indent=None`` for
    one line), atomically and durably."""
    json_kwargs.setdefault("indent", 1)
    write_atomic(path, json.dumps(obj, **json_kwargs).encode("utf-8"), mode=mode)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a rename or a new file in it is on disk. A file system or a
    permission that does not allow it is no error; an I/O error is."""
    try:
        fd = os.open(os.fspath(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _DIR_SYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike[str], *, any_owner: bool = False) -> int:
    """Remove the temporary files that crashed writes of ``path`` left behind: those of
    processes that no longer exist, or all of them with ``any_owner`` (only for the sole writer
    of ``path``, e.g. at its start). Returns how many were removed."""
    path = os.fspath(path)
    d, base = os.path.split(path)
    prefix = base + TEMP_INFIX
    removed = 0
    for name in os.listdir(d or "."):
        if not name.startswith(prefix):
            continue
        if not any_owner and not _owner_gone(name[len(prefix):]):
            continue
        if _unlink_quietly(os.path.join(d, name)):
            removed += 1
    return removed


# --- internals -------------------------------------------------------------------------------

def _temp_name(path: str) -> str:
    return f"{path}{TEMP_INFIX}{os.getpid()}.{threading.get_native_id()}"


def _create_temp(path: str, mode: int | None) -> tuple[str, int]:
    tmp = _temp_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    create_mode = UNSET_MODE_CREATE if mode is None else mode
    try:
        fd = os.open(tmp, flags, create_mode)
    except FileExistsError:
        # This name belongs to this process and thread alone, which are not writing it now: it is
        # the leftover of a crashed process that had the same pid (they repeat at every boot).
        os.unlink(tmp)
        fd = os.open(tmp, flags, create_mode)
    if mode is not None:
        try:
            os.fchmod(fd, mode)      # the exact mode, whatever the umask; before any byte is in it
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
    return tmp, fd


def _owner_gone(suffix: str) -> bool:
    """Whether the process named in a temporary file's suffix ("<pid>.<tid>") no longer exists.
    Unknown names are kept (they are not ours); a reused pid keeps a leftover for a while."""
    pid_s = suffix.split(".", 1)[0]
    if not pid_s.isdigit():
        return False
    pid = int(pid_s)
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False                 # exists (another user's), or cannot tell
    return False


def _unlink_quietly(p: str) -> bool:
    try:
        os.unlink(p)
        return True
    except OSError:
        return False
