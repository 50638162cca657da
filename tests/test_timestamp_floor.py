"""The floor under handshake timestamps across restarts (cyphonic.timestamp_floor): a node whose
clock went back (a Pi without a real-time clock, before NTP) is still taken by the peers and the
cloud that remember its last run; the reservation on disk, and the edge that keeps it."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cyphonic import events as ev
from cyphonic import timestamp_floor as tsf
from cyphonic.certs import TrustStore
from cyphonic.device import Device
from cyphonic.node.engine_host import TIMESTAMP_FLOOR_FILE, EngineHost, TimestampFloorFile

from corefixtures import T0, World, ping

NS = 1_000_000_000
HOUR = 3600.0


def test_the_first_run_reserves_ahead_of_the_clock_and_has_no_floor():
    r = tsf.TimestampReservation(None, T0)
    assert r.floor_ns == 0
    assert tsf.parse(r.start_value()) == int(T0 * NS) + int(tsf.RESERVE_S * NS)


def test_a_restart_with_the_clock_behind_starts_above_everything_the_last_run_could_send():
    run1 = tsf.TimestampReservation(None, T0)
    stored = tsf.parse(run1.start_value())
    for t in (T0, T0 + tsf.RESERVE_S * 0.49):     # timestamps of the last run: all below the reservation
        assert run1.due(t) is None and int(t * NS) < stored
    run2 = tsf.TimestampReservation(stored, T0 - HOUR)     # the clock went back an hour
    assert run2.floor_ns == stored
    assert tsf.parse(run2.start_value()) == stored + int(tsf.RESERVE_S * NS)   # moved up by RESERVE_S, no more


def test_the_reservation_is_renewed_when_the_clock_comes_within_half_of_it():
    r = tsf.TimestampReservation(None, T0)
    assert r.due(T0 + tsf.RESERVE_S / 2 - 1) is None
    data = r.due(T0 + tsf.RESERVE_S / 2 + 1)
    assert tsf.parse(data) == int((T0 + tsf.RESERVE_S / 2 + 1) * NS) + int(tsf.RESERVE_S * NS)
    assert r.due(T0 + tsf.RESERVE_S / 2 + 2) is None          # one write, not one per tick


@pytest.mark.parametrize("raw", [b"", b"\n", b"x", b"-5", b"1.5", b"99999999999999999999", b"\xff\xfe", b"1 2"])
def test_anything_but_one_number_in_range_is_no_reservation(raw):
    assert tsf.parse(raw) is None


def _restarted(w: World, old: Device, name: str, floor_ns: int) -> Device:
    """The same identity in a new Device (the process restarted), at the same address."""
    d = Device(old.identity, TrustStore.of(w.ca.public), rng=random.Random(99), timestamp_floor_ns=floor_ns)
    w.devices[name] = d
    return d


@pytest.mark.parametrize("with_floor", [True, False], ids=["floor", "no_floor"])
def test_a_peer_takes_the_handshake_of_a_node_restarted_with_its_clock_an_hour_behind(with_floor):
    w = World()                                        # (certificates valid from T0 - 60 s)
    a = w.device("alice", "100.64.0.1")
    b = w.device("bob", "100.64.0.2")
    w.now = T0 + HOUR                                  # the last run: the clock right
    run1 = tsf.TimestampReservation(None, w.now)
    a.add_peer(b.identity.certificate, w.now, endpoint=w.addr["bob"])
    a.send_packet(ping(a, b, 1), w.now)
    w.pump()
    assert [e for e in w.events("bob") if isinstance(e, ev.PacketReceived)]
    stored = tsf.parse(run1.start_value())
    w.now += 10                                        # (bob's clock: past the initiation rate limit)
    behind = T0 + 60                                   # alice's clock after the restart: an hour behind
    run2 = tsf.TimestampReservation(stored if with_floor else None, behind)
    a2 = _restarted(w, a, "alice", run2.floor_ns)
    a2.add_peer(b.identity.certificate, behind, endpoint=w.addr["bob"])
    a2.send_packet(ping(a2, b, 2), behind)
    w.pump()
    got = [e.packet for e in w.events("bob") if isinstance(e, ev.PacketReceived)]
    if with_floor:
        assert got == [ping(a2, b, 2)] and not b.drops.get("replay_initiation")
    else:   # what happened before the floor: refused as a replay until the clock catches up
        assert got == [] and b.drops["replay_initiation"] >= 1


class _Engine:
    """What EngineHost asks of its engine at start, recorded."""

    def __init__(self) -> None:
        self.floor = None
        self.started = False

    def set_timestamp_floor(self, ns: int) -> None:
        assert not self.started, "the floor must be set before the engine starts"
        self.floor = ns

    def restore(self, records, now):
        return 0

    def start(self, now: float) -> None:
        self.started = True

    def next_event(self):
        return None

    def datagrams_to_send(self):
        return []

    def get_timer(self):
        return None


class _Health:
    def record(self, *a, **k):
        pass


def _host(tmp_path, clock, timestamps=None):
    lines = []
    h = EngineHost(_Engine(), {}, deliver=lambda p: None, on_event=lambda e: None, log=lines.append,
                   health=_Health(), records_path=str(tmp_path / "peers.json"), clock=clock,
                   timestamps=timestamps)
    return h, lines


def test_the_edge_writes_the_reservation_before_the_engine_starts_and_renews_it(tmp_path):
    now = [T0]
    h, _ = _host(tmp_path, lambda: now[0])
    h.start()
    path = tmp_path / TIMESTAMP_FLOOR_FILE
    assert h.engine.started and h.engine.floor == 0
    first = tsf.parse(path.read_bytes())
    assert first == int(T0 * NS) + int(tsf.RESERVE_S * NS)
    now[0] = T0 + tsf.RESERVE_S                      # the tick renews it
    h.poke()
    assert tsf.parse(path.read_bytes()) > first
    # a restart with the clock an hour behind: the floor is what was on disk
    stored = tsf.parse(path.read_bytes())
    now[0] = T0 - HOUR
    h2, _ = _host(tmp_path, lambda: now[0])
    h2.start()
    assert h2.engine.floor == stored and tsf.parse(path.read_bytes()) == stored + int(tsf.RESERVE_S * NS)


def test_an_unreadable_reservation_is_logged_and_replaced_and_an_unwritable_one_is_counted(tmp_path):
    (tmp_path / TIMESTAMP_FLOOR_FILE).write_bytes(b"garbage")
    h, lines = _host(tmp_path, lambda: T0)
    h.start()
    assert h.engine.floor == 0 and any("unreadable" in l for l in lines)
    assert tsf.parse((tmp_path / TIMESTAMP_FLOOR_FILE).read_bytes()) is not None
    ro = tmp_path / "ro"
    ro.mkdir()
    h2, lines2 = _host(ro / "missing-dir", lambda: T0)   # its directory does not exist: cannot write
    h2.start()
    assert h2.engine.started and h2.drops["timestamps_unwritable"] == 1
    assert any("cannot write the timestamp reservation" in l for l in lines2)


def test_the_engines_of_one_process_share_one_reservation_written_once(tmp_path, monkeypatch):
    """The adapter runs an engine per general node: one file, one write at start and one per
    renewal for all of them (an SD card's fsync is slow), every engine above the same floor."""
    from cyphonic.node import engine_host
    writes = []
    real = engine_host.write_atomic
    monkeypatch.setattr(engine_host, "write_atomic", lambda path, data: (writes.append(path), real(path, data)))
    now = [T0]
    shared_path = tmp_path / "adapter" / TIMESTAMP_FLOOR_FILE
    shared_path.parent.mkdir()
    shared_path.write_bytes(tsf.encode(int((T0 + HOUR) * NS)))      # the last run's, an hour ahead
    drops, lines = Counter(), []
    shared = TimestampFloorFile(str(shared_path), clock=lambda: now[0], log=lines.append, drops=drops)
    hosts = []
    for i in range(5):
        d = tmp_path / f"gn{i}"
        d.mkdir()
        h, _ = _host(d, lambda: now[0], timestamps=shared)
        h.start()
        hosts.append(h)
    assert [h.engine.floor for h in hosts] == [int((T0 + HOUR) * NS)] * 5
    assert writes == [str(shared_path)]                    # once, for all five
    assert not any((tmp_path / f"gn{i}" / TIMESTAMP_FLOOR_FILE).exists() for i in range(5))
    now[0] = T0 + HOUR + tsf.RESERVE_S                     # the tick renews it once
    for h in hosts:
        h.poke()
    assert writes == [str(shared_path)] * 2
    assert tsf.parse(shared_path.read_bytes()) == int(now[0] * NS) + int(tsf.RESERVE_S * NS)
    # a file that cannot be written is counted once, in the owner's drops, not per engine
    gone = TimestampFloorFile(str(tmp_path / "missing" / "f"), clock=lambda: now[0], log=lines.append, drops=drops)
    for i in range(3):
        h, _ = _host(tmp_path / f"gn{i}", lambda: now[0], timestamps=gone)
        h.start()
        assert h.engine.started and not h.drops
    assert drops["timestamps_unwritable"] == 1


@pytest.mark.parametrize("with_floor", [True, False], ids=["floor", "no_floor"])
def test_the_cloud_takes_the_control_handshake_of_a_node_restarted_with_its_clock_behind(with_floor):
    from cyphonic import control as ctl
    from cyphonic.wire import signaling as sig
    from test_control import CLOUD, Net

    net = Net()
    net.now = T0 + HOUR
    net.client.request(sig.Keepalive(), net.now)
    net.pump()
    assert [e for e in net.events(net.server) if isinstance(e, ctl.Incoming)]
    stored = tsf.parse(tsf.TimestampReservation(None, net.now).start_value())
    net.now += 10
    behind = T0 + 60
    floor = tsf.TimestampReservation(stored if with_floor else None, behind).floor_ns
    net.client = ctl.ControlClient(net.node_id, net.cloud_id.public, CLOUD, rng=random.Random(5),
                                   timestamp_floor_ns=floor)
    net.client.request(sig.Keepalive(), behind)
    net.pump()
    got = [e for e in net.events(net.server) if isinstance(e, ctl.Incoming)]
    if with_floor:
        assert len(got) == 1 and not net.server.drops.get("replay_initiation")
    else:
        assert got == [] and net.server.drops["replay_initiation"] >= 1


def test_the_engine_hands_its_floor_to_the_cloud_channel_and_to_the_device():
    from cyphonic.handshake import StaticIdentity
    from cyphonic.node.engine import NodeEngine

    w = World()
    floor = int((T0 + HOUR) * NS)
    e = NodeEngine(StaticIdentity.generate(), w.ca.public, StaticIdentity.generate().public, ("198.51.100.1", 47101),
                   rng=random.Random(1))
    e.set_timestamp_floor(floor)
    e.start(T0)
    channel = next(iter(e.signaling.channels.values()))
    assert channel._last_timestamp_ns > floor           # its first initiation, at T0, went out above the floor
    e.signaling.identity = w.identity("n", "100.64.0.9")
    assert e.restore([], T0) == 0 and e.device._last_timestamp_ns == floor



def test_the_adapters_earlier_files_one_per_engine_are_folded_in_once(tmp_path):
    """140ca15 to f6e22d4 kept one reservation per general node: the shared one starts above the
    highest of them all and they are removed once it is written."""
    state = tmp_path / "state"
    own = state / "gn" / "020000000000" / TIMESTAMP_FLOOR_FILE
    for name, ns in (("020000000000", T0), ("525400000001", T0 + HOUR), ("525400000002", T0 + 10)):
        (state / "gn" / name).mkdir(parents=True)
        (state / "gn" / name / TIMESTAMP_FLOOR_FILE).write_bytes(tsf.encode(int(ns * NS)))
    (state / "gn" / "525400000003").mkdir()
    (state / "gn" / "525400000003" / TIMESTAMP_FLOOR_FILE).write_bytes(b"garbage")
    lines = []
    f = TimestampFloorFile(str(own), clock=lambda: T0 - HOUR, log=lines.append, drops=Counter(),
                           merge_glob=str(state / "gn" / "*" / TIMESTAMP_FLOOR_FILE))
    assert f.start() == int((T0 + HOUR) * NS)
    assert sorted(p.parent.name for p in state.glob("gn/*/" + TIMESTAMP_FLOOR_FILE)) == ["020000000000"]
    assert tsf.parse(own.read_bytes()) == int((T0 + HOUR + tsf.RESERVE_S) * NS)
    assert any("unreadable" in l for l in lines)
