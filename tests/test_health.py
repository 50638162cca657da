"""The health model shared by the node daemon, the adapter and the cloud (cyphonic.health)."""

from __future__ import annotations

import os
import re

import pytest

from cyphonic.health import CODES, CONDITION, EVENT, Health, Warning, describe

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
