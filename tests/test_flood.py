"""Handshake floods in namespaces (issue 12, "Handshake flood"): initiations with a valid mac1
from random spoofed sources (lab/flood.py), as fast as one sender process goes (at least
``MIN_RATE``; the test fails if the sender did not get there: a test that did not attack proves
nothing), for ``FLOOD_S`` seconds, at

(a) a node daemon: an existing tunnel to it loses at most 1 % of its pings and their median RTT
    stays within twice the unloaded median (measured first, in the same test); its cloud link
    stays ready;
(b) an adapter, at its general node's WAN port: the same for the general node's tunnel, and the
    general node's cloud link (and the adapter's own) stays ready;
(c) the cloud's control channel (control initiations): logged-in nodes stay logged in, and a new
    node enrolls and logs in during the flood.

Memory: no process's RSS grows by ``RSS_GROWTH_MAX_KB`` or more across a flood. What a flood
may fill is bounded: the per-source rate limiter (4096 addresses) and the cloud's unconfirmed
control handshakes (4096, ``MAX_CONTROL_UNCONFIRMED``), at well under 1 kB an entry in Python
(4 MB at most each), plus whatever cookie state there is (a secret); 16 MB leaves room for the
allocator's arenas while anything that grows per initiation (over a million of them here, at a
hundred bytes or more each) breaks it.

The spoofed sources (172.16.0.0/12) are not routable back: what the target answers goes to the
segment's gateway, which counts it by type (``ReplyCounter``: responses, cookie replies) and drops
it. Every lab part is the lab's: processes and namespaces are removed at the end, failed or not.
The namespace tests need root (CI runs as root); about 1.5 minutes. The first test (no root)
checks that the flood's initiations pass mac1 and reach the key agreement.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from appliance.cyadm import ask
from cyphonic import handshake as hs
from cyphonic.cloud.keys import parse_cloud_key
from cyphonic.errors import AuthenticationError
from cyphonic.wire import cert as wire_cert
from lab import Lab
from lab.adapterlab import adapter_site, mac_of
from lab.flood import Flood, ReplyCounter, build_pool, ping, rss_kb, udp_counters, under_flood
from cyphonic.ipv4 import checksum as inet_checksum   # a right header sums to 0 with its checksum in
from lab.nodelab import Overlay

FLOOD_S = 20.0
# The new node of the cloud's flood starts this long into it. It usually logs in 2 to 11 s later,
# but about one run in ten it took 16 to 18 s (CI, 2026-12-06): its first initiation is one of
# ~200k/s into a full intake queue (about 1 in 5 is read), then the cookie round and the login.
# The test claims it gets in during the flood (lab.flood sends for 20 s at most), not how fast.
NEW_NODE_AT_S = 1.0
FLOOD_RATE = float(os.environ.get("CYPHONIC_FLOOD_RATE", "0"))   # 0: as fast as the sender goes
MIN_RATE = 50_000
FLOOD_PROCS = 1               # one sender: on these 2 cores the target keeps the other one
UNLOADED_PINGS = 200          # at lab.flood.PING_INTERVAL_S (0.02 s): 4 s
LOSS_MAX_PERCENT = 1.0
RTT_FACTOR_MAX = 2.0
RSS_GROWTH_MAX_KB = 16 * 1024


def test_the_floods_initiations_pass_mac1_and_reach_the_key_agreement():
    """No root: what the flood sends is what the responder's cheap gate lets through (else the
    namespace tests below would pass without attacking anything): right IPv4 and UDP checksums,
    a valid mac1 for the target (and only for it), and a Diffie-Hellman before it fails."""
    target, other = hs.StaticIdentity.generate(), hs.StaticIdentity.generate()
    for kind, purpose in (("tunnel", hs.TUNNEL), ("control", hs.CONTROL)):
        pool = build_pool(kind, target.public, "198.18.0.9", 47100, n=16, seed=1)
        assert len({p[12:16] for p in pool}) == 16                        # spoofed sources, all different
        for pkt in pool:
            assert inet_checksum(pkt[:20]) == 0
            pseudo = pkt[12:20] + bytes([0, 17]) + (len(pkt) - 20).to_bytes(2, "big")
            assert inet_checksum(pseudo + pkt[20:]) == 0
            payload = pkt[28:]
            msg = hs.check_mac1(target, payload, purpose)
            with pytest.raises(AuthenticationError):
                hs.consume_initiation(target, msg, purpose)              # after the X25519
            with pytest.raises(AuthenticationError):
                hs.check_mac1(other, payload, purpose)


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces); CI runs them as root")
    with Lab(prefix="cyf") as lab:
        yield lab


def _flood(lab, atk, tmp_path, *, kind: str, key: bytes, target: str, port: int) -> Flood:
    return Flood(lab, atk, kind=kind, key=key, target=target, port=port, rate=FLOOD_RATE, seconds=FLOOD_S,
                 procs=FLOOD_PROCS, log=tmp_path / f"flood-{kind}.log")


def _rss(pids: dict) -> dict:
    return {name: rss_kb(pid) for name, pid in pids.items()}


def _growth(before: dict, after: dict) -> dict:
    return {n: (after[n] - before[n]) if after.get(n) is not None and before.get(n) is not None else None
            for n in before}


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def _report(what: str, unloaded: dict | None, run: dict, extra: dict) -> None:
    f, p = run["flood"], run["ping"]
    line = (f"\n[flood {what}] {f['sent']} initiations in {f['seconds']} s = {f['rate']}/s "
            f"({f['errors']} send errors)")
    if unloaded is not None:
        line += (f"; ping unloaded {unloaded['loss_percent']}% loss, median {unloaded['median_ms']} ms; "
                 f"under flood {p['loss_percent']}% loss ({p['sent'] - p['received']}/{p['sent']}), "
                 f"median {p['median_ms']} ms, p90 {p['p90_ms']} ms, max {p['max_ms']} ms")
    print(line + "".join(f"; {k} {v}" for k, v in extra.items()))


def _check_attack(run: dict, target_udp: dict, drops: dict | None = None) -> list[str]:
    """The flood really happened: rate reached, the target's namespace received it, and (where
    the target's drops are given) its mac1 gate did not refuse it."""
    f = run["flood"]
    bad = []
    if f["rate"] < MIN_RATE or f["seconds"] < FLOOD_S - 0.5:
        bad.append(f"the sender reached only {f['rate']}/s for {f['seconds']} s (need {MIN_RATE}/s for {FLOOD_S} s)")
    arrived = target_udp.get("InDatagrams", 0) + target_udp.get("RcvbufErrors", 0)
    if arrived < 0.9 * f["sent"]:
        bad.append(f"the target's namespace saw {arrived} datagrams of {f['sent']} sent")
    if drops is not None and drops.get("device_mac1", 0) > 0.01 * f["sent"]:
        bad.append(f"the target refused {drops['device_mac1']} initiations on mac1: not the attack meant")
    return bad


def _check_tunnel(unloaded: dict, run: dict) -> list[str]:
    p = run["ping"]
    bad = []
    if p["sent"] < 0.9 * (FLOOD_S - 1) / 0.02 or p["loss_percent"] > LOSS_MAX_PERCENT:
        bad.append(f"ping loss {p['loss_percent']}% of {p['sent']} (at most {LOSS_MAX_PERCENT}%)")
    if p["median_ms"] is None or p["median_ms"] > RTT_FACTOR_MAX * unloaded["median_ms"]:
        bad.append(f"median RTT {p['median_ms']} ms under flood, {unloaded['median_ms']} ms unloaded "
                   f"(at most {RTT_FACTOR_MAX}x)")
    return bad


def _sampled(fn):
    """``fn()``, or what went wrong asking (a status socket that does not answer in time is
    itself a finding, not a reason to stop sampling)."""
    def sample():
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported as the sample
            return f"{type(exc).__name__}: {exc}"
    return sample


def _check_rss(growth: dict) -> list[str]:
    return [f"RSS of {n} grew by {g} kB (limit {RSS_GROWTH_MAX_KB} kB)"
            for n, g in growth.items() if g is None or g >= RSS_GROWTH_MAX_KB]


@pytest.mark.root
def test_flood_at_a_node_daemon(lab, tmp_path, capsys):
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet, v6=False)
    h1 = lab.host("n1", inet, v6=False)
    h2 = lab.host("n2", inet, v6=False)
    atk = lab.host("atk", inet, v6=False)
    replies = ReplyCounter(lab, inet)
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("alpha", h1)
    ov.add_node("beta", h2)
    ov.wait_ready("alpha")
    st = ov.wait_ready("beta")
    vip, key, port = st["identity"]["vip4"], bytes.fromhex(st["identity"]["static_key"]), st["udp_port"]
    assert ov.resolve("alpha", ov.nodes["beta"]["fqdn"]) == vip
    assert ping(lab, h1, vip, count=5, interval=0.05)["received"] >= 4
    unloaded = ping(lab, h1, vip, count=UNLOADED_PINGS, interval=0.02)
    pids = {"alpha": ov.nodes["alpha"]["proc"].pid, "beta": ov.nodes["beta"]["proc"].pid,
            "cloud": ov.cloud_proc.pid}
    rss0, udp0, rep0 = _rss(pids), udp_counters(lab, h2), replies.read()
    run = under_flood(lab, _flood(lab, atk, tmp_path, kind="tunnel", key=key, target=h2.addr4, port=port),
                      pinger=h1, target=vip, log=tmp_path / "ping-flood.log",
                      sample=_sampled(lambda: ov.status("beta")["cloud"]["state"]))
    time.sleep(1.0)                           # the backlog drains before the memory is read
    growth, udp, rep = _growth(rss0, _rss(pids)), _delta(udp_counters(lab, h2), udp0), _delta(replies.read(), rep0)
    drops = ov.status("beta")["drops"]
    with capsys.disabled():
        _report("node daemon", unloaded, run, {"cloud link": sorted({s for _, s in run["samples"]}),
                                               "rss growth kB": growth, "target udp": udp,
                                               "replies to spoofed sources": rep, "drops": drops})
    bad = _check_attack(run, udp, drops) + _check_tunnel(unloaded, run) + _check_rss(growth)
    bad += [f"beta's cloud link {s} at +{t} s" for t, s in run["samples"] if s != "ready"]
    if not run["samples"]:
        bad.append("no status sample during the flood")
    assert not bad, bad


@pytest.mark.root
def test_flood_at_an_adapters_general_node(lab, tmp_path, capsys):
    site = adapter_site(lab, tmp_path)
    adapter, gn, srv_vip, sock, ov = site["adapter"], site["gn"], site["srv_vip"], site["sock"], site["ov"]
    inet = lab.segments["inet"]
    atk = lab.host("atk", inet, v6=False)
    replies = ReplyCounter(lab, inet)
    st = ask(sock)
    row = next(g for g in st["general_nodes"] if g["name"] == "cam1")
    port = row["port"]
    # the general node's static key, from its certificate (which every peer it talks to holds)
    with open(tmp_path / "adapter" / "gn" / mac_of(lab, gn).replace(":", "") / "certificate") as f:
        key = wire_cert.decode(bytes.fromhex(f.read().strip())).static_public
    assert ping(lab, gn, srv_vip, count=5, interval=0.05)["received"] >= 4
    unloaded = ping(lab, gn, srv_vip, count=UNLOADED_PINGS, interval=0.02)
    pids = {"controller": site["proc"].pid, "srv": ov.nodes["srv"]["proc"].pid, "cloud": ov.cloud_proc.pid,
            **{f"worker{i}": w["pid"] for i, w in enumerate(ask(sock)["workers"])}}
    rss0, udp0, rep0 = _rss(pids), udp_counters(lab, adapter), replies.read()

    def sample():
        s = ask(sock)
        return {"adapter": s["cloud"]["state"], "cam1": next(g["cloud"] for g in s["general_nodes"]
                                                             if g["name"] == "cam1")}

    run = under_flood(lab, _flood(lab, atk, tmp_path, kind="tunnel", key=key, target=adapter.addr4, port=port),
                      pinger=gn, target=srv_vip, log=tmp_path / "ping-flood.log", sample=_sampled(sample))
    time.sleep(1.0)
    growth, udp = _growth(rss0, _rss(pids)), _delta(udp_counters(lab, adapter), udp0)
    rep, after = _delta(replies.read(), rep0), ask(sock)
    with capsys.disabled():
        _report("adapter general node", unloaded, run,
                {"cloud links": sorted({str(s) for _, s in run["samples"]}),
                 "rss growth kB": growth, "target udp": udp, "replies to spoofed sources": rep,
                 "drops": after["drops"], "health": [h["code"] for h in after["health"]]})
    bad = _check_attack(run, udp, after["drops"]) + _check_tunnel(unloaded, run) + _check_rss(growth)
    bad += [f"cloud links {s} at +{t} s" for t, s in run["samples"] if s != {"adapter": "ready", "cam1": "ready"}]
    if not run["samples"]:
        bad.append("no status sample during the flood")
    assert not bad, bad


@pytest.mark.root
def _cloud_stats(ov) -> str:
    try:
        return ov.cli("stats", "--json")[-3000:]
    except AssertionError as exc:
        return f"n/a ({exc})"


def test_flood_at_the_clouds_control_channel(lab, tmp_path, capsys):
    inet = lab.switch("inet", "198.18.0.0/24")
    cloud = lab.host("cloud", inet, v6=False)
    hosts = {name: lab.host(name, inet, v6=False) for name in ("n1", "n2", "n3")}
    atk = lab.host("atk", inet, v6=False)
    replies = ReplyCounter(lab, inet)
    ov = Overlay(lab, cloud, str(tmp_path))
    ov.start_cloud()
    ov.add_node("alpha", hosts["n1"])
    ov.add_node("beta", hosts["n2"])
    ov.wait_ready("alpha")
    ov.wait_ready("beta")
    _, cloud_static = parse_cloud_key(ov.cloud_key)
    pids = {"cloud": ov.cloud_proc.pid, "alpha": ov.nodes["alpha"]["proc"].pid,
            "beta": ov.nodes["beta"]["proc"].pid}
    rss0, udp0, rep0 = _rss(pids), udp_counters(lab, cloud), replies.read()
    flood = _flood(lab, atk, tmp_path, kind="control", key=cloud_static, target=cloud.addr4, port=47101)
    late: dict = {}
    gamma_seen: dict = {}        # gamma's status while it was not logged in, by time into the flood

    def sample():
        # a new node enrolls and logs in during the flood (started from the sampler)
        t = time.monotonic() - flood.started
        if "started" not in late and t >= NEW_NODE_AT_S:
            ov.add_node("gamma", hosts["n3"])
            late["started"] = round(t, 1)
        if "started" in late and "ready" not in late:
            if gamma_ready():
                late["ready"] = round(t - late["started"], 1)
            else:   # what it saw, for the report if it does not log in during the flood
                try:
                    st = ov.status("gamma")
                    gamma_seen[round(t, 1)] = {k: st.get(k) for k in ("cloud", "drops", "errors", "sockets")}
                except (OSError, ValueError, KeyError) as exc:
                    gamma_seen[round(t, 1)] = f"status: {exc}"
        return {n: _sampled(lambda: ov.status(n)["cloud"]["state"])() for n in ("alpha", "beta")}

    def gamma_ready() -> bool:
        log = open(ov.nodes["gamma"]["log"]).read()
        return all(k in log for k in ("registered:", "interface cy0"))

    run = under_flood(lab, flood, sample=sample, sample_every_s=1.0)
    if "started" in late and "ready" not in late:       # for the report: how late, if at all
        end = time.monotonic() + 10
        while time.monotonic() < end and not gamma_ready():
            time.sleep(0.2)
        late["ready_after_flood_start_s"] = round(time.monotonic() - flood.started, 1) if gamma_ready() else None
    time.sleep(1.0)
    growth, udp = _growth(rss0, _rss(pids)), _delta(udp_counters(lab, cloud), udp0)
    rep = _delta(replies.read(), rep0)
    enrolled = {n["name"]: n for n in json.loads(ov.cli("nodes", "--json"))}
    with capsys.disabled():
        _report("cloud control channel", None, run,
                {"logged-in nodes": sorted({str(s) for _, s in run["samples"]}),
                 "new node": late, "rss growth kB": growth, "target udp": udp,
                 "replies to spoofed sources": rep})
    bad = _check_attack(run, udp) + _check_rss(growth)
    bad += [f"logged-in nodes {s} at +{t} s" for t, s in run["samples"] if s != {"alpha": "ready", "beta": "ready"}]
    if "started" not in late:
        bad.append("the new node was never started")
    elif "ready" not in late:
        bad.append(f"the new node did not log in during the flood ({late}): "
                   + open(ov.nodes["gamma"]["log"]).read()[-1500:]
                   + f"; its status in the flood's last seconds: {dict(list(gamma_seen.items())[-2:])}"
                   + f"; the cloud's stats: {_cloud_stats(ov)}")
    if "gamma" not in enrolled or not all(enrolled.get(n, {}).get("registered") for n in ("alpha", "beta", "gamma")):
        bad.append(f"after the flood: {enrolled}")
    assert not bad, bad
