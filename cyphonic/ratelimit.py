"""Token buckets keyed by source (address or static key), in a bounded table.

Used to limit handshake initiations: a source that sends faster than its rate
is refused (counted) before any Diffie-Hellman work. The table holds at most
``max_entries`` keys; the least recently used is evicted, so a flood from
many sources costs bounded memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from . import constants as C


class RateLimiter:
    def __init__(self, rate_per_s: float = C.HANDSHAKE_RATE_PER_SOURCE_PER_S,
                 burst: float = C.HANDSHAKE_BURST_PER_SOURCE,
                 max_entries: int = C.RATELIMIT_TABLE_MAX) -> None:
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.max_entries = max_entries
        self._table: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def allow(self, key: Hashable, now: float) -> bool:
        tokens, last = self._table.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._table[key] = (tokens, max(last, now))  # a clock stepping back credits nothing twice
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)
        return ok

    def __len__(self) -> int:
        return len(self._table)
