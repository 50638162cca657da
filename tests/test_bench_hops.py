"""lab.bench.hops.pair: following each ping echo through four tcpdump points (pure)."""

from lab.bench import hops


def _points(echoes, stray_wire=(), lost=()):
    """tcpdump-like (t, line) lists for echoes starting at the given times (seconds), each hop
    taking a known time; ``lost``: echoes whose request never reaches n2's TUN."""
    clear, wire, peer_wire, peer_clear = [], [], [], []
    for i, t1 in enumerate(echoes):
        t2 = t1 + 300e-6
        t3 = t2 + 5e-6
        wire.append((t2, "IP a > b: UDP"))
        peer_wire.append((t3, "IP a > b: UDP"))
        clear.append((t1, f"IP x > y: ICMP echo request, id 1, seq {i}"))
        if i in lost:
            continue
        t4 = t3 + 180e-6
        t5 = t4 + 20e-6
        t6 = t5 + 70e-6
        t7 = t6 + 10e-6
        t8 = t7 + 140e-6
        peer_clear += [(t4, "ICMP echo request"), (t5, "ICMP echo reply")]
        peer_wire.append((t6, "IP b > a: UDP"))
        wire.append((t7, "IP b > a: UDP"))
        clear.append((t8, f"IP y > x: ICMP echo reply, id 1, seq {i}"))
    wire += [(t, "IP a > b: UDP keepalive") for t in stray_wire]
    return sorted(clear), sorted(wire), sorted(peer_wire), sorted(peer_clear)


def test_each_hop_is_measured_per_echo():
    med = hops.medians_us(hops.pair(*_points([1.0, 1.1, 1.2])))
    assert med == {"out": 300, "peer_in": 180, "peer_kernel": 20, "peer_out": 70, "wire": 15, "back": 140,
                   "total": 725, "paired": 3}


def test_a_lost_echo_is_left_out_and_does_not_shift_the_others():
    med = hops.medians_us(hops.pair(*_points([1.0, 1.1, 1.2, 1.3], lost={1})))
    assert med["paired"] == 3
    assert (med["out"], med["back"], med["total"]) == (300, 140, 725)


def test_a_stray_datagram_before_the_answer_does_not_count_as_it():
    # a keepalive on the sender's wire after n2 answered, before the answer arrives: the
    # answer's own arrival (the last datagram before the clear answer) is kept
    med = hops.medians_us(hops.pair(*_points([1.0, 1.1], stray_wire=[1.00058, 1.10058])))
    assert (med["back"], med["total"], med["paired"]) == (140, 725, 2)


def test_an_answer_later_than_the_limit_is_left_out():
    assert hops.pair(*_points([1.0]), max_rtt_s=0.0005)["total"] == []


def test_nothing_captured_pairs_nothing():
    assert hops.medians_us(hops.pair([], [], [], [])) == {**{h: None for h in hops.HOPS}, "paired": 0}


def test_parse_reads_tcpdump_nano_stamps():
    text = ("tcpdump: verbose output suppressed\n"
            "1765065600.123456789 IP 100.64.0.8 > 100.64.0.2: ICMP echo request, id 7, seq 1, length 64\n"
            "garbage\n")
    assert hops.parse(text) == [(1765065600.123456789,
                                 "1765065600.123456789 IP 100.64.0.8 > 100.64.0.2: ICMP echo request, id 7, "
                                 "seq 1, length 64")]


def _sh(script):
    import subprocess
    return subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_capture_is_awaited_until_tcpdump_says_it_listens():
    import time
    p = _sh('echo "tcpdump: verbose output suppressed" >&2; sleep 0.2; echo "listening on eth0" >&2; exec sleep 30')
    try:
        hops._await_listening(p, time.monotonic() + 20)
        assert p.poll() is None
    finally:
        p.kill()
        p.communicate()


def test_a_capture_that_ends_or_stays_silent_is_an_error():
    import time
    import pytest
    p = _sh('echo "tcpdump: eth9: No such device exists" >&2; exit 1')
    with pytest.raises(RuntimeError, match="No such device"):
        hops._await_listening(p, time.monotonic() + 20)
    p.communicate()
    p = _sh("exec sleep 30")
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            hops._await_listening(p, time.monotonic() + 0.3)
    finally:
        p.kill()
        p.communicate()


def test_a_capture_that_cannot_start_is_reported_not_raised():
    """measure() with a tcpdump that fails: the path gets an error row, the bench goes on."""
    import subprocess
    import types

    class Lab:
        execs = 0

        def spawn(self, host, argv, **kw):
            return subprocess.Popen(["sh", "-c", 'echo "tcpdump: cy9: No such device exists" >&2; exit 1'],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def exec(self, *a, **kw):
            Lab.execs += 1

    bench = types.SimpleNamespace(lab=Lab(), h={"n1": "n1", "n2": "n2"},
                                  path_info=lambda p: {"port": 47200, "client": "n1", "target": "100.64.0.2"},
                                  hop_points=lambda p: (("n1", "cy9"), ("n1", "eth0"), "cy0"))
    out = hops.measure(bench, ["cyphonic"], count=1)
    assert "No such device" in out["cyphonic"]["error"] and Lab.execs == 0
