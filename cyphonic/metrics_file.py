"""The Prometheus textfile a daemon writes for node_exporter's textfile collector
(``--collector.textfile.directory``): the node daemon and the adapter, every ``every_s``, from
their periodic work. Web-free: no HTTP server of ours listens; node_exporter serves the file.

``tick(now)`` writes ``cyphonic.metrics.exposition(status())`` to ``path`` when it is due,
through ``cyphonic.atomic_file.write_atomic`` (0644: node_exporter runs as another user), so
node_exporter never reads half a file; the directory is made if missing. A failure is
counted in ``errors["metrics_file_<error>"]``, logged once until the next success, and shown
as the ``metrics-unwritable`` health condition. A clean stop removes the file, so stopped
metrics are absent rather than frozen (after a crash node_exporter's
``node_textfile_mtime_seconds`` tells how old it is). ``path`` "" turns it all off.

Never: raise into the daemon's periodic work for a file system error.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable

from .atomic_file import write_atomic
from .health import Warning
from .metrics import exposition

METRICS_EVERY_S = 5.0     # node_exporter is usually scraped every 15 s or more


class MetricsFile:
    def __init__(self, path: str, status: Callable[[], dict], *, log: Callable[[str], None],
                 errors: Counter | None = None, every_s: float = METRICS_EVERY_S) -> None:
        self.path = path
        self.status = status
        self.log = log
        self.errors: Counter = errors if errors is not None else Counter()
        self.every_s = every_s
        self.error = ""           # why the last write failed; "" once one succeeded
        self._next = 0.0

    def tick(self, now: float) -> None:
        if not self.path or now < self._next:
            return
        self._next = now + self.every_s
        self.write()

    def write(self) -> bool:
        text = exposition(self.status())
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
            write_atomic(self.path, text.encode(), mode=0o644)
        except OSError as exc:
            self.errors["metrics_file_" + type(exc).__name__] += 1
            why = f"{self.path}: {exc.strerror or exc}"
            if why != self.error:
                self.log(f"cannot write the metrics file {why}")
            self.error = why
            return False
        self.error = ""
        return True

    def conditions(self) -> list[Warning]:
        return [Warning("metrics-unwritable", self.error)] if self.path and self.error else []

    def remove(self) -> None:
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
