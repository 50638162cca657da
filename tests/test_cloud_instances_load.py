"""Enrollment under concurrent load at several cloud instances (issue 13), for real: three
`cyphonic-cloud serve` processes (AS+NMS) on loopback sharing one state directory (keys) and one
PostgreSQL database (tests/conftest.py's server; the tests fail, never skip, without it), and
simulated nodes from the cloud bench's load generator (sans-IO ControlClients on one UDP
socket, each from its own 127.100.x.y), node i at instance i mod 3.

- 300 nodes enroll at once, each with its own one-time token, spread over the three
  instances: 300 successes, 300 distinct virtual IPs and FQDNs, 300 nodes listed.
- One one-time token presented by two nodes (different keys) at two instances at the same
  moment, 20 times: exactly one identity per token, the other node gets TOKEN_USED.

No root, no namespaces; about 8 s.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from cyphonic.cloud import authentication
from cyphonic.cloud.keys import parse_cloud_key
from cyphonic.cloud.store import open_store
from cyphonic.control import Connected, Reply, RequestTimedOut, Unreachable
from cyphonic.wire import signaling as sig

from lab.bench.cloud import LoadGenerator, login_request
from lab.cloudproc import CloudInstances

INSTANCES = 3
NODES = 300
RACE_ROUNDS = 20
DOMAIN = "ov.test"
LOGIN_WITHIN_S = 40.0        # every login of a phase answered within this (they retry 1, 2, 4, 8 s apart)


@pytest.fixture
def cloud(tmp_path, pg_url):
    """Three AS+NMS instances on one PostgreSQL database, stopped (and their logs shown on
    failure) whatever happens."""
    inst = CloudInstances(str(tmp_path), INSTANCES, pg_url, domain=DOMAIN, prefix="100.64.0.0/16",
                          listen6="", keepalive_s=60, lifetime_s=600,
                          extra={"services": '["as", "nms"]'})
    with inst:
        yield inst


@pytest.fixture
def store(pg_url):
    """The shared database, as an admin on another host sees it (the same library calls as
    `cyphonic-cloud enroll`)."""
    s = open_store(pg_url)
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def generator(cloud: CloudInstances, n: int):
    _, cloud_static = parse_cloud_key(cloud.cloud_key)
    gen = LoadGenerator(cloud.addresses, cloud_static, n)
    try:
        yield gen
    finally:
        gen.close()


def wait_for(read, ok, timeout_s: float):
    """``read()`` until ``ok`` of it (polled every 20 ms, at most ``timeout_s``); the last read."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if ok(value) or time.monotonic() >= deadline:
            return value
        time.sleep(0.02)


def one_time_tokens(store, names) -> list[bytes]:
    now = time.time()
    return [authentication.create_token(store, name, now, reusable=False, lifetime_s=3600).encode()
            for name in names]


def test_300_enrollments_at_three_instances_at_once(cloud, store):
    names = [f"n{i:03d}" for i in range(NODES)]
    tokens = one_time_tokens(store, names)
    answers: dict[int, object] = {}
    with generator(cloud, NODES) as gen:
        def on_event(node, ev, now):
            if isinstance(ev, Reply):
                answers[node.i] = ev.msg
            elif isinstance(ev, RequestTimedOut):
                answers[node.i] = "timed out"
            elif isinstance(ev, Unreachable):
                answers[node.i] = "unreachable"
        gen.handler = on_event
        now = time.time()
        for node, token in zip(gen.nodes, tokens):     # all 300 before any answer is read
            node.client.request(login_request(node, token), now)
        for node in gen.nodes:
            gen.flush(node)
        t0 = time.monotonic()
        done = gen.pump_until(lambda: len(answers) == NODES, LOGIN_WITHIN_S)
        took = time.monotonic() - t0
    assert done, f"{NODES - len(answers)} logins unanswered after {LOGIN_WITHIN_S} s\n{cloud.logs()}"
    failed = {i: a for i, a in answers.items() if not isinstance(a, sig.LoginResponse)}
    assert not failed, f"{len(failed)} logins failed, e.g. {list(failed.items())[:5]}\n{cloud.logs()}"
    fqdns = {a.fqdn for a in answers.values()}
    vips = {str(a.vip4) for a in answers.values()}
    assert len(fqdns) == NODES and len(vips) == NODES
    assert fqdns == {f"{n}.{DOMAIN}" for n in names}
    # Each node got the name of the token it brought, whichever instance it asked.
    assert all(answers[i].fqdn == f"{names[i]}.{DOMAIN}" for i in range(NODES))
    # Spread over the instances for real: each enrolled its third. An instance logs after it
    # sent its answers (the driver's round), so its last lines may still be on their way.
    counts = wait_for(lambda: [m.log().count("enrolled ok") for m in cloud],
                      lambda c: sum(c) == NODES, 10.0)
    assert counts == [NODES // INSTANCES] * INSTANCES, counts
    listed = cloud.nodes()   # cyphonic-cloud nodes --json, against the shared database
    assert len(listed) == NODES
    assert {r["fqdn"] for r in listed} == fqdns and {r["vip4"] for r in listed} == vips
    assert all(t.uses == 1 for t in store.list_tokens())
    print(f"{NODES} enrollments at {INSTANCES} instances in {took:.2f} s")


def test_one_token_at_two_instances_at_the_same_moment(cloud, store):
    """Round r: nodes 2r and 2r+1 (instances 2r mod 3 and 2r+1 mod 3, never the same) hold open
    control sessions; both LoginRequests with round r's token go out back to back, which
    first alternating, so both instances work on the same token at the same time."""
    names = [f"race{r:02d}" for r in range(RACE_ROUNDS)]
    tokens = one_time_tokens(store, names)
    with generator(cloud, 2 * RACE_ROUNDS) as gen:
        # The sessions first, so that the two requests reach the instances together.
        connected: set[int] = set()

        def on_connected(node, ev, now):
            if isinstance(ev, Connected):
                connected.add(node.i)
        gen.handler = on_connected
        now = time.time()
        for node in gen.nodes:
            node.client.set_cloud_address(node.cloud_addr, now)
            gen.flush(node)
        assert gen.pump_until(lambda: len(connected) == len(gen.nodes), 15), \
            f"only {len(connected)} control sessions came up\n{cloud.logs()}"

        answers: dict[int, object] = {}

        def on_event(node, ev, now):
            if isinstance(ev, Reply):
                answers[node.i] = ev.msg
            elif isinstance(ev, RequestTimedOut):
                answers[node.i] = "timed out"
        gen.handler = on_event
        for r, token in enumerate(tokens):
            pair = gen.nodes[2 * r: 2 * r + 2]
            assert pair[0].instance != pair[1].instance
            if r % 2:
                pair.reverse()
            now = time.time()
            for node in pair:
                node.client.request(login_request(node, token), now)
            for node in pair:
                gen.flush(node)
            assert gen.pump_until(lambda: all(n.i in answers for n in pair), LOGIN_WITHIN_S), \
                f"round {r}: unanswered\n{cloud.logs()}"
    for r in range(RACE_ROUNDS):
        a, b = answers[2 * r], answers[2 * r + 1]
        won = [x for x in (a, b) if isinstance(x, sig.LoginResponse)]
        lost = [x for x in (a, b) if not isinstance(x, sig.LoginResponse)]
        assert len(won) == 1, f"round {r}: {a!r} / {b!r}"
        assert isinstance(lost[0], sig.Error) and lost[0].code == sig.ErrorCode.TOKEN_USED, \
            f"round {r}: the loser got {lost[0]!r}"
        assert won[0].fqdn == f"{names[r]}.{DOMAIN}"
    # Never two identities: one per token, and it is the winner's key.
    idents = store.list_identities()
    assert sorted(i.name for i in idents) == names
    winners = {gen.nodes[i].identity.public for i, a in answers.items() if isinstance(a, sig.LoginResponse)}
    assert {i.static_public for i in idents} == winners
    assert all(t.uses == 1 for t in store.list_tokens())
