"""The adapter's worker pool (appliance.worker_pool) with stand-in processes and pipes:
generations, supervision, health, messages, counters."""

from __future__ import annotations

from test_adapter_sessions import FakeConn, Pool


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
