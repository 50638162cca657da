"""A short-lived, bounded cache of what the store says (identities by key, FQDN or address).

The store is the truth; what is cached is reused for ``ttl_s`` (IDENTITY_CACHE_S: a
revocation reaches every instance within it, as ``CloudCore.refresh`` also re-reads the
revoked serials every few seconds), at most ``max_entries`` (least recently used dropped).
Only found records are kept: a node enrolled a moment ago is found at once. While the store
fails, a stale entry is used rather than nothing (keepalives and routes to known nodes go on
while the database restarts); without one, the store's error goes to the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

from .store import StoreError


class TimedCache:
    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()

    def get(self, key: Hashable, now: float, load: Callable[[], Any]) -> Any:
        hit = self._entries.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        try:
            value = load()
        except StoreError:
            if hit is not None:
                return hit[1]
            raise
        if value is not None:
            self._entries[key] = (now, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.pop(key, None)
        return value

    def __len__(self) -> int:
        return len(self._entries)
