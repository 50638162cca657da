"""`cyphonic-led`: the appliance's state on the Pi's activity LED, for a Pi without a screen.

The state comes from what is already there: ``/run/cyphonic/provision.json`` (written by
`cyphonic-provision` at boot), the adapter's status socket (as `cyadm status` asks it) and the
last update's outcome, ``/data/update/last.json`` (appliance/updater.py).
The LED is driven through sysfs: ``/sys/class/leds/ACT`` (older kernels: ``led0``), its
``trigger`` set to ``none`` and its ``brightness`` written; the kernel's trigger is put back
on SIGTERM.

Blink codes (the table PATTERNS below is the one place they are defined; docs/appliance.md
shows them to users):

| state | pattern | meaning |
|---|---|---|
| booting | fast blink, 5 Hz | starting; provisioning not done or the adapter not answering yet |
| not-provisioned, error, adapter-down | 3 short blinks, pause | no cyphonic.toml, a mistake in it, login refused, or the adapter does not run: see `cyadm status` |
| cloud-unreachable | 1 long, 1 short, pause | the adapter runs but cannot reach the cloud (WAN cable? address?) |
| ready | heartbeat, 1 Hz | logged in to the cloud; no tunnel up |
| tunnel-up | on, short off blip every 2 s | at least one general node's tunnel is up |
| rolled-back | 2 long blinks, pause | working, but on the old version: the last update failed its health gate and rolled back (`cyadm update status` says why; `cyadm update ack` stops it) |

`rolled-back` takes the place of ready and tunnel-up only: any problem pattern wins over it.
`derive_state()` and `level_at()` are pure; `run()` is the loop: it re-reads the state every
LED_POLL_S and never sleeps longer than LED_TICK_S, so SIGTERM ends it at once. With no LED it logs
once and idles until SIGTERM (exit 0), because a missing LED must never fail the boot.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from .constants import ADAPTER_DOWN_AFTER_S, LED_ASK_TIMEOUT_S, LED_POLL_S, LED_TICK_S

LED_NAMES = ("ACT", "led0")
PROVISION_STATUS = "/run/cyphonic/provision.json"
ADAPTER_SOCKET = "/run/cyphonic/adapter.sock"
LAST_UPDATE = "/data/update/last.json"

BOOTING, NOT_PROVISIONED, ERROR, ADAPTER_DOWN = "booting", "not-provisioned", "error", "adapter-down"
CLOUD_UNREACHABLE, READY, TUNNEL_UP = "cloud-unreachable", "ready", "tunnel-up"
ROLLED_BACK = "rolled-back"

_THREE_SHORT = ((True, 0.15), (False, 0.25), (True, 0.15), (False, 0.25), (True, 0.15), (False, 1.5))
# state -> one period of (LED on?, seconds), repeated
PATTERNS: dict[str, tuple[tuple[bool, float], ...]] = {
    BOOTING: ((True, 0.1), (False, 0.1)),                                   # 5 Hz
    NOT_PROVISIONED: _THREE_SHORT,
    ERROR: _THREE_SHORT,
    ADAPTER_DOWN: _THREE_SHORT,
    CLOUD_UNREACHABLE: ((True, 0.8), (False, 0.3), (True, 0.15), (False, 1.25)),
    READY: ((True, 0.1), (False, 0.1), (True, 0.1), (False, 0.7)),           # heartbeat, 1 s period
    TUNNEL_UP: ((True, 1.9), (False, 0.1)),
    ROLLED_BACK: ((True, 0.8), (False, 0.4), (True, 0.8), (False, 1.5)),   # 2 long blinks, pause
}


def derive_state(provision: dict | None, status: dict | None, unanswered_s: float = 0.0,
                 rolled_back: bool = False) -> str:
    """The appliance's state from provision.json (None: not written yet), the adapter's answer to
    `status` (None: no answer), how long the adapter has not answered since provisioning
    finished, and whether the last update rolled back and nobody acknowledged it yet."""
    if provision is None:
        return BOOTING
    pstate = provision.get("state")
    if pstate == "not-provisioned":
        return NOT_PROVISIONED
    if pstate != "ok":
        return ERROR
    if status is None or "error" in status:
        return BOOTING if unanswered_s < ADAPTER_DOWN_AFTER_S else ADAPTER_DOWN
    cloud = (status.get("cloud") or {}).get("state")
    if cloud == "failed":
        return ERROR                    # the cloud refused the adapter's login (token?)
    if cloud == "reconnecting" or any(h.get("code") == "cloud-unreachable" for h in status.get("health", [])):
        return CLOUD_UNREACHABLE
    if cloud != "ready":
        return BOOTING                  # logging in, registering
    if rolled_back:
        return ROLLED_BACK
    if any(t.get("up") for t in status.get("tunnels", [])):
        return TUNNEL_UP
    return READY


def level_at(pattern, t: float) -> tuple[bool, float]:
    """(LED on?, seconds until the next change) at `t` seconds into a repeating pattern."""
    period = sum(d for _, d in pattern)
    t = t % period
    for on, d in pattern:
        if t < d:
            return on, d - t
        t -= d
    return pattern[-1][0], pattern[0][1]     # float rounding at the very end of the period


# --- the edge ---------------------------------------------------------------------------------------

class Led:
    """One sysfs LED: trigger none + brightness. Failures are logged once, never raised."""

    def __init__(self, path: str, log) -> None:
        self.path = path
        self.log = log
        self.failed = False
        self.lit: bool | None = None
        self.old_trigger = ""
        trigger = self._read("trigger")
        for word in trigger.split():
            if word.startswith("[") and word.endswith("]"):
                self.old_trigger = word[1:-1]
        self.on_value = self._read("max_brightness") or "1"
        self._write("trigger", "none")

    def _read(self, name: str) -> str:
        try:
            with open(os.path.join(self.path, name)) as f:
                return f.read().strip()
        except OSError:
            return ""

    def _write(self, name: str, value: str) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(value)
        except OSError as exc:
            if not self.failed:
                self.log(f"cannot write {os.path.join(self.path, name)}: {exc}; carrying on")
            self.failed = True

    def set(self, on: bool) -> None:
        if on != self.lit:
            self._write("brightness", self.on_value if on else "0")
            self.lit = on

    def restore(self) -> None:
        if self.old_trigger and self.old_trigger != "none":
            self._write("trigger", self.old_trigger)


def find_led(leds_dir: str, name: str | None = None) -> str | None:
    names = [name] if name else list(LED_NAMES)
    for n in names:
        p = os.path.join(leds_dir, n)
        if os.path.isfile(os.path.join(p, "brightness")):
            return p
    if not name:
        try:
            for n in sorted(os.listdir(leds_dir)):
                if n.lower().endswith(":act") and os.path.isfile(os.path.join(leds_dir, n, "brightness")):
                    return os.path.join(leds_dir, n)
        except OSError:
            pass
    return None


def read_provision(path: str) -> dict | None:
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else {"state": "unreadable"}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"state": "unreadable"}


def read_rolled_back(path: str) -> bool:
    """last.json says the last update rolled back, unacknowledged (a missing or broken file: no)."""
    from .update import Last, UpdateFileError, parse_file, rolled_back_unacknowledged
    try:
        with open(path, "rb") as f:
            return rolled_back_unacknowledged(parse_file(f.read(1 << 20), Last))
    except (OSError, UpdateFileError):
        return False


def ask_status(sock: str) -> dict | None:
    from .cyadm import ask
    try:
        st = ask(sock, "status", timeout=LED_ASK_TIMEOUT_S)
        return st if isinstance(st, dict) and "error" not in st else None
    except (OSError, ValueError):
        return None


def run(*, leds_dir: str = "/sys/class/leds", led_name: str | None = None,
        provision_path: str = PROVISION_STATUS, socket_path: str = ADAPTER_SOCKET,
        duration_s: float = 0.0, out=None, last_update_path: str = LAST_UPDATE) -> int:
    out = out or sys.stdout
    stop = []

    def log(line: str) -> None:
        print(f"cyphonic-led: {line}", file=out, flush=True)

    def on_term(signum, frame) -> None:
        stop.append(signum)
    old = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        path = find_led(leds_dir, led_name)
        led = Led(path, log) if path else None
        if led is None:
            log(f"no LED ({led_name or ' or '.join(LED_NAMES)}) under {leds_dir}: nothing to show; idling")
        else:
            log(f"showing the appliance's state on {path}")
        start = time.monotonic()
        state, since, next_poll, unanswered_from = None, start, start, None
        while not stop and not (duration_s and time.monotonic() - start >= duration_s):
            now = time.monotonic()
            if led is not None and now >= next_poll:
                prov = read_provision(provision_path)
                st = ask_status(socket_path) if prov is not None and prov.get("state") == "ok" else None
                if prov is not None and prov.get("state") == "ok" and st is None:
                    unanswered_from = unanswered_from or now
                else:
                    unanswered_from = None
                new = derive_state(prov, st, now - unanswered_from if unanswered_from else 0.0,
                                   read_rolled_back(last_update_path))
                if new != state:
                    log(f"state {new}")
                    state, since = new, now
                next_poll = now + LED_POLL_S
            wait = LED_TICK_S
            if led is not None:
                on, left = level_at(PATTERNS[state], now - since)
                led.set(on)
                wait = min(wait, left)
                wait = min(wait, next_poll - now)
            time.sleep(max(0.01, wait))
        if led is not None:
            led.restore()
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cyphonic-led",
                                 description="Show the CYPHONIC appliance's state on the activity LED.")
    ap.add_argument("--leds-dir", default="/sys/class/leds", help="where the LEDs are (default %(default)s)")
    ap.add_argument("--led", default=None, help="the LED's name (default: ACT, else led0)")
    ap.add_argument("--provision-status", default=PROVISION_STATUS, help="default %(default)s")
    ap.add_argument("--socket", default=ADAPTER_SOCKET, help="the adapter's status socket (default %(default)s)")
    ap.add_argument("--last-update", default=LAST_UPDATE, help="the last update's outcome (default %(default)s)")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until SIGTERM)")
    a = ap.parse_args(argv)
    return run(leds_dir=a.leds_dir, led_name=a.led, provision_path=a.provision_status, socket_path=a.socket,
               duration_s=a.duration, last_update_path=a.last_update)


if __name__ == "__main__":
    sys.exit(main())
