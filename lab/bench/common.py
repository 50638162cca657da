"""What every benchmark part does alike: describe the machine, read a process's CPU time from
/proc, write its result as ``<out>/<part>.json``. No measuring here."""

from __future__ import annotations

import json
import os
import platform

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
