"""Stream ids: which part of a send key's nonce space each extra sender may seal in.

A data packet's 64-bit counter is a stream id (its top ``STREAM_BITS``) and a per-stream
counter (``cyphonic.datachannel``; docs/protocol.md, "Several workers, one session"). A
sender counts from 0 in its stream, so two senders that hold the same (send key, stream id)
seal two packets under one nonce, and ChaCha20-Poly1305 then gives away the XOR of the two
plaintexts and the means to forge tags. The adapter seals one session in several worker
processes, so this module owns the one rule that keeps their nonces apart:

**For one send key, a stream id is handed out at most once, ever.**

- Stream 0 belongs to the key's ``Device`` (keepalives, key confirmation, what the device
  seals itself) and is never handed out. Ids ``FIRST_STREAM_ID``..``LAST_STREAM_ID`` are
  handed out in increasing order, each once, as ranges: ``take(key, n)`` gives n ids no
  one had before, one per sender. Every installation of a send stream takes fresh ids (a
  new key, a new endpoint, a restarted worker, a re-forked pool): a ``SendStream`` counts
  from 0 again, so an old id given again would repeat its nonces.
- The receiver keeps one replay window per stream id, at most
  ``MAX_RECEIVE_STREAMS_PER_SESSION`` per session (stream 0 included), and drops packets of
  any stream beyond (``datachannel.ReceiveSession``). So ids stop at ``LAST_STREAM_ID``,
  and when a key has too few left ``take`` answers ``REKEY``: the caller starts a new
  handshake (``Device.rekey``) and the new key has all its ids again.
- A key is named by a digest of its bytes (``key_id``): stable, unique, and neither the
  key itself (the table may outlive it) nor ``id()`` of a keypair object (a freed object's
  id is given to the next one).
- The table forgets a key only when the caller ``retire``s it, which it must do only for
  a key that will never seal again (no longer any peer's current keypair: rotated out,
  expired, or its peer gone). It is bounded by ``max_keys`` live keys; a new key beyond
  gets ``TABLE_FULL`` and nothing is evicted. A retired key is remembered for a while
  (``RETIRED_REMEMBERED``), so that a caller that presents it again gets ``REKEY``, not
  its first ids once more.

Not persisted: a restarted controller starts from an empty table, which is safe because
sessions are not persisted either. Its devices have no keys until new handshakes make new
ones, and the workers of the old controller die with it (``PR_SET_PDEATHSIG``).

Pure: bytes and ints in, ranges out; no clock, no sockets, no files.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from . import constants as C

FIRST_STREAM_ID = 1                                     # 0 is the device's own stream
LAST_STREAM_ID = C.MAX_RECEIVE_STREAMS_PER_SESSION - 1  # the receiver keeps this many windows, 0 included
STREAM_IDS_PER_KEY = LAST_STREAM_ID - FIRST_STREAM_ID + 1
RETIRED_REMEMBERED = 1024                                # retired keys still refused (a guard against misuse)
KEY_ID_BYTES = 16

REKEY = "rekey"              # this key has too few stream ids left: start a new handshake
TABLE_FULL = "table-full"    # max_keys live keys already: retire the dead ones

assert LAST_STREAM_ID < C.MAX_STREAMS


def key_id(send_key: bytes) -> bytes:
    """A send key's name in the table (a digest: the table does not keep the key)."""
    return hashlib.blake2b(send_key, digest_size=KEY_ID_BYTES, person=b"cy-stream-ids").digest()


class StreamIds:
    """The stream ids handed out so far, per live send key."""

    def __init__(self, max_keys: int = C.MAX_PEERS, *, retired_remembered: int = RETIRED_REMEMBERED) -> None:
        self.max_keys = max_keys
        self.retired_remembered = retired_remembered
        self._next: dict[bytes, int] = {}                    # key id -> the next id to hand out
        self._retired: OrderedDict[bytes, None] = OrderedDict()
        self.refused: dict[str, int] = {REKEY: 0, TABLE_FULL: 0}

    def __len__(self) -> int:
        return len(self._next)

    def __contains__(self, kid: bytes) -> bool:
        return kid in self._next

    def left(self, kid: bytes) -> int:
        """Stream ids this key has not handed out yet (0 for a retired key)."""
        if kid in self._retired:
            return 0
        return LAST_STREAM_ID + 1 - self._next.get(kid, FIRST_STREAM_ID)

    def take(self, kid: bytes, count: int) -> range | str:
        """``count`` stream ids for this key that were never handed out (one per sender, in
        order), or ``REKEY`` / ``TABLE_FULL`` (nothing handed out then)."""
        if count < 1:
            raise ValueError("take at least one stream id")
        first = self._next.get(kid)
        if first is None:
            if kid in self._retired:
                self.refused[REKEY] += 1
                return REKEY
            if len(self._next) >= self.max_keys:
                self.refused[TABLE_FULL] += 1
                return TABLE_FULL
            first = FIRST_STREAM_ID
        end = first + count
        if end > LAST_STREAM_ID + 1:
            self._next[kid] = first   # (a new key that asked for more than a key has: tracked, exhausted)
            self.refused[REKEY] += 1
            return REKEY
        self._next[kid] = end
        return range(first, end)

    def retire(self, kid: bytes) -> None:
        """This key will never seal again: forget its ids (and refuse it from now on)."""
        self._next.pop(kid, None)
        self._retired.pop(kid, None)
        self._retired[kid] = None
        while len(self._retired) > self.retired_remembered:
            self._retired.popitem(last=False)
