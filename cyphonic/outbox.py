"""The output side every sans-IO core shares: bounded queues of datagrams and events.

A core pushes datagrams and emits events; the I/O edge pulls them with
``datagrams_to_send()`` and ``next_event()``. A full queue drops its oldest
entry and counts it (``drops["out_queue_full"]`` / ``drops["event_queue_full"]``):
the packet path never blocks and memory stays bounded.
"""

from __future__ import annotations

from collections import Counter, deque

from . import constants as C


class Outbox:
    def __init__(self) -> None:
        self._out: deque = deque()
        self._events: deque = deque()
        self.drops: Counter = Counter()

    def datagrams_to_send(self) -> list:
        out = list(self._out)
        self._out.clear()
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    def _push(self, datagram: bytes, addr) -> None:
        if len(self._out) >= C.MAX_DATAGRAMS_QUEUED:
            self._out.popleft()
            self.drops["out_queue_full"] += 1
        self._out.append((datagram, addr))

    def _emit(self, event) -> None:
        if len(self._events) >= C.MAX_EVENTS_QUEUED:
            self._events.popleft()
            self.drops["event_queue_full"] += 1
        self._events.append(event)
