"""The cloud (AS + NMS) and the node's Signaling Module, in memory with a fake clock."""

from __future__ import annotations

from cyphonic import signaling as sg
from cyphonic.cloud import policy as pol
from cyphonic.handshake import StaticIdentity
from cyphonic.wire import cert as wire_cert
from cyphonic.wire import signaling as sig

from cloudfixtures import CloudNet

E = sig.ErrorCode
RT = sig.RouteType


def of(events, cls):
    return [e for e in events if isinstance(e, cls)]


def ready(net, *names):
    for n in names:
        assert net.nodes[n].state == sg.State.READY, (n, net.nodes[n].status())


def test_enroll_login_register():
    net = CloudNet()
    a = net.node("alice", ("192.0.2.10", 5000))
    net.start_all()
    evs = net.events("alice")
    logged = of(evs, sg.LoggedIn)[0]
    assert logged.fqdn == "alice.ov.example" and logged.vip4 == "100.64.0.1" and logged.enrolled
    cert = wire_cert.decode(logged.certificate)
    assert cert.static_public == a.identity.public and cert.groups == ("default",)
    reg = of(evs, sg.Registered)[0]
    assert reg.nat is False and reg.observed == sig.Endpoint("192.0.2.10", 5000)
    ready(net, "alice")
    assert any("enrolled ok node=alice.ov.example" in l for l in net.cloud.logs)


def test_nat_is_detected_from_the_observed_address():
    net = CloudNet()
    net.node("cam", ("203.0.113.5", 61000), local=[sig.Endpoint("10.0.0.5", 5000)])
    net.start_all()
    assert of(net.events("cam"), sg.Registered)[0].nat is True


def test_token_errors_are_precise_and_final():
    net = CloudNet()
    tok = net.token("dup")
    net.node("a1", ("192.0.2.1", 1), token=tok)
    net.node("a2", ("192.0.2.2", 1), token=tok)              # replayed (used) token
    net.node("a3", ("192.0.2.3", 1), token="00112233aabb." + "00" * 16)  # unknown
    net.node("a4", ("192.0.2.4", 1), token="garbage")
    net.node("a5", ("192.0.2.5", 1), token=net.token("old", lifetime_s=10))
    net.now += 20
    net.start_all()
    assert net.nodes["a1"].state == sg.State.READY
    codes = {n: of(net.events(n), sg.LoginFailed)[0].code for n in ("a2", "a3", "a4", "a5")}
    assert codes == {"a2": E.TOKEN_USED, "a3": E.TOKEN_UNKNOWN, "a4": E.TOKEN_UNKNOWN, "a5": E.TOKEN_EXPIRED}
    assert all(net.nodes[n].state == sg.State.FAILED for n in codes)


def test_known_identity_logs_in_by_key_and_keeps_its_address():
    net = CloudNet()
    ident = StaticIdentity.generate()
    net.node("nas", ("192.0.2.10", 5000), identity=ident)
    net.start_all()
    first = of(net.events("nas"), sg.LoggedIn)[0]
    net.now += 1  # the node restarts later, from another address
    again = net.node("nas", ("192.0.2.99", 7000), identity=ident, token="")
    net.start_all()
    second = of(net.events("nas"), sg.LoggedIn)[0]
    assert (second.fqdn, second.vip4) == (first.fqdn, first.vip4) and not second.enrolled
    assert again.state == sg.State.READY


def test_unknown_key_without_token_is_refused():
    net = CloudNet()
    net.node("x", ("192.0.2.1", 1), token="")
    net.start_all()
    assert of(net.events("x"), sg.LoginFailed)[0].code == E.UNAUTHENTICATED


def test_revoked_identity_is_refused_and_told():
    net = CloudNet()
    net.node("bad", ("192.0.2.1", 1))
    net.start_all()
    net.events("bad")
    net.store.revoke("bad", net.now)
    net.advance(6)
    evs = net.events("bad")
    assert of(evs, sg.LoginFailed) and of(evs, sg.LoginFailed)[0].code == E.REVOKED
    assert net.nodes["bad"].state == sg.State.FAILED


def route(net, a, b_fqdn):
    net.nodes[a].request_route(b_fqdn, net.now)
    net.pump()


def answer_pushed(net, name, accept=True):
    for e in of(net.events(name), sg.DirectionPushed):
        net.nodes[name].answer_direction(e, accept, net.now, code=E.POLICY_DENIED)
        net.pump()
        return e.direction
    return None


def route_between(a_addr, a_local, b_addr, b_local, **kw):
    net = CloudNet(**kw)
    net.node("a", a_addr, local=a_local)
    net.node("b", b_addr, local=b_local)
    net.start_all()
    ready(net, "a", "b")
    net.events("a")
    route(net, "a", "b.ov.example")
    pushed = answer_pushed(net, "b")
    evs = net.events("a")
    return net, pushed, evs


def test_route_direct_when_the_responder_is_public():
    net, pushed, evs = route_between(("192.0.2.1", 1000), [sig.Endpoint("192.0.2.1", 1000)],
                                     ("192.0.2.2", 2000), [sig.Endpoint("192.0.2.2", 2000)])
    rr = of(evs, sg.RouteReady)[0].direction
    assert rr.route_type == RT.DIRECT and rr.role == sig.Role.INITIATOR
    assert rr.peer_endpoints[0] == sig.Endpoint("192.0.2.2", 2000)
    assert wire_cert.decode(rr.peer_certificate).fqdn == "b.ov.example"
    assert pushed.role == sig.Role.RESPONDER and pushed.peer_fqdn == "a.ov.example"


def test_route_reversed_when_only_the_responder_is_behind_nat():
    net, pushed, evs = route_between(("192.0.2.1", 1000), [sig.Endpoint("192.0.2.1", 1000)],
                                     ("203.0.113.9", 40000), [sig.Endpoint("10.1.0.2", 2000)])
    rr = of(evs, sg.RouteReady)[0].direction
    assert rr.route_type == RT.REVERSED and rr.role == sig.Role.RESPONDER
    assert pushed.role == sig.Role.INITIATOR and pushed.peer_endpoints[0] == sig.Endpoint("192.0.2.1", 1000)


def test_route_hole_punching_when_both_are_behind_nat():
    net, pushed, evs = route_between(("203.0.113.1", 30000), [sig.Endpoint("10.0.0.2", 1000)],
                                     ("203.0.113.9", 40000), [sig.Endpoint("10.1.0.2", 2000)])
    rr = of(evs, sg.RouteReady)[0].direction
    assert rr.route_type == RT.HOLE_PUNCH and pushed.route_type == RT.HOLE_PUNCH
    assert rr.peer_endpoints[0] == sig.Endpoint("203.0.113.9", 40000)
    assert pushed.peer_endpoints[0] == sig.Endpoint("203.0.113.1", 30000)


def test_route_local_when_both_are_behind_the_same_nat():
    net, pushed, evs = route_between(("203.0.113.1", 30000), [sig.Endpoint("10.0.0.2", 1000)],
                                     ("203.0.113.1", 30001), [sig.Endpoint("10.0.0.3", 2000)])
    rr = of(evs, sg.RouteReady)[0].direction
    assert rr.route_type == RT.LOCAL and rr.peer_endpoints == (sig.Endpoint("10.0.0.3", 2000),)


def test_route_relay_when_ipv4_meets_ipv6():
    net, pushed, evs = route_between(("192.0.2.1", 1000), [sig.Endpoint("192.0.2.1", 1000)],
                                     ("2001:db8::2", 2000), [sig.Endpoint("2001:db8::2", 2000)])
    rr = of(evs, sg.RouteReady)[0].direction
    assert rr.route_type == RT.RELAY and pushed.route_type == RT.RELAY
    assert rr.relay_endpoint == sig.Endpoint("198.51.100.1", 47102)
    assert pushed.relay_endpoint == sig.Endpoint("2001:db8::1", 47102)
    assert rr.relay_session_id == pushed.relay_session_id and rr.relay_token != pushed.relay_token
    from cyphonic.cloud.relay_token import verify_token
    assert verify_token(net.keys.relay_key, rr.relay_session_id, rr.relay_token, net.now) == 0
    assert verify_token(net.keys.relay_key, rr.relay_session_id, pushed.relay_token, net.now) == 1


def test_failed_punching_falls_back_to_the_relay():
    net, pushed, evs = route_between(("203.0.113.1", 30000), [sig.Endpoint("10.0.0.2", 1000)],
                                     ("203.0.113.9", 40000), [sig.Endpoint("10.1.0.2", 2000)])
    rr = of(evs, sg.RouteReady)[0].direction
    net.nodes["a"].confirm_route(rr.route_id, False, RT.HOLE_PUNCH, None, net.now)
    net.pump()
    for name in ("a", "b"):
        d = answer_pushed(net, name)
        assert d is not None and d.route_type == RT.RELAY and d.relay_session_id


def test_policy_refusals_unknown_peers_and_unregistered_peers():
    net = CloudNet()
    net.node("a", ("192.0.2.1", 1), token=net.token("a", groups=("cams",)))
    net.node("b", ("192.0.2.2", 1), token=net.token("b", groups=("servers",)))
    net.start_all()
    route(net, "a", "b.ov.example")
    route(net, "a", "nobody.ov.example")
    fails = {e.peer_fqdn: e.code for e in of(net.events("a"), sg.RouteFailed)}
    assert fails == {"b.ov.example": E.POLICY_DENIED, "nobody.ov.example": E.UNKNOWN_PEER}
    net.store.set_policy(pol.validate({"default": "deny", "rules": [
        {"from": ["group:cams"], "to": ["group:servers"], "action": "allow"}]}))
    net.advance(6)
    route(net, "a", "b.ov.example")
    assert answer_pushed(net, "b") is not None
    assert of(net.events("a"), sg.RouteReady)
    route(net, "b", "a.ov.example")  # directional: servers may not open tunnels to cameras
    assert of(net.events("b"), sg.RouteFailed)[0].code == E.POLICY_DENIED
    net.drop_from_cloud.add("b")
    net.nodes["b"].state = sg.State.IDLE
    net.advance(200, step=5)  # b's registration expires (no keepalives reach the cloud from it)
    net.events("a")
    route(net, "a", "b.ov.example")
    assert of(net.events("a"), sg.RouteFailed)[0].code == E.PEER_UNREACHABLE


def test_responder_refusal_and_silence_are_reported():
    net = CloudNet()
    net.node("a", ("192.0.2.1", 1))
    net.node("b", ("192.0.2.2", 1))
    net.start_all()
    route(net, "a", "b.ov.example")
    answer_pushed(net, "b", accept=False)
    assert of(net.events("a"), sg.RouteFailed)[0].code == E.POLICY_DENIED
    net.drop_from_cloud.add("b")
    route(net, "a", "b.ov.example")
    net.advance(40, step=1)
    assert of(net.events("a"), sg.RouteFailed)[0].code == E.PEER_UNREACHABLE


def test_keepalives_hold_the_registration_and_roaming_keeps_the_vip():
    net = CloudNet()
    net.node("m", ("192.0.2.1", 1000))
    net.start_all()
    vip = of(net.events("m"), sg.LoggedIn)[0].vip4
    net.advance(300, step=2)
    assert net.nodes["m"].state == sg.State.READY and len(net.cloud.nms.registrations) == 1
    net.addrs["m"] = ("198.51.100.77", 3333)
    net.nodes["m"].set_local_endpoints([sig.Endpoint("198.51.100.77", 3333)], net.now)
    net.pump()
    reg = list(net.cloud.nms.registrations.values())[0]
    assert reg.observed == sig.Endpoint("198.51.100.77", 3333) and reg.identity.vip4 == vip


def test_node_comes_back_after_the_cloud_loses_its_sessions():
    net = CloudNet()
    net.node("m", ("192.0.2.1", 1000))
    net.start_all()
    # a restarted cloud: same store and keys, no sessions, no registrations
    from cyphonic.cloud.core import CloudCore
    import random
    net.cloud = CloudCore(store=net.store, keys=net.keys, domain="ov.example", prefix="100.64.0.0/24",
                          rng=random.Random(77))
    lost, health = [], []
    for _ in range(120):
        net.advance(1, step=1)
        lost.append(net.nodes["m"].last_error)
        health.append(net.nodes["m"].link_health())
    assert any(lost), "the node never noticed the lost session"
    assert net.nodes["m"].state == sg.State.READY
    assert net.nodes["m"].last_error == ""      # ready again: no stale error in the status
    # health: cloud-unreachable from the first failure until ready again, without a gap
    # (not "connecting" while a retry logs in), then nothing
    first = next(i for i, h in enumerate(health) if h is not None)
    last = max(i for i, h in enumerate(health) if h is not None)
    assert all(h is not None and h[0] == "cloud-unreachable" for h in health[first:last + 1]), health
    assert health[-1] is None
    assert len(net.cloud.nms.registrations) == 1


def test_garbage_never_stops_the_cloud():
    import os
    net = CloudNet()
    net.node("a", ("192.0.2.1", 1))
    net.start_all()
    for i in range(300):
        net.cloud.receive_datagram(os.urandom(i % 200), ("203.0.113.1", i), net.now)
    net.cloud.receive_datagram(b"\x08" + os.urandom(100), ("192.0.2.1", 1), net.now)
    assert sum(net.cloud.server.drops.values()) >= 300
    route(net, "a", "a.ov.example")
    assert net.nodes["a"].state == sg.State.READY


def test_full_address_pool_refuses_enrollment_and_keeps_the_token():
    net = CloudNet(prefix="100.64.0.0/30")  # two host addresses
    net.node("a", ("192.0.2.1", 1))
    net.node("b", ("192.0.2.2", 1))
    tok = net.token("c")
    c = net.node("c", ("192.0.2.3", 1), token=tok)
    net.start_all()
    ready(net, "a", "b")
    assert c.state != sg.State.READY and not of(net.events("c"), sg.LoggedIn)
    assert "INTERNAL" in c.last_error and "address pool exhausted" in c.last_error
    assert any("login refused node=c code=INTERNAL" in l for l in net.cloud.logs)
    token_id = tok.split(".")[0]
    assert net.store.get_token(token_id).uses == 0  # nothing lost: the token is still unused
    assert net.store.get_identity(c.identity.public) is None
    net.advance(10, step=1)                          # retries fail the same way, still lossless
    assert c.state != sg.State.READY and net.store.get_token(token_id).uses == 0
    # The operator widens the pool; the same token now enrolls the node.
    from cyphonic.cloud.core import CloudCore
    import random
    net.cloud = CloudCore(store=net.store, keys=net.keys, domain="ov.example", prefix="100.64.0.0/29",
                          rng=random.Random(78))
    net.advance(120, step=1)
    ready(net, "c")
    assert net.store.get_token(token_id).uses == 1
    assert net.store.get_identity(c.identity.public).vip4 == "100.64.0.3"


def test_concurrent_routes_of_different_nodes_are_not_crossed():
    """Cloud request ids are counted per node: two responders answering at once must each
    settle their own route (found by the benchmark: keyed by id alone, answers crossed)."""
    net = CloudNet()
    for n in ("a1", "a2", "b1", "b2"):
        net.node(n, (f"192.0.2.{len(net.nodes) + 1}", 1000))
    net.start_all()
    for n in net.nodes:
        net.events(n)
    for peer in net.cloud.server.peers.values():   # ids start at random per node: make them meet
        peer.next_id = 41
    net.nodes["a1"].request_route("b1.ov.example", net.now)
    net.nodes["a2"].request_route("b2.ov.example", net.now)
    net.pump()
    p1 = of(net.events("b1"), sg.DirectionPushed)[0]
    p2 = of(net.events("b2"), sg.DirectionPushed)[0]
    assert p1.incoming.msg.request_id == p2.incoming.msg.request_id  # the collision case
    net.nodes["b2"].answer_direction(p2, False, net.now, code=E.POLICY_DENIED)
    net.nodes["b1"].answer_direction(p1, True, net.now)
    net.pump()
    assert of(net.events("a1"), sg.RouteReady)[0].direction.peer_fqdn == "b1.ov.example"
    assert of(net.events("a2"), sg.RouteFailed)[0].code == E.POLICY_DENIED


def test_health_says_cloud_unreachable_through_a_whole_outage_without_flapping():
    """While the cloud does not answer, the node goes round reconnecting, logging in (waiting
    for an answer) and reconnecting again: its health stays cloud-unreachable the whole time,
    from the first unanswered keepalive until it is ready again, and no stale error remains."""
    net = CloudNet()
    net.node("m", ("192.0.2.1", 1000))
    net.start_all()
    m = net.nodes["m"]
    assert m.link_health() is None
    net.drop_to_cloud = True
    states, health = [], []
    for _ in range(200):
        net.advance(1, step=1)
        states.append(m.state)
        health.append(m.link_health())
    assert sg.State.LOGGING_IN in states and sg.State.RECONNECTING in states  # it went round
    first = next(i for i, h in enumerate(health) if h is not None)
    assert all(h is not None and h[0] == "cloud-unreachable" for h in health[first:]), health
    net.drop_to_cloud = False
    net.advance(60, step=1)
    assert m.state == sg.State.READY and m.link_health() is None and m.last_error == ""
