"""Packet Handling: the pool of NFQUEUE worker processes, as the controller sees it.

One worker per queue (``appliance.packet_handling.worker_main``), forked so that it
inherits every general node's WAN socket and the heads-up eventfd. The controller talks to
each over a pipe (the messages are listed in ``appliance.packet_handling``); this module
owns the processes and their pipes:

- ``start()`` forks them; ``restart_all()`` forks them all again;
- ``add_port(port, sock)`` hands a new general node's socket to the running workers (its fd
  over each pipe) and ``close_port(port)`` takes it back: adding or removing a general node
  restarts no worker, so no other general node's packet in a queue is lost;
- ``supervise(now)`` replaces a worker that died (its pipe closed or its process ended)
  and records a ``worker-restarted`` health event; the ``worker-down`` condition holds
  while one is not running;
- every worker has a *generation*, a number no other process of this pool had: the
  session installer (``appliance.sessions``) compares it to know which processes lack
  which sessions, so a new process never inherits stream ids of the one it replaced;
- ``ask_stats()`` / the counters each worker answers with, for ``cyadm``.

Never: block on a pipe (a dead worker is marked, replaced at the next supervision),
or let one worker's failure stop the others.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from typing import Callable

from cyphonic.health import Health, Warning

from .constants import WORKER_RESTART_WAIT_S, WORKER_STOP_WAIT_S
from .packet_handling import send_socket


@dataclass
class Worker:
    index: int
    queue: int
    generation: int
    proc: object                 # multiprocessing.Process (or a test's stand-in)
    conn: object                 # our end of its pipe
    started: float
    stats: dict = field(default_factory=dict)
    dead: bool = False


def fork_worker(index: int, queue: int, conn, args: tuple):
    """Fork ``worker_main(index, queue, conn, *args)``; the process (started)."""
    from .packet_handling import worker_main
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=worker_main, args=(index, queue, conn, *args), daemon=True,
                       name=f"cyphonic-worker-{index}")
    proc.start()
    return proc


class WorkerPool:
    """``worker_args()``: what a worker gets at fork besides its index, queue and pipe (the
    sockets by port, the heads-up eventfd), read at every fork. ``add_reader`` /
    ``remove_reader``: the event loop's. ``on_message(msg)``: a worker's ``miss``.
    ``pass_socket(conn, sock)``: sends a socket's fd over a worker's pipe (tests: a stand-in)."""

    def __init__(self, nworkers: int, queue_first: int, *, worker_args: Callable[[], tuple],
                 add_reader: Callable, remove_reader: Callable, on_message: Callable[[tuple], None],
                 health: Health, log: Callable[[str], None], clock: Callable[[], float],
                 launch: Callable = fork_worker, pipe: Callable | None = None,
                 pass_socket: Callable = send_socket) -> None:
        self.nworkers = nworkers
        self.queue_first = queue_first
        self.worker_args = worker_args
        self.add_reader = add_reader
        self.remove_reader = remove_reader
        self.on_message = on_message
        self.health = health
        self.log = log
        self.clock = clock
        self.launch = launch
        self.pipe = pipe or multiprocessing.get_context("fork").Pipe
        self.pass_socket = pass_socket
        self.workers: list[Worker] = []
        self.restarts = 0
        self._generations = 0
        self.stopping = False

    # --- processes -----------------------------------------------------------------------

    def start(self) -> None:
        self.workers = [self._spawn(i) for i in range(self.nworkers)]

    def _spawn(self, index: int) -> Worker:
        parent, child = self.pipe()
        queue = self.queue_first + index
        proc = self.launch(index, queue, child, self.worker_args())
        child.close()
        self._generations += 1
        w = Worker(index, queue, self._generations, proc, parent, self.clock())
        self.add_reader(parent.fileno(), self._on_readable, w)
        return w

    def _retire(self, w: Worker, wait_s: float) -> None:
        """Stop one worker for good: tell it, wait a little, kill it; close its pipe."""
        self.send_to(w, ("stop",))
        self._unwatch(w)
        w.proc.join(wait_s)
        if w.proc.is_alive():
            w.proc.kill()
        w.conn.close()

    def _unwatch(self, w: Worker) -> None:
        try:
            self.remove_reader(w.conn.fileno())
        except (ValueError, OSError):   # closed already
            pass

    def restart_all(self) -> None:
        """Fork every worker again (each loses what was in its queue; a new general node does
        not need this: ``add_port``)."""
        for i, w in enumerate(self.workers):
            self._retire(w, WORKER_RESTART_WAIT_S)
            self.workers[i] = self._spawn(i)

    def supervise(self, now: float) -> bool:
        """Replace the workers that died; True if any was."""
        if self.stopping:
            return False   # shutting down: workers are being stopped on purpose
        replaced = False
        for i, w in enumerate(self.workers):
            if w.dead or not w.proc.is_alive():
                self._unwatch(w)
                w.conn.close()
                code = w.proc.exitcode
                self.restarts += 1
                self.log(f"worker {i} (pid {w.proc.pid}) died (exit {code}); restarting")
                self.health.record(now, Warning("worker-restarted", f"worker {i} died (exit {code}) and was restarted",
                                                subject=f"worker {i}"))
                self.workers[i] = self._spawn(i)
                replaced = True
        return replaced

    def stop(self) -> None:
        self.stopping = True
        for w in self.workers:
            self.send_to(w, ("stop",))
        for w in self.workers:
            self._unwatch(w)
            w.proc.join(WORKER_STOP_WAIT_S)
            if w.proc.is_alive():
                w.proc.kill()

    # --- messages --------------------------------------------------------------------------

    def slots(self) -> list[tuple[int, int]]:
        """(index, generation) of every worker (``appliance.sessions.Workers``)."""
        return [(w.index, w.generation) for w in self.workers]

    def send(self, index: int, msg: tuple) -> None:
        self.send_to(self.workers[index], msg)

    def send_to(self, w: Worker, msg: tuple) -> None:
        try:
            w.conn.send(msg)
        except (OSError, ValueError):   # BrokenPipeError, or a closed pipe
            w.dead = True

    def ask_stats(self) -> None:
        for w in self.workers:
            self.send_to(w, ("stats",))

    def add_port(self, port: int, sock) -> None:
        """A general node was added: every running worker gets its socket (the fd over its pipe,
        right after the message), so that its sessions can be installed there; a worker forked
        later inherits it (``worker_args``). A worker whose pipe fails is marked dead and
        replaced at the next supervision."""
        for w in self.workers:
            self.send_to(w, ("add_port", port))
            if w.dead:
                continue
            try:
                self.pass_socket(w.conn, sock)
            except (OSError, ValueError):
                w.dead = True

    def close_port(self, port: int) -> None:
        """A general node is gone: every worker drops its sessions and closes its copy of the
        node's socket (from fork or ``add_port``), in that order, after what came before on its
        pipe; the port is then free for the next general node."""
        for w in self.workers:
            self.send_to(w, ("close_port", port))

    def _on_readable(self, w: Worker) -> None:
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "stats":
                    w.stats = msg[1]
                elif msg[0] == "miss":
                    self.on_message(msg)
        except (EOFError, OSError):
            self._unwatch(w)
            w.dead = True

    # --- status ----------------------------------------------------------------------------

    def conditions(self) -> list[Warning]:
        return [Warning("worker-down", f"worker {w.index} is not running", subject=f"worker {w.index}")
                for w in self.workers if not w.proc.is_alive()]

    def rows(self) -> list[dict]:
        return [{"index": w.index, "pid": w.proc.pid, "alive": w.proc.is_alive(), "queue": w.queue,
                 **{k: v for k, v in w.stats.items() if k not in ("index", "pid")}}
                for w in self.workers]

    def tx_bytes(self, gn_vip4: str, peer_vip4: str) -> int:
        """Bytes the workers sealed for one general node toward one peer (their last counters)."""
        key = f"{gn_vip4}>{peer_vip4}"
        return sum(w.stats.get("per_session", {}).get(key, 0) for w in self.workers)
