"""cyphonic.udp_batch: UDP GSO runs and GRO pieces (issue 15).

Fakes record every system call: runs split where they must (a size change, a new socket or
destination, 64 segments, the byte bound), keep their order, end at a shorter datagram and
never wait past ``flush``; a refused GSO send turns GSO off for that socket and sends the same
bytes one by one, counted; a property test seals random packets of several sessions through
the sender and checks that no (key, stream, counter) is used twice and every datagram opens.
Then real sockets on loopback: one GSO send arrives as N datagrams at a plain receiver and as
one read of N pieces at a GRO receiver."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic import constants as C
from cyphonic.datachannel import SEAL_STAGE, SEALED, ReceiveSession, SendStream
from cyphonic.udp_batch import (GRO_ANCILLARY_BYTES, SOL_UDP, UDP_GRO, UDP_SEGMENT, GsoSender, enable_gro,
                                gro_segment, pieces, split)
from cyphonic.wire.data import HEADER


class RecordingSock:
    """Records ``sendmsg`` (with its UDP_SEGMENT size) and ``sendto``; ``gso_error`` /
    ``error``: the errno the next GSO send / any send raises."""

    def __init__(self, gso_error: int | None = None, error: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.gso_error = gso_error
        self.error = error

    def sendmsg(self, buffers, ancdata, flags, addr):
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        if self.gso_error is not None:
            raise OSError(self.gso_error, os.strerror(self.gso_error))
        [(level, kind, data)] = ancdata
        assert (level, kind) == (SOL_UDP, UDP_SEGMENT) and flags == 0
        payload = b"".join(bytes(b) for b in buffers)
        self.calls.append(("gso", addr, struct.unpack("=H", data)[0], payload))
        return len(payload)

    def sendto(self, data, addr):
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        self.calls.append(("one", addr, len(data), bytes(data)))
        return len(data)

    def datagrams(self) -> list[tuple]:
        """What the receivers get, in order: (addr, datagram)."""
        return [(addr, d) for _, addr, seg, payload in self.calls for d in split(payload, seg)]

    def shapes(self) -> list[tuple]:
        return [(kind, addr, seg, len(payload)) for kind, addr, seg, payload in self.calls]


A, B = ("192.0.2.1", 1000), ("192.0.2.2", 2000)


def dgram(tag: int, size: int) -> bytes:
    return bytes([tag % 256]) * size


def test_runs_split_at_a_size_change_a_new_destination_and_64_segments():
    s = RecordingSock()
    g = GsoSender()
    sent = [dgram(i, 100) for i in range(3)] + [dgram(i, 200) for i in range(130)]
    for d in sent:
        g.add(s, A, d)
    g.add(s, B, dgram(7, 200))
    g.add(s, B, dgram(8, 200))
    g.flush()
    assert s.shapes() == [("gso", A, 100, 300), ("gso", A, 200, 64 * 200), ("gso", A, 200, 64 * 200),
                          ("gso", A, 200, 400), ("gso", B, 200, 400)]
    assert s.datagrams() == [(A, d) for d in sent] + [(B, dgram(7, 200)), (B, dgram(8, 200))]
    assert g.counters == {"gso_sends": 5, "gso_segments": 135} and g.pending == 0


def test_a_shorter_datagram_ends_its_run_and_a_larger_one_starts_a_new_one():
    s = RecordingSock()
    other = RecordingSock()
    g = GsoSender()
    for d in (dgram(1, 300), dgram(2, 300), dgram(3, 120)):   # the last shorter: sent at once
        g.add(s, A, d)
    assert s.shapes() == [("gso", A, 300, 720)] and g.pending == 0
    g.add(s, A, dgram(4, 300))
    g.add(s, A, dgram(5, 500))                                 # larger: a new run
    g.add(other, A, dgram(6, 500))                             # another socket: a new run
    g.flush()
    assert s.shapes()[1:] == [("one", A, 300, 300), ("one", A, 500, 500)]
    assert other.shapes() == [("one", A, 500, 500)]
    assert g.counters["plain_sends"] == 3


def test_a_run_stays_within_the_byte_bound_and_nothing_is_held_past_flush():
    s = RecordingSock()
    g = GsoSender()
    for i in range(100):
        g.add(s, A, dgram(i, 1500))
    per_run = C.MAX_DATAGRAM_BYTES // 1500                     # 43 segments of 1500 fit 65507 bytes
    assert [len(c[3]) for c in s.calls] == [per_run * 1500, per_run * 1500]
    assert g.pending == 100 - 2 * per_run
    g.flush()
    assert g.pending == 0 and sum(len(c[3]) for c in s.calls) == 150_000
    g.flush()                                                  # idempotent: nothing to send
    assert len(s.calls) == 3
    with pytest.raises(ValueError):
        GsoSender(max_segments=65)


def test_a_lone_datagram_leaves_at_flush_as_an_ordinary_send():
    s = RecordingSock()
    g = GsoSender()
    g.add(s, A, dgram(1, 84))
    assert s.calls == [] and g.pending == 1                    # held only until the drain ends ...
    g.flush()
    assert s.calls == [("one", A, 84, dgram(1, 84))]           # ... and no GSO for one datagram
    assert g.counters == {"plain_sends": 1}


@pytest.mark.parametrize("code", [errno.EIO, errno.EINVAL, errno.ENOPROTOOPT])
def test_a_refused_gso_send_turns_gso_off_for_that_socket_and_resends_the_same_bytes(code):
    bad, good = RecordingSock(gso_error=code), RecordingSock()
    g = GsoSender()
    run = [dgram(i, 400) for i in range(5)]
    for d in run:
        g.add(bad, A, d)
    g.flush()
    assert bad.datagrams() == [(A, d) for d in run] and {c[0] for c in bad.calls} == {"one"}
    assert g.counters["gso_disabled"] == 1 and g.counters["plain_sends"] == 5 and not g.gso_enabled(bad)
    bad.calls.clear()
    for d in run:                                              # never tried again on that socket ...
        g.add(bad, A, d)
    for d in run:
        g.add(good, B, d)                                      # ... while another socket keeps GSO
    g.flush()
    assert bad.shapes() == [("one", A, 400, 400)] * 5
    assert g.counters["gso_disabled"] == 1 and good.shapes() == [("gso", B, 400, 2000)]
    assert not g.drops and not g.errors


@pytest.mark.parametrize("code, key", [(errno.EAGAIN, "udp_send_buffer_full"), (errno.ECONNREFUSED, "udp_send_error")])
def test_a_failed_send_is_a_counted_drop_of_the_run(code, key):
    s = RecordingSock(error=code)
    g = GsoSender()
    for i in range(4):
        g.add(s, A, dgram(i, 100))
    g.flush()
    assert g.drops[key] == 4 and g.pending == 0
    g.add(s, A, dgram(9, 100))                                 # a lone one, sent plainly
    g.flush()
    assert g.drops[key] == 5
    g.add(None, A, dgram(9, 100))                              # no socket of that family
    g.send_now(None, A, dgram(9, 100))
    assert g.errors["no_socket_for_family"] == 2 and g.pending == 0
    assert g.drops["udp_send_error"] == (7 if key == "udp_send_error" else 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0, 40, 60, 1300, 1400]), st.booleans()),
                min_size=1, max_size=300),
       st.sampled_from([None, errno.EIO]))
def test_batched_sealing_never_uses_a_nonce_twice_and_every_datagram_opens(ops, gso_error):
    """Packets of three sessions, random sizes, drains ending at random points: each datagram
    sent carries the next counter of its stream, no (key, stream, counter) twice, and opens."""
    keys = [bytes([k + 1]) * 32 for k in range(3)]
    streams = [SendStream(keys[k], 10 + k, stream_id=k + 1) for k in range(3)]
    socks = [RecordingSock(gso_error=gso_error), RecordingSock()]
    g = GsoSender()
    plaintexts: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    for i, (k, size, end_of_drain) in enumerate(ops):
        plain = bytes([i % 256, k]) * (size // 2)
        SEAL_STAGE[:len(plain)] = plain
        n = streams[k].seal_staged(len(plain))
        g.add(socks[k % 2], ("192.0.2.9", 1000 + k), SEALED[:n])
        plaintexts[k].append(plain)
        if end_of_drain:
            g.flush()
    g.flush()
    seen = set()
    receivers = [ReceiveSession(keys[k], 10 + k) for k in range(3)]
    got: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    last: dict[int, int] = {}
    for s in socks:
        for (host, port), d in s.datagrams():
            k = port - 1000
            _, index, counter = HEADER.unpack_from(d)
            assert (keys[k], counter) not in seen
            seen.add((keys[k], counter))
            assert counter >> C.STREAM_COUNTER_BITS == k + 1 and counter > last.get(k, -1)
            last[k] = counter
            plain, _ = receivers[k].open(d)
            got[k].append(bytes(plain))
    assert got == plaintexts and not g.drops


def test_gro_segment_and_pieces():
    anc = [(SOL_UDP, UDP_GRO, struct.pack("=i", 1300))]
    assert gro_segment(anc, 13_000) == 1300 and pieces(13_000, 1300) == 10 and pieces(13_001, 1300) == 11
    assert gro_segment(anc, 1300) == 1300 and gro_segment([], 500) == 500
    assert gro_segment([(socket.SOL_SOCKET, 1, b"\0\0\0\0")], 900) == 900
    assert split(b"abcdefg", 3) == [b"abc", b"def", b"g"]


def _udp(gro: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    if gro:
        assert enable_gro(s), "this kernel has UDP_GRO"
    return s


def test_a_real_gso_send_arrives_as_datagrams_at_a_plain_receiver_and_as_one_read_at_a_gro_receiver():
    sender, plain, merged = _udp(), _udp(), _udp(gro=True)
    run = [dgram(i, 1300) for i in range(10)] + [dgram(10, 500)]
    g = GsoSender()
    for dest in (plain, merged):
        for d in run:
            g.add(sender, dest.getsockname(), d)
        g.flush()
    assert g.counters == {"gso_sends": 2, "gso_segments": 22} and not g.drops
    got = []
    for _ in run:
        assert select.select([plain], [], [], 5)[0]
        got.append(plain.recv(65536))
    assert got == run                                          # GSO is invisible to a peer without GRO
    assert select.select([merged], [], [], 5)[0]
    buf = bytearray(65536)
    n, anc, flags, _ = merged.recvmsg_into([buf], GRO_ANCILLARY_BYTES)
    seg = gro_segment(anc, n)
    assert (n, seg, flags & socket.MSG_TRUNC) == (13_500, 1300, 0)
    assert split(bytes(buf[:n]), seg) == run                   # one read, eleven datagrams
    merged.setblocking(False)
    with pytest.raises(BlockingIOError):
        merged.recv(10)
    for s in (sender, plain, merged):
        s.close()


def test_receive_pieces_moves_each_piece_to_the_front_in_order_and_sends_refusals_slow():
    """The one piece loop of the node daemon and the adapter's way back."""
    from collections import Counter
    from cyphonic.udp_batch import receive_pieces

    stage = bytearray(4096)
    data = b"\x04AAAA" + b"\x04BBBB" + b"\x01CCCC" + b"\x04DDDD" + b"\x04E"
    stage[:len(data)] = data
    seen, opened, refused = [], [], []

    def fast_receive(size, addr, now):
        seen.append(bytes(stage[:size]))
        if stage[0] == 1:
            return None              # (an initiation: the slow path's)
        return 0 if stage[1:2] == b"B" else size   # (B: consumed, a keepalive or a counted drop)

    counts = Counter()
    slow = receive_pieces(len(data), 5, ("198.18.0.1", 1), 1.0, stage, fast_receive,
                          lambda plen: opened.append(bytes(stage[:plen])),
                          lambda size, addr, now: refused.append((bytes(stage[:size]), addr, now)), counts)
    assert slow is True
    assert seen == [b"\x04AAAA", b"\x04BBBB", b"\x01CCCC", b"\x04DDDD", b"\x04E"]
    assert opened == [b"\x04AAAA", b"\x04DDDD", b"\x04E"]
    assert refused == [(b"\x01CCCC", ("198.18.0.1", 1), 1.0)]
    assert counts == {"gro_initiation_on_main": 1}
    # no device yet: everything is refused; a lone datagram's refusal is not counted as merged
    refused.clear()
    stage[:5] = b"\x01XXXX"
    assert receive_pieces(5, 5, ("h", 2), 2.0, stage, None, opened.append,
                          lambda size, addr, now: refused.append(bytes(stage[:size])), counts) is True
    assert refused == [b"\x01XXXX"] and counts == {"gro_initiation_on_main": 1}


# The data path's modules, whose module-level names the handlers use per packet.
HOT_PATH_MODULES = ("cyphonic.udp_batch", "cyphonic.offload", "cyphonic.datachannel", "cyphonic.device",
                    "cyphonic.busy_poll", "cyphonic.node.packet_handling", "appliance.packet_handling",
                    "appliance.way_back", "appliance.nfqueue_wire", "appliance.interface_handling")


def test_hot_path_constants_are_plain_ints():
    """An ``enum.Flag`` operand (socket.MSG_TRUNC is one) sends ``flags & X`` through enum.py's
    Python code: 0.6 µs warm, about 30 µs with cold caches, which is every lone packet's case
    (it cost the node daemon's ping about 30 µs per read until it was a plain int)."""
    import enum
    import importlib

    found = []
    for name in HOT_PATH_MODULES:
        mod = importlib.import_module(name)
        for attr, value in vars(mod).items():
            if isinstance(value, enum.Flag):
                found.append(f"{name}.{attr} = {value!r}")
    assert not found, "enum.Flag constants on the data path (use int(...)): " + ", ".join(found)
