"""The RFC 6479 replay window (cyphonic.replay) and the token buckets (cyphonic.ratelimit).

The window is checked against a reference model that is obviously right and
obviously slow: the set of every counter accepted so far and the highest one.
A counter is accepted iff it is unseen and ``highest - counter <= WINDOW``
(or nothing was accepted yet). Hypothesis drives both with random walks,
big jumps and replays, and they must agree on every step.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic import constants as C
from cyphonic.ratelimit import RateLimiter
from cyphonic.replay import WINDOW, ReplayWindow

assert WINDOW == C.REPLAY_WINDOW_PACKETS == 8128


class ModelWindow:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest: int | None = None

    def check(self, c: int) -> bool:
        if c in self.seen:
            return False
        return self.highest is None or self.highest - c <= WINDOW

    def update(self, c: int) -> bool:
        if not self.check(c):
            return False
        self.seen.add(c)
        self.highest = c if self.highest is None else max(self.highest, c)
        return True


def accept_all(w: ReplayWindow, counters) -> None:
    for c in counters:
        assert w.update(c), c


# --- Examples -------------------------------------------------------------------------

def test_in_order_accepted_and_duplicates_refused():
    w = ReplayWindow()
    for c in range(20_000):
        assert w.check(c)
        assert w.update(c)
        assert not w.check(c)
        assert not w.update(c)
    assert w.highest == 19_999


def test_first_counter_may_be_anything():
    for first in (0, 1, 63, 64, 8191, 8192, 2**40, 2**56 - 1, 2**64 - 1):
        w = ReplayWindow()
        assert w.update(first)
        assert not w.update(first)
        assert w.highest == first


def test_reordering_inside_window_accepted_exactly_once():
    w = ReplayWindow()
    top = 50_000
    assert w.update(top)
    # Every counter of the window, in a scrambled order, accepted once.
    order = sorted(range(top - WINDOW, top), key=lambda c: (c * 2654435761) % 8191)
    for c in order:
        assert w.update(c), c
    for c in range(top - WINDOW, top + 1):
        assert not w.check(c) and not w.update(c), c


def test_window_edge():
    for top in (WINDOW + 5, 10_000, 65_536, 2**40 + 12345, 2**56 - 2):
        w = ReplayWindow()
        assert w.update(top)
        assert w.check(top - WINDOW)
        assert not w.check(top - WINDOW - 1)
        assert not w.update(top - WINDOW - 1)
        assert w.update(top - WINDOW)
        assert not w.update(top - WINDOW)
        # All in between still accepted once.
        assert w.update(top - 1) and w.update(top - WINDOW + 1)


def test_old_counters_beyond_window_refused():
    w = ReplayWindow()
    accept_all(w, range(0, 10_000, 3))
    highest = w.highest
    for c in range(0, highest - WINDOW):
        assert not w.check(c)
        assert not w.update(c)


def test_edge_at_every_bit_position():
    """The window edge as the highest counter moves through a whole 64-bit block."""
    for top in range(20_000, 20_000 + 130):
        w = ReplayWindow()
        accept_all(w, range(top - WINDOW - 200, top + 1, 7))
        w.update(top)
        lo = top - WINDOW
        for c in range(lo - 70, lo + 70):
            assert w.check(c) == (c >= lo and (c - (top - WINDOW - 200)) % 7 != 0), (top, c)


@pytest.mark.parametrize("jump", [64, 8128, 8129, 8191, 8192, 8193, 8192 + 64, 100_000, 2**40 + 3, 2**55])
def test_big_jumps_clear_properly(jump):
    w = ReplayWindow()
    base = 1_000_003
    accept_all(w, range(base - 9000, base + 1))
    new = base + jump
    assert w.update(new)
    # Counters that were seen stay refused (inside the window) or are too old.
    for c in range(base - 9000, base + 1):
        assert not w.update(c), c
    # Unseen counters inside the new window are accepted, including ones whose bits
    # share ring slots with old, already-seen counters.
    unseen = [c for c in range(max(new - WINDOW, base + 1), new)]
    for c in sorted(set(unseen[:3000] + unseen[-3000:])):
        assert w.update(c), c
    assert not w.update(new - WINDOW - 1)


def test_jump_by_exact_ring_size_does_not_keep_stale_bits():
    w = ReplayWindow()
    accept_all(w, range(0, 8192))
    assert w.update(8192 + 8191)        # exactly one ring further than 8191
    for c in range(8192 + 8191 - WINDOW, 8192 + 8191):
        assert w.check(c), c            # every slot reused by an old counter is fresh


def test_check_does_not_change_state():
    w = ReplayWindow()
    for c in (5, 1_000_000, 999_990, 2**40):
        for _ in range(3):
            assert w.check(c)
        assert w.highest != c
    assert w.update(10)
    assert w.check(11) and w.check(9) and w.check(2**50)
    assert w.highest == 10
    assert w.update(11) and w.update(9)


# --- Property against the model ------------------------------------------------------------

steps = st.one_of(
    st.integers(-40, 40),                           # jitter around the current point
    st.integers(-WINDOW - 70, -WINDOW + 70),        # the window edge
    st.integers(8000, 8400),                        # about one ring ahead
    st.integers(-200_000, 200_000),                 # far moves both ways
    st.just(0),                                     # exact replay of the current point
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**60), st.lists(steps, min_size=1, max_size=400))
def test_window_agrees_with_model_on_random_walk(start, deltas):
    w, m = ReplayWindow(), ModelWindow()
    c = start
    history: list[int] = []
    for d in deltas:
        c = max(0, c + d)
        history.append(c)
        assert w.check(c) == m.check(c), (c, w.highest)
        assert w.update(c) == m.update(c), (c, w.highest)
        assert w.highest == m.highest
    # Replaying the whole history is refused everywhere.
    for c in history:
        assert not w.check(c) and not w.update(c)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3 * 8192), min_size=1, max_size=600))
def test_window_agrees_with_model_on_dense_counters(counters):
    w, m = ReplayWindow(), ModelWindow()
    for c in counters:
        assert w.check(c) == m.check(c), c
        assert w.update(c) == m.update(c), c


# --- Rate limiter -----------------------------------------------------------------------

def test_ratelimit_burst_then_refusal():
    rl = RateLimiter(rate_per_s=20, burst=40)
    now = 1000.0
    assert all(rl.allow("a", now) for _ in range(40))
    assert not rl.allow("a", now)
    assert not rl.allow("a", now)
    # Another source has its own bucket.
    assert rl.allow("b", now)


def test_ratelimit_refill_over_time():
    rl = RateLimiter(rate_per_s=20, burst=40)
    now = 0.0
    for _ in range(40):
        assert rl.allow("k", now)
    assert not rl.allow("k", now)
    assert not rl.allow("k", now + 0.04)          # 0.8 token
    assert rl.allow("k", now + 0.06)              # 1.2 tokens, one spent
    assert not rl.allow("k", now + 0.06)
    # After a long pause the bucket is full again, but never above the burst.
    later = now + 3600
    assert sum(rl.allow("k", later) for _ in range(100)) == 40


def test_ratelimit_steady_rate():
    rl = RateLimiter(rate_per_s=10, burst=1)
    allowed = sum(rl.allow("k", t / 100) for t in range(1000))  # 10 s, 100 tries a second
    # 100 plus the initial token, less what float rounding of the refill costs
    # (0.1 * 10 can fall just short of 1.0, so a token may arrive one try late).
    assert 90 <= allowed <= 101


def test_ratelimit_clock_going_backwards_does_not_add_tokens():
    """A ``now`` that steps back (callers with skewed clocks) must not credit the same
    interval twice: after 100 -> 50 -> 100 no time has really passed since 100."""
    rl = RateLimiter(rate_per_s=1, burst=2)
    assert rl.allow("k", 100.0) and rl.allow("k", 100.0)
    assert not rl.allow("k", 50.0)
    assert not rl.allow("k", 100.0)


def test_ratelimit_table_bounded():
    rl = RateLimiter(rate_per_s=1, burst=1, max_entries=100)
    for i in range(10_000):
        rl.allow(("10.0.0.1", i), 0.0)
        assert len(rl) <= 100
    assert len(rl) == 100
    # The least recently used keys were evicted: an evicted source starts with a full bucket.
    assert rl.allow(("10.0.0.1", 0), 0.0)
    # A recent key is still tracked and empty.
    assert not rl.allow(("10.0.0.1", 9_999), 0.0)


def test_ratelimit_default_table_bounded():
    rl = RateLimiter()
    for i in range(C.RATELIMIT_TABLE_MAX + 500):
        rl.allow(i, 0.0)
    assert len(rl) == C.RATELIMIT_TABLE_MAX


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 0.5)), max_size=300))
def test_ratelimit_never_exceeds_burst_plus_refill(events):
    rate, burst = 5.0, 3.0
    rl = RateLimiter(rate_per_s=rate, burst=burst, max_entries=1000)
    now = 0.0
    allowed: dict[int, int] = {}
    for key, dt in events:
        now += dt
        if rl.allow(key, now):
            allowed[key] = allowed.get(key, 0) + 1
    for key, n in allowed.items():
        assert n <= burst + rate * now + 1e-6
