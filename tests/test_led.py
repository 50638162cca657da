"""The activity LED helper (appliance/led.py, `cyphonic-led`): the state derived from
provision.json and the adapter's status, the blink patterns, and the loop against a fake
/sys/class/leds (no LED: it idles until SIGTERM and exits 0)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance import led
from appliance.led import PATTERNS, derive_state, level_at

ROOT = Path(__file__).resolve().parent.parent
OK = {"state": "ok", "errors": []}


def adapter(cloud="ready", tunnels=(), health=()):
    return {"kind": "adapter", "cloud": {"state": cloud}, "tunnels": list(tunnels), "health": list(health)}


@pytest.mark.parametrize("provision,status,unanswered,expected", [
    (None, None, 0, led.BOOTING),                                          # provisioning has not run yet
    ({"state": "not-provisioned"}, None, 0, led.NOT_PROVISIONED),
    ({"state": "error", "errors": ["x"]}, None, 0, led.ERROR),
    ({"state": "unreadable"}, None, 0, led.ERROR),
    (OK, None, 5, led.BOOTING),                                            # the adapter is starting
    (OK, None, led.ADAPTER_DOWN_AFTER_S + 1, led.ADAPTER_DOWN),            # ... and never answered
    (OK, {"error": "internal"}, 0, led.BOOTING),
    (OK, adapter("logging in"), 0, led.BOOTING),
    (OK, adapter("registering"), 0, led.BOOTING),
    (OK, adapter("reconnecting"), 0, led.CLOUD_UNREACHABLE),
    (OK, adapter("ready", health=[{"code": "cloud-unreachable"}]), 0, led.CLOUD_UNREACHABLE),
    (OK, adapter("failed"), 0, led.ERROR),                                 # login refused: token?
    (OK, adapter("ready"), 0, led.READY),
    (OK, adapter("ready", tunnels=[{"up": False}]), 0, led.READY),
    (OK, adapter("ready", tunnels=[{"up": False}, {"up": True}]), 0, led.TUNNEL_UP),
])
def test_derive_state(provision, status, unanswered, expected):
    assert derive_state(provision, status, unanswered) == expected


@pytest.mark.parametrize("provision,status,unanswered,expected", [
    (OK, adapter("ready"), 0, led.ROLLED_BACK),                           # working, on the old version
    (OK, adapter("ready", tunnels=[{"up": True}]), 0, led.ROLLED_BACK),
    (OK, adapter("reconnecting"), 0, led.CLOUD_UNREACHABLE),              # problems win over it
    (OK, None, led.ADAPTER_DOWN_AFTER_S + 1, led.ADAPTER_DOWN),
    ({"state": "error", "errors": ["x"]}, None, 0, led.ERROR),
    (OK, adapter("logging in"), 0, led.BOOTING),
])
def test_derive_state_after_a_rollback(provision, status, unanswered, expected):
    assert derive_state(provision, status, unanswered, rolled_back=True) == expected


def test_rolled_back_is_read_from_last_json(tmp_path):
    from appliance.update import COMMITTED, ROLLED_BACK, Last
    path = tmp_path / "last.json"
    assert led.read_rolled_back(str(path)) is False                       # no update yet
    last = Last(ROLLED_BACK, "A", "B", "0.1.0", "0.2.0", 1.0, 2.0, reason="the adapter restarted 3 times")
    path.write_text(json.dumps(last.to_json()))
    assert led.read_rolled_back(str(path)) is True
    path.write_text(json.dumps({**last.to_json(), "acknowledged": True}))  # cyadm update ack
    assert led.read_rolled_back(str(path)) is False
    path.write_text(json.dumps({**last.to_json(), "outcome": COMMITTED}))  # the next update went well
    assert led.read_rolled_back(str(path)) is False
    path.write_bytes(b"{garbage")                                          # a broken file shows nothing
    assert led.read_rolled_back(str(path)) is False


def test_every_state_has_a_pattern_and_they_are_told_apart():
    states = {led.BOOTING, led.NOT_PROVISIONED, led.ERROR, led.ADAPTER_DOWN, led.CLOUD_UNREACHABLE, led.READY,
              led.TUNNEL_UP, led.ROLLED_BACK}
    assert set(PATTERNS) == states
    for p in PATTERNS.values():
        assert all(d > 0 for _, d in p) and any(on for on, _ in p) and any(not on for on, _ in p)
    distinct = {PATTERNS[s] for s in (led.BOOTING, led.ERROR, led.CLOUD_UNREACHABLE, led.READY, led.TUNNEL_UP,
                                      led.ROLLED_BACK)}
    assert len(distinct) == 6
    assert PATTERNS[led.NOT_PROVISIONED] == PATTERNS[led.ERROR] == PATTERNS[led.ADAPTER_DOWN]


def period(p) -> float:
    return sum(d for _, d in p)


def test_documented_codes():
    assert period(PATTERNS[led.BOOTING]) == pytest.approx(0.2)                          # 5 Hz
    assert sum(on for on, _ in PATTERNS[led.ERROR]) == 3                                # 3 blinks, then
    assert PATTERNS[led.ERROR][-1][1] >= 1.0 and not PATTERNS[led.ERROR][-1][0]         # a pause
    ons = [d for on, d in PATTERNS[led.CLOUD_UNREACHABLE] if on]
    assert len(ons) == 2 and ons[0] > 3 * ons[1]                                        # 1 long, 1 short
    assert period(PATTERNS[led.READY]) == pytest.approx(1.0)                            # heartbeat 1 Hz
    on_time = sum(d for on, d in PATTERNS[led.TUNNEL_UP] if on)
    assert on_time / period(PATTERNS[led.TUNNEL_UP]) > 0.9                              # on, short blips
    ons = [d for on, d in PATTERNS[led.ROLLED_BACK] if on]
    assert len(ons) == 2 and min(ons) >= 0.5                                            # 2 long blinks, then
    assert PATTERNS[led.ROLLED_BACK][-1][1] >= 1.0 and not PATTERNS[led.ROLLED_BACK][-1][0]   # a pause


def test_level_at():
    boot = PATTERNS[led.BOOTING]
    assert level_at(boot, 0.0) == (True, pytest.approx(0.1))
    assert level_at(boot, 0.15) == (False, pytest.approx(0.05))
    assert level_at(boot, 10.05)[0] is True                   # repeats
    ready = PATTERNS[led.READY]
    assert [level_at(ready, t)[0] for t in (0.05, 0.15, 0.25, 0.5, 1.05)] == [True, False, True, False, True]
    for p in PATTERNS.values():                               # any moment, any pattern: a level and a wait
        for i in range(200):
            on, left = level_at(p, i * 0.0371)
            assert isinstance(on, bool) and 0 < left <= max(d for _, d in p) + 1e-9


# --- the loop against a fake sysfs ----------------------------------------------------------------

def fake_led(leds: Path, name="ACT", trigger="none rc-feedback [mmc0] timer heartbeat") -> Path:
    d = leds / name
    d.mkdir(parents=True)
    (d / "trigger").write_text(trigger + "\n")
    (d / "brightness").write_text("0\n")
    (d / "max_brightness").write_text("255\n")
    return d


def test_loop_blinks_the_state_and_gives_the_trigger_back(tmp_path, monkeypatch):
    d = fake_led(tmp_path / "leds")
    prov = tmp_path / "provision.json"
    prov.write_text(json.dumps({"state": "error", "errors": ["[cloud] key: required"]}))
    writes = []
    real = led.Led._write

    def record(self, name, value):
        writes.append((round(time.monotonic(), 3), name, value))
        real(self, name, value)
    monkeypatch.setattr(led.Led, "_write", record)
    out = tmp_path / "log"
    with open(out, "w") as f:
        assert led.run(leds_dir=str(tmp_path / "leds"), provision_path=str(prov),
                       socket_path=str(tmp_path / "none.sock"), duration_s=3.0, out=f) == 0
    log = out.read_text()
    assert f"showing the appliance's state on {d}" in log and "state error" in log
    assert writes[0][1:] == ("trigger", "none")
    levels = [v for _, n, v in writes if n == "brightness"]
    assert levels[:6] == ["255", "0", "255", "0", "255", "0"]                 # 3 short blinks
    on_times = [t for t, n, v in writes if n == "brightness" and v == "255"]
    # the pattern's own timing is tested on the pure function; here only that the loop does not
    # run ahead of it (a loaded machine may make it late, never early)
    assert on_times[1] - on_times[0] >= 0.3
    assert writes[-1][1:] == ("trigger", "mmc0")                               # the kernel's trigger back
    assert (d / "trigger").read_text() == "mmc0"


class FakeAdapter(threading.Thread):
    """A status socket answering like cyphonic-adapter."""

    def __init__(self, path: str, answer: dict) -> None:
        super().__init__(daemon=True)
        self.answer = answer
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.srv.settimeout(0.2)
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            try:
                c, _ = self.srv.accept()
            except (socket.timeout, OSError):
                continue
            with c:
                c.recv(65536)
                c.sendall(json.dumps(self.answer).encode() + b"\n")


def test_loop_asks_the_adapter(tmp_path):
    fake_led(tmp_path / "leds", name="led0")                  # older kernels' name
    prov = tmp_path / "provision.json"
    prov.write_text(json.dumps(OK))
    sock = str(tmp_path / "adapter.sock")
    srv = FakeAdapter(sock, adapter("ready", tunnels=[{"up": True}]))
    srv.start()
    out = tmp_path / "log"
    try:
        with open(out, "w") as f:
            assert led.run(leds_dir=str(tmp_path / "leds"), provision_path=str(prov), socket_path=sock,
                           duration_s=0.6, out=f) == 0
    finally:
        srv.stop = True
        srv.join(2)
    assert "state tunnel-up" in out.read_text()
    assert (tmp_path / "leds/led0/brightness").read_text() == "255"           # on (the blip is at the end)


def test_find_led(tmp_path):
    leds = tmp_path / "leds"
    assert led.find_led(str(leds)) is None
    fake_led(leds, "mmc0::")
    assert led.find_led(str(leds)) is None
    fake_led(leds, "platform:green:act")
    assert led.find_led(str(leds)) == str(leds / "platform:green:act")
    fake_led(leds, "ACT")
    assert led.find_led(str(leds)) == str(leds / "ACT")
    assert led.find_led(str(leds), "mmc0::") == str(leds / "mmc0::")


def test_no_led_idles_until_sigterm_and_exits_0(tmp_path):
    (tmp_path / "leds").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "appliance.led", "--leds-dir", str(tmp_path / "leds"),
                          "--provision-status", str(tmp_path / "none.json")],
                         cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert p.poll() is None                                    # still idling
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=5)
    assert p.returncode == 0
    assert out.count("no LED") == 1


def test_an_led_that_cannot_be_written_is_logged_once(tmp_path):
    d = fake_led(tmp_path / "leds")
    (d / "brightness").unlink()
    (d / "brightness").symlink_to("/proc/version")            # a file nobody (not even root) can write
    out = tmp_path / "log"
    with open(out, "w") as f:
        assert led.run(leds_dir=str(tmp_path / "leds"), provision_path=str(tmp_path / "none.json"),
                       duration_s=0.5, out=f) == 0
    assert out.read_text().count("cannot write") == 1
