"""The one asyncio driver for sans-IO cores (aioquic's ``asyncio/protocol.py``, in small).

Every core of ours is fed ``(data, addr, now)`` and answers with datagrams, events and a
next deadline. What runs it is the same everywhere, so it is written once, here:

- ``DeadlineTimer``: one asyncio timer kept at a core's next deadline. ``arm()`` reads the
  deadline and re-arms only when it moved; ``poke()`` is for edges whose fast path moves
  deadlines behind the core's back (keepalives, rekey checks): it fires a deadline that has
  passed, else re-arms.
- ``patiently``: run a blocking call in a thread until it stops failing (a cloud name that
  does not resolve yet at boot), waiting 1 s doubling to 30 s, one log line per failure.
- ``CoreDriver``: a datagram core (``receive_datagram``, ``datagrams_to_send``,
  ``next_event``, ``get_timer``, ``handle_timer``): feed it, then ``flush()`` sends what came
  out, hands events to ``on_event`` and goes round again, since a handler may make the core
  send or emit more (an echo reply), at most ``FLUSH_ROUNDS_MAX`` rounds of at most
  ``EVENTS_PER_ROUND_MAX`` events (what is left waits for the next flush, and is counted),
  then re-arms.

Used by the node daemon (``cyphonic.node.engine_host``, once; the adapter once per general
node), the cloud (``cyphonic.cloud.server``), the TRS (``cyphonic.cloud.trs_server``), the
DNS edge (``cyphonic.dns_server``, timer only: its core speaks queries, not datagrams) and
the plain UDP edge (``cyphonic.udp``).

Never: let a send error or an event handler's exception out into the event loop (both are
counted in ``errors``, by exception type), or keep a timer armed after ``close()``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections import Counter
from typing import Callable

log = logging.getLogger(__name__)

FLUSH_ROUNDS_MAX = 64        # event handlers may feed the core again; a loop between two must end
EVENTS_PER_ROUND_MAX = 1024  # ... also when a handler makes the core emit an event per event
TIMER_ERROR_BACKOFF_S = 0.1  # a core whose handle_timer raised is not called again sooner (no spinning)


class DeadlineTimer:
    """One asyncio timer at ``deadline()``; calls ``fire(now)`` when it comes due."""

    def __init__(self, deadline: Callable[[], float | None], fire: Callable[[float], None], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._deadline = deadline
        self._fire_cb = fire
        self.clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None
        self._not_before = 0.0
        self._closed = False

    @property
    def armed_for(self) -> float | None:
        return self._armed_for if self._handle is not None else None

    def arm(self) -> None:
        """Keep the timer at the core's deadline; nothing to do if it is there already."""
        if self._closed:
            return
        t = self._deadline()
        if t is not None and t < self._not_before:
            t = self._not_before
        if t == self._armed_for and (t is None or self._handle is not None):
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_for = t
        if t is not None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_later(max(0.0, t - self.clock()), self._fire)

    def back_off(self, until: float) -> None:
        """Do not fire before ``until`` (the core failed: do not call it again at once)."""
        self._not_before = until

    def poke(self) -> bool:
        """A fast path may have moved the deadline: fire it if it has passed (True), else re-arm."""
        if self._closed:
            return False
        t = self._deadline()
        now = self.clock()
        if t is not None and t <= now and now >= self._not_before:
            self._fire()
            return True
        self.arm()
        return False

    def _fire(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._armed_for = None
        if not self._closed:
            self._fire_cb(self.clock())

    def close(self) -> None:
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_for = None


class FlushRounds:
    """Bounded, re-entrant rounds of work: ``run(step)`` calls ``step()`` (which returns how
    much it did) until a round does nothing, at most ``FLUSH_ROUNDS_MAX`` times. A ``run`` asked
    for while one is running (from a handler the step called) makes the running one go round
    once more instead of nesting. Rounds that never went quiet are counted in
    ``errors["flush_rounds_exhausted"]``."""

    def __init__(self, errors: Counter) -> None:
        self.errors = errors
        self._running = False
        self._again = False

    def run(self, step: Callable[[], int]) -> bool:
        """False when folded into a running one (the caller has nothing more to do)."""
        if self._running:
            self._again = True
            return False
        self._running = True
        try:
            for _ in range(FLUSH_ROUNDS_MAX):
                self._again = False
                if not step() and not self._again:
                    break
            else:
                self.errors["flush_rounds_exhausted"] += 1  # left for the next flush or timer
        finally:
            self._running = False
            self._again = False
        return True


class CoreDriver:
    """Drives one datagram core: time in, datagrams out through ``send(data, addr)``, events
    to ``on_event(event)``, one timer at the core's next deadline.

    ``send`` may raise ``OSError``: counted in ``errors`` (``BlockingIOError``, a full send
    buffer, as ``send_buffer_full``), never raised. ``after_round()``, if given, runs after each
    round of sending and events (the DNS edge sends answers the events unblocked) and returns
    how much it did (0 = quiet). A core without ``next_event`` has no events."""

    def __init__(self, core, send: Callable[[bytes, object], None],
                 on_event: Callable[[object], None] | None = None, *,
                 clock: Callable[[], float] = time.time,
                 after_round: Callable[[], int] | None = None,
                 errors: Counter | None = None) -> None:
        self.core = core
        self.send = send
        self.on_event = on_event
        self.after_round = after_round
        self.clock = clock
        self.errors: Counter = errors if errors is not None else Counter()
        self.timer = DeadlineTimer(core.get_timer, self._on_timer, clock=clock)
        self._next_event = getattr(core, "next_event", None)
        self._rounds = FlushRounds(self.errors)

    def receive(self, data: bytes, addr) -> None:
        self.core.receive_datagram(data, addr, self.clock())
        self.flush()

    def _on_timer(self, now: float) -> None:
        try:
            self.core.handle_timer(now)
        except Exception as exc:  # noqa: BLE001 - counted; the flush below re-arms the timer
            self.errors["timer_" + type(exc).__name__] += 1
            log.exception("handle_timer failed")
            self.timer.back_off(now + TIMER_ERROR_BACKOFF_S)
        self.flush()

    def poke(self) -> bool:
        return self.timer.poke()

    def send_out(self) -> int:
        """Send what the core queued; the number of datagrams it had."""
        out = self.core.datagrams_to_send()
        send = self.send
        for data, addr in out:
            try:
                send(data, addr)
            except BlockingIOError:
                self.errors["send_buffer_full"] += 1
            except OSError as exc:
                self.errors[type(exc).__name__] += 1
        return len(out)

    def flush(self) -> None:
        """Send, deliver events, repeat until quiet (``FlushRounds``), re-arm."""
        if self._rounds.run(self._round):
            self.timer.arm()

    def _round(self) -> int:
        n = self.send_out()
        if self._next_event is not None:
            for _ in range(EVENTS_PER_ROUND_MAX):
                e = self._next_event()
                if e is None:
                    break
                n += 1
                if self.on_event is not None:
                    try:
                        self.on_event(e)
                    except Exception as exc:  # noqa: BLE001 - a handler's bug must not stop the edge
                        self.errors["event_handler_" + type(exc).__name__] += 1
                        log.exception("event handler failed on %r", e)
        if self.after_round is not None:
            n += self.after_round()
        return n

    def close(self) -> None:
        self.timer.close()


async def run_until_signalled(start: Callable[[], object], close: Callable[[], object],
                              stop: asyncio.Event) -> None:
    """A daemon's life, the same for every daemon: SIGTERM and SIGINT set ``stop``; ``start()``,
    wait for ``stop``, then ``close()`` whatever happened (either may be a coroutine function)."""
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    try:
        if inspect.isawaitable(started := start()):
            await started
        await stop.wait()
    finally:
        if inspect.isawaitable(closed := close()):
            await closed


async def patiently(call: Callable[[], object], *, retry_on: type[BaseException], log: Callable[[str], None],
                    final: Callable[[BaseException], bool] = lambda exc: False,
                    first_s: float = 1.0, max_s: float = 30.0):
    """``call()`` in a thread until it returns; a ``retry_on`` failure is logged and tried again
    after ``first_s`` doubling to ``max_s``, unless ``final(exc)`` says retrying cannot help."""
    wait = first_s
    while True:
        try:
            return await asyncio.to_thread(call)
        except retry_on as exc:
            if final(exc):
                raise
            log(f"{exc}; trying again in {wait:.0f} s")
            await asyncio.sleep(wait)
            wait = min(wait * 2, max_s)
