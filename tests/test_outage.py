"""A day (or three) without the cloud, in the core with a fake clock (docs/protocol.md 11.6):
certificates last a day, the cloud is gone for 72 h, and the tunnels that existed carry on,
rekeying every two minutes with certificates long expired; what the grace never allows."""

from __future__ import annotations

import pytest

from cyphonic import constants as C
from cyphonic import events as ev
from cyphonic.errors import CertificateError

from corefixtures import World, ping

DAY = 86400.0


def _world(grace: float):
    w = World()
    from cyphonic.certs import TrustStore
    from cyphonic.device import Device
    import random
    devs = {}
    for i, (name, vip) in enumerate((("alice", "100.64.0.1"), ("bob", "100.64.0.2"))):
        d = Device(w.identity(name, vip, not_after=w.now + DAY), TrustStore.of(w.ca.public), rng=random.Random(i))
        d.expired_grace_s = grace
        w.devices[name] = d
        w.addr[name] = ("192.0.2.%d" % (i + 1), 40000 + i)
        devs[name] = d
    a, b = devs["alice"], devs["bob"]
    a.add_peer(b.identity.certificate, w.now, endpoint=w.addr["bob"])
    b.add_peer(a.identity.certificate, w.now, endpoint=w.addr["alice"])
    return w, a, b


def _delivered(w, name) -> int:
    return sum(isinstance(e, ev.PacketReceived) for e in w.events(name))


def _run(w, a, b, hours: float, every_s: float = 600.0) -> tuple[int, int, int]:
    sent = got_a = got_b = 0
    end = w.now + hours * 3600
    while w.now < end:
        a.send_packet(ping(a, b, sent % 65536), w.now)
        b.send_packet(ping(b, a, sent % 65536), w.now)
        sent += 1
        w.pump()
        got_b += _delivered(w, "bob")
        got_a += _delivered(w, "alice")
        w.advance(every_s, step=60.0)
    return sent, got_a, got_b


def test_tunnels_survive_72_hours_without_the_cloud_on_one_day_certificates():
    w, a, b = _world(C.OUTAGE_CERT_GRACE_S)
    sent, got_a, got_b = _run(w, a, b, 72)
    assert sent == 432 and got_a == sent and got_b == sent
    # Sessions last REJECT_AFTER_S, so each ping ten minutes later needed a new handshake,
    # most of them with both certificates expired (after the first 24 h).
    assert a.peer(b.cert.fqdn).handshakes >= sent
    assert a.counters["expired_certificate_in_outage"] + b.counters["expired_certificate_in_outage"] > 0
    assert not a.drops.get("cert_expired") and not b.drops.get("cert_expired")


def test_without_the_grace_the_tunnel_ends_when_the_certificates_expire():
    """The counterfactual: the same 72 h with a cloud that would have renewed nothing and no
    grace. Pings stop within REJECT_AFTER_S of the expiry."""
    w, a, b = _world(0.0)
    sent, got_a, got_b = _run(w, a, b, 72)
    assert got_b < sent * 0.4 and got_a < sent * 0.4
    assert a.drops["cert_expired"] + b.drops["cert_expired"] > 0


def test_the_grace_is_bounded_and_never_for_strangers_or_revoked_peers():
    w, a, b = _world(C.OUTAGE_CERT_GRACE_S)
    a.send_packet(ping(a, b, 1), w.now)
    w.pump()
    assert _delivered(w, "bob") == 1
    # A stranger with an expired certificate: refused at once, grace or not.
    with pytest.raises(CertificateError):
        a.add_peer(w.identity("carol", "100.64.0.3", not_after=w.now - 10, not_before=w.now - 3600),
                   w.now)
    # Revoked: refused even within the grace.
    w.advance(DAY + 600, step=60.0)
    w.events("alice"), w.events("bob")
    b.revoke(a.cert.serial)
    w.advance(400, step=30.0)
    b.send_packet(ping(b, a, 2), w.now)
    w.pump()
    w.advance(200, step=10.0)
    assert b.peer(a.cert.fqdn) is None
    assert _delivered(w, "alice") == 0
