"""What each worker seals with: appliance.sessions.SessionInstaller through the real
appliance.worker_pool.WorkerPool (fake processes and pipes that record every message), the
path the controller uses. The security invariant: no ("tx", ...) message ever carries a
(send key, stream id) that an earlier one carried, across workers, worker restarts, re-forks,
endpoint changes, rekeys and expiry; stream ids stay within what the receiver keeps windows
for; a key out of ids is rekeyed through Device.rekey."""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.datachannel import SendStream
from cyphonic.health import Health
from cyphonic.stream_ids import LAST_STREAM_ID, STREAM_IDS_PER_KEY, StreamIds, key_id

from appliance.sessions import SessionInstaller
from appliance.worker_pool import WorkerPool

from corefixtures import World, ping

GN_VIP = bytes([100, 64, 0, 1])
PORT = 47200


# --- fakes: worker processes and their pipes -------------------------------------------------------

class FakeConn:
    """Our end of a worker's pipe: records what is sent (into the shared log, with the worker's
    process), never has anything to read."""
    _fds = itertools.count(1000)

    def __init__(self, log: list) -> None:
        self.log = log
        self.proc = None
        self.closed = False
        self.fd = next(self._fds)

    def send(self, msg) -> None:
        if self.closed:
            raise OSError("closed")
        self.log.append((self.proc, msg))

    def poll(self) -> bool:
        return False

    def fileno(self) -> int:
        if self.closed:
            raise OSError("closed")
        return self.fd

    def close(self) -> None:
        self.closed = True


class FakeProc:
    _pids = itertools.count(5000)

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = next(self._pids)
        self.alive = True
        self.exitcode = None

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout=None) -> None:
        pass

    def kill(self) -> None:
        self.alive = False
        self.exitcode = -9


class Pool:
    """A WorkerPool whose processes are FakeProcs; ``log`` has every message sent to any of them."""

    def __init__(self, n: int) -> None:
        self.log: list = []
        self.now = 1000.0
        self.health = Health()
        self._last_parent = None
        self.pool = WorkerPool(n, 0, worker_args=lambda: (), add_reader=lambda *a: None,
                               remove_reader=lambda *a: None, on_message=lambda msg: None,
                               health=self.health, log=lambda line: None, clock=lambda: self.now,
                               launch=self._launch, pipe=self._pipe, pass_socket=self._pass_socket)
        self.pool.start()

    def _pipe(self):
        self._last_parent = FakeConn(self.log)
        return self._last_parent, FakeConn([])

    @staticmethod
    def _pass_socket(conn, sock) -> None:
        """(The real one sends the fd over the pipe, SCM_RIGHTS: recorded as a message here.)"""
        conn.send(("fd", sock.getsockname()[1]))

    def _launch(self, index, queue, child, args):
        proc = FakeProc(index)
        self._last_parent.proc = proc
        return proc

    def crash(self, index: int) -> None:
        self.pool.workers[index].proc.kill()

    def txs(self) -> list[tuple]:
        return [msg for _, msg in self.log if msg[0] == "tx"]

    def held(self) -> dict:
        """What each running worker process holds now: proc -> {peer vip: (key, stream id)}."""
        out = {w.proc: {} for w in self.pool.workers}
        for proc, msg in self.log:
            if proc not in out:
                continue
            if msg[0] == "tx":
                out[proc][msg[2]] = (msg[3], msg[5])
            elif msg[0] == "untx":
                out[proc].pop(msg[2], None)
        return out


def assert_never_twice(pool: Pool) -> None:
    seen = set()
    for msg in pool.txs():
        _, gn_vip, peer_vip, key, remote_index, stream_id, endpoint, port = msg
        assert 1 <= stream_id <= LAST_STREAM_ID, stream_id      # never 0: the device's own
        assert (key, stream_id) not in seen, f"stream id {stream_id} handed out twice for one key"
        seen.add((key, stream_id))


# --- fakes: the device's view of its peers ---------------------------------------------------------

class Keys:
    def __init__(self) -> None:
        self.send_key = os.urandom(32)
        self.remote_index = int.from_bytes(os.urandom(4), "big")


class Keypair:
    def __init__(self) -> None:
        self.keys = Keys()
        self.ok = True          # can_send


class Peer:
    def __init__(self, fqdn: str) -> None:
        self.fqdn = fqdn
        self.current = Keypair()
        self.endpoint = ("198.51.100.7", 47199)

    def sendable(self, now):
        return self.current if self.current is not None and self.current.ok else None


class Device:
    def __init__(self) -> None:
        self.peers_by_vip: dict[bytes, Peer] = {}
        self.rekeys: list[str] = []

    def add(self, n: int) -> Peer:
        p = Peer(f"p{n}.example")
        self.peers_by_vip[bytes([100, 64, 1, n])] = p
        return p

    def rekey(self, peer, now: float) -> None:
        self.rekeys.append(peer.fqdn)


def setup(nworkers=3, npeers=1):
    pool = Pool(nworkers)
    dev = Device()
    peers = [dev.add(i) for i in range(npeers)]
    inst = SessionInstaller(GN_VIP, PORT, pool.pool)
    return pool, dev, peers, inst


# --- unit tests ---------------------------------------------------------------------------------------

def test_every_worker_gets_the_session_with_a_stream_id_of_its_own():
    pool, dev, [peer], inst = setup(3)
    inst.sync(dev, 0.0)
    txs = pool.txs()
    assert [m[5] for m in txs] == [1, 2, 3]
    assert {p for p, m in pool.log} == {w.proc for w in pool.pool.workers}
    assert all(m[3] == peer.current.keys.send_key and m[4] == peer.current.keys.remote_index
               and m[6] == peer.endpoint and m[7] == PORT and m[1] == GN_VIP for m in txs)
    inst.sync(dev, 1.0)
    assert len(pool.txs()) == 3          # nothing changed: nothing sent
    assert_never_twice(pool)


def test_a_restarted_worker_gets_fresh_stream_ids_and_the_others_keep_theirs():
    pool, dev, [peer], inst = setup(3)
    inst.sync(dev, 0.0)
    old = pool.pool.workers[1]
    pool.crash(1)
    assert pool.pool.supervise(pool.now)
    new = pool.pool.workers[1]
    assert new.generation != old.generation and new.proc is not old.proc
    assert pool.health.report(pool.now)[0]["code"] == "worker-restarted"
    inst.sync(dev, 1.0)
    txs = pool.txs()
    assert len(txs) == 4 and txs[-1][5] == 4          # not 2, its predecessor's
    assert pool.held()[new.proc][next(iter(dev.peers_by_vip))][1] == 4
    for _ in range(5):                                 # and again, and again
        pool.crash(1)
        pool.pool.supervise(pool.now)
        inst.sync(dev, 2.0)
    assert pool.pool.restarts == 6
    assert_never_twice(pool)


def test_forking_the_pool_again_gives_every_worker_fresh_ids():
    pool, dev, _, inst = setup(2)
    inst.sync(dev, 0.0)
    old = [w.conn for w in pool.pool.workers]
    pool.pool.restart_all()                   # a general node was added
    assert all(c.closed for c in old)
    inst.sync(dev, 1.0)
    assert [m[5] for m in pool.txs()] == [1, 2, 3, 4]
    assert_never_twice(pool)


def test_a_new_endpoint_or_a_new_key_reinstalls_with_fresh_ids_and_retires_the_old_key():
    pool, dev, [peer], inst = setup(2)
    inst.sync(dev, 0.0)
    peer.endpoint = ("203.0.113.9", 40000)    # roaming: a "tx" restarts the counter, so fresh ids
    inst.sync(dev, 1.0)
    assert [m[5] for m in pool.txs()] == [1, 2, 3, 4] and pool.txs()[-1][6] == peer.endpoint
    old_kid = key_id(peer.current.keys.send_key)
    peer.current = Keypair()                  # rekeyed: the old key never seals again
    inst.sync(dev, 2.0)
    assert [m[5] for m in pool.txs()][-2:] == [1, 2] and old_kid not in inst.stream_ids
    assert len(inst.stream_ids) == 1
    assert_never_twice(pool)


def test_a_session_that_cannot_send_leaves_the_workers_and_a_removed_peer_its_key():
    pool, dev, [peer, other], inst = setup(2, npeers=2)
    inst.sync(dev, 0.0)
    peer.current.ok = False                   # expired
    inst.sync(dev, 1.0)
    untx = [(p, m) for p, m in pool.log if m[0] == "untx"]
    assert len(untx) == 2 and all(m[2] == bytes([100, 64, 1, 0]) for _, m in untx)
    del dev.peers_by_vip[bytes([100, 64, 1, 1])]
    inst.sync(dev, 2.0)
    assert len(inst.stream_ids) == 1          # only the expired-but-current key is still tracked
    assert all(not held for held in pool.held().values())
    inst.close()
    assert len(inst.stream_ids) == 0


def test_a_key_out_of_stream_ids_is_rekeyed_through_the_device_and_nothing_is_installed():
    pool, dev, [peer], inst = setup(4)
    restarts_until_out = STREAM_IDS_PER_KEY // 4
    inst.sync(dev, 0.0)
    for _ in range(restarts_until_out - 1):
        pool.pool.restart_all()
        inst.sync(dev, 1.0)
    assert dev.rekeys == [] and len(pool.txs()) == restarts_until_out * 4
    pool.pool.restart_all()
    inst.sync(dev, 2.0)                       # 63 ids: 60 handed out, 4 wanted
    assert dev.rekeys == [peer.fqdn] and len(pool.txs()) == restarts_until_out * 4
    assert inst.drops["stream_ids_rekey"] == 1
    peer.current = Keypair()                  # the new handshake completed
    inst.sync(dev, 3.0)
    assert [m[5] for m in pool.txs()[-4:]] == [1, 2, 3, 4]
    assert_never_twice(pool)


def test_a_worker_restart_in_the_same_round_as_much_key_churn_forgets_no_live_key():
    """The reading in issue 11: with many keys tracked, a prune in the same round as a worker
    restart forgot the stream ids of a live key. Liveness now comes from the device."""
    pool, dev, peers, inst = setup(2, npeers=40)
    inst.stream_ids = StreamIds(max_keys=40)  # as full as it can be
    inst.sync(dev, 0.0)
    for round_ in range(30):
        for p in peers[: 20]:
            p.current = Keypair()             # churn: half the keys rotate every round
        pool.crash(round_ % 2)
        pool.pool.supervise(pool.now)
        inst.sync(dev, float(round_))
        assert len(inst.stream_ids) == 40
    assert_never_twice(pool)
    held = pool.held()
    for w in pool.pool.workers:               # every worker holds every peer's current key
        assert {vip: k for vip, (k, _) in held[w.proc].items()} == \
            {vip: p.current.keys.send_key for vip, p in dev.peers_by_vip.items()}


# --- property: random interleavings ------------------------------------------------------------------

steps = st.lists(st.one_of(
    st.tuples(st.just("sync"), st.integers(0, 3)),
    st.tuples(st.just("crash"), st.integers(0, 3)),        # a worker dies (supervised at the next sync)
    st.tuples(st.just("refork"), st.integers(0, 3)),       # a general node was added
    st.tuples(st.just("rekey"), st.integers(0, 3)),        # a peer's key is replaced
    st.tuples(st.just("expire"), st.integers(0, 3)),       # a peer's key can no longer send
    st.tuples(st.just("roam"), st.integers(0, 3)),         # a peer's endpoint moves
    st.tuples(st.just("lose_endpoint"), st.integers(0, 3)),
    st.tuples(st.just("remove"), st.integers(0, 3)),       # a peer is gone
    st.tuples(st.just("add"), st.integers(0, 3)),          # ... or (back) with a new key
), max_size=80)


@settings(max_examples=200, deadline=None)
@given(steps, st.integers(1, 4))
def test_no_send_key_and_stream_id_pair_is_ever_installed_twice(script, nworkers):
    pool = Pool(nworkers)
    dev = Device()
    for n in range(4):
        dev.add(n)
    inst = SessionInstaller(GN_VIP, PORT, pool.pool, stream_ids=StreamIds(max_keys=4))
    t = 0.0
    for op, n in script:
        vip = bytes([100, 64, 1, n])
        peer = dev.peers_by_vip.get(vip)
        if op == "crash":
            pool.crash(n % nworkers)
        elif op == "refork":
            pool.pool.restart_all()
        elif op == "add" and peer is None:
            dev.add(n)
        elif peer is not None:
            if op == "rekey":
                peer.current = Keypair()
            elif op == "expire":
                peer.current.ok = False
            elif op == "roam":
                peer.endpoint = ("198.51.100.%d" % (t % 250 + 1), 40000 + n)
            elif op == "lose_endpoint":
                peer.endpoint = None
            elif op == "remove":
                del dev.peers_by_vip[vip]
        if op == "sync":
            t += 1.0
            pool.pool.supervise(t)
            dev.rekeys.clear()
            inst.sync(dev, t)
            held = pool.held()
            for w in pool.pool.workers:
                want = {v: p.current.keys.send_key for v, p in dev.peers_by_vip.items()
                        if p.sendable(t) is not None and p.endpoint is not None and p.fqdn not in dev.rekeys}
                got = {v: k for v, (k, _) in held[w.proc].items() if v not in
                       {vv for vv, pp in dev.peers_by_vip.items() if pp.fqdn in dev.rekeys}}
                assert got == want
            for fqdn in dev.rekeys:           # the device's new handshake completes
                p = next(p for p in dev.peers_by_vip.values() if p.fqdn == fqdn)
                p.current = Keypair()
        assert len(inst.stream_ids) <= len(dev.peers_by_vip) + 4
    assert_never_twice(pool)


# --- with the real device: the receiver accepts every stream the workers were given ---------------

def test_with_a_real_device_every_worker_stream_is_accepted_and_running_out_rekeys():
    w = World()
    gn = w.device("cam1", "100.64.0.1")
    srv = w.device("srv", "100.64.0.2")
    gn.add_peer(srv.identity.certificate, w.now, endpoint=w.addr["srv"])
    gn.send_packet(ping(gn, srv, 1), w.now)
    w.pump()
    w.events("srv")
    pool = Pool(3)
    inst = SessionInstaller(gn.cert.vip4.packed, PORT, pool.pool)
    inst.sync(gn, w.now)
    for _ in range(25):                       # workers die and come back; more ids each time
        pool.crash(0)
        pool.pool.supervise(w.now)
        inst.sync(gn, w.now)
    assert_never_twice(pool)
    txs = pool.txs()
    assert len(txs) == 3 + 25 and gn.counters["initiations_sent"] == 1
    # every stream a worker was given seals a packet the peer accepts (its windows: 64, stream 0 included)
    for seq, m in enumerate(txs):
        _, _, _, key, remote_index, stream_id, endpoint, _ = m
        srv.receive_datagram(SendStream(key, remote_index, stream_id).seal(ping(gn, srv, 100 + seq)),
                             w.addr["cam1"], w.now)
    got = [e for e in w.events("srv") if type(e).__name__ == "PacketReceived"]
    assert len(got) == len(txs) and not srv.drops
    # out of ids: the device starts a handshake (Device.rekey), and the new key starts at 1 again
    w.now += 1.0
    for _ in range(40):
        pool.crash(0)
        pool.pool.supervise(w.now)
        inst.sync(gn, w.now)
    assert gn.counters["initiations_sent"] == 2 and inst.rekeys >= 1
    w.pump()
    inst.sync(gn, w.now)
    assert [m[5] for m in pool.txs()[-3:]] == [1, 2, 3]
    assert pool.txs()[-1][3] == gn.peer(srv.cert.fqdn).current.keys.send_key
    assert_never_twice(pool)
