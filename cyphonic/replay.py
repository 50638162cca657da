"""Anti-replay sliding window, RFC 6479 (the bitmap-ring variant).

A ring of ``REPLAY_BITMAP_BITS // 64`` 64-bit blocks. Counters more than
``REPLAY_WINDOW_PACKETS`` (8128) behind the highest accepted counter are
refused as too old; inside the window each counter is accepted once, in any
order. Advancing the window clears only the blocks it passes over, so the
cost per packet is constant.

Use ``check`` before decryption (cheap, no state change) and ``update`` only
after the AEAD tag verified: an attacker must never move the window.
"""

from __future__ import annotations

from . import constants as C

_BLOCK_BITS = 64
_BLOCK_SHIFT = 6
_BIT_MASK = _BLOCK_BITS - 1
_N_BLOCKS = C.REPLAY_BITMAP_BITS // _BLOCK_BITS
_RING_MASK = _N_BLOCKS - 1
WINDOW = C.REPLAY_WINDOW_PACKETS

assert _N_BLOCKS & _RING_MASK == 0, "ring size must be a power of two"


class ReplayWindow:
    __slots__ = ("_blocks", "_last", "_any")

    def __init__(self) -> None:
        self._blocks = [0] * _N_BLOCKS
        self._last = 0
        self._any = False

    @property
    def highest(self) -> int:
        return self._last

    def check(self, counter: int) -> bool:
        """True if ``counter`` would be accepted now (no state change)."""
        if not self._any or counter > self._last:
            return True
        if self._last - counter > WINDOW:
            return False
        return not (self._blocks[(counter >> _BLOCK_SHIFT) & _RING_MASK] >> (counter & _BIT_MASK)) & 1

    def update(self, counter: int) -> bool:
        """Mark ``counter`` as seen; False (and no change) if it is a replay or too old."""
        blocks = self._blocks
        if not self._any or counter > self._last:
            cur = self._last >> _BLOCK_SHIFT
            new = counter >> _BLOCK_SHIFT
            diff = new - cur if self._any else _N_BLOCKS
            if diff > _N_BLOCKS:
                diff = _N_BLOCKS
            for i in range(1, diff + 1):
                blocks[(cur + i) & _RING_MASK] = 0
            if not self._any:
                blocks[new & _RING_MASK] = 0
            self._last = counter
            self._any = True
        elif self._last - counter > WINDOW:
            return False
        idx = (counter >> _BLOCK_SHIFT) & _RING_MASK
        bit = 1 << (counter & _BIT_MASK)
        if blocks[idx] & bit:
            return False
        blocks[idx] |= bit
        return True
