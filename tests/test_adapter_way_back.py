"""The adapter's way back (appliance.way_back): a general node's socket read straight from
select(), the common case opened and injected at once, the rest to its engine; the workers'
heads-up starts a busy poll that the answer stops."""

from __future__ import annotations

from contextlib import contextmanager

import os
import socket
from types import SimpleNamespace

from cyphonic.datachannel import OPENED, RECV_STAGE
from cyphonic.node.constants import INTAKE_BATCH
from cyphonic.udp import steered_udp_sockets

from appliance.way_back import WayBack


class Selector:
    def __init__(self) -> None:
        self.readers = {}
        self.spins = []
        self.stops = 0

    def add_fast_reader(self, fd, handler):
        self.readers[fd] = handler

    def remove_fast_reader(self, fd):
        return self.readers.pop(fd, None) is not None

    def spin(self, s):
        self.spins.append(s)

    def stop_spin(self):
        self.stops += 1


class FastDevice:
    """Datagrams starting with b"D" open to what follows, b"K" is a keepalive, the rest is not
    for the fast path."""

    def fast_receive_staged(self, n, addr, now):
        kind = bytes(RECV_STAGE[:1])
        if kind == b"D":
            OPENED[:n - 1] = RECV_STAGE[1:n]
            return n - 1
        if kind == b"K":
            return 0
        return None


class Engine:
    def __init__(self) -> None:
        self.device = FastDevice()
        self.slow = []

    def receive_datagram(self, data, addr, now):
        self.slow.append(bytes(data))


def link_pair():
    sock, intake = steered_udp_sockets(socket.AF_INET, "127.0.0.1", 0)   # as appliance.signaling opens them
    assert intake is not None, "this kernel takes the reuseport program"
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flushes = []
    link = SimpleNamespace(sock=sock, intake=intake,
                           host=SimpleNamespace(engine=Engine(), flush=lambda: flushes.append(1)))
    return link, peer, flushes


def _wait_readable(sock) -> None:
    import select
    assert select.select([sock], [], [], 5.0)[0], "the datagram never arrived"


def test_data_is_injected_at_once_and_the_rest_goes_to_the_engine_flushed_once():
    injected = []
    sel = Selector()
    wb = WayBack(lambda p: injected.append(bytes(p)) or True, selector=sel)
    link, peer, flushes = link_pair()
    wb.watch(link)
    handler = sel.readers[link.sock.fileno()]
    for d in (b"Dhello", b"K", b"\x02response", b"Dworld", b"\x08signaling"):
        peer.sendto(d, link.sock.getsockname())
    assert handler() is True                   # the engine was used: asyncio has work
    assert injected == [b"hello", b"world"]
    assert link.host.engine.slow == [b"\x02response", b"\x08signaling"] and flushes == [1]
    peer.sendto(b"Dagain", link.sock.getsockname())
    assert handler() is False and injected[-1] == b"again" and flushes == [1]
    wb.unwatch(link)
    assert sel.readers == {}
    link.sock.close()
    link.intake.close()
    peer.close()


def test_initiations_arrive_on_the_intake_and_are_read_a_few_at_a_time():
    """The kernel steers initiations (types 1 and 6) to the link's intake socket, so a flood of
    them cannot fill the queue the general node's packets wait in; its reader takes
    INTAKE_BATCH per wakeup and hands them to the engine."""
    sel = Selector()
    wb = WayBack(lambda p: True, selector=sel)
    link, peer, flushes = link_pair()
    wb.watch(link)
    flood = [bytes([1 if i % 2 else 6]) + b"init%d" % i for i in range(INTAKE_BATCH + 3)]
    for d in flood:
        peer.sendto(d, link.sock.getsockname())
    peer.sendto(b"Ddata", link.sock.getsockname())
    _wait_readable(link.sock)
    assert sel.readers[link.sock.fileno()]() is False and flushes == []
    _wait_readable(link.intake)
    assert sel.readers[link.intake.fileno()]() is True
    assert link.host.engine.slow == flood[:INTAKE_BATCH] and flushes == [1]
    assert sel.readers[link.intake.fileno()]() is True
    assert link.host.engine.slow == flood and flushes == [1, 1]
    wb.unwatch(link)
    assert sel.readers == {}
    link.sock.close()
    link.intake.close()
    peer.close()


def test_the_adapters_own_link_and_a_failed_injection():
    sel = Selector()
    wb = WayBack(lambda p: False, selector=sel)
    link, peer, _ = link_pair()
    wb.watch(link, to_general_node=False)      # the adapter's own identity: all to its engine
    peer.sendto(b"Dnot-for-the-lan", link.sock.getsockname())
    sel.readers[link.sock.fileno()]()
    assert link.host.engine.slow == [b"Dnot-for-the-lan"]
    wb.unwatch(link)
    wb.watch(link)
    peer.sendto(b"Dx", link.sock.getsockname())
    sel.readers[link.sock.fileno()]()
    assert wb.drops["inject_failed"] == 1
    wb.deliver(b"from the slow path")
    assert wb.drops["inject_failed"] == 2
    link.sock.close()
    peer.close()


def test_a_heads_up_starts_a_busy_poll_and_the_answer_stops_it():
    sel = Selector()
    wb = WayBack(lambda p: True, selector=sel, busy_poll_s=0.0005)
    try:
        assert wb.heads_up >= 0 and wb.heads_up in sel.readers
        wb.reply_wait.idle_cpus = 2.0
        os.eventfd_write(wb.heads_up, 1)       # a worker is about to send a lone packet
        assert sel.readers[wb.heads_up]() is False
        assert sel.spins == [0.0005] and wb.reply_wait.heads_ups == 1
        assert sel.readers[wb.heads_up]() is False and wb.reply_wait.heads_ups == 1   # nothing to read
        link, peer, _ = link_pair()
        wb.watch(link)
        peer.sendto(b"Danswer", link.sock.getsockname())
        sel.readers[link.sock.fileno()]()
        assert sel.stops == 1 and wb.reply_wait.quick
        link.sock.close()
        peer.close()
    finally:
        wb.close()
    assert wb.heads_up == -1
    assert WayBack(lambda p: True, selector=None, busy_poll_s=0.0005).reply_wait is None   # no selector: no busy poll


def test_each_piece_of_a_gro_read_is_opened_checked_and_injected_on_its_own():
    """A merged read (UDP GRO) from a peer: every piece passes the device's fast path by itself,
    so a replayed piece is a counted drop and an initiation merged into the run reaches the engine."""
    from corefixtures import ping
    from test_node_packet_loop import MergedReads, live_pair

    w, a, b = live_pair()
    sealed = [a.fast_send(ping(a, b, i, b"x" * 200), w.now)[0] for i in range(1, 4)]
    size = len(sealed[0])
    initiation = b"\x01" + bytes(size - 1)
    merged = sealed[0] + sealed[0] + initiation + sealed[1] + sealed[2]
    injected = []
    sel = Selector()
    wb = WayBack(lambda p: injected.append(bytes(p)) or True, selector=sel, clock=lambda: w.now)
    engine = Engine()
    engine.device = b
    flushes = []
    link = SimpleNamespace(sock=MergedReads([(merged, size)], w.addr["alice"]), intake=None,
                           host=SimpleNamespace(engine=engine, flush=lambda: flushes.append(1)))
    wb.watch(link)
    assert sel.readers[99]() is True
    assert injected == [ping(a, b, i, b"x" * 200) for i in (1, 2, 3)]
    assert b.drops["replay"] == 1 and engine.slow == [initiation] and flushes == [1]
    assert wb.batch == {"gro_reads": 1, "gro_pieces": 5, "gro_initiation_on_main": 1}


# --- injection in batches (issue 15, step 4) -------------------------------------------------

class FakeInjector:
    """An Injector's batch side: ``enable_batches`` as told, ``inject_write`` records frames (or
    refuses GSO frames, as a kernel without TSO on a packet socket would)."""

    def __init__(self, *, enable=True, refuse_gso=False) -> None:
        self.enable, self.refuse_gso = enable, refuse_gso
        self.frames = []
        self.gso_refused = False

    def enable_batches(self):
        return self.enable

    def inject_write(self, write, mac):
        if self.refuse_gso and write[1]:
            self.gso_refused = True
            return False
        self.frames.append((bytes(write), mac))
        return True

    def inject_plain(self, packet, mac):
        return self.inject_write(bytes(10) + bytes(packet), mac)


@contextmanager
def batched_way_back(fake=None, mac="02:11:22:33:44:55"):
    """A WayBack that injects in batches through ``fake`` (a FakeInjector), watching a general
    node's link whose MAC is ``mac``; its sockets closed afterwards. Yields the parts: ``wb``,
    ``fake``, ``injected`` (the one-packet path), ``link``, ``peer`` (the sender), ``read``
    (the link's handler)."""
    injected = []
    fake = FakeInjector() if fake is None else fake
    sel = Selector()
    wb = WayBack(lambda p: injected.append(bytes(p)) or True, selector=sel, batch_injector=fake)
    link, peer, _ = link_pair()
    link.gn = SimpleNamespace(mac=mac, name="cam1")
    wb.watch(link)
    try:
        yield SimpleNamespace(wb=wb, fake=fake, injected=injected, link=link, peer=peer,
                              read=sel.readers[link.sock.fileno()])
    finally:
        link.sock.close()
        link.intake.close()
        peer.close()


def send_all(peer, link, packets):
    for p in packets:
        peer.sendto(b"D" + bytes(p), link.sock.getsockname())
    _wait_readable(link.sock)
    import time
    time.sleep(0.05)               # (all of them queued: one drain reads them)


def test_a_drains_tcp_run_is_one_frame_and_a_lone_packet_goes_at_once():
    from cyphonic.offload import F_NEEDS_CSUM, GSO_TCPV4, ZERO_HDR, VirtioNetHdr
    from test_offload import run_of
    with batched_way_back() as t:
        run = run_of(5, size=1000)
        ping = bytearray(b"\x45" + bytes(27))
        send_all(t.peer, t.link, [*run, ping])
        t.read()
        assert t.injected == []                            # nothing took the one-packet path
        # the first datagram of a quiet socket goes at once; what follows in the drain merges
        [(first, mac), (merged, mac2), (alone, mac3)] = t.fake.frames
        assert mac == mac2 == mac3 == bytes.fromhex("021122334455")
        assert first == ZERO_HDR + run[0]
        assert VirtioNetHdr.parse(merged) == VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 14 + 40, 1000, 14 + 20, 16)
        assert merged[10 + 40:] == b"".join(bytes(p[40:]) for p in run[1:])
        assert alone == ZERO_HDR + ping
        b = t.wb.batch
        assert b["merged_writes"] == 1 and b["merged_segments"] == 4 and b["plain_writes"] == 2
        # a lone packet, TCP or not, leaves in the wakeup that read it
        [seg] = run_of(1, seq=9999)
        send_all(t.peer, t.link, [seg])
        t.read()
        assert t.fake.frames[-1] == (ZERO_HDR + seg, mac)


def test_refused_batches_fall_back_to_one_packet_per_send_and_are_counted():
    from test_offload import run_of
    with batched_way_back(FakeInjector(enable=False)) as t:
        assert t.wb.batch_injector is None and t.wb.batch["inject_batches_refused"] == 1
        run = run_of(3)
        send_all(t.peer, t.link, run)
        t.read()
        assert t.injected == [bytes(p) for p in run]


def test_a_refused_gso_frame_is_injected_packet_by_packet_and_batches_stop():
    from cyphonic.offload import l4_checksum_ok
    from test_offload import run_of
    with batched_way_back(FakeInjector(refuse_gso=True)) as t:
        run = run_of(4)
        send_all(t.peer, t.link, run)
        t.read()
        assert t.wb.batch["inject_gso_refused"] == 1 and t.wb.batch_injector is None
        assert len(t.fake.frames) == 1                                         # the first, alone
        assert t.injected == [bytes(p) for p in run[1:]]                       # the run, cut again
        assert all(l4_checksum_ok(p) for p in t.injected) and not t.wb.drops
        more = run_of(2, seq=4001)
        send_all(t.peer, t.link, more)
        t.read()
        assert t.injected[-2:] == [bytes(p) for p in more] and len(t.fake.frames) == 1


def test_a_general_node_without_a_usable_mac_keeps_the_one_packet_path():
    with batched_way_back(mac="ff:ff:ff:ff:ff:ff") as t:
        send_all(t.peer, t.link, [b"\x45" + bytes(27)])
        t.read()
        assert t.injected == [b"\x45" + bytes(27)] and t.fake.frames == []


def test_a_syn_keeps_the_raw_socket_whose_output_hook_clamps_its_mss():
    from test_offload import run_of, tcp4
    with batched_way_back() as t:
        syn_ack = tcp4(b"", flags=0x12, options=b"\x02\x04\x05\x78")
        run = run_of(3)
        send_all(t.peer, t.link, [syn_ack])                  # lone
        t.read()
        send_all(t.peer, t.link, [run[0], syn_ack, *run[1:]])   # in a burst
        t.read()
        assert t.injected == [bytes(syn_ack), bytes(syn_ack)]
        [(first, _), (merged, _)] = t.fake.frames
        assert first[10:] == bytes(run[0]) and merged[1] == 1                 # (then 2 and 3 merged)
        assert merged[10 + 40:] == bytes(run[1][40:]) + bytes(run[2][40:])
