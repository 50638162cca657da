"""Sealing and opening data packets (cyphonic.datachannel) and the data header (cyphonic.wire.data).

- Round trips, keepalives, replay, reordering, old counters.
- Fuzz invariant: ``ReceiveSession.open`` of a damaged packet raises a
  ``RemoteProtocolError`` subclass (ParseError, AuthenticationError,
  ReplayError) and never returns or raises anything else; a forged packet never
  moves a replay window or allocates one.
- The multi-worker scheme: several SendStreams share one key, each with its own
  stream id; one ReceiveSession accepts all of them whatever their rates, and
  no nonce (header bytes 4..16) repeats.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic import constants as C
from cyphonic.datachannel import ReceiveSession, SendStream, crypto_route_ok, ipv4_addresses
from cyphonic.errors import (AuthenticationError, LocalProtocolError, ParseError, RemoteProtocolError,
                             ReplayError)
from cyphonic.wire import data as wire_data

KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(1, 33))
INDEX = 0xA1B2C3D4
STREAM_SHIFT = C.STREAM_COUNTER_BITS


def pair(stream_id: int = 0, **kw) -> tuple[SendStream, ReceiveSession]:
    return SendStream(KEY, INDEX, stream_id), ReceiveSession(KEY, INDEX, **kw)


def expect_remote_error(rx: ReceiveSession, datagram: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        rx.open(datagram)
    assert isinstance(info.value, (ParseError, AuthenticationError, ReplayError)), repr(info.value)
    return info.value


# Packets sealed once at import, for the fuzz tests (each example opens with a fresh session).
_tx = SendStream(KEY, INDEX, stream_id=3)
SEALED = [_tx.seal(b""), _tx.seal(b"\x45" + bytes(range(63))), _tx.seal(bytes(300))]


# --- Round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 64, 1400, C.DEFAULT_INNER_MTU,
                                  C.MAX_DATAGRAM_BYTES - C.DATA_OVERHEAD_BYTES])
def test_round_trip(size):
    tx, rx = pair()
    plaintext = bytes((i * 7) & 0xFF for i in range(size))
    packet = tx.seal(plaintext)
    assert len(packet) == size + C.DATA_OVERHEAD_BYTES
    assert wire_data.decode_header(packet) == (INDEX, 0)
    assert packet[C.DATA_HEADER_BYTES:C.DATA_HEADER_BYTES + size] != plaintext or size == 0
    got, counter = rx.open(packet)
    assert got == plaintext and counter == 0
    assert tx.packets_sent == rx.packets_received == 1
    assert tx.bytes_sent == rx.bytes_received == size
    assert tx.counter == 1


@pytest.mark.parametrize("size", [C.MAX_INNER_PACKET_BYTES, C.MAX_DATAGRAM_BYTES - C.DATA_OVERHEAD_BYTES + 1,
                                  65535, 65536])
def test_largest_inner_packets_seal_only_what_opens(size):
    """Whatever ``seal`` accepts must fit MAX_DATAGRAM_BYTES and open at the peer: either
    seal refuses the size (LocalProtocolError) or the round trip works. (Before the fix,
    seal took 65535 bytes and produced a datagram that ``open`` refused as oversize.)"""
    tx, rx = pair()
    plaintext = b"\x5a" * size
    try:
        packet = tx.seal(plaintext)
    except LocalProtocolError:
        return
    assert len(packet) <= C.MAX_DATAGRAM_BYTES, "sealed datagram cannot be sent over UDP/IPv4"
    assert rx.open(packet)[0] == plaintext


def test_keepalive_is_empty_packet():
    tx, rx = pair()
    packet = tx.seal(b"")
    assert len(packet) == C.DATA_OVERHEAD_BYTES == wire_data.MIN_DATA_BYTES
    assert rx.open(packet) == (b"", 0)


def test_many_packets_in_order_and_counters():
    tx, rx = pair(stream_id=2)
    for i in range(1000):
        data = i.to_bytes(4, "big")
        packet = tx.seal(data)
        assert rx.open(packet) == (data, (2 << STREAM_SHIFT) | i)


def test_results_are_copies_not_views_of_a_shared_buffer():
    a = SendStream(KEY, INDEX, stream_id=0)
    b = SendStream(OTHER_KEY, INDEX + 1, stream_id=1)
    pa = a.seal(b"A" * 100)
    pb = b.seal(b"B" * 50)
    ra, rb = ReceiveSession(KEY, INDEX), ReceiveSession(OTHER_KEY, INDEX + 1)
    xa, _ = ra.open(pa)
    xb, _ = rb.open(pb)
    assert xa == b"A" * 100 and xb == b"B" * 50
    assert isinstance(pa, bytes) and isinstance(xa, bytes)


def test_the_staged_zero_copy_path_is_the_same_seal_and_open():
    """The node's data path reads a packet into SEAL_STAGE and seals it in place, and receives a
    datagram into RECV_STAGE and opens it into OPENED: the same bytes, counters and checks as
    seal and open (which run through the same code)."""
    from cyphonic.datachannel import OPENED, RECV_STAGE, SEAL_STAGE, SEALED
    tx_a, rx = pair()
    tx_b, _ = pair()
    for size in (0, 84, 1400):
        plaintext = bytes((i * 13) & 0xFF for i in range(size))
        expected = tx_a.seal(plaintext)
        SEAL_STAGE[:size] = plaintext
        n = tx_b.seal_staged(size)
        staged = bytes(SEALED[:n])
        assert staged == expected and tx_b.counter == tx_a.counter
        RECV_STAGE[:n] = staged
        plen, counter = rx.open_staged(n)
        assert bytes(OPENED[:plen]) == plaintext and counter == tx_b.counter - 1
        RECV_STAGE[:n] = staged  # the same datagram again: a replay, refused
        with pytest.raises(ReplayError):
            rx.open_staged(n)
    RECV_STAGE[:n] = staged[:-1] + bytes([staged[-1] ^ 1])
    with pytest.raises(ReplayError):   # (that counter was seen; a fresh one with a bad tag:)
        rx.open_staged(n)
    SEAL_STAGE[:10] = bytes(10)
    n = tx_b.seal_staged(10)
    bad = bytearray(SEALED[:n])
    bad[-1] ^= 1
    RECV_STAGE[:n] = bad
    with pytest.raises(AuthenticationError):
        rx.open_staged(n)
    RECV_STAGE[:n] = bytes(SEALED[:n])  # the window did not move on the forgery: it opens now
    assert rx.open_staged(n)[0] == 10
    for size in (-1, C.MAX_INNER_PACKET_BYTES + 1):
        with pytest.raises(LocalProtocolError):
            tx_b.seal_staged(size)
    for size in (0, C.DATA_OVERHEAD_BYTES - 1, C.MAX_DATAGRAM_BYTES + 1):
        with pytest.raises(ParseError):
            rx.open_staged(size)


def test_input_types_bytes_like():
    """Datagrams read into a bytearray (recv_into) or a memoryview must open too, or be
    refused with our own error, never a TypeError from the C layer."""
    tx, rx = pair()
    assert rx.open(tx.seal(b"x"))[0] == b"x"
    for conv in (bytearray, memoryview):
        packet = tx.seal(b"abc")
        try:
            assert rx.open(conv(packet))[0] == b"abc"
        except RemoteProtocolError:
            pass


def test_wrong_key_is_authentication_error():
    tx = SendStream(OTHER_KEY, INDEX)
    rx = ReceiveSession(KEY, INDEX)
    expect_remote_error(rx, tx.seal(b"hi"))
    assert isinstance(expect_remote_error(rx, tx.seal(b"hi")), AuthenticationError)


def test_wrong_local_index_is_parse_error():
    tx = SendStream(KEY, INDEX + 1)
    rx = ReceiveSession(KEY, INDEX)
    with pytest.raises(ParseError) as info:
        rx.open(tx.seal(b"hi"))
    assert info.value.reason == "index"


def test_wrong_type_is_parse_error():
    packet = bytearray(pair()[0].seal(b"hi"))
    for t in (0, 1, 2, 3, 5, 255):
        packet[0] = t
        with pytest.raises(ParseError):
            ReceiveSession(KEY, INDEX).open(bytes(packet))


def test_short_and_oversize_are_parse_errors():
    rx = ReceiveSession(KEY, INDEX)
    for n in (0, 1, 16, 31):
        with pytest.raises(ParseError) as info:
            rx.open(SEALED[0][:n].ljust(n, b"\x00"))
        assert info.value.reason == "short"
    with pytest.raises(ParseError) as info:
        rx.open(SEALED[0][:16] + bytes(C.MAX_DATAGRAM_BYTES))
    assert info.value.reason == "oversize"


# --- Replay --------------------------------------------------------------------------

def test_replayed_packet_refused():
    tx, rx = pair()
    packet = tx.seal(b"once")
    rx.open(packet)
    with pytest.raises(ReplayError) as info:
        rx.open(packet)
    assert info.value.reason == "replay"
    assert rx.packets_received == 1


def test_reordering_within_window_accepted():
    tx, rx = pair()
    packets = [tx.seal(i.to_bytes(2, "big")) for i in range(C.REPLAY_WINDOW_PACKETS + 1)]
    # The newest first, then everything else in reverse: all within the window.
    for i in reversed(range(len(packets))):
        assert rx.open(packets[i])[1] == i
    for p in packets[::97]:
        with pytest.raises(ReplayError):
            rx.open(p)


def test_old_counters_beyond_window_refused():
    tx, rx = pair()
    packets = [tx.seal(b"") for _ in range(C.REPLAY_WINDOW_PACKETS + 10)]
    rx.open(packets[-1])          # highest = WINDOW + 9
    for i in range(9):            # more than WINDOW behind
        with pytest.raises(ReplayError):
            rx.open(packets[i])
    assert rx.open(packets[9])[1] == 9   # exactly WINDOW behind: still accepted


def test_forged_packet_does_not_move_window_or_allocate_stream():
    tx, rx = pair()
    rx = ReceiveSession(KEY, INDEX, max_streams=1)
    first = tx.seal(b"a")
    # A forged packet far ahead in stream 0 and one in a new stream: both refused.
    far = bytearray(tx.seal(b"b"))
    far[8:16] = struct.pack("!Q", 10**9)
    expect_remote_error(rx, bytes(far))
    other_stream = bytearray(far)
    other_stream[8:16] = struct.pack("!Q", 7 << STREAM_SHIFT)
    expect_remote_error(rx, bytes(other_stream))
    # The genuine first packet still opens: the window did not move, no window was taken.
    assert rx.open(first)[0] == b"a"


# --- Fuzz: bit flips and truncations -----------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SEALED), st.data())
def test_any_single_bit_flip_refused(packet, data):
    bit = data.draw(st.integers(0, len(packet) * 8 - 1))
    bad = bytearray(packet)
    bad[bit // 8] ^= 1 << (bit % 8)
    rx = ReceiveSession(KEY, INDEX)
    expect_remote_error(rx, bytes(bad))
    assert rx.packets_received == 0
    rx.open(packet)  # the genuine packet is unaffected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_datagrams_refused(datagram):
    expect_remote_error(ReceiveSession(KEY, INDEX), datagram)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=100))
def test_random_payload_with_valid_header_refused(body):
    datagram = wire_data.encode_header(INDEX, 5) + body
    expect_remote_error(ReceiveSession(KEY, INDEX), datagram)


@pytest.mark.parametrize("packet", SEALED, ids=["keepalive", "64", "300"])
def test_truncated_at_every_offset(packet):
    rx = ReceiveSession(KEY, INDEX)
    for n in range(len(packet)):
        expect_remote_error(rx, packet[:n])
    for extra in (b"\x00", b"\x00" * 16):
        expect_remote_error(rx, packet + extra)
    assert rx.packets_received == 0
    rx.open(packet)


# --- Several streams, one key (multi-worker) ----------------------------------------------

def test_several_streams_interleaved_with_very_different_rates():
    rates = {0: 20_000, 1: 3, 2: 500, 3: 7_001}
    streams = {sid: SendStream(KEY, INDEX, stream_id=sid) for sid in rates}
    rx = ReceiveSession(KEY, INDEX)
    # Interleave by "time": stream s sends its k-th packet at k / rate.
    schedule = sorted((k / n, sid) for sid, n in rates.items() for k in range(n))
    nonces = set()
    seen = {sid: 0 for sid in rates}
    for _, sid in schedule:
        payload = struct.pack("!BI", sid, seen[sid])
        packet = streams[sid].seal(payload)
        nonces.add(packet[4:16])
        got, counter = rx.open(packet)
        assert got == payload
        assert counter >> STREAM_SHIFT == sid
        assert counter & ((1 << STREAM_SHIFT) - 1) == seen[sid]
        seen[sid] += 1
    assert seen == rates
    assert len(nonces) == sum(rates.values()) == rx.packets_received


def test_slow_stream_late_packets_survive_fast_stream():
    """The fast stream is 20000 ahead; the slow stream's delayed packets are still in its window."""
    fast = SendStream(KEY, INDEX, stream_id=0)
    slow = SendStream(KEY, INDEX, stream_id=1)
    rx = ReceiveSession(KEY, INDEX)
    held = [slow.seal(b"slow%d" % i) for i in range(3)]
    for _ in range(20_000):
        rx.open(fast.seal(b""))
    for i in (2, 0, 1):
        assert rx.open(held[i])[0] == b"slow%d" % i
    with pytest.raises(ReplayError):
        rx.open(held[0])


def test_same_counter_in_different_streams_are_distinct_packets():
    a = SendStream(KEY, INDEX, stream_id=0)
    b = SendStream(KEY, INDEX, stream_id=1)
    pa, pb = a.seal(b"same"), b.seal(b"same")
    assert pa[4:16] != pb[4:16]
    assert pa[16:] != pb[16:]
    rx = ReceiveSession(KEY, INDEX)
    assert rx.open(pa)[1] == 0 and rx.open(pb)[1] == 1 << STREAM_SHIFT


def test_stream_limit_per_session():
    rx = ReceiveSession(KEY, INDEX, max_streams=2)
    rx.open(SendStream(KEY, INDEX, 0).seal(b""))
    rx.open(SendStream(KEY, INDEX, 200).seal(b""))
    with pytest.raises(ReplayError) as info:
        rx.open(SendStream(KEY, INDEX, 5).seal(b""))
    assert info.value.reason == "streams"
    # The streams already known keep working.
    rx.open(SendStream(KEY, INDEX, 0, start=1).seal(b""))


def test_default_stream_limit():
    rx = ReceiveSession(KEY, INDEX)
    for sid in range(C.MAX_RECEIVE_STREAMS_PER_SESSION):
        rx.open(SendStream(KEY, INDEX, sid).seal(b""))
    with pytest.raises(ReplayError) as info:
        rx.open(SendStream(KEY, INDEX, C.MAX_RECEIVE_STREAMS_PER_SESSION).seal(b""))
    assert info.value.reason == "streams"


# --- SendStream misuse ------------------------------------------------------------------

@pytest.mark.parametrize("sid", [-1, C.MAX_STREAMS, 256, 1000])
def test_send_stream_refuses_bad_stream_id(sid):
    with pytest.raises(LocalProtocolError):
        SendStream(KEY, INDEX, stream_id=sid)


def test_send_stream_accepts_stream_255():
    tx = SendStream(KEY, INDEX, stream_id=255)
    assert ReceiveSession(KEY, INDEX).open(tx.seal(b"z"))[1] == 255 << STREAM_SHIFT


@pytest.mark.parametrize("n", [0, 16, 31, 33, 64])
def test_bad_key_length_is_local_error(n):
    with pytest.raises(LocalProtocolError):
        SendStream(b"k" * n, INDEX)
    with pytest.raises(LocalProtocolError):
        ReceiveSession(b"k" * n, INDEX)


@pytest.mark.parametrize("sid", [0, 1, 255])
def test_exhausted_stream_raises_local_error(sid):
    tx = SendStream(KEY, INDEX, stream_id=sid, start=C.REJECT_AFTER_MESSAGES - 1)
    assert not tx.exhausted
    packet = tx.seal(b"last")
    assert tx.exhausted
    with pytest.raises(LocalProtocolError):
        tx.seal(b"one too many")
    with pytest.raises(LocalProtocolError):
        tx.seal(b"")
    # The last packet carries the right stream id (the counter never spills into it) and opens.
    _, counter = wire_data.decode_header(packet)
    assert counter >> STREAM_SHIFT == sid
    assert counter & ((1 << STREAM_SHIFT) - 1) == C.REJECT_AFTER_MESSAGES - 1
    assert ReceiveSession(KEY, INDEX).open(packet) == (b"last", counter)


def test_too_large_plaintext_is_local_error():
    tx = SendStream(KEY, INDEX)
    with pytest.raises(LocalProtocolError):
        tx.seal(bytes(C.MAX_INNER_PACKET_BYTES + 1))


# --- Crypto routing --------------------------------------------------------------------

PEER = bytes([10, 0, 0, 2])
ME = bytes([10, 0, 0, 1])
ME2 = bytes([10, 0, 0, 3])


def ipv4(src: bytes, dst: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0, src, dst) + payload


def test_crypto_route_ok():
    pkt = ipv4(PEER, ME, b"hello")
    assert ipv4_addresses(pkt) == (PEER, ME)
    assert crypto_route_ok(pkt, PEER, ME)
    assert crypto_route_ok(pkt, PEER, {ME, ME2})
    assert crypto_route_ok(pkt, PEER, frozenset({ME}))
    assert crypto_route_ok(ipv4(PEER, ME2), PEER, {ME, ME2})


def test_crypto_route_refuses_wrong_source_or_destination():
    assert not crypto_route_ok(ipv4(ME2, ME), PEER, ME)             # spoofed source
    assert not crypto_route_ok(ipv4(PEER, ME2), PEER, ME)           # not for us
    assert not crypto_route_ok(ipv4(PEER, ME2), PEER, {ME})
    assert not crypto_route_ok(ipv4(PEER, ME), PEER, set())
    assert not crypto_route_ok(ipv4(ME, PEER), PEER, ME)            # reversed


def test_crypto_route_refuses_non_ipv4_and_short():
    ipv6 = bytes([0x60]) + bytes(39)
    assert ipv4_addresses(ipv6) is None
    assert not crypto_route_ok(ipv6, PEER, ME)
    v4 = ipv4(PEER, ME)
    for n in range(20):
        assert not crypto_route_ok(v4[:n], PEER, ME)
    assert not crypto_route_ok(b"", PEER, ME)
    for first in (0x00, 0x35, 0x55, 0xF5):
        assert not crypto_route_ok(bytes([first]) + v4[1:], PEER, ME)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_crypto_route_random_never_raises(pkt):
    ok = crypto_route_ok(pkt, PEER, {ME})
    assert ok == (len(pkt) >= 20 and pkt[0] >> 4 == 4 and pkt[12:16] == PEER and pkt[16:20] == ME)


# --- Wire: the data header ---------------------------------------------------------------

def test_header_round_trip():
    for idx, counter in ((0, 0), (INDEX, 12345), (2**32 - 1, 2**64 - 1), (1, 255 << STREAM_SHIFT)):
        hdr = wire_data.encode_header(idx, counter)
        assert len(hdr) == C.DATA_HEADER_BYTES
        assert hdr[0] == wire_data.MSG_DATA and hdr[1:4] == b"\x00\x00\x00"
        assert wire_data.decode_header(hdr + bytes(C.AEAD_TAG_BYTES)) == (idx, counter)


def test_decode_header_bad_input():
    good = wire_data.encode_header(INDEX, 9) + bytes(16)
    for n in range(len(good)):
        with pytest.raises(ParseError) as info:
            wire_data.decode_header(good[:n])
        assert info.value.reason == "short"
    with pytest.raises(ParseError) as info:
        wire_data.decode_header(good + bytes(C.MAX_DATAGRAM_BYTES))
    assert info.value.reason == "oversize"
    for t in (0, 1, 2, 3, 5, 255):
        with pytest.raises(ParseError) as info:
            wire_data.decode_header(bytes([t]) + good[1:])
        assert info.value.reason == "type"
    for pos in (1, 2, 3):
        bad = bytearray(good)
        bad[pos] = 1
        with pytest.raises(ParseError):
            wire_data.decode_header(bytes(bad))


@pytest.mark.parametrize("value", [None, 5, "x" * 40, ["a"] * 40])
def test_decode_header_non_bytes_is_parse_error(value):
    """errors.py: every parser raises ParseError for any malformed input, never anything else
    (wire.cert and wire.handshake check the type; wire.data must too)."""
    with pytest.raises(ParseError):
        wire_data.decode_header(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_decode_header_random_bytes(data):
    try:
        idx, counter = wire_data.decode_header(data)
    except ParseError:
        return
    assert data[0] == wire_data.MSG_DATA and data[1:4] == bytes(3) and len(data) >= 32
    assert wire_data.encode_header(idx, counter) == data[:16]


def test_message_type():
    assert wire_data.message_type(b"\x04rest") == wire_data.MSG_DATA
    with pytest.raises(ParseError):
        wire_data.message_type(b"")


def test_pieces_of_a_merged_read_open_one_by_one_from_the_front_of_the_stage():
    """The GRO readers (issue 15) move each piece of a merged read to the front of RECV_STAGE and
    open it there: opening writes only OPENED, so the pieces further on stay intact, and each
    piece takes its own replay-window entry (a repeated piece is refused)."""
    from cyphonic.datachannel import OPENED, RECV_STAGE
    from cyphonic.errors import ReplayError

    key = bytes(range(32))
    tx, rx = SendStream(key, 5, stream_id=2), ReceiveSession(key, 5)
    pieces = [tx.seal(bytes([i]) * 300) for i in range(4)]
    pieces.insert(2, pieces[1])                                # a duplicate inside the run
    merged = b"".join(pieces)
    seg = len(pieces[0])
    RECV_STAGE[:len(merged)] = merged
    opened, refused = [], 0
    for off in range(0, len(merged), seg):
        if off:
            RECV_STAGE[0:seg] = RECV_STAGE[off:off + seg]
        try:
            plen, counter = rx.open_staged(seg)
        except ReplayError:
            refused += 1
            continue
        opened.append((bytes(OPENED[:plen]), counter))
        assert bytes(RECV_STAGE[off + seg:len(merged)]) == merged[off + seg:]   # the rest untouched
    assert [p for p, _ in opened] == [bytes([i]) * 300 for i in range(4)] and refused == 1
    assert [c for _, c in opened] == [(2 << 56) + i for i in range(4)]


def test_importing_the_data_channel_alone_initialises_libsodium():
    """sodium_init picks libsodium's SIMD code; the data path must not rely on another module
    (nacl.bindings) having been imported first. In a fresh interpreter that imports only
    cyphonic.datachannel, a second sodium_init says "already done" (1)."""
    import subprocess
    import sys
    code = ("import sys, cyphonic.datachannel\n"
            "assert 'nacl.bindings' not in sys.modules, 'the test needs an import without nacl.bindings'\n"
            "from nacl._sodium import lib\n"
            "print(lib.sodium_init())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
