"""The one asyncio driver of sans-IO cores (cyphonic.driver): timer, flush rounds, errors."""

from __future__ import annotations

import asyncio
from collections import deque

from cyphonic.driver import EVENTS_PER_ROUND_MAX, FLUSH_ROUNDS_MAX, CoreDriver, DeadlineTimer


class FakeCore:
    """A datagram core that echoes: each datagram received is queued back, and an event says so."""

    def __init__(self) -> None:
        self.out: deque = deque()
        self.events: deque = deque()
        self.deadline: float | None = None
        self.fired: list[float] = []

    def receive_datagram(self, data, addr, now):
        self.out.append((data, addr))
        self.events.append(("got", data))

    def datagrams_to_send(self):
        out = list(self.out)
        self.out.clear()
        return out

    def next_event(self):
        return self.events.popleft() if self.events else None

    def get_timer(self):
        return self.deadline

    def handle_timer(self, now):
        self.fired.append(now)
        self.deadline = None
        self.events.append(("timer", now))


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(coro):
    return asyncio.run(coro)


def test_flush_sends_delivers_and_goes_round_while_handlers_feed_the_core():
    async def main():
        core, sent, seen = FakeCore(), [], []
        d = CoreDriver(core, lambda data, addr: sent.append(data), None)

        def on_event(e):
            seen.append(e)
            if e == ("got", b"ping"):
                core.receive_datagram(b"pong", ("h", 1), 0.0)  # a handler that makes the core send again
        d.on_event = on_event
        d.receive(b"ping", ("h", 1))
        assert sent == [b"ping", b"pong"]
        assert seen == [("got", b"ping"), ("got", b"pong")]
    run(main())


def test_flush_rounds_are_bounded_when_handlers_loop_forever():
    async def main():
        core, sent = FakeCore(), []
        d = CoreDriver(core, lambda data, addr: sent.append(data),
                       lambda e: core.receive_datagram(b"again", ("h", 1), 0.0))
        d.receive(b"x", ("h", 1))
        assert 0 < len(sent) <= FLUSH_ROUNDS_MAX * EVENTS_PER_ROUND_MAX
        assert d.errors["flush_rounds_exhausted"] == 1
    run(main())


def test_send_errors_and_handler_exceptions_are_counted_not_raised():
    async def main():
        core = FakeCore()

        def send(data, addr):
            raise BlockingIOError if data == b"full" else ConnectionRefusedError

        def on_event(e):
            raise RuntimeError("bug")
        d = CoreDriver(core, send, on_event)
        d.receive(b"full", ("h", 1))
        d.receive(b"refused", ("h", 1))
        assert d.errors == {"send_buffer_full": 1, "ConnectionRefusedError": 1, "event_handler_RuntimeError": 2}
    run(main())


def test_a_flush_asked_for_inside_after_round_goes_round_once_more():
    async def main():
        core, sent = FakeCore(), []
        d = CoreDriver(core, lambda data, addr: sent.append(data))
        fed = []

        def after_round():
            if not fed:   # e.g. the DNS edge asks the engine for a tunnel: the engine queues a datagram
                fed.append(1)
                core.out.append((b"route request", ("cloud", 1)))
                d.flush()
            return 0
        d.after_round = after_round
        d.flush()
        assert sent == [b"route request"]
    run(main())


def test_timer_is_kept_at_the_core_deadline_and_fires_once():
    async def main():
        clock = Clock(100.0)
        core = FakeCore()
        d = CoreDriver(core, lambda data, addr: None, None, clock=clock)
        core.deadline = 100.02
        d.flush()
        assert d.timer.armed_for == 100.02
        handle = d.timer._handle
        d.flush()                      # same deadline: the same timer stays
        assert d.timer._handle is handle
        core.deadline = 100.01         # moved: re-armed
        d.flush()
        assert d.timer.armed_for == 100.01 and d.timer._handle is not handle
        clock.t = 100.01
        await asyncio.sleep(0.05)
        assert core.fired == [100.01]
        assert d.timer.armed_for is None
    run(main())


def test_poke_fires_a_deadline_that_a_fast_path_let_pass():
    async def main():
        clock = Clock(5.0)
        core = FakeCore()
        d = CoreDriver(core, lambda data, addr: None, None, clock=clock)
        core.deadline = 50.0
        d.flush()
        assert d.poke() is False and core.fired == []
        core.deadline = 4.0            # moved behind the driver's back, already due
        assert d.poke() is True and core.fired == [5.0]
    run(main())


def test_close_cancels_and_never_arms_again():
    async def main():
        clock = Clock(0.0)
        fired = []
        t = DeadlineTimer(lambda: 0.01, fired.append, clock=clock)
        t.arm()
        t.close()
        t.arm()
        assert t.poke() is False
        await asyncio.sleep(0.03)
        assert fired == [] and t.armed_for is None
    run(main())


def test_a_core_without_events_is_driven_too():
    async def main():
        class Relay:
            def __init__(self):
                self.q = []

            def receive_datagram(self, data, addr, now):
                self.q.append((data, ("peer", 2)))

            def datagrams_to_send(self):
                q, self.q = self.q, []
                return q

            def get_timer(self):
                return None

            def handle_timer(self, now):
                pass
        sent = []
        d = CoreDriver(Relay(), lambda data, addr: sent.append((data, addr)))
        d.receive(b"x", ("a", 1))
        assert sent == [(b"x", ("peer", 2))]
    run(main())


def test_a_failing_timer_is_counted_and_the_timer_stays_armed():
    async def main():
        clock = Clock(10.0)
        core = FakeCore()

        def broken(now):
            raise RuntimeError("bug")
        core.handle_timer = broken
        d = CoreDriver(core, lambda data, addr: None, None, clock=clock)
        core.deadline = 9.0
        assert d.poke() is True
        assert d.errors["timer_RuntimeError"] == 1
        assert d.timer.armed_for == 10.1            # not again at once: no spinning on a broken core
        assert d.poke() is False
        core.deadline = 20.0
        d.flush()
        assert d.timer.armed_for == 20.0
    run(main())
