"""What every benchmark part does alike: describe the machine, read a process's CPU time from
/proc, hold a lab and its work directory for one part (torn down on failure or SIGTERM, logs
kept then), write its result as ``<out>/<part>.json``. No measuring here."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import tempfile
import threading
from typing import Callable, Iterator

from ..topology import Lab

CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine() -> dict:
    """The interpreter, the CPUs and the load when the run starts (the machine is shared)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "cpu_model": model,
            "platform": platform.platform(), "loadavg_at_start": load}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def write_result(out_dir: str, part: str, result: dict) -> str:
    """Write ``result`` to ``<out_dir>/<part>.json`` (the folder made if missing); its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{part}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def raise_system_exit(signum, frame) -> None:
    """A SIGTERM handler: leave like Ctrl-C, so that `finally` tears the lab down."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def bench_lab(name: str, *, prefix: str, say: Callable[..., None],
              dump_logs: Callable[[str, Callable[..., None]], None]) -> Iterator[tuple[Lab, str]]:
    """A lab (namespaces ``prefix``*) and a work directory (with ``overlay/``) for one bench
    part. SIGTERM tears it down as Ctrl-C does. On failure the daemons' logs are shown
    (``dump_logs(work, say)``) and the work directory is kept; otherwise it is removed."""
    work = tempfile.mkdtemp(prefix=f"cyphonic-{name}-bench-")
    os.makedirs(os.path.join(work, "overlay"))
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, raise_system_exit)
    failed = True
    try:
        with Lab(prefix=prefix) as lab:
            try:
                yield lab, work
            except BaseException:
                dump_logs(work, say)
                raise
        failed = False
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if failed:
            say(f"{name} bench: logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
