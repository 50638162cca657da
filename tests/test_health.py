"""The health model shared by the node daemon, the adapter and the cloud (cyphonic.health)."""

from __future__ import annotations

import os
import re

import pytest

from cyphonic.health import CODES, CONDITION, EVENT, Health, LoadWatch, Warning, describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_condition_keeps_its_since_while_it_holds_and_is_forgotten_when_it_ends():
    h = Health()
    h.observe(10.0, [Warning("cloud-unreachable", "no answer", subject="cam1")])
    h.observe(12.0, [Warning("cloud-unreachable", "still no answer", subject="cam1")])
    [row] = h.report(13.0)
    assert row == {"code": "cloud-unreachable", "severity": "error", "text": "still no answer",
                   "subject": "cam1", "since": 10.0}
    h.observe(14.0, [])
    assert h.report(14.0) == []
    h.observe(15.0, [Warning("cloud-unreachable", "again", subject="cam1")])
    assert h.report(15.0)[0]["since"] == 15.0


def test_same_code_for_two_subjects_stands_twice_errors_first():
    h = Health()
    h.observe(1.0, [Warning("connecting", "cloud link: logging in", subject="a"),
                    Warning("login-failed", "TOKEN_USED", subject="b"),
                    Warning("connecting", "cloud link: registering", subject="c")])
    rows = h.report(2.0)
    assert [(r["code"], r.get("subject")) for r in rows] == [("login-failed", "b"), ("connecting", "a"),
                                                             ("connecting", "c")]


def test_events_show_for_a_while_latest_text_wins_and_are_bounded():
    h = Health(event_show_s=300.0, events_max=3)
    h.record(0.0, Warning("worker-restarted", "worker 0 died (exit -9)", subject="0"))
    h.record(5.0, Warning("worker-restarted", "worker 0 died (exit 1)", subject="0"))
    assert [(r["text"], r["since"]) for r in h.report(6.0)] == [("worker 0 died (exit 1)", 5.0)]
    assert h.report(305.0) == []
    for i in range(10):
        h.record(400.0 + i, Warning("tunnel-failed", f"peer{i}", subject=str(i)))
    assert [r["text"] for r in h.report(410.0)] == ["peer7", "peer8", "peer9"]


def test_unknown_codes_and_wrong_kinds_are_refused():
    with pytest.raises(ValueError):
        Warning("no-such-code", "x")
    h = Health()
    with pytest.raises(ValueError):
        h.observe(0.0, [Warning("worker-restarted", "x")])
    with pytest.raises(ValueError):
        h.record(0.0, Warning("cloud-unreachable", "x"))


def test_every_code_is_a_condition_or_an_event_with_a_severity_and_a_meaning():
    for name, code in CODES.items():
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", name)
        assert code.kind in (CONDITION, EVENT) and code.severity in ("error", "warning") and code.meaning


def test_the_documented_table_is_the_code_table():
    """docs/architecture.md lists every health code with its severity and kind, and no other."""
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        doc = f.read()
    rows = dict((m.group(1), (m.group(2), m.group(3)))
                for m in re.finditer(r"^\| `([a-z-]+)` \| (error|warning) \| (condition|event) \|", doc, re.M))
    assert rows == {name: (c.severity, c.kind) for name, c in CODES.items()}


def test_describe_prints_severity_code_text_and_age():
    assert describe([{"code": "worker-down", "severity": "error", "text": "worker 1", "since": 90.0}], 100.0) == \
        ["[error] worker-down: worker 1 (for 10 s)"]


class Counters:
    """A daemon's running totals, as ``LoadWatch`` samples them (and how often it did)."""

    def __init__(self) -> None:
        self.t = {"cookie_replies": {"device": 0}, "kernel_drops": {"udp4 0.0.0.0:47100": 0},
                  "drops": {"device_mac1": 0}}
        self.samples = 0

    def __call__(self) -> dict:
        self.samples += 1
        return {k: dict(v) for k, v in self.t.items()}


def _under_load(h: Health, w: LoadWatch, c: Counters, now: float) -> dict | None:
    h.observe(now, w.conditions(now, c))
    rows = [r for r in h.report(now) if r["code"] == "under-load"]
    return rows[0] if rows else None


def test_under_load_holds_while_cookie_replies_climb_and_ends_by_itself():
    h, w, c = Health(), LoadWatch(sample_s=1.0, hold_s=5.0), Counters()
    assert _under_load(h, w, c, 100.0) is None                    # the first sample is the base
    for i in range(1, 4):                                          # cookie replies sent, every second
        c.t["cookie_replies"]["device"] += 50
        row = _under_load(h, w, c, 100.0 + i)
        assert row is not None and row["severity"] == "warning" and row["since"] == 101.0
        assert row["text"].startswith("50 cookie replies sent")
    samples = c.samples
    assert _under_load(h, w, c, 103.3) is not None                  # a status between two samples:
    assert c.samples == samples                                     # nothing read, nothing changed
    # the replies stop: it holds hold_s after the last rise, then ends by itself
    seen = {t: _under_load(h, w, c, t) is not None for t in (104.0, 105.0, 106.0, 107.0, 108.0, 109.0)}
    assert seen == {104.0: True, 105.0: True, 106.0: True, 107.0: True, 108.0: False, 109.0: False}
    c.t["cookie_replies"]["device"] += 1                            # again: a new since
    assert _under_load(h, w, c, 110.0)["since"] == 110.0


def test_under_load_from_kernel_drops_and_from_the_daemon_s_own_drops_climbing_fast():
    h, w, c = Health(), LoadWatch(sample_s=1.0, hold_s=5.0, drops_per_s=10.0), Counters()
    _under_load(h, w, c, 0.0)
    c.t["kernel_drops"]["udp4 0.0.0.0:47100"] += 1                 # any kernel drop is load
    row = _under_load(h, w, c, 1.0)
    assert row is not None and "1 datagrams dropped by the kernel (most on udp4 0.0.0.0:47100)" in row["text"]
    h2, w2, c2 = Health(), LoadWatch(sample_s=1.0, hold_s=5.0, drops_per_s=10.0), Counters()
    _under_load(h2, w2, c2, 0.0)
    c2.t["drops"]["device_mac1"] += 5                              # a few stray bad datagrams are not
    assert _under_load(h2, w2, c2, 1.0) is None
    c2.t["drops"]["engine_unknown_type"] = 9                       # a reason seen for the first time counts
    assert _under_load(h2, w2, c2, 1.5) is None                     # whole (not sampled yet: 0.5 s after)
    c2.t["drops"]["device_mac1"] += 3                              # 12 in 1 s
    row = _under_load(h2, w2, c2, 2.0)
    assert row is not None and row["text"] == "12 dropped by the daemon (most engine_unknown_type) in 1.0 s"


def test_counters_that_fall_are_no_load_and_a_new_base():
    """A restarted worker's counters start again from 0; a removed general node's vanish."""
    h, w, c = Health(), LoadWatch(sample_s=1.0, hold_s=5.0), Counters()
    c.t["kernel_drops"]["udp4 0.0.0.0:47100"] = 500
    c.t["drops"]["worker_drop_no_session"] = 1000
    _under_load(h, w, c, 0.0)
    c.t["kernel_drops"] = {}
    c.t["drops"]["worker_drop_no_session"] = 3
    assert _under_load(h, w, c, 1.0) is None
    c.t["drops"]["worker_drop_no_session"] = 50                     # from the new base: 47 in 1 s
    assert _under_load(h, w, c, 2.0) is not None
