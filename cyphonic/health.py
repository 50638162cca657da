"""The health model shared by the node daemon, the adapter and the cloud (Tailscale's
``health/warnings.go``, in small): each warning has a code, a severity, a text and the time
since when it holds. ``cyadm status`` and ``cyphonic-cloud stats`` show them.

Two kinds, both declared in ``CODES`` (the one table; ``docs/architecture.md`` shows it and
a test keeps the two the same):
- a *condition* holds while the state says so (the cloud does not answer, a worker is down).
  The daemon passes the conditions it sees to ``observe(now, [...])`` on its periodic tick and
  before answering a status request; ``since`` is when the condition was first seen without
  a break, and it is forgotten as soon as an observation lacks it;
- an *event* happened (a worker died and was restarted, a tunnel failed): ``record()`` keeps
  it for ``EVENT_SHOW_S``, the latest text per (code, subject), at most ``EVENTS_MAX``.

``LoadWatch`` turns rising counters into the ``under-load`` condition, the same for every
daemon: cookie replies sent, kernel drops on the daemon's sockets and its own drops, compared
between two samples.

Pure: time is an argument; no clocks, files or sockets.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

EVENT_SHOW_S = 300.0
EVENTS_MAX = 64

LOAD_SAMPLE_S = 1.0         # counters are compared over at least this long (a status asked between
                            # two of a daemon's ticks neither starts nor ends the condition)
LOAD_WARNING_HOLD_S = 5.0   # under-load holds this long after the last rise seen, then ends by itself
LOAD_DROPS_PER_S = 10.0     # the daemon's own drops climbing this fast are load (a stray bad datagram
                            # is not); any cookie reply sent or any kernel drop is

ERROR = "error"
WARNING = "warning"
_SEVERITY_ORDER = {ERROR: 0, WARNING: 1}

CONDITION = "condition"
EVENT = "event"


@dataclass(frozen=True)
class Code:
    severity: str
    kind: str
    meaning: str


# Every health code of every daemon. Adding a code here is what makes it usable.
CODES: dict[str, Code] = {
    # any node: the node daemon, the adapter's own link, each general node's link
    "cloud-unreachable": Code(ERROR, CONDITION, "from the first failure until the link is ready again"),
    "login-failed": Code(ERROR, CONDITION, "the cloud refused the login (token unknown, used or expired; "
                                           "identity revoked): the operator must act"),
    "connecting": Code(WARNING, CONDITION, "logging in or registering for the first time"),
    "certificate-expiring": Code(WARNING, CONDITION, "the node's certificate expires within an hour "
                                                     "and has not been renewed"),
    "clock-off": Code(WARNING, CONDITION, "the clock is more than 5 minutes off the cloud's (no NTP?); "
                                          "certificates are checked on the cloud's time"),
    "tunnel-failed": Code(WARNING, EVENT, "a tunnel could not be set up (policy, peer offline, no path)"),
    # any daemon: the node daemon, the adapter, the cloud (LoadWatch below)
    "under-load": Code(WARNING, CONDITION, "cookie replies are being sent, or the kernel or the daemon itself "
                                           "is dropping datagrams faster than usual; ends by itself"),
    "metrics-unwritable": Code(WARNING, CONDITION, "the Prometheus textfile (metrics_file) cannot be written"),
    # the node daemon
    "tun-failed": Code(ERROR, EVENT, "the TUN interface could not be created or configured"),
    "dns-down": Code(ERROR, EVENT, "the DNS server could not listen on its address"),
    # the adapter
    "worker-down": Code(ERROR, CONDITION, "a packet handling worker is not running"),
    "worker-restarted": Code(WARNING, EVENT, "a packet handling worker died and was restarted"),
    "gn-config": Code(WARNING, CONDITION, "a general node listed in the configuration could not be enrolled "
                                          "yet; retried"),
    "token-file": Code(WARNING, CONDITION, "gn_token_file cannot be read"),
    "registry-unreadable": Code(WARNING, CONDITION, "the general node registry was unreadable and was "
                                                    "set aside"),
    "lease-file": Code(WARNING, CONDITION, "the DHCP lease file was unreadable or partly invalid"),
    # the cloud
    "stats-unwritable": Code(WARNING, CONDITION, "the cloud cannot write its stats file"),
}


@dataclass(frozen=True)
class Warning:
    """One thing wrong, as an edge sees it: ``subject`` names what it is about (a general
    node, a worker), so two of the same code can stand side by side."""
    code: str
    text: str
    subject: str = ""

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown health code {self.code!r} (declare it in cyphonic.health.CODES)")


class Health:
    def __init__(self, *, event_show_s: float = EVENT_SHOW_S, events_max: int = EVENTS_MAX) -> None:
        self.event_show_s = event_show_s
        self.events_max = events_max
        self._conditions: dict[tuple[str, str], tuple[Warning, float]] = {}
        self._events: OrderedDict[tuple[str, str], tuple[Warning, float]] = OrderedDict()

    def observe(self, now: float, conditions: Iterable[Warning]) -> None:
        """The conditions that hold now (all of them: one missing has ended)."""
        seen: dict[tuple[str, str], tuple[Warning, float]] = {}
        for w in conditions:
            if CODES[w.code].kind != CONDITION:
                raise ValueError(f"{w.code} is an event: record() it")
            key = (w.code, w.subject)
            if key not in seen:
                old = self._conditions.get(key)
                seen[key] = (w, old[1] if old is not None else now)
        self._conditions = seen

    def record(self, now: float, warning: Warning) -> None:
        """An event happened: shown for ``event_show_s``; the latest per (code, subject)."""
        if CODES[warning.code].kind != EVENT:
            raise ValueError(f"{warning.code} is a condition: observe() it")
        key = (warning.code, warning.subject)
        self._events.pop(key, None)
        self._events[key] = (warning, now)
        while len(self._events) > self.events_max:
            self._events.popitem(last=False)

    def report(self, now: float) -> list[dict]:
        """What holds and what happened lately, errors first, oldest first."""
        for key in [k for k, (_, when) in self._events.items() if now - when >= self.event_show_s]:
            del self._events[key]
        rows = [(w, since) for w, since in self._conditions.values()] + list(self._events.values())
        rows.sort(key=lambda r: (_SEVERITY_ORDER[CODES[r[0].code].severity], r[1], r[0].code, r[0].subject))
        return [{"code": w.code, "severity": CODES[w.code].severity, "text": w.text,
                 **({"subject": w.subject} if w.subject else {}), "since": round(since, 3)}
                for w, since in rows]

    def codes(self, now: float) -> set[str]:
        return {r["code"] for r in self.report(now)}


def _rise(old: Mapping[str, int], new: Mapping[str, int]) -> tuple[int, str]:
    """How much the counters rose, key by key (one that fell, e.g. a restarted worker's, adds
    nothing), and the key that rose most."""
    total, top, top_n = 0, "", 0
    for key, value in new.items():
        d = value - old.get(key, 0)
        if d > 0:
            total += d
            if d > top_n:
                top, top_n = key, d
    return total, top


class LoadWatch:
    """The ``under-load`` condition of one daemon. ``conditions(now, sample)`` is called
    wherever the daemon observes its health; ``sample()`` answers three tables of counters
    (name -> running total), read only once per ``sample_s``:

    - ``cookie_replies``: cookie replies sent (``cookie_replies_sent`` of the devices and
      control servers): any rise is load, since they are sent only under load;
    - ``kernel_drops``: per socket (``socket_stats``): any rise is load (a full receive buffer);
    - ``drops``: the daemon's own drops by reason: a rise of ``drops_per_s`` or more is load.

    The condition holds from the first sample that saw a rise until ``hold_s`` after the last
    one: it ends by itself once the counters stop climbing."""

    def __init__(self, *, subject: str = "", sample_s: float = LOAD_SAMPLE_S,
                 hold_s: float = LOAD_WARNING_HOLD_S, drops_per_s: float = LOAD_DROPS_PER_S) -> None:
        self.subject = subject
        self.sample_s = sample_s
        self.hold_s = hold_s
        self.drops_per_s = drops_per_s
        self._last: tuple[float, dict] | None = None
        self._until: float | None = None
        self._text = ""

    def observe(self, now: float, *, cookie_replies: Mapping[str, int], kernel_drops: Mapping[str, int],
                drops: Mapping[str, int]) -> None:
        """One sample: compared with the last one (the first only sets the base)."""
        sample = {"cookie_replies": dict(cookie_replies), "kernel_drops": dict(kernel_drops), "drops": dict(drops)}
        last, self._last = self._last, (now, sample)
        if last is None or now <= last[0]:
            return
        dt = now - last[0]
        cookies, _ = _rise(last[1]["cookie_replies"], sample["cookie_replies"])
        kernel, kernel_top = _rise(last[1]["kernel_drops"], sample["kernel_drops"])
        user, user_top = _rise(last[1]["drops"], sample["drops"])
        why = []
        if cookies:
            why.append(f"{cookies} cookie replies sent")
        if kernel:
            why.append(f"{kernel} datagrams dropped by the kernel (most on {kernel_top})")
        if user >= self.drops_per_s * dt:
            why.append(f"{user} dropped by the daemon (most {user_top})")
        if why:
            self._until = now + self.hold_s
            self._text = ", ".join(why) + f" in {dt:.1f} s"

    def conditions(self, now: float, sample: Callable[[], Mapping[str, Mapping[str, int]]]) -> list[Warning]:
        if self._last is None or now - self._last[0] >= self.sample_s:
            self.observe(now, **sample())
        if self._until is None or now >= self._until:
            return []
        return [Warning("under-load", self._text, subject=self.subject)]


def describe(rows: list[dict], now: float) -> list[str]:
    """A report as the CLIs print it: ``[error] cloud-unreachable: text (for 42 s)``."""
    out = []
    for h in rows:
        since = h.get("since")
        age = f" (for {max(0, int(now - since))} s)" if isinstance(since, (int, float)) else ""
        out.append(f"[{h.get('severity', '?')}] {h.get('code', '?')}: {h.get('text', '')}{age}")
    return out
