"""The adapter's worker pool (appliance.worker_pool) with stand-in processes and pipes:
generations, supervision, health, messages, counters; and a general node added to and removed
from running workers over real pipes (appliance.packet_handling.SealTable, the worker's side)."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import Counter
from types import SimpleNamespace

import pytest
from multiprocessing.connection import Connection

from cyphonic.health import Health

from appliance.packet_handling import SealTable
from appliance.worker_pool import WorkerPool

from test_adapter_nfq_gso import Netlink
from test_adapter_sessions import FakeConn, FakeProc, Pool


def test_workers_start_on_their_queues_each_with_a_generation_of_its_own():
    p = Pool(3)
    ws = p.pool.workers
    assert [w.queue for w in ws] == [0, 1, 2] and [w.index for w in ws] == [0, 1, 2]
    assert len({w.generation for w in ws}) == 3
    assert p.pool.slots() == [(w.index, w.generation) for w in ws]


def test_a_dead_worker_is_replaced_with_a_new_generation_and_a_health_event():
    p = Pool(2)
    lines = []
    p.pool.log = lines.append
    before = {w.generation for w in p.pool.workers}
    assert not p.pool.supervise(p.now)            # all alive: nothing to do
    p.crash(1)
    assert p.pool.conditions()[0].code == "worker-down"
    assert p.pool.supervise(p.now)
    w = p.pool.workers[1]
    assert w.generation not in before and w.proc.is_alive() and p.pool.restarts == 1
    assert "worker 1" in lines[0] and "restarting" in lines[0]
    [event] = p.health.report(p.now)
    assert event["code"] == "worker-restarted" and event["subject"] == "worker 1" and event["since"] == p.now
    assert p.pool.conditions() == []


def test_a_broken_pipe_marks_a_worker_dead_and_a_stopping_pool_restarts_nothing():
    p = Pool(2)
    p.pool.workers[0].conn.closed = True
    p.pool.send(0, ("stats",))                    # fails: marked dead, replaced at the next supervision
    assert p.pool.workers[0].dead
    p.pool.stopping = True
    assert not p.pool.supervise(p.now)
    p.pool.stopping = False
    assert p.pool.supervise(p.now) and not p.pool.workers[0].dead


def test_messages_from_a_worker_counters_misses_and_its_end():
    class Conn(FakeConn):
        def __init__(self, msgs):
            super().__init__([])
            self.msgs = list(msgs)

        def poll(self):
            if self.msgs == ["EOF"]:
                raise EOFError
            return bool(self.msgs)

        def recv(self):
            return self.msgs.pop(0)

    p = Pool(1)
    misses = []
    p.pool.on_message = misses.append
    w = p.pool.workers[0]
    w.conn = Conn([("ready", 0, 1), ("stats", {"index": 0, "pid": 1, "sealed": 7, "per_session": {
        "100.64.0.1>100.64.0.2": 700}}), ("miss", b"a", b"b"), "EOF"])
    p.pool._on_readable(w)
    assert misses == [("miss", b"a", b"b")] and w.dead
    assert w.stats["sealed"] == 7 and p.pool.tx_bytes("100.64.0.1", "100.64.0.2") == 700
    [row] = p.pool.rows()
    assert row["sealed"] == 7 and row["queue"] == 0 and row["pid"] == w.proc.pid and row["alive"]


def test_forking_again_and_stopping():
    p = Pool(2)
    old = list(p.pool.workers)
    p.pool.restart_all()
    assert all(w.conn.closed and not w.proc.is_alive() for w in old)   # told, waited for, killed
    assert [m for proc, m in p.log if proc in {w.proc for w in old}] == [("stop",), ("stop",)]
    p.pool.ask_stats()
    p.pool.stop()
    assert [m for proc, m in p.log if proc in {w.proc for w in p.pool.workers}] == [("stats",)] * 2 + [("stop",)] * 2
    assert p.pool.stopping


# --- a general node added to and removed from running workers ------------------------------------------

def udp(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    s.settimeout(2.0)
    return s


class LiveWorkers:
    """A WorkerPool on real pipes (Unix socket pairs, as forked workers have) whose "processes" are
    SealTables in this process, each on its own copy of the pipe's child end (as after a fork)."""

    def __init__(self, n: int, sockets: dict) -> None:
        self.tables: list[SealTable] = []
        self.pool = WorkerPool(n, 0, worker_args=lambda: (dict(sockets), -1), add_reader=lambda *a: None,
                               remove_reader=lambda *a: None, on_message=lambda msg: None, health=Health(),
                               log=lambda line: None, clock=lambda: 0.0, launch=self._launch)
        self.pool.start()

    def _launch(self, index, queue, child, args):
        sockets, _heads_up = args
        inherited = Connection(os.dup(child.fileno()))
        self.tables.append(SealTable(index, queue, inherited, {p: s.dup() for p, s in sockets.items()}, Counter()))
        return FakeProc(index)

    def run(self) -> list[bool]:
        """Each worker reads what its pipe holds, as worker_main does; whether each goes on."""
        out = []
        for t in self.tables:
            going = True
            while going and t.conn.poll():
                going = t.control(t.conn.recv())
            out.append(going)
        return out


def tx(port: int, gn: int, peer: int) -> tuple:
    return ("tx", bytes([100, 64, 0, gn]), bytes([100, 64, 1, peer]), os.urandom(32), 7, 1 + gn,
            ("127.0.0.1", 9), port)


def test_a_new_general_nodes_socket_reaches_the_running_workers_and_leaves_them_with_its_sessions():
    a, b, peer = udp(), udp(), udp()
    pa, pb = a.getsockname()[1], b.getsockname()[1]
    live = LiveWorkers(2, {pa: a})
    procs = [w.proc for w in live.pool.workers]
    live.pool.add_port(pb, b)                       # `cyadm gn add`: b's socket, over each pipe
    for w in live.pool.workers:
        live.pool.send_to(w, tx(pa, 1, 1))
        live.pool.send_to(w, tx(pb, 2, 1))
    assert live.run() == [True, True]
    assert [w.proc for w in live.pool.workers] == procs and not any(w.dead for w in live.pool.workers)
    for t in live.tables:
        assert set(t.sockets) == {pa, pb} and t.counters["installs"] == 2 and t.counters["ports_added"] == 1
        copy = t.sessions[(bytes([100, 64, 0, 2]), bytes([100, 64, 1, 1]))][2]
        assert copy.fileno() != b.fileno()          # its own copy of the controller's socket ...
        copy.sendto(b"sealed", peer.getsockname())  # ... which sends from the general node's port
        data, src = peer.recvfrom(100)
        assert data == b"sealed" and src[1] == pb
    # `cyadm gn remove`: the sessions of b leave with its socket; a's stay; the controller's b works on
    live.pool.close_port(pb)
    assert live.run() == [True, True]
    for t in live.tables:
        assert set(t.sockets) == {pa} and copy.fileno() == -1
        assert all(s[2].getsockname()[1] == pa for s in t.sessions.values()) and len(t.sessions) == 1
        assert all(s is not copy for _, _, s in t.sessions.values())
    b.sendto(b"still mine", peer.getsockname())
    assert peer.recvfrom(100)[0] == b"still mine"
    for s in (a, b, peer):
        s.close()


def test_a_worker_refuses_an_add_port_without_its_socket_and_stops_for_a_fresh_fork(monkeypatch):
    import appliance.packet_handling as ph
    monkeypatch.setattr(ph.receive_socket, "__defaults__", (0.05,))   # the wait for the fd
    other = udp()
    live = LiveWorkers(1, {})
    live.pool.send_to(live.pool.workers[0], ("add_port", 40000))        # no fd follows
    assert live.run() == [False] and live.tables[0].counters["add_port_refused"] == 1
    live = LiveWorkers(1, {})
    live.pool.add_port(40000, other)                # a socket that is not bound to that port
    assert live.run() == [False] and not live.tables[0].sockets
    live = LiveWorkers(1, {})
    live.pool.workers[0].conn.close()
    live.pool.add_port(other.getsockname()[1], other)                  # a dead pipe: marked, replaced
    assert live.pool.workers[0].dead
    other.close()


# --- a worker's queue drain: sealed runs out first, then one DROP for every packet read (issue 15) ------

class LoggingUdp:
    def __init__(self, log: list) -> None:
        self.log = log

    def sendto(self, data, addr):
        self.log.append(("udp", addr, bytes(data)))

    def sendmsg(self, buffers, ancdata, flags, addr):
        self.log.append(("udp-gso", addr, b"".join(bytes(b) for b in buffers)))


class FakePacket:
    def __init__(self, pid: int, payload: bytes | None) -> None:
        self.id = pid
        self.payload = payload
        self.verdicts = []

    def get_payload(self):
        if self.payload is None:
            raise RuntimeError("no payload")
        return self.payload

    def drop(self):
        self.verdicts.append("drop")

    accept = drop


GN, PEER = bytes([100, 64, 0, 1]), bytes([100, 64, 1, 1])


def ip(src: bytes, dst: bytes, size: int = 60) -> bytes:
    return b"\x45" + bytes(11) + src + dst + bytes(size - 20)


def worker(log: list, messages=(), limit: int = 256):
    from appliance.packet_handling import QueueDrain, packet_handler
    from cyphonic.datachannel import SendStream
    from cyphonic.udp_batch import GsoSender

    sent_misses = []
    table = SealTable(0, 5, SimpleNamespace(send=sent_misses.append), {}, Counter())
    udp_sock = LoggingUdp(log)
    key = bytes(range(32))
    table.sessions[(GN, PEER)] = (SendStream(key, 77, stream_id=3), ("192.0.2.7", 4000), udp_sock)
    sender = GsoSender(counters=table.counters)
    drain = QueueDrain(Netlink(log, messages), 5, table.counters, sender, limit=limit)
    return table, drain, packet_handler(table, sender, drain), sent_misses, key


def test_a_drain_sends_its_runs_then_one_drop_verdict_for_every_packet_it_read_even_failed_ones():
    from appliance import nfqueue_wire as nfw
    from cyphonic.datachannel import ReceiveSession

    log = []
    table, drain, on_packet, misses, key = worker(log)
    pkts = [FakePacket(10, ip(GN, PEER)), FakePacket(11, ip(GN, PEER)), FakePacket(12, ip(GN, bytes(4))),
            FakePacket(13, None), FakePacket(14, b"\x60" + bytes(39)), FakePacket(15, ip(GN, PEER))]
    for p in pkts:
        on_packet(p)
    assert [e[0] for e in log] == ["udp"]                      # the first after a pause leaves at once ...
    assert not any(p.verdicts for p in pkts)                   # ... the rest waits for the drain's end
    drain.end()
    kinds = [e[0] for e in log]
    assert kinds == ["udp", "udp-gso", "netlink"]              # the sealed run first, then the verdict
    assert log[2][1] == nfw.verdict_batch(5, nfw.NF_DROP, 15)  # DROP up to the last id read
    recv = ReceiveSession(key, 77)
    opened = [recv.open(d) for d in [log[0][2]] + [log[1][2][i:i + 92] for i in range(0, 184, 92)]]
    assert [c for _, c in opened] == [(3 << 56) + i for i in range(3)]   # the stream's next counters
    c = table.counters
    assert (c["sealed"], c["drop_no_session"], c["internal_RuntimeError"], c["drop_not_ipv4"]) == (3, 1, 1, 1)
    assert (c["verdict_batches"], c["verdicts"], c["gso_sends"], c["gso_segments"]) == (1, 6, 1, 2)
    assert misses == [("miss", GN, bytes(4))]
    drain.end()                                                # an empty drain judges nothing
    assert len(log) == 3 and c["verdict_batches"] == 1


def test_a_lone_packet_is_sent_and_judged_in_the_drain_it_arrived_in():
    log = []
    table, drain, on_packet, _, _ = worker(log)
    on_packet(FakePacket(1, ip(GN, PEER)))
    drain.end()
    assert [e[0] for e in log] == ["udp", "netlink"] and table.counters["plain_sends"] == 1


def test_the_drain_is_bounded_takes_out_its_config_ack_and_counts_enobufs():
    from appliance import nfqueue_wire as nfw

    ack_ok = nfw.NLMSGHDR.pack(36, nfw.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", 0) + bytes(16)
    refused = nfw.NLMSGHDR.pack(36, nfw.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -errno.EINVAL) + bytes(16)
    log = []
    table, drain, _, _, _ = worker(log, [ack_ok, b"p1", errno.ENOBUFS, refused, b"p2", b"p3", b"p4"], limit=2)
    assert drain.recv(4096) == b"p1"
    with pytest.raises(OSError) as exc:
        drain.recv(4096)                                       # (run_socket goes on after ENOBUFS)
    assert exc.value.errno == errno.ENOBUFS
    assert drain.recv(4096) == b"p2"
    with pytest.raises(BlockingIOError):                       # the bound: run_socket returns
        drain.recv(4096)
    c = table.counters
    assert (c["config_acked"], c["nfq_config_refused"], c["nfq_enobufs"]) == (1, 1, 1)
    drain.end()                                                # a new drain, a new bound
    assert drain.recv(4096) == b"p3" and drain.recv(4096) == b"p4"
    with pytest.raises(BlockingIOError):
        drain.recv(4096)                                       # the queue is empty
    drain.configure()
    assert log[-1] == ("netlink", nfw.config(5, flags=0, mask=nfw.F_FAIL_OPEN, seq=1))
