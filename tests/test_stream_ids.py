"""The stream-id rule (cyphonic.stream_ids): for one send key, no stream id is handed out twice,
ever; ids stay within what the receiver keeps windows for; a key out of ids says rekey."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic import constants as C
from cyphonic.datachannel import ReceiveSession
from cyphonic.stream_ids import (FIRST_STREAM_ID, LAST_STREAM_ID, REKEY, STREAM_IDS_PER_KEY, TABLE_FULL,
                                 StreamIds, key_id)


def test_ids_come_in_disjoint_ranges_from_one_and_never_zero():
    ids = StreamIds()
    k = key_id(b"k" * 32)
    assert ids.take(k, 3) == range(1, 4)
    assert ids.take(k, 2) == range(4, 6)
    assert ids.take(key_id(b"j" * 32), 2) == range(1, 3)      # another key has its own ids
    assert ids.left(k) == LAST_STREAM_ID - 5
    with pytest.raises(ValueError):
        ids.take(k, 0)


def test_a_key_out_of_ids_says_rekey_and_hands_out_nothing():
    ids = StreamIds()
    k = key_id(os.urandom(32))
    assert ids.take(k, STREAM_IDS_PER_KEY - 1) == range(FIRST_STREAM_ID, LAST_STREAM_ID)
    assert ids.take(k, 2) == REKEY                   # one left, two wanted: nothing
    assert ids.take(k, 1) == range(LAST_STREAM_ID, LAST_STREAM_ID + 1)
    assert ids.take(k, 1) == REKEY and ids.left(k) == 0
    assert ids.refused[REKEY] == 2


def test_the_ids_fit_the_receivers_windows():
    """Stream 0 (the device's own) and every id handed out for one key are accepted by one
    ReceiveSession: exactly as many streams as it keeps windows for."""
    assert FIRST_STREAM_ID == 1 and LAST_STREAM_ID + 1 == C.MAX_RECEIVE_STREAMS_PER_SESSION
    assert LAST_STREAM_ID < C.MAX_STREAMS
    from cyphonic.datachannel import SendStream
    key = os.urandom(32)
    rx = ReceiveSession(key, 7)
    ids = StreamIds()
    got = list(ids.take(key_id(key), STREAM_IDS_PER_KEY))
    for sid in [0] + got:
        rx.open(SendStream(key, 7, sid).seal(b"x"))
    assert len(rx._windows) == C.MAX_RECEIVE_STREAMS_PER_SESSION
    with pytest.raises(Exception):                   # one stream more would be refused
        rx.open(SendStream(key, 7, LAST_STREAM_ID + 1).seal(b"x"))


def test_a_retired_key_is_forgotten_and_refused_if_it_comes_back():
    ids = StreamIds(retired_remembered=2)
    k = key_id(b"a" * 32)
    ids.take(k, 4)
    ids.retire(k)
    assert k not in ids and len(ids) == 0
    assert ids.take(k, 1) == REKEY                   # never its first ids again
    assert ids.left(k) == 0


def test_the_table_is_bounded_and_evicts_no_live_key():
    ids = StreamIds(max_keys=2)
    a, b, c = (key_id(bytes([i]) * 32) for i in range(3))
    ids.take(a, 1)
    ids.take(b, 1)
    assert ids.take(c, 1) == TABLE_FULL and c not in ids
    assert ids.take(a, 1) == range(2, 3)             # the live keys keep their counts
    ids.retire(b)
    assert ids.take(c, 1) == range(1, 2)


def test_key_ids_are_stable_digests_not_the_key():
    key = os.urandom(32)
    assert key_id(key) == key_id(bytes(key)) and key_id(key) != key and len(key_id(key)) == 16
    assert key_id(key) != key_id(os.urandom(32))


# --- property: random interleavings, as a controller would do them -------------------------------

ops = st.lists(st.one_of(
    st.tuples(st.just("install"), st.integers(0, 5), st.integers(1, 8)),   # key slot, workers wanting ids
    st.tuples(st.just("restart"), st.integers(0, 5), st.integers(1, 3)),   # some workers of a key restarted
    st.tuples(st.just("rekey"), st.integers(0, 5), st.just(0)),            # the key is replaced
    st.tuples(st.just("expire"), st.integers(0, 5), st.just(0)),           # the key expires: retired
    st.tuples(st.just("prune"), st.integers(0, 5), st.just(0)),            # the caller retires its dead keys
), max_size=120)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(1, 6))
def test_no_key_and_stream_id_is_ever_handed_out_twice(script, max_keys):
    ids = StreamIds(max_keys=max_keys, retired_remembered=4)
    live = {}                       # slot -> key id (a live key)
    dead = []                       # key ids that will never seal again, not yet retired
    serial = 0
    handed: set[tuple[bytes, int]] = set()

    def new_key():
        nonlocal serial
        serial += 1
        return key_id(serial.to_bytes(8, "big") * 4)

    for op, slot, n in script:
        if op in ("install", "restart"):
            kid = live.setdefault(slot, new_key())
            got = ids.take(kid, n)
            if isinstance(got, range):
                assert len(got) == n
                for sid in got:
                    assert FIRST_STREAM_ID <= sid <= LAST_STREAM_ID
                    assert (kid, sid) not in handed, "a (key, stream id) handed out twice"
                    handed.add((kid, sid))
            elif got == REKEY:
                assert ids.left(kid) < n
                dead.append(live.pop(slot))      # the caller rekeys: this key dies
            else:
                assert got == TABLE_FULL and len(ids) >= max_keys
                live.pop(slot)                   # never installed: nothing to retire
        elif op in ("rekey", "expire") and slot in live:
            dead.append(live.pop(slot))
        elif op == "prune":
            for kid in dead:
                ids.retire(kid)
            dead.clear()
        assert len(ids) <= max_keys
        assert all(kid in ids or ids.left(kid) == STREAM_IDS_PER_KEY for kid in live.values())
