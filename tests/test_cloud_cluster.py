"""Several cloud instances on one store, in memory (issue 13): cyphonic.cloud.cluster and the NMS.

Three CloudCores share one MemoryStore and the same keys, each with its own
address and Cluster; two relays are TRS-only Clusters. Nodes attach to the
instance they are given. The bus is read after every exchange, as a NOTIFY
would make the edge do. The same runs over real sockets and PostgreSQL in
tests/test_cloud_instances_lab.py.
"""

from __future__ import annotations

import random

import pytest

from cyphonic import signaling as sg
from cyphonic.cloud import authentication
from cyphonic.cloud.cluster import Cluster, route_owner
from cyphonic.cloud.core import CloudCore
from cyphonic.cloud.store import MemoryStore
from cyphonic.cloud.store_runtime import INSTANCE_DEAD_S
from cyphonic.errors import ParseError
from cyphonic.handshake import StaticIdentity
from cyphonic.wire import bus as wire_bus
from cyphonic.wire import signaling as sig

from cloudfixtures import DOMAIN, T0, make_keys

RT = sig.RouteType
E = sig.ErrorCode
ADDR = {"i1": ("198.51.100.1", 47101), "i2": ("198.51.100.2", 47101), "i3": ("198.51.100.3", 47101)}
RELAYS = {"r1": ("198.51.100.11:47102", "[2001:db8::11]:47102"),
          "r2": ("198.51.100.12:47102", "[2001:db8::12]:47102")}


class ClusterNet:
    def __init__(self, relays=("r1", "r2")):
        self.now = T0
        self.store = MemoryStore()
        self.keys = make_keys()
        self.cores: dict[str, CloudCore] = {}
        self.relays: dict[str, Cluster] = {}
        self.dead: set[str] = set()
        for name in relays:
            c = Cluster(self.store, name, services=("trs",), relay=RELAYS[name])
            c.start(self.now)
            self.relays[name] = c
        for name in ADDR:
            cl = Cluster(self.store, name, services=("as", "nms"), signaling=(f"{ADDR[name][0]}:47101",),
                         notified=True)
            cl.start(self.now)
            self.cores[name] = CloudCore(store=self.store, keys=self.keys, domain=DOMAIN,
                                         prefix="100.64.0.0/24", rng=random.Random(len(self.cores)),
                                         cluster=cl)
        self.nodes: dict[str, sg.SignalingClient] = {}
        self.addrs: dict[str, tuple] = {}
        self.home: dict[str, str] = {}

    def node(self, name, addr, instance, *, local=None):
        tok = authentication.create_token(self.store, name, self.now).encode()
        local = local if local is not None else (sig.Endpoint(addr[0], addr[1]),)
        c = sg.SignalingClient(StaticIdentity.generate(), self.keys.signaling.public, ADDR[instance],
                               token=tok, name_hint=name, local_endpoints=tuple(local),
                               rng=random.Random(len(self.nodes)))
        self.nodes[name], self.addrs[name], self.home[name] = c, addr, instance
        c.start(self.now)
        self.pump()
        assert c.state == sg.State.READY, c.status()
        return c

    def pump(self):
        for _ in range(100):
            moved = False
            for name, c in self.nodes.items():
                for data, dst in c.datagrams_to_send():
                    moved = True
                    inst = next((i for i, a in ADDR.items() if a == dst), None)
                    if inst is not None and inst not in self.dead:
                        self.cores[inst].receive_datagram(data, self.addrs[name], self.now)
            for inst, core in self.cores.items():
                if inst in self.dead:
                    core.datagrams_to_send()
                    continue
                core.read_bus(self.now)
                for data, dst in core.datagrams_to_send():
                    moved = True
                    for name, addr in self.addrs.items():
                        if addr == dst:
                            self.nodes[name].receive_datagram(data, ADDR[inst], self.now)
            if not moved:
                return

    def advance(self, seconds, step=0.25):
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for c in self.nodes.values():
                if (t := c.get_timer()) is not None and t <= self.now:
                    c.handle_timer(self.now)
            for inst, core in self.cores.items():
                if inst not in self.dead and (t := core.get_timer()) is not None and t <= self.now:
                    core.handle_timer(self.now)
            for name, r in self.relays.items():
                if name not in self.dead and (t := r.get_timer()) is not None and t <= self.now:
                    r.handle_timer(self.now)
            self.pump()

    def events(self, name):
        out = []
        while (e := self.nodes[name].next_event()) is not None:
            out.append(e)
        return out

    def route(self, a, b):
        """A asks for B; B accepts what it is pushed; A's events are returned."""
        self.events(a)
        self.nodes[a].request_route(f"{b}.{DOMAIN}", self.now)
        self.pump()
        pushed = self.answer(b)
        return pushed, self.events(a)

    def answer(self, name, accept=True):
        for e in self.events(name):
            if isinstance(e, sg.DirectionPushed):
                self.nodes[name].answer_direction(e, accept, self.now, code=E.POLICY_DENIED)
                self.pump()
                return e.direction
        return None


def ready_route(evs):
    got = [e for e in evs if isinstance(e, sg.RouteReady)]
    assert got, evs
    return got[0].direction


def public(ip, port):
    return (ip, port), [sig.Endpoint(ip, port)]


CASES = {
    "direct": (public("192.0.2.1", 1000), public("192.0.2.2", 2000), RT.DIRECT),
    "reversed": (public("192.0.2.1", 1000), (("203.0.113.9", 40000), [sig.Endpoint("10.1.0.2", 2000)]),
                 RT.REVERSED),
    "hole_punch": ((("203.0.113.1", 30000), [sig.Endpoint("10.0.0.2", 1000)]),
                   (("203.0.113.9", 40000), [sig.Endpoint("10.1.0.2", 2000)]), RT.HOLE_PUNCH),
    "local": ((("203.0.113.1", 30000), [sig.Endpoint("10.0.0.2", 1000)]),
              (("203.0.113.1", 30001), [sig.Endpoint("10.0.0.3", 2000)]), RT.LOCAL),
    "relay": (public("192.0.2.1", 1000), public("2001:db8::2", 2000), RT.RELAY),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_route_type_between_nodes_at_different_instances(case):
    (a_addr, a_local), (b_addr, b_local), want = CASES[case]
    net = ClusterNet()
    net.node("a", a_addr, "i1", local=a_local)
    net.node("b", b_addr, "i2", local=b_local)
    pushed, evs = net.route("a", "b")
    rr = ready_route(evs)
    assert rr.route_type == want and pushed is not None and pushed.route_type == want
    assert rr.route_id == pushed.route_id
    assert route_owner(rr.route_id) == net.cores["i1"].cluster.tag      # the instance A asked owns it
    # B was told through its own instance, before A had its answer
    assert net.cores["i2"].nms.counters["carried_for_instance"] == 1
    assert net.cores["i1"].nms.counters["pushed_to_instance"] == 1
    if want == RT.RELAY:
        relay_hosts = {rr.relay_endpoint.host, pushed.relay_endpoint.host}
        assert relay_hosts <= {"198.51.100.11", "2001:db8::11", "198.51.100.12", "2001:db8::12"}
        assert rr.relay_session_id == pushed.relay_session_id


def test_a_route_to_a_node_at_a_dead_instance_fails_at_once_and_works_after_it_moves():
    net = ClusterNet()
    net.node("a", ("192.0.2.1", 1000), "i1")
    net.node("b", ("192.0.2.2", 2000), "i2")
    net.dead.add("i2")
    net.advance(INSTANCE_DEAD_S + 1.0)
    net.events("a")
    net.nodes["a"].request_route(f"b.{DOMAIN}", net.now)
    net.pump()
    failed = [e for e in net.events("a") if isinstance(e, sg.RouteFailed)]
    assert failed and failed[0].code == E.PEER_UNREACHABLE, failed
    # b registers at i3 (what its failover does): the route works again
    c = net.nodes["b"]
    net.nodes["b"] = sg.SignalingClient(c.identity, net.keys.signaling.public, ADDR["i3"],
                                        local_endpoints=c.local_endpoints, rng=random.Random(9))
    net.nodes["b"].start(net.now)
    net.pump()
    assert net.nodes["b"].state == sg.State.READY
    pushed, evs = net.route("a", "b")
    assert ready_route(evs).route_type == RT.DIRECT and pushed is not None


def test_a_push_to_an_instance_that_dies_is_answered_within_seconds():
    net = ClusterNet()
    net.node("a", ("192.0.2.1", 1000), "i1")
    net.node("b", ("192.0.2.2", 2000), "i2")
    net.events("a")
    net.dead.add("i2")             # dies after the lookup: the PUSH waits in the bus for nobody
    net.nodes["a"].request_route(f"b.{DOMAIN}", net.now)
    net.pump()
    start = net.now
    failed = []
    while not failed and net.now - start < 10:
        net.advance(0.5)
        failed = [e for e in net.events("a") if isinstance(e, sg.RouteFailed)]
    assert failed and failed[0].code == E.PEER_UNREACHABLE
    assert net.now - start <= INSTANCE_DEAD_S + 1.5


def test_confirmation_and_relay_request_reach_the_owner_through_the_other_instance():
    (a_addr, a_local), (b_addr, b_local), _ = CASES["hole_punch"]
    net = ClusterNet()
    net.node("a", a_addr, "i1", local=a_local)
    net.node("b", b_addr, "i2", local=b_local)
    pushed, evs = net.route("a", "b")
    # B (at i2) reports the punch failed: i2 forwards to i1, which pushes the relay to both
    net.nodes["b"].confirm_route(pushed.route_id, False, RT.HOLE_PUNCH, None, net.now)
    net.pump()
    assert net.cores["i2"].nms.counters["forwarded_to_owner"] == 1
    da, db = net.answer("a"), net.answer("b")
    assert da.route_type == RT.RELAY and db.route_type == RT.RELAY
    assert da.relay_session_id == db.relay_session_id
    # B asks for a relay grant (token renewal) at i2: answered by the owner
    net.nodes["b"].request_relay(pushed.route_id, f"a.{DOMAIN}", net.now)
    net.pump()
    grants = [e for e in net.events("b") if isinstance(e, sg.RelayGranted)]
    assert grants and grants[0].grant.relay_session_id == da.relay_session_id


def test_relayed_routes_move_off_a_dead_relay_within_five_seconds():
    net = ClusterNet()
    net.node("a", ("192.0.2.1", 1000), "i1")
    net.node("b", ("2001:db8::2", 2000), "i2")
    pushed, evs = net.route("a", "b")
    rr = ready_route(evs)
    used = "r1" if rr.relay_endpoint.host in ("198.51.100.11", "2001:db8::11") else "r2"
    net.dead.add(used)
    start = net.now
    moved_a = moved_b = None
    while (moved_a is None or moved_b is None) and net.now - start < 10:
        net.advance(0.25)
        moved_a = moved_a or net.answer("a")
        moved_b = moved_b or net.answer("b")
    assert moved_a is not None and moved_b is not None
    assert net.now - start <= 5.0
    other = {"r1": "r2", "r2": "r1"}[used]
    assert moved_a.relay_endpoint.host in RELAYS[other][0] and moved_b.relay_endpoint.host in RELAYS[other][1]
    assert moved_a.relay_session_id == moved_b.relay_session_id != rr.relay_session_id
    assert net.cores["i1"].nms.counters["relay_moves"] == 1


def test_relays_are_spread_over_the_live_ones():
    net = ClusterNet()
    net.node("a", ("192.0.2.1", 1000), "i1")
    hosts = set()
    for i in range(12):
        name = f"v6n{i}"
        net.node(name, (f"2001:db8::{i + 100:x}", 2000), "i2")
        _, evs = net.route("a", name)
        hosts.add(ready_route(evs).relay_endpoint.host)
    assert hosts == {"198.51.100.11", "198.51.100.12"}


def test_registrations_are_shared_and_removed_when_they_end():
    net = ClusterNet()
    b = net.node("b", ("192.0.2.2", 2000), "i2")
    rec = net.store.get_registration(b.identity.public)
    assert rec is not None and rec.instance_id == "i2" and rec.observed == "192.0.2.2:2000"
    assert net.store.count_registrations() == {"i2": 1}
    b.stop(net.now)
    net.pump()
    assert net.store.get_registration(b.identity.public) is None


def test_a_restarted_instance_forgets_what_its_previous_run_left_behind():
    net = ClusterNet()
    net.node("b", ("192.0.2.2", 2000), "i2")
    tag = net.cores["i2"].cluster.tag
    again = Cluster(net.store, "i2", services=("as", "nms"))
    again.start(net.now)
    assert again.tag == tag                      # the same id keeps its tag
    assert net.store.count_registrations() == {}


def test_the_bus_refuses_garbage_with_parse_errors_only():
    m = wire_bus.BusMessage(wire_bus.Kind.PUSH, 3, 7, b"k" * 32, sig.Keepalive(request_id=5))
    assert wire_bus.decode(m.encode()) == m
    assert wire_bus.decode(wire_bus.BusMessage(wire_bus.Kind.PUSH_RESULT, 3, 7, b"k" * 32, None).encode()).msg is None
    data = m.encode()
    rng = random.Random(1)
    for n in range(len(data) + 1):
        for cut in (data[:n], bytes(rng.getrandbits(8) for _ in range(n))):
            try:
                wire_bus.decode(cut)
            except ParseError:
                pass
    with pytest.raises(ParseError):
        wire_bus.decode(b"\x01" * 5000)
    with pytest.raises(ValueError):
        wire_bus.BusMessage(wire_bus.Kind.PUSH, 3, 7, b"k" * 32, None).encode()


def test_garbage_on_the_bus_is_a_counted_drop():
    net = ClusterNet()
    net.store.bus_send("i1", b"\x01\x09" + b"\x00" * 60, net.now)
    net.store.bus_send("i1", b"junk", net.now)
    net.pump()
    drops = net.cores["i1"].cluster.drops
    assert sum(drops.values()) == 2 and drops["bus_short"] == 1, drops


def test_instances_see_each_other_live_and_dead():
    net = ClusterNet()
    cl = net.cores["i1"].cluster
    net.advance(1.5)                              # one heartbeat: the table is read again
    assert {"i1", "i2", "i3", "r1", "r2"} == set(cl.status(net.now)["alive"])
    net.dead.add("i3")
    net.advance(INSTANCE_DEAD_S + 1.5)
    st = cl.status(net.now)
    assert "i3" in st["dead"] and "i3" not in st["alive"]
    net.cores["i2"].cluster.stop()
    cl._refresh(net.now)
    assert not cl.alive("i2", net.now)            # a clean stop is seen at once (heartbeat 0)


def test_a_node_that_moves_while_its_old_instance_lives_is_forgotten_there():
    net = ClusterNet()
    net.node("a", ("192.0.2.1", 1000), "i1")
    b = net.node("b", ("192.0.2.2", 2000), "i2")
    # b moves to i3 (as its failover does when i2 is unreachable for it, though i2 lives on)
    net.nodes["b"] = sg.SignalingClient(b.identity, net.keys.signaling.public, ADDR["i3"],
                                        local_endpoints=b.local_endpoints, rng=random.Random(9))
    net.nodes["b"].start(net.now)
    net.pump()
    assert net.nodes["b"].state == sg.State.READY
    assert b.identity.public not in net.cores["i2"].nms.registrations
    assert net.cores["i2"].nms.counters["registrations_moved_away"] == 1
    a = net.nodes["a"]                             # a moves to i2, where b's stale entry was
    net.nodes["a"] = sg.SignalingClient(a.identity, net.keys.signaling.public, ADDR["i2"],
                                        local_endpoints=a.local_endpoints, rng=random.Random(8))
    net.nodes["a"].start(net.now)
    net.pump()
    pushed, evs = net.route("a", "b")              # i2 finds b at i3 now, not in its stale table
    assert ready_route(evs).route_type == RT.DIRECT and pushed is not None


def test_a_lone_instance_keeps_registrations_to_itself_and_shares_them_when_another_appears():
    store, keys, now = MemoryStore(), make_keys(), T0
    lone = Cluster(store, "i1", services=("as", "nms"))
    lone.start(now)
    core = CloudCore(store=store, keys=keys, domain=DOMAIN, prefix="100.64.0.0/24", rng=random.Random(1),
                     cluster=lone)
    net = ClusterNet.__new__(ClusterNet)
    net.now, net.store, net.keys, net.cores, net.relays, net.dead = now, store, keys, {"i1": core}, {}, set()
    net.nodes, net.addrs, net.home = {}, {}, {}
    b = net.node("b", ("192.0.2.2", 2000), "i1")
    assert store.count_registrations() == {}                 # alone: no write per registration
    second = Cluster(store, "i2", services=("as", "nms"), notified=True)
    second.start(net.now)
    net.cores["i2"] = CloudCore(store=store, keys=keys, domain=DOMAIN, prefix="100.64.0.0/24",
                                rng=random.Random(2), cluster=second)
    net.pump()                                                # i2's HELLO: i1 shares at once
    assert store.get_registration(b.identity.public).instance_id == "i1"
    net.node("a", ("192.0.2.1", 1000), "i2")
    pushed, evs = net.route("a", "b")
    assert ready_route(evs).route_type == RT.DIRECT and pushed is not None


def test_the_timed_cache_reuses_for_its_ttl_keeps_no_misses_and_covers_a_store_outage():
    from cyphonic.cloud.cache import TimedCache
    from cyphonic.cloud.store import StoreError
    c, calls = TimedCache(5.0, 2), []

    def load(v):
        def f():
            calls.append(v)
            if isinstance(v, Exception):
                raise v
            return v
        return f
    assert c.get("a", 0.0, load("A")) == "A" and c.get("a", 4.9, load("X")) == "A"
    assert c.get("a", 5.0, load("B")) == "B"                       # expired: read again
    assert c.get("n", 0.0, load(None)) is None and c.get("n", 0.1, load("N")) == "N"   # misses not kept
    assert c.get("a", 20.0, load(StoreError("down"))) == "B"       # the store is away: the stale one
    with pytest.raises(StoreError):
        c.get("z", 20.0, load(StoreError("down")))                 # nothing known: the error
    c.get("q", 21.0, load("Q"))
    assert len(c) == 2                                             # bounded


def test_a_registration_that_changes_nothing_is_not_written_again():
    net = ClusterNet()
    b = net.node("b", ("192.0.2.2", 2000), "i2")
    writes = []
    put = net.store.put_registration
    net.store.put_registration = lambda rec: (writes.append(rec), put(rec))[1]
    for _ in range(3):
        b._register(net.now)
        net.pump()
    assert writes == []                                  # the same as the row says
    b.set_local_endpoints((sig.Endpoint("192.0.2.2", 2000), sig.Endpoint("10.9.9.9", 2000)), net.now)
    net.pump()
    assert len(writes) == 1 and writes[0].local == ("192.0.2.2:2000", "10.9.9.9:2000")


def test_a_notified_instance_still_reads_the_bus_once_a_heartbeat():
    store = MemoryStore()
    a = Cluster(store, "a", services=("as", "nms"), notified=True)
    b = Cluster(store, "b", services=("as", "nms"), notified=True)
    a.start(T0)
    b.start(T0)
    assert a.handle_timer(T0 + 0.5) == (False, False)           # between heartbeats: NOTIFY's job
    poll, refreshed = a.handle_timer(T0 + 1.0)
    assert refreshed and poll                                    # a lost NOTIFY waits one heartbeat
    lone = Cluster(MemoryStore(), "x", services=("as", "nms"), notified=True)
    lone.start(T0)
    assert lone.handle_timer(T0 + 1.0) == (False, True)          # alone: nothing to read
