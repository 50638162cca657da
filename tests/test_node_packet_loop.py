"""The node's data path loop (cyphonic/node/packet_handling.py), without root: the epoll selector
under asyncio, and PacketPath with a datagram socketpair standing in for the TUN device."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

from cyphonic.datachannel import OPENED, RECV_STAGE, SEAL_STAGE, SEALED
from cyphonic.node.packet_handling import DataPathSelector, PacketPath


def run(coro_fn, selector: DataPathSelector | None = None):
    sel = selector or DataPathSelector()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(sel)) as r:
        return r.run(coro_fn(sel))


def udp_pair():
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_fast_readers_run_inside_select_and_asyncio_keeps_working():
    async def scenario(sel):
        loop = asyncio.get_running_loop()
        a, b = udp_pair()
        c, d = udp_pair()
        got, asyncio_got = [], []

        def on_fast() -> bool:
            while True:
                try:
                    got.append(a.recv(100))
                except BlockingIOError:
                    return False

        sel.add_fast_reader(a.fileno(), on_fast)
        loop.add_reader(c.fileno(), lambda: asyncio_got.append(c.recv(100)))
        timer = loop.create_future()
        t0 = time.monotonic()
        loop.call_later(0.15, timer.set_result, time.monotonic())
        for i in range(50):  # fast traffic all along must not hold asyncio's timer back
            b.sendto(b"fast%d" % i, a.getsockname())
            await asyncio.sleep(0.004)
        d.sendto(b"for asyncio", c.getsockname())
        fired = await asyncio.wait_for(timer, 2)
        await asyncio.sleep(0.02)
        assert fired - t0 < 0.25
        assert len(got) == 50 and got[0] == b"fast0"
        assert asyncio_got == [b"for asyncio"]
        # a thread waking the loop (asyncio.to_thread's completion) is heard while the loop sleeps
        assert await asyncio.to_thread(lambda: 42) == 42
        assert sel.get_key(c.fileno()).fd == c.fileno() and len(sel.get_map()) >= 1
        assert sel.remove_fast_reader(a.fileno()) and not sel.remove_fast_reader(a.fileno())
        loop.remove_reader(c.fileno())
        for s in (a, b, c, d):
            s.close()

    run(scenario)


def test_a_handler_that_leaves_work_hands_control_back_and_errors_are_counted():
    async def scenario(sel):
        loop = asyncio.get_running_loop()
        a, b = udp_pair()
        done = loop.create_future()
        calls = []

        def on_fast() -> bool:
            data = a.recv(100)
            calls.append(data)
            if data == b"boom":
                raise RuntimeError("a bug in a handler")
            loop.call_soon(done.set_result, data)  # asyncio work: runs once select() returns
            return True

        sel.add_fast_reader(a.fileno(), on_fast)
        b.sendto(b"boom", a.getsockname())
        await asyncio.sleep(0.05)
        assert sel.handler_errors["RuntimeError"] == 1
        b.sendto(b"after", a.getsockname())
        assert await asyncio.wait_for(done, 2) == b"after"
        assert calls == [b"boom", b"after"]
        sel.remove_fast_reader(a.fileno())
        a.close()
        b.close()

    run(scenario)


def test_a_threadsafe_call_wakes_a_loop_that_only_waits():
    async def scenario(sel):
        loop = asyncio.get_running_loop()
        woke = loop.create_future()
        threading.Timer(0.05, lambda: loop.call_soon_threadsafe(woke.set_result, True)).start()
        assert await asyncio.wait_for(woke, 2)

    run(scenario)


class FakeDevice:
    """The staged fast paths of the common case, by rule: b"?F..." takes the fast path."""

    def __init__(self, peer_addr):
        self.peer_addr = peer_addr

    def fast_send_staged(self, size, now):
        pkt = bytes(SEAL_STAGE[:size])
        if pkt[1:2] != b"F":
            return None
        out = b"sealed:" + pkt
        SEALED[:len(out)] = out
        return len(out), self.peer_addr

    def fast_receive_staged(self, size, addr, now):
        data = bytes(RECV_STAGE[:size])
        if not data.startswith(b"sealed:"):
            return None
        inner = data[len(b"sealed:"):]
        if inner == b"\x45keepalive":
            return 0
        OPENED[:len(inner)] = inner
        return len(inner)


def packet(tag: bytes) -> bytes:
    return b"\x45" + tag  # IPv4 version nibble


def test_packet_path_carries_the_common_case_and_hands_the_rest_to_the_slow_path():
    async def scenario(sel):
        udp, peer = udp_pair()
        tun_app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)  # a TUN: one packet per read
        for s in (tun_app, tun):
            s.setblocking(False)
        slow_datagrams, slow_packets, flushes = [], [], []
        path = PacketPath(sel.add_fast_reader, sel.remove_fast_reader,
                          slow_datagram=lambda d, a, now: slow_datagrams.append(d),
                          slow_packet=lambda p, now: slow_packets.append(p),
                          flush=lambda: flushes.append(1))
        path.attach({socket.AF_INET: udp})  # no device and no TUN yet: everything is slow
        peer.sendto(b"sealed:\x45Fearly", udp.getsockname())
        await asyncio.sleep(0.05)
        assert slow_datagrams == [b"sealed:\x45Fearly"] and len(flushes) == 1

        path.attach({socket.AF_INET: udp}, FakeDevice(peer.getsockname()), tun.fileno())
        # TUN -> UDP: a burst, all carried; one packet without a session goes slow
        for tag in (b"F1", b"F2", b"S3", b"F4"):
            tun_app.send(packet(tag))
        await asyncio.sleep(0.05)
        out = []
        while True:
            try:
                out.append(peer.recv(100))
            except BlockingIOError:
                break
        assert out == [b"sealed:" + packet(t) for t in (b"F1", b"F2", b"F4")]
        assert slow_packets == [packet(b"S3")]
        # UDP -> TUN: opened packets are written to the TUN, keepalives consumed, the rest slow
        for d in (b"sealed:" + packet(b"Fa"), b"sealed:\x45keepalive", b"handshake", b"sealed:" + packet(b"Fb")):
            peer.sendto(d, udp.getsockname())
        await asyncio.sleep(0.05)
        inbound = []
        while True:
            try:
                inbound.append(tun_app.recv(100))
            except BlockingIOError:
                break
        assert inbound == [packet(b"Fa"), packet(b"Fb")]
        assert slow_datagrams[-1] == b"handshake"
        # an IPv6 packet never takes the fast path
        tun_app.send(b"\x60F" + bytes(40))
        await asyncio.sleep(0.05)
        assert slow_packets[-1][:1] == b"\x60"
        path.detach()
        for s in (udp, peer, tun_app, tun):
            s.close()
        assert not path.errors

    run(scenario)


def test_packet_path_runs_on_a_plain_asyncio_loop_too():
    async def scenario():
        loop = asyncio.get_running_loop()
        udp, peer = udp_pair()
        tun_app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = PacketPath(loop.add_reader, loop.remove_reader, slow_datagram=lambda *a: None,
                          slow_packet=lambda *a: None, flush=lambda: None)
        path.attach({socket.AF_INET: udp}, FakeDevice(peer.getsockname()), tun.fileno())
        tun_app.send(packet(b"Fx"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            try:
                got = peer.recv(100)
                break
            except BlockingIOError:
                continue
        assert got == b"sealed:" + packet(b"Fx")
        path.detach()
        for s in (udp, peer, tun_app, tun):
            s.close()

    asyncio.run(scenario())


def test_selector_bookkeeping():
    sel = DataPathSelector()
    r, w = os.pipe()
    try:
        key = sel.register(r, 1, "data")
        assert sel.get_key(r) is key and key.data == "data"
        key2 = sel.modify(r, 1, "other")
        assert key2.data == "other"
        try:
            sel.add_fast_reader(r, lambda: False)
            raise AssertionError("an fd of asyncio's cannot be a fast reader too")
        except ValueError:
            pass
        os.write(w, b"x")
        assert [(k.fd, ev) for k, ev in sel.select(0)] == [(r, 1)]
        sel.unregister(r)
        assert sel.select(0) == []
        t = time.monotonic()
        assert sel.select(0.03) == []
        assert time.monotonic() - t >= 0.025
    finally:
        sel.close()
        os.close(r)
        os.close(w)


def test_busy_polling_waits_awake_for_the_answer_to_a_lone_packet_only():
    """A lone packet of our own starts a busy poll (if CPUs are idle and answers come quickly);
    the answer stops it; an answer we send (right after a delivery) and a stream do not start
    one; a busy machine never does."""
    async def scenario(sel):
        udp, peer = udp_pair()
        tun_app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (tun_app, tun):
            s.setblocking(False)
        spins, stops = [], []

        def spin(seconds):
            spins.append(seconds)
            sel.spin(seconds)

        def stop_spin():
            stops.append(1)
            sel.stop_spin()

        path = PacketPath(sel.add_fast_reader, sel.remove_fast_reader, slow_datagram=lambda *a: None,
                          slow_packet=lambda *a: None, flush=lambda: None, busy_poll_s=0.02,
                          spin=spin, stop_spin=stop_spin)
        path.attach({socket.AF_INET: udp}, FakeDevice(peer.getsockname()), tun.fileno())

        async def lone_packet():
            tun_app.send(packet(b"Fping"))
            await asyncio.sleep(0.01)
            return peer.recv(100)

        path.idle_cpus = 0.5                       # a busy machine: no busy poll
        assert await lone_packet() == b"sealed:" + packet(b"Fping") and spins == []
        path.sent_at = 0.0
        path.idle_cpus = 2.0
        assert await lone_packet() and spins == [0.02] and path.busy_polls == 1
        t0 = time.monotonic()
        peer.sendto(b"sealed:" + packet(b"Fpong"), udp.getsockname())   # the answer, quickly
        await asyncio.sleep(0.01)
        assert stops and tun_app.recv(100) == packet(b"Fpong") and path.quick
        assert sel.spin_until == 0.0 and time.monotonic() - t0 < 1
        # a packet that answers a delivery (an echo reply going back) starts none
        peer.sendto(b"sealed:" + packet(b"Fping2"), udp.getsockname())
        for _ in range(10000):
            await asyncio.sleep(0)
            try:
                tun_app.recv(100)
                break
            except BlockingIOError:
                continue
        tun_app.send(packet(b"Fpong2"))
        await asyncio.sleep(0.01)
        assert peer.recv(100) and len(spins) == 1
        # lone packets whose answers do not come: one busy poll, then no more
        for _ in range(3):
            await asyncio.sleep(0.05)
            assert await lone_packet()
        assert len(spins) == 2 and not path.quick
        path.detach()
        for s in (udp, peer, tun_app, tun):
            s.close()

    run(scenario)


def test_a_busy_poll_keeps_asyncio_timers_on_time():
    async def scenario(sel):
        loop = asyncio.get_running_loop()
        fired = loop.create_future()
        t0 = time.monotonic()
        loop.call_later(0.02, lambda: fired.set_result(time.monotonic()))
        sel.spin(0.2)
        t = await asyncio.wait_for(fired, 2)
        assert t - t0 < 0.1
        sel.stop_spin()

    run(scenario)


def test_idle_cpus_reads_proc_stat(tmp_path):
    from cyphonic.node.packet_handling import IdleCpus
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n")
    meter = IdleCpus(str(stat), cpus=2)
    assert meter.sample() is None                           # the first sample has nothing to compare
    stat.write_text("cpu  150 0 150 1000 100 0 0 0 0 0\n")  # 400 ticks: 300 idle
    assert meter.sample() == 1.5
    assert IdleCpus(str(tmp_path / "missing")).sample() is None
    assert IdleCpus().sample() is None or True              # the real file reads


# --- batches (issue 15): GRO pieces in, GSO runs out ------------------------------------------------

class MergedReads:
    """A UDP socket whose reads are given: each (data, gso_size) is one ``recvmsg_into`` result
    with its UDP_GRO control message (none when gso_size is None); records what is sent."""

    def __init__(self, reads, addr) -> None:
        self.reads = list(reads)
        self.addr = addr
        self.sent = []
        self.options = {}

    def fileno(self):
        return 99

    def setsockopt(self, level, opt, value):
        self.options[(level, opt)] = value

    def recvmsg_into(self, buffers, ancbufsize):
        import struct
        from cyphonic.udp_batch import SOL_UDP, UDP_GRO
        if not self.reads:
            raise BlockingIOError
        data, seg = self.reads.pop(0)
        buffers[0][:len(data)] = data
        anc = [] if seg is None else [(SOL_UDP, UDP_GRO, struct.pack("=i", seg))]
        return len(data), anc, 0, self.addr

    def recvmsg(self, bufsize, ancbufsize):
        buf = bytearray(65536)
        n, anc, flags, addr = self.recvmsg_into([memoryview(buf)], ancbufsize)
        return bytes(buf[:n]), anc, flags, addr

    def sendmsg(self, buffers, ancdata, flags, addr):
        self.sent.append(("gso", b"".join(bytes(b) for b in buffers), ancdata, addr))

    def sendto(self, data, addr):
        self.sent.append(("one", bytes(data), addr))


def live_pair():
    """Two real Devices with a confirmed session alice -> bob (tests/test_device.py's pair)."""
    from corefixtures import ping
    from test_device import pair
    w, a, b = pair()
    a.send_packet(ping(a, b, 0), w.now)
    w.pump()
    w.events("bob")
    return w, a, b


def test_each_piece_of_a_gro_read_is_opened_on_its_own_a_replay_is_dropped_and_an_initiation_goes_slow():
    from corefixtures import ping
    from cyphonic.udp_batch import UDP_GRO, SOL_UDP

    w, a, b = live_pair()
    sealed = [a.fast_send(ping(a, b, i, b"x" * 100), w.now)[0] for i in range(1, 5)]
    size = len(sealed[0])
    initiation = b"\x01" + bytes(size - 1)                      # an initiation merged into the run
    last = a.fast_send(ping(a, b, 9, b"y" * 10), w.now)[0]      # shorter: the read's last piece
    merged = sealed[0] + sealed[1] + sealed[1] + initiation + sealed[2] + sealed[3] + last
    sock = MergedReads([(merged, size), (sealed[3], None)], w.addr["alice"])
    tun_app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_app.setblocking(False)
    handlers, slow = {}, []
    path = PacketPath(lambda fd, h: handlers.__setitem__(fd, h), handlers.pop,
                      slow_datagram=lambda d, addr, now: slow.append(bytes(d)), slow_packet=lambda p, now: None,
                      flush=lambda: None, clock=lambda: w.now)
    path.attach({socket.AF_INET: sock}, b, tun.fileno())
    assert sock.options == {(SOL_UDP, UDP_GRO): 1}
    assert handlers[99]() is True                              # the initiation took the slow path
    assert handlers[99]() is False                             # (after a pause a wakeup reads once)
    delivered = []
    while True:
        try:
            delivered.append(tun_app.recv(2000))
        except BlockingIOError:
            break
    assert delivered == [ping(a, b, i, b"x" * 100) for i in (1, 2, 3, 4)] + [ping(a, b, 9, b"y" * 10)]
    assert b.drops["replay"] == 2                              # the copy in the run, and the lone replay
    assert slow == [initiation]
    assert path.batch == {"gro_reads": 1, "gro_pieces": 7, "gro_initiation_on_main": 1}
    for s in (tun_app, tun):
        s.close()


def test_a_tun_burst_leaves_in_gso_runs_and_a_lone_packet_in_its_own_wakeup():
    from corefixtures import ping

    w, a, b = live_pair()
    sock = MergedReads([], w.addr["bob"])
    tun_app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)   # (a DGRAM pair queues 10)
    for s in (tun_app, tun):
        s.setblocking(False)
    clock = [w.now]
    handlers = {}
    path = PacketPath(lambda fd, h: handlers.__setitem__(fd, h), handlers.pop, slow_datagram=None,
                      slow_packet=lambda p, now: None, flush=lambda: None, clock=lambda: clock[0])
    path.attach({socket.AF_INET: sock}, a, tun.fileno())
    on_tun = handlers[tun.fileno()]
    tun_app.send(ping(a, b, 1))
    on_tun()                                                   # after a pause: one packet, sent at once
    assert [s[0] for s in sock.sent] == ["one"]
    for i in range(70):
        tun_app.send(ping(a, b, 100 + i, b"z" * 500))
    tun_app.send(ping(a, b, 200, b"z" * 20))
    clock[0] += 0.0001                                         # within busy_poll.LONE_GAP_S: drain
    on_tun()
    kinds = [(s[0], len(s[1])) for s in sock.sent[1:]]
    seg = len(a.peer(b.cert.fqdn).current.sender.seal(b"")) + len(ping(a, b, 1, b"z" * 500))
    assert kinds == [("gso", 64 * seg), ("gso", 6 * seg + seg - 480)]
    assert path.batch == {"plain_sends": 1, "gso_sends": 2, "gso_segments": 71}
    # every datagram opens at bob, in order, each with its own counter
    for kind, data, *_ in sock.sent:
        for i in range(0, len(data), seg):
            b.receive_datagram(data[i:i + seg], w.addr["alice"], w.now)
    got = [e.packet for e in w.events("bob") if hasattr(e, "packet")]
    assert got == [ping(a, b, 1)] + [ping(a, b, 100 + i, b"z" * 500) for i in range(70)] + [ping(a, b, 200, b"z" * 20)]
    for s in (tun_app, tun):
        s.close()


# --- TUN offloads (issue 15, step 3): super-packets cut on the way out, segments merged on the way in ---

def _offload_path(w, dev, sock, *, slow_datagram=None, slow_packet=None):
    """A PacketPath with offloads (vnet headers) on ``dev``, its TUN a socket pair: (path, its
    handlers by fd, the application's end of the TUN, the path's end, the clock to move)."""
    tun_app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (tun_app, tun):
        s.setblocking(False)
    clock = [w.now]
    handlers = {}
    path = PacketPath(lambda fd, h: handlers.__setitem__(fd, h), handlers.pop, slow_datagram=slow_datagram,
                      slow_packet=slow_packet, flush=lambda: None, clock=lambda: clock[0])
    path.attach({socket.AF_INET: sock}, dev, tun.fileno(), vnet_hdr=True)
    return path, handlers, tun_app, tun, clock


def test_with_offloads_a_super_packet_leaves_as_sealed_pieces_and_a_partial_checksum_is_finished():
    import ipaddress
    from test_offload import as_read, payload_of, ref_ip_ok, ref_l4_ok, tcp4
    from cyphonic.offload import GSO_NONE, GSO_TCPV4

    w, a, b = live_pair()
    src, dst = (ipaddress.IPv4Address(str(d.cert.vip4)).packed for d in (a, b))
    sock = MergedReads([], w.addr["bob"])
    path, handlers, tun_app, tun, clock = _offload_path(w, a, sock, slow_packet=lambda p, now: None)
    on_tun = handlers[tun.fileno()]
    data = os.urandom(1300 * 30 + 11)
    big = tcp4(data, src=src, dst=dst, seq=77)
    read, hdr = as_read(bytearray(big), GSO_TCPV4, 1300)
    tun_app.send(hdr.build() + read)
    lone, lhdr = as_read(tcp4(b"GET /", src=src, dst=dst, seq=5), GSO_TCPV4, 0)
    tun_app.send(lhdr._replace(gso_type=GSO_NONE).build() + lone)
    on_tun()
    clock[0] += 0.0001
    on_tun()
    assert path.batch["super_reads"] == 1 and path.batch["super_read_pieces"] == 31
    for kind, blob, *_ in sock.sent:
        seg = len(a.peer(b.cert.fqdn).current.sender.seal(b"")) + 1340
        for i in range(0, len(blob), seg if kind == "gso" else len(blob)):
            b.receive_datagram(blob[i:i + seg] if kind == "gso" else blob, w.addr["alice"], w.now)
    got = [e.packet for e in w.events("bob") if hasattr(e, "packet")]
    assert len(got) == 32 and all(ref_ip_ok(p) and ref_l4_ok(p) for p in got)
    assert b"".join(payload_of(p) for p in got[:31]) == data and payload_of(got[31]) == b"GET /"
    for s in (tun_app, tun):
        s.close()


def test_with_offloads_a_gro_run_of_one_flow_is_one_merged_write_and_a_lone_packet_gets_a_zero_header():
    import ipaddress
    from corefixtures import ping
    from test_offload import payload_of, tcp4
    from cyphonic.offload import F_NEEDS_CSUM, GSO_TCPV4, VNET_HDR_BYTES, ZERO_HDR, VirtioNetHdr

    w, a, b = live_pair()
    src, dst = (ipaddress.IPv4Address(str(d.cert.vip4)).packed for d in (a, b))
    segs = [tcp4(bytes([i]) * 1000, src=src, dst=dst, seq=1 + 1000 * i, flags=0x10, ip_id=i) for i in range(5)]
    sealed = [a.fast_send(bytes(p), w.now)[0] for p in segs]
    lone = a.fast_send(ping(a, b, 3), w.now)[0]
    sock = MergedReads([(b"".join(sealed), len(sealed[0])), (lone, None)], w.addr["alice"])
    path, handlers, tun_app, tun, clock = _offload_path(w, b, sock, slow_datagram=lambda d, addr, now: None)
    handlers[99]()                       # after a pause: one read (here a GRO read of five)
    clock[0] += 0.0001
    handlers[99]()                       # the lone datagram
    writes = []
    while True:
        try:
            writes.append(tun_app.recv(70000))
        except BlockingIOError:
            break
    assert len(writes) == 2
    h = VirtioNetHdr.parse(writes[0])
    assert h == VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16)
    assert payload_of(writes[0][VNET_HDR_BYTES:]) == b"".join(bytes([i]) * 1000 for i in range(5))
    assert writes[1] == ZERO_HDR + ping(a, b, 3)
    assert path.batch["merged_writes"] == 1 and path.batch["merged_segments"] == 5
    for s in (tun_app, tun):
        s.close()


def test_with_offloads_a_tun_drain_is_bounded_by_packets_not_reads():
    import ipaddress
    from test_offload import as_read, tcp4
    from cyphonic.node.constants import READ_BATCH
    from cyphonic.offload import GSO_TCPV4

    w, a, b = live_pair()
    src, dst = (ipaddress.IPv4Address(str(d.cert.vip4)).packed for d in (a, b))
    sock = MergedReads([], w.addr["bob"])
    path, handlers, tun_app, tun, clock = _offload_path(w, a, sock, slow_packet=lambda p, now: None)
    for i in range(12):
        read, hdr = as_read(tcp4(os.urandom(100 * 40), src=src, dst=dst, seq=1 + 4000 * i), GSO_TCPV4, 100)
        tun_app.send(hdr.build() + read)
    handlers[tun.fileno()]()
    clock[0] += 0.0001
    handlers[tun.fileno()]()                  # a drain: stops once READ_BATCH packets went out
    reads = path.batch["super_reads"]
    assert reads == 1 + -(-READ_BATCH // 40) and path.batch["super_read_pieces"] == 40 * reads
    for s in (tun_app, tun):
        s.close()


def test_with_offloads_a_packet_that_cannot_merge_is_written_at_once_after_the_run_before_it():
    """In a drain, a datagram that is not IPv4 TCP (here a ping) goes to the TUN at once with a
    zero header, and the run of segments before it is written first: order is kept."""
    import ipaddress
    from corefixtures import ping
    from test_offload import payload_of, tcp4
    from cyphonic.offload import F_NEEDS_CSUM, GSO_TCPV4, VNET_HDR_BYTES, ZERO_HDR, VirtioNetHdr

    w, a, b = live_pair()
    src, dst = (ipaddress.IPv4Address(str(d.cert.vip4)).packed for d in (a, b))
    segs = [tcp4(bytes([i]) * 1000, src=src, dst=dst, seq=1 + 1000 * i, flags=0x10, ip_id=i) for i in range(7)]
    sealed = [a.fast_send(bytes(p), w.now)[0] for p in segs]
    lone = a.fast_send(ping(a, b, 3), w.now)[0]
    sock = MergedReads([(b"".join(sealed[:3]), len(sealed[0])), (b"".join(sealed[3:5]), len(sealed[0])),
                        (lone, None), (b"".join(sealed[5:]), len(sealed[0]))], w.addr["alice"])
    path, handlers, tun_app, tun, clock = _offload_path(w, b, sock, slow_datagram=lambda d, addr, now: None)
    handlers[99]()                       # after a pause: one read
    clock[0] += 0.0001
    handlers[99]()                       # a drain: the other three
    writes = []
    while True:
        try:
            writes.append(tun_app.recv(70000))
        except BlockingIOError:
            break
    assert [VirtioNetHdr.parse(x).gso_size for x in writes] == [1000, 1000, 0, 1000]
    assert writes[2] == ZERO_HDR + ping(a, b, 3)
    for x, run in ((writes[0], range(3)), (writes[1], range(3, 5)), (writes[3], range(5, 7))):
        assert VirtioNetHdr.parse(x)[:2] == (F_NEEDS_CSUM, GSO_TCPV4)
        assert payload_of(x[VNET_HDR_BYTES:]) == b"".join(bytes([i]) * 1000 for i in run)
    assert path.batch["merged_writes"] == 3 and path.batch["merged_segments"] == 7 and path.batch["plain_writes"] == 1
    for s in (tun_app, tun):
        s.close()
