"""The Resolver Module: sans-IO rules on a fake clock, then the asyncio edge against stock ``dig``."""

from __future__ import annotations

import asyncio
import shutil
import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic.dns_server import serve_dns
from cyphonic.resolver import OverlayResolver
from cyphonic.wire.signaling import ErrorCode

C1, C2, C3 = ("10.0.0.2", 40001), ("10.0.0.3", 40002), ("10.0.0.4", 40003)
T0 = 1000.0


def make(**kw) -> OverlayResolver:
    kw.setdefault("self_names", {"Me.ov.test.": "10.100.0.1"})
    kw.setdefault("prefix", "10.100.0.0/16")
    return OverlayResolver("ov.test", **kw)


def query(name: str, rdtype="A", qid: int = 4660, edns: int | bool = False, **kw) -> bytes:
    q = dns.message.make_query(name, rdtype, use_edns=edns, **kw)
    q.id = qid
    return q.to_wire()


def answers(r: OverlayResolver) -> list[tuple[dns.message.Message, object, bool]]:
    return [(dns.message.from_wire(d), c, t) for d, c, t in r.answers_to_send()]


def one(r: OverlayResolver) -> dns.message.Message:
    out = answers(r)
    assert len(out) == 1, out
    return out[0][0]


def a_records(m: dns.message.Message) -> list[str]:
    return [rd.address for rrset in m.answer for rd in rrset if rrset.rdtype == dns.rdatatype.A]


# --- overlay names --------------------------------------------------------------------------


def test_query_is_held_until_tunnel_up_then_answered_with_the_vip():
    r = make()
    r.receive_query(query("peer.ov.test", qid=77, edns=0), C1, T0)
    assert r.answers_to_send() == []
    assert r.resolves_wanted() == [("peer.ov.test", None)]
    assert r.get_timer() == T0 + 5.0
    r.tunnel_up("peer.ov.test", "10.100.0.7", T0 + 0.3)
    (m, client, tcp), = answers(r)
    assert client == C1 and tcp is False and m.id == 77
    assert m.rcode() == dns.rcode.NOERROR
    assert m.flags & dns.flags.QR and m.flags & dns.flags.AA and m.flags & dns.flags.RA
    assert str(m.question[0].name) == "peer.ov.test." and m.question[0].rdtype == dns.rdatatype.A
    assert a_records(m) == ["10.100.0.7"] and m.answer[0].ttl == 30
    assert r.get_timer() is None and r.pending_count() == 0
    assert r.counters["answered_a"] == 1 and r.counters["overlay_queries"] == 1
    # remembered: the next query is answered at once, no resolve
    r.receive_query(query("PEER.ov.test."), C2, T0 + 1)
    assert a_records(one(r)) == ["10.100.0.7"]
    assert r.resolves_wanted() == []


def test_several_queries_for_one_name_wait_together_one_resolve():
    r = make()
    r.receive_query(query("peer.ov.test", qid=1), C1, T0)
    r.receive_query(query("Peer.OV.Test", qid=2), C2, T0 + 0.1)
    r.receive_query(query("peer.ov.test", qid=3), C3, T0 + 0.2, tcp=True)
    r.receive_query(query("peer.ov.test", qid=1), C1, T0 + 1.0)   # retransmission: not held twice
    assert r.resolves_wanted() == [("peer.ov.test", None)]
    assert r.pending_count() == 3 and r.drops["duplicate_held"] == 1
    r.tunnel_up("peer.ov.test.", "10.100.0.7", T0 + 2)
    out = answers(r)
    assert sorted((m.id, c, t) for m, c, t in out) == [(1, C1, False), (2, C2, False), (3, C3, True)]
    assert all(a_records(m) == ["10.100.0.7"] for m, _, _ in out)
    # the question is echoed with the client's case (0x20 randomisation)
    assert [str(m.question[0].name) for m, _, _ in out if m.id == 2] == ["Peer.OV.Test."]


@pytest.mark.parametrize("code, rcode", [
    (ErrorCode.UNKNOWN_PEER, dns.rcode.NXDOMAIN),
    (ErrorCode.POLICY_DENIED, dns.rcode.REFUSED),
    (ErrorCode.PEER_UNREACHABLE, dns.rcode.SERVFAIL),
    (ErrorCode.RELAY_UNAVAILABLE, dns.rcode.SERVFAIL),
    (ErrorCode.NOT_REGISTERED, dns.rcode.SERVFAIL),
    (ErrorCode.INTERNAL, dns.rcode.SERVFAIL),
    (ErrorCode.RATE_LIMITED, dns.rcode.SERVFAIL),
])
def test_tunnel_failed_answers_by_code(code, rcode):
    r = make()
    r.receive_query(query("peer.ov.test", edns=0), C1, T0)
    r.receive_query(query("peer.ov.test", qid=9), C2, T0)
    r.tunnel_failed("peer.ov.test", code, T0 + 1)
    out = answers(r)
    assert len(out) == 2 and all(m.rcode() == rcode and not m.answer for m, _, _ in out)
    with_edns = [m for m, c, _ in out if c == C1][0]
    ede = [o for o in with_edns.options if o.otype == dns.edns.OptionType.EDE]
    assert ede and ede[0].text == code.describe()
    assert r.get_timer() is None and r.pending_count() == 0


def test_hold_timeout_is_servfail_and_a_later_query_resolves_again():
    r = make(hold_s=2.0)
    r.receive_query(query("slow.ov.test"), C1, T0)
    r.receive_query(query("slow.ov.test", qid=5), C2, T0 + 1)
    assert r.resolves_wanted() == [("slow.ov.test", None)]
    r.handle_timer(T0 + 1.9)
    assert r.answers_to_send() == []
    r.handle_timer(T0 + 2.0)
    (m, c, _), = answers(r)
    assert c == C1 and m.rcode() == dns.rcode.SERVFAIL
    assert r.get_timer() == T0 + 3.0
    r.handle_timer(T0 + 3.0)
    assert one(r).rcode() == dns.rcode.SERVFAIL
    assert r.counters["timeouts"] == 2 and r.counters["servfail"] == 2 and r.get_timer() is None
    r.receive_query(query("slow.ov.test"), C1, T0 + 4)
    assert r.resolves_wanted() == [("slow.ov.test", None)]
    # the tunnel came up late: waiters answered, remembered for the next one
    r.tunnel_up("slow.ov.test", "10.100.0.8", T0 + 4.5)
    assert a_records(one(r)) == ["10.100.0.8"]
    r.tunnel_failed("slow.ov.test", ErrorCode.PEER_UNREACHABLE, T0 + 5)   # nobody waits: forgotten
    assert r.answers_to_send() == []
    r.receive_query(query("slow.ov.test"), C1, T0 + 6)
    assert r.resolves_wanted() == [("slow.ov.test", None)]


def test_pending_is_bounded():
    r = make(max_pending=3)
    for i in range(3):
        r.receive_query(query(f"p{i}.ov.test", qid=i), C1, T0)
    r.receive_query(query("p9.ov.test", qid=9), C1, T0)
    m = one(r)
    assert m.id == 9 and m.rcode() == dns.rcode.SERVFAIL
    assert r.drops["pending_full"] == 1 and len(r.resolves_wanted()) == 3
    r.tunnel_up("p0.ov.test", "10.100.0.10", T0)
    assert a_records(one(r)) == ["10.100.0.10"]
    r.receive_query(query("p9.ov.test", qid=10), C1, T0)   # room again
    assert r.answers_to_send() == [] and r.resolves_wanted() == [("p9.ov.test", None)]


def test_self_names_answered_at_once():
    r = make()
    r.receive_query(query("me.OV.test"), C1, T0)
    m = one(r)
    assert a_records(m) == ["10.100.0.1"] and m.flags & dns.flags.AA
    assert r.resolves_wanted() == []


def test_other_types_are_nodata_bad_names_nxdomain_apex_nodata():
    r = make()
    for name in ("peer.ov.test", "me.ov.test", "ov.test", "OV.TEST."):
        for rdtype in ("AAAA", "MX", "TXT"):
            r.receive_query(query(name, rdtype), C1, T0)
            m = one(r)
            assert m.rcode() == dns.rcode.NOERROR and not m.answer and m.flags & dns.flags.AA, (name, rdtype)
    r.receive_query(query("ov.test", "A"), C1, T0)
    assert one(r).rcode() == dns.rcode.NOERROR
    assert r.resolves_wanted() == []
    for bad in ("_dns-sd._udp.ov.test", "-x.ov.test", "a\\032b.ov.test"):
        r.receive_query(query(bad), C1, T0)
        assert one(r).rcode() == dns.rcode.NXDOMAIN, bad
    assert r.resolves_wanted() == [] and r.forwards_wanted() == []


def test_ptr_for_overlay_addresses():
    r = make()
    r.tunnel_up("peer.ov.test", "10.100.0.7", T0)
    r.receive_query(query("1.0.100.10.in-addr.arpa", "PTR"), C1, T0)
    m = one(r)
    assert [rd.target.to_text() for rd in m.answer[0]] == ["me.ov.test."] and m.flags & dns.flags.AA
    r.receive_query(query("7.0.100.10.IN-ADDR.ARPA.", "PTR"), C1, T0)
    assert [rd.target.to_text() for rd in one(r).answer[0]] == ["peer.ov.test."]
    r.receive_query(query("99.0.100.10.in-addr.arpa", "PTR"), C1, T0)
    assert one(r).rcode() == dns.rcode.NXDOMAIN
    r.receive_query(query("7.0.100.10.in-addr.arpa", "TXT"), C1, T0)
    m = one(r)
    assert m.rcode() == dns.rcode.NOERROR and not m.answer
    # outside the prefix: not ours, forwarded
    r.receive_query(query("7.0.0.192.in-addr.arpa", "PTR"), C1, T0)
    assert r.answers_to_send() == [] and len(r.forwards_wanted()) == 1
    assert make(prefix=None).forwards_wanted() == []


def test_asker_keys_tunnels_per_general_node():
    r = make()
    r.receive_query(query("peer.ov.test", qid=1), C1, T0, asker="gn-a")
    r.receive_query(query("peer.ov.test", qid=2), C2, T0, asker="gn-b")
    assert r.resolves_wanted() == [("peer.ov.test", "gn-a"), ("peer.ov.test", "gn-b")]
    r.tunnel_up("peer.ov.test", "10.100.0.7", T0, asker="gn-a")
    (m, c, _), = answers(r)
    assert c == C1
    r.tunnel_failed("peer.ov.test", ErrorCode.POLICY_DENIED, T0, asker="gn-b")
    (m, c, _), = answers(r)
    assert c == C2 and m.rcode() == dns.rcode.REFUSED


# --- passthrough ----------------------------------------------------------------------------


def upstream_reply(data: bytes, new_id: int, address: str = "192.0.2.7", extra: int = 0) -> bytes:
    q = dns.message.from_wire(data)
    resp = dns.message.make_response(q)
    resp.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", address))
    for i in range(extra):
        resp.additional.append(dns.rrset.from_text(f"x{i}.example.com.", 60, "IN", "TXT", '"' + "y" * 200 + '"'))
    wire = bytearray(resp.to_wire())
    struct.pack_into("!H", wire, 0, new_id)
    return bytes(wire)


def test_passthrough_forwards_and_restores_the_id():
    r = make()
    data = query("Example.COM", qid=0xBEEF)
    r.receive_query(data, C1, T0)
    assert r.answers_to_send() == [] and r.resolves_wanted() == []
    (token, sent), = r.forwards_wanted()
    assert sent == data and r.forward_pending(token)
    # the edge rewrote the id on the way out: the reply comes back with its id
    reply = upstream_reply(b"\x12\x34" + sent[2:], 0x1234)
    other = upstream_reply(query("evil.example"), 0x1234)
    r.upstream_answer(token, other, T0)                      # wrong question: ignored, still waiting
    assert r.answers_to_send() == [] and r.drops["upstream_mismatch"] == 1 and r.forward_pending(token)
    r.upstream_answer(token, reply, T0 + 0.1)
    (m, c, tcp), = answers(r)
    assert c == C1 and not tcp and m.id == 0xBEEF and a_records(m) == ["192.0.2.7"]
    assert not r.forward_pending(token) and r.counters["forwarded"] == 1
    r.upstream_answer(token, reply, T0 + 0.2)                # a duplicate reply: nobody waits
    assert r.answers_to_send() == [] and r.drops["upstream_unknown"] == 1


def test_forward_retransmission_reuses_token_timeout_and_failure_are_servfail():
    r = make(hold_s=3.0, max_forwards=2)
    r.receive_query(query("a.example", qid=1), C1, T0)
    r.receive_query(query("a.example", qid=1), C1, T0 + 1)   # client retransmits
    (t1, _), (t1b, _) = r.forwards_wanted()
    assert t1 == t1b
    r.receive_query(query("b.example", qid=2), C1, T0 + 1)
    (t2, _), = r.forwards_wanted()
    r.receive_query(query("c.example", qid=3), C1, T0 + 1)   # over the bound
    assert one(r).rcode() == dns.rcode.SERVFAIL and r.drops["forwards_full"] == 1
    r.upstream_failed(t2, T0 + 2)
    m = one(r)
    assert m.id == 2 and m.rcode() == dns.rcode.SERVFAIL
    assert r.get_timer() == T0 + 3.0
    r.handle_timer(T0 + 3.0)
    m = one(r)
    assert m.id == 1 and m.rcode() == dns.rcode.SERVFAIL and r.counters["timeouts"] == 1


def test_large_upstream_answer_to_a_plain_udp_client_is_truncated():
    r = make()
    data = query("big.example", qid=42)
    r.receive_query(data, C1, T0)
    (token, sent), = r.forwards_wanted()
    r.upstream_answer(token, upstream_reply(sent, 7, extra=4), T0)
    m = one(r)
    assert m.id == 42 and m.flags & dns.flags.TC and not m.answer
    r.receive_query(data, C1, T0, tcp=True)                # the client retries over TCP: whole answer
    (token, sent), = r.forwards_wanted()
    big = upstream_reply(sent, 7, extra=4)
    r.upstream_answer(token, big, T0)
    (m, _, tcp), = answers(r)
    assert tcp and not m.flags & dns.flags.TC and len(m.additional) == 4


def test_no_passthrough_is_refused():
    r = make(passthrough=False)
    r.receive_query(query("example.com"), C1, T0)
    assert one(r).rcode() == dns.rcode.REFUSED
    assert r.forwards_wanted() == [] and r.counters["refused"] == 1


# --- malformed and unsupported --------------------------------------------------------------


def test_opcode_qdcount_class_edns_version():
    r = make()
    for opcode in (dns.opcode.NOTIFY, dns.opcode.STATUS, dns.opcode.UPDATE, 3):
        wire = bytearray(query("peer.ov.test", qid=11))
        wire[2] = (wire[2] & 0x87) | (opcode << 3)
        r.receive_query(bytes(wire), C1, T0)
        m = one(r)
        assert m.rcode() == dns.rcode.NOTIMP and m.id == 11 and m.opcode() == opcode
    wire = bytearray(query("peer.ov.test"))
    wire[2] |= 0x80                                          # a response: never answered
    r.receive_query(bytes(wire), C1, T0)
    assert r.answers_to_send() == [] and r.drops["not_query"] == 1
    no_q = struct.pack("!HHHHHH", 12, 0x0100, 0, 0, 0, 0)
    r.receive_query(no_q, C1, T0)
    assert one(r).rcode() == dns.rcode.FORMERR
    two = dns.message.make_query("a.ov.test", "A")
    two.question.append(dns.rrset.RRset(dns.name.from_text("b.ov.test"), dns.rdataclass.IN, dns.rdatatype.A))
    r.receive_query(two.to_wire(), C1, T0)
    assert one(r).rcode() == dns.rcode.FORMERR
    r.receive_query(query("version.bind", "TXT", rdclass="CH"), C1, T0)
    assert one(r).rcode() == dns.rcode.REFUSED
    r.receive_query(query("ov.test", "AXFR"), C1, T0, tcp=True)
    assert one(r).rcode() == dns.rcode.REFUSED
    r.receive_query(query("peer.ov.test", edns=1), C1, T0)
    assert one(r).rcode() == dns.rcode.BADVERS
    assert r.resolves_wanted() == [] and r.forwards_wanted() == [] and r.drops["internal"] == 0


def test_every_truncation_of_a_real_query_is_formerr_or_dropped():
    r = make()
    data = query("peer.ov.test", qid=0x4242, edns=0)
    for n in range(len(data)):
        r.receive_query(data[:n], C1, T0)
        out = r.answers_to_send()
        if n < 12:
            assert out == []
        else:
            (resp, _, _), = out
            assert resp[:2] == b"\x42\x42" and dns.message.from_wire(resp).rcode() == dns.rcode.FORMERR
    assert r.drops["short"] == 12 and r.counters["formerr"] == len(data) - 12
    assert r.resolves_wanted() == [] and r.drops["internal"] == 0
    r.receive_query(data + b"\x00", C1, T0)                  # trailing junk
    assert one(r).rcode() == dns.rcode.FORMERR
    pointer = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\xc0\x00" + b"\x00\x01\x00\x01"
    r.receive_query(pointer, C1, T0)                         # question name pointing into the header
    assert one(r).rcode() == dns.rcode.FORMERR and r.forwards_wanted() == []
    assert r.drops["internal"] == 0


def check_garbage(data: bytes, tcp: bool) -> None:
    r = make()
    r.receive_query(data, C1, T0, tcp=tcp)
    r.handle_timer(T0 + 10)
    assert r.drops["internal"] == 0
    for resp, _, _ in r.answers_to_send():
        m = dns.message.from_wire(resp)
        assert m.flags & dns.flags.QR and resp[:2] == data[:2]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_never_raise(data, tcp):
    check_garbage(data, tcp)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), max_size=6), st.booleans())
def test_mutated_queries_never_raise(edits, tcp):
    data = bytearray(query("peer.ov.test", edns=0))
    for pos, value in edits:
        data[pos % len(data)] = value
    check_garbage(bytes(data), tcp)


def test_internal_errors_are_contained():
    r = make()
    r.receive_query(query("peer.ov.test"), C1, T0, asker=["unhashable"])
    assert r.drops["internal"] == 1
    r.tunnel_up("peer.ov.test", "not an address", T0)
    r.tunnel_failed("peer.ov.test", 9999, T0)
    r.upstream_answer(12345, b"", T0)
    r.upstream_failed(12345, T0)
    assert r.drops["bad_tunnel_up"] == 1 and r.drops["upstream_unknown"] == 2


# --- real sockets and stock dig -------------------------------------------------------------


class FakeUpstream(asyncio.DatagramProtocol):
    """A tiny DNS server: every A query is answered 192.0.2.7."""

    def connection_made(self, transport):
        self.transport = transport
        self.seen = []

    def datagram_received(self, data, addr):
        q = dns.message.from_wire(data)
        self.seen.append(q)
        resp = dns.message.make_response(q)
        resp.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.7"))
        self.transport.sendto(resp.to_wire(), addr)


async def dig(port: int, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=3", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode()


def test_stock_dig_against_the_server():
    assert shutil.which("dig"), "needs dig: `make setup` installs bind9-dnsutils"
    async def scenario():
        loop = asyncio.get_running_loop()
        up_transport, upstream = await loop.create_datagram_endpoint(FakeUpstream, local_addr=("127.0.0.1", 0))
        up_port = up_transport.get_extra_info("sockname")[1]
        resolver = make(hold_s=1.0)
        box = {}
        asked = []

        def later(fn, *args):
            def fire():
                fn(*args, time.time())
                box["server"].flush()
            loop.call_later(0.05, fire)

        def on_resolve(fqdn, asker):   # the fake engine
            asked.append(fqdn)
            if fqdn == "peer.ov.test":
                later(resolver.tunnel_up, fqdn, "10.100.0.7")
            elif fqdn == "denied.ov.test":
                later(resolver.tunnel_failed, fqdn, ErrorCode.POLICY_DENIED)
            elif fqdn == "up.ov.test":
                return "10.100.0.9"                   # already up: engine.resolve returns the VIP
            elif fqdn != "silent.ov.test":
                later(resolver.tunnel_failed, fqdn, ErrorCode.UNKNOWN_PEER)
            return None

        server = await serve_dns(resolver, "127.0.0.1", 0, on_resolve=on_resolve,
                                 upstream=("127.0.0.1", up_port))
        box["server"] = server
        port = server.port
        try:
            t0 = time.monotonic()
            a, a_tcp, up, unknown, denied, ext, silent, me_tcp = await asyncio.gather(
                dig(port, "peer.ov.test", "A", "+short"),
                dig(port, "peer.ov.test", "A", "+short", "+tcp"),
                dig(port, "up.ov.test", "A", "+short"),
                dig(port, "nobody.ov.test", "A"),
                dig(port, "denied.ov.test", "A"),
                dig(port, "example.com", "A", "+short"),
                dig(port, "silent.ov.test", "A"),
                dig(port, "me.ov.test", "A", "+tcp", "+short"),
            )
            elapsed = time.monotonic() - t0
            assert a.split() == ["10.100.0.7"], a
            assert a_tcp.split() == ["10.100.0.7"], a_tcp
            assert up.split() == ["10.100.0.9"], up
            assert "status: NXDOMAIN" in unknown, unknown
            assert "status: REFUSED" in denied, denied
            assert ext.split() == ["192.0.2.7"], ext
            assert "status: SERVFAIL" in silent, silent
            assert me_tcp.split() == ["10.100.0.1"], me_tcp
            assert elapsed < 3.0
            # one resolve for peer.ov.test although two queries asked at once
            assert sorted(asked) == sorted(set(asked))
            # the PTR of the peer is known now
            ptr = await dig(port, "-x", "10.100.0.7", "+short")
            assert ptr.split() == ["peer.ov.test."], ptr
            assert len(upstream.seen) == 1
            assert resolver.drops["internal"] == 0 and not server.errors, (resolver.drops, server.errors)
        finally:
            server.close()
            await server.wait_closed()
            up_transport.close()

    asyncio.run(scenario())


def test_forward_without_upstream_is_servfail_and_tcp_framing_by_hand():
    async def scenario():
        resolver = make()
        server = await serve_dns(resolver, "127.0.0.1", 0, on_resolve=lambda f, a: None, upstream=None)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            for qid, name in ((1, "me.ov.test"), (2, "example.com")):   # pipelined on one connection
                data = query(name, qid=qid)
                writer.write(struct.pack("!H", len(data)) + data)
            await writer.drain()
            got = {}
            for _ in range(2):
                (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 3))
                m = dns.message.from_wire(await reader.readexactly(n))
                got[m.id] = m
            assert a_records(got[1]) == ["10.100.0.1"]
            assert got[2].rcode() == dns.rcode.SERVFAIL
            writer.write(b"\x00\x00")                                # zero length: the server hangs up
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            assert server.errors["upstream_unavailable"] == 1
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
