"""Address configuration (the adapter's DHCP server): appliance/address_config.py (sans-IO rules),
appliance/leases.py (lease table on disk), appliance/dhcp_server.py (the UDP edge).

Tiers, as pyroute2's DHCP tests: pure unit tests with packets built by dhcppython and with
golden packets captured from isc-dhcp-client, busybox udhcpc and dhcpcd
(tests/vectors/dhcp/golden.json, made by tests/vectors/dhcp/capture.py); lease store tests
including a real `kill -9` of a writer; and, marked `root`, the three real clients in network
namespaces against the real server process (also killed with SIGKILL between OFFER and ACK).

Every call of `receive()` here goes through `feed()`, which checks the no-throw boundary: each
datagram is answered, taken without an answer (RELEASE, DECLINE), or counted in exactly one
`drops[reason]`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhcppython import options as dopt
from dhcppython.packet import DHCPPacket

from appliance.address_config import (BROADCAST, DECLINE_HOLD_S, LOG_ONCE_MAX, OFFER_HOLD_S,
                                      Binding, DhcpServer, advertised_mtu)
from appliance.leases import (TRANSITIONS, AddressUnavailable, Event, InvalidTransition,
                              LeaseStore, State)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "tests", "vectors", "dhcp", "golden.json")
with open(VECTORS) as _f:
    GOLDEN = json.load(_f)["clients"]
CLIENTS = sorted(GOLDEN)

MAC = "02:cd:00:00:00:07"          # the MAC of the golden captures
VIP = "100.64.0.7"
SERVER_IP = "100.64.0.254"
OTHER_MAC = "02:cd:00:00:00:08"
OTHER_VIP = "100.64.0.8"
UNKNOWN_MAC = "02:cd:00:00:00:99"
T0 = 1_800_000_000.0
LEASE_S = 3600

o = dopt.options.short_value_to_object


# --- helpers ------------------------------------------------------------------------------

def golden(client: str, label: str) -> list[bytes]:
    return [bytes.fromhex(p["hex"]) for p in GOLDEN[client]["packets"] if p["label"] == label]


def all_golden() -> list[bytes]:
    return [bytes.fromhex(p["hex"]) for c in CLIENTS for p in GOLDEN[c]["packets"]]


class Net:
    """A server with a lease file in a temp dir, a mutable bindings table and a log list."""

    def __init__(self, directory: str, **kw):
        self.table = {MAC: Binding(MAC, VIP, "gn"), OTHER_MAC: Binding(OTHER_MAC, OTHER_VIP, "gn2")}
        self.logs: list[str] = []
        self.path = os.path.join(directory, "leases.json")
        self.store = LeaseStore(self.path, log=self.logs.append)
        args = dict(server_ip=SERVER_IP, netmask="255.255.255.0", router=SERVER_IP, dns=SERVER_IP,
                    domain="ov.example", mtu=advertised_mtu(), lease_s=LEASE_S)
        args.update(kw)
        self.server = DhcpServer(**args, bindings=self.table.get, leases=self.store,
                                 log=self.logs.append)
        self.now = T0

    def _tally(self):
        c = self.server.counters
        return sum(self.server.drops.values()), c["released"] + c["declined"]

    def feed(self, data: bytes, advance: float = 1.0):
        """receive() with the no-throw check: each datagram is answered, or taken without an
        answer (RELEASE, DECLINE), or counted in exactly one drop."""
        self.now += advance
        drops, taken = self._tally()
        replies = self.server.receive(data, self.now)
        drops2, taken2 = self._tally()
        assert isinstance(replies, list)
        assert (bool(replies), taken2 - taken, drops2 - drops) in {(True, 0, 0), (False, 1, 0), (False, 0, 1)}, \
            (replies, self.server.drops)
        return replies


@pytest.fixture
def net(tmp_path):
    return Net(str(tmp_path))


def decode(reply) -> tuple[DHCPPacket, dict[int, bytes]]:
    pkt = DHCPPacket.from_bytes(reply.data)
    return pkt, {opt.code: opt.data for opt in pkt.options if opt.code not in (0, 255)}


def codes(reply) -> list[int]:
    return [opt.code for opt in DHCPPacket.from_bytes(reply.data).options if opt.code not in (0, 255)]


def msg(reply) -> int:
    return decode(reply)[1][53][0]


def ip(b: bytes) -> str:
    return str(ipaddress.IPv4Address(b))


def u32(b: bytes) -> int:
    return int.from_bytes(b, "big")


PRL = [1, 3, 6, 15, 26, 28, 51, 54, 58, 59]


def discover(mac=MAC, *, prl=PRL, broadcast=True, xid=0x1234, extra=(), relay=None):
    opts = dopt.OptionList([o(55, prl)] + list(extra)) if prl is not None else dopt.OptionList(list(extra))
    return DHCPPacket.Discover(mac, tx_id=xid, use_broadcast=broadcast, relay=relay,
                               option_list=opts).asbytes


def request(mac=MAC, *, requested=None, server_id=None, ciaddr="0.0.0.0", broadcast=False,
            xid=0x1234, relay=None):
    opts = [o(55, PRL)]
    if requested:
        opts.append(o(50, requested))
    if server_id:
        opts.append(o(54, server_id))
    return DHCPPacket.Request(mac, 0, xid, use_broadcast=broadcast, relay=relay,
                              client_ip=ipaddress.IPv4Address(ciaddr),
                              option_list=dopt.OptionList(opts)).asbytes


def with_type(data: bytes, mtype: str, *opts, ciaddr: str | None = None) -> bytes:
    """A dhcppython REQUEST turned into another client message type (DECLINE, RELEASE, INFORM)."""
    pkt = DHCPPacket.from_bytes(data)
    pkt.options = dopt.OptionList([o(53, mtype), *opts])
    if ciaddr is not None:
        pkt.ciaddr = ipaddress.IPv4Address(ciaddr)
    return pkt.asbytes


def bind(net: Net, mac=MAC, vip=VIP):
    [offer] = net.feed(discover(mac))
    [ack] = net.feed(request(mac, requested=vip, server_id=SERVER_IP))
    assert msg(offer) == 2 and msg(ack) == 5
    return ack


# --- DORA ---------------------------------------------------------------------------------

def test_dora_with_dhcppython_packets(net):
    [offer] = net.feed(discover(xid=0xCAFE))
    pkt, opts = decode(offer)
    assert (pkt.op, msg(offer), str(pkt.yiaddr), pkt.xid) == ("BOOTREPLY", 2, VIP, 0xCAFE)
    assert str(pkt.ciaddr) == "0.0.0.0" and pkt.chaddr.lower() == MAC
    assert (offer.ip, offer.mac, offer.port) == (BROADCAST, "ff:ff:ff:ff:ff:ff", 68)   # flag set
    assert net.store.get(MAC).state is State.OFFERED
    [ack] = net.feed(request(requested=VIP, server_id=SERVER_IP, xid=0xCAFE))
    pkt, opts = decode(ack)
    assert (msg(ack), str(pkt.yiaddr), pkt.xid) == (5, VIP, 0xCAFE)
    lease = LeaseStore(net.path).get(MAC)                  # on disk before the ACK went out
    assert (lease.vip, lease.state, lease.expires) == (VIP, State.BOUND, net.now + LEASE_S)
    assert net.server.counters["tx_OFFER"] == 1 and net.server.counters["tx_ACK"] == 1


def test_options_present_with_right_values(net):
    [offer] = net.feed(discover())
    _, opts = decode(offer)
    assert ip(opts[1]) == "255.255.255.0"
    assert ip(opts[3]) == SERVER_IP and ip(opts[6]) == SERVER_IP and ip(opts[54]) == SERVER_IP
    assert opts[15] == b"ov.example"
    assert int.from_bytes(opts[26], "big") == advertised_mtu() == 1408   # 1500 - 48 - 12 - 32
    assert (u32(opts[51]), u32(opts[58]), u32(opts[59])) == (3600, 1800, 3150)   # T1 50 %, T2 87.5 %
    [ack] = net.feed(request(requested=VIP, server_id=SERVER_IP))
    assert decode(ack)[1] | {53: b"\x05"} == opts | {53: b"\x05"}


def test_option_order_follows_parameter_request_list(net):
    [offer] = net.feed(discover(prl=[26, 3, 15, 1, 6]))
    got = codes(offer)
    assert got[:2] == [53, 54]
    # requested order, but the subnet mask moved before the router (RFC 2132 3.3)
    assert got[2:7] == [26, 1, 3, 15, 6]
    assert set(got) >= {1, 3, 6, 15, 26, 51, 54, 58, 59}


@pytest.mark.parametrize("prl", [None, [], [12, 42, 121]])
def test_required_options_always_present(net, prl):
    [offer] = net.feed(discover(prl=prl))
    assert set(codes(offer)) >= {1, 3, 6, 51, 54}


@pytest.mark.parametrize("client", CLIENTS)
def test_dora_with_golden_packets(net, client):
    disc, req = golden(client, "discover")[0], golden(client, "request_selecting")[0]
    [offer] = net.feed(disc)
    pkt, opts = decode(offer)
    assert msg(offer) == 2 and str(pkt.yiaddr) == VIP
    assert pkt.xid == DHCPPacket.from_bytes(disc).xid
    # none of the three sets the broadcast flag: RFC 2131 says unicast to yiaddr/chaddr, which
    # the edge cannot do before the client has the address, so it broadcasts (Reply.link_unicast)
    assert (offer.ip, offer.mac, offer.link_unicast) == (VIP, MAC, True)
    client_opts = {opt.code: opt.data for opt in DHCPPacket.from_bytes(disc).options}
    if 61 in client_opts:                                   # udhcpc, dhcpcd: echoed (RFC 6842)
        assert opts[61] == client_opts[61]
    prl = [c for c in client_opts.get(55, b"") if c in {1, 3, 6, 15, 26, 51, 58, 59}]
    assert prl[0] == 1                       # all three ask for the subnet mask first
    assert [c for c in codes(offer) if c in prl] == prl          # in the order they asked
    [ack] = net.feed(req)
    pkt, opts = decode(ack)
    assert msg(ack) == 5 and str(pkt.yiaddr) == VIP and ack.link_unicast
    assert int.from_bytes(opts[26], "big") == 1408 and u32(opts[51]) == LEASE_S
    assert net.store.get(MAC).state is State.BOUND


def test_rapid_commit_is_ignored(net):
    """dhcpcd asks for rapid commit (option 80): we answer OFFER, never a two-message ACK."""
    disc = golden("dhcpcd", "discover")[0]
    assert 80 in {opt.code for opt in DHCPPacket.from_bytes(disc).options}
    [reply] = net.feed(disc)
    assert msg(reply) == 2 and 80 not in codes(reply)
    assert net.server.counters["rapid_commit_ignored"] == 1
    assert net.store.get(MAC).state is State.OFFERED


EXPECT = {"discover": 2, "discover_requested_ip": 2, "request_selecting": 5, "request_init_reboot": 5,
          "request_renew": 5, "request_rebind": 5, "release": None, "decline": None}


@pytest.mark.parametrize("client", CLIENTS)
def test_replay_of_real_conversations(net, client):
    """Each client's captured conversation (DORA, renew, rebind, INIT-REBOOT, release, DECLINE)
    replayed in order gets the answers the real clients got."""
    declined = False
    for p in GOLDEN[client]["packets"]:
        replies = net.feed(bytes.fromhex(p["hex"]))
        want = None if declined else EXPECT[p["label"]]
        assert [msg(r) for r in replies] == ([want] if want else []), p["label"]
        if p["label"] in ("request_renew", "request_rebind"):
            # ciaddr set: unicast to it (renew and rebind alike; the edge sends normal UDP)
            [r] = replies
            assert (r.ip, r.link_unicast, str(decode(r)[0].ciaddr)) == (VIP, False, VIP)
        if p["label"] == "release":
            assert net.store.get(MAC).state is State.RELEASED
        if p["label"] == "decline":
            declined = True
            assert net.store.declined_until(VIP, net.now) == net.now + DECLINE_HOLD_S
            assert any("DECLINED" in line and VIP in line for line in net.logs)


# --- REQUEST variants ---------------------------------------------------------------------

def test_renew_and_rebind_extend_the_lease(net):
    bind(net)
    first = net.store.get(MAC).expires
    [ack] = net.feed(request(ciaddr=VIP), advance=1800)              # RENEWING (unicast)
    assert msg(ack) == 5 and (ack.ip, ack.mac, ack.port) == (VIP, MAC, 68)
    assert not ack.link_unicast and str(decode(ack)[0].ciaddr) == VIP
    assert net.store.get(MAC).expires == first + 1800
    [ack] = net.feed(request(ciaddr=VIP, broadcast=True), advance=1500)   # REBINDING
    assert msg(ack) == 5 and ack.ip == VIP                          # ciaddr wins over the flag
    assert net.store.get(MAC).expires == first + 3300


def test_init_reboot_without_server_id(net):
    [ack] = net.feed(request(requested=VIP))
    assert msg(ack) == 5 and net.store.get(MAC).state is State.BOUND


@pytest.mark.parametrize("kind", ["selecting", "init_reboot", "renewing"])
def test_nak_for_a_wrong_address(net, kind):
    bind(net)
    wrong = "100.64.0.99"
    data = {"selecting": request(requested=wrong, server_id=SERVER_IP),
            "init_reboot": request(requested=wrong),
            "renewing": request(ciaddr=wrong)}[kind]
    [nak] = net.feed(data)
    pkt, opts = decode(nak)
    assert msg(nak) == 6 and str(pkt.yiaddr) == "0.0.0.0" and str(pkt.ciaddr) == "0.0.0.0"
    assert ip(opts[54]) == SERVER_IP and b"not yours" in opts[56]
    assert not {1, 3, 6, 51, 58, 59} & set(opts)
    assert nak.ip == BROADCAST                                     # NAK: always broadcast
    assert net.server.counters["nak_wrong_address"] == 1
    assert net.store.get(MAC).state is State.BOUND                  # the real lease is untouched


def test_request_for_another_server_is_ignored(net):
    net.feed(discover())
    assert net.store.get(MAC).state is State.OFFERED
    assert net.feed(request(requested=VIP, server_id="100.64.0.1")) == []
    assert net.server.drops["other_server"] == 1
    assert net.store.get(MAC) is None                                # our offer withdrawn


def test_request_without_address_is_dropped(net):
    assert net.feed(request()) == []
    assert net.feed(request(server_id=SERVER_IP)) == []             # SELECTING without option 50
    assert net.server.drops["bad_request"] == 2


# --- INFORM, RELEASE, DECLINE -------------------------------------------------------------

def test_inform_gets_options_but_no_lease(net):
    data = with_type(request(ciaddr=VIP), "DHCPINFORM", o(55, PRL))
    [ack] = net.feed(data)
    pkt, opts = decode(ack)
    assert msg(ack) == 5 and str(pkt.yiaddr) == "0.0.0.0" and str(pkt.ciaddr) == VIP
    assert {1, 3, 6, 15, 26, 54} <= set(opts) and not {51, 58, 59} & set(opts)
    assert (ack.ip, ack.link_unicast) == (VIP, False)
    assert net.store.get(MAC) is None


def test_release(net):
    bind(net)
    rel = with_type(request(), "DHCPRELEASE", o(54, SERVER_IP), ciaddr=VIP)
    assert net.feed(rel) == []
    assert net.server.counters["released"] == 1
    assert net.store.get(MAC).state is State.RELEASED and net.store.holder(VIP, net.now) is None
    assert LeaseStore(net.path).get(MAC).state is State.RELEASED
    assert net.feed(with_type(request(), "DHCPRELEASE", ciaddr="100.64.0.99")) == []
    assert net.server.drops["release_unknown"] == 1
    [offer] = net.feed(discover())                                   # and it can come back
    assert msg(offer) == 2


def test_decline_holds_the_address_back_and_logs_loudly(net):
    bind(net)
    dec = with_type(request(), "DHCPDECLINE", o(50, VIP), o(54, SERVER_IP))
    assert net.feed(dec) == []
    assert net.server.counters["declined"] == 1
    loud = [l for l in net.logs if "DECLINED" in l]
    assert len(loud) == 1 and VIP in loud[0] and "something else on the LAN" in loud[0]
    assert net.store.get(MAC) is None
    assert net.feed(discover()) == [] and net.server.drops["address_declined"] == 1
    [nak] = net.feed(request(requested=VIP))
    assert msg(nak) == 6 and net.server.counters["nak_declined"] == 1
    assert net.feed(dec) == [] and net.server.drops["decline_repeated"] == 1
    assert len([l for l in net.logs if "DECLINED" in l]) == 1      # repeated: counted, not logged
    assert LeaseStore(net.path).declined_until(VIP, net.now) is not None   # survives a restart
    [offer] = net.feed(discover(), advance=DECLINE_HOLD_S)
    assert msg(offer) == 2


def test_decline_of_another_address_is_dropped(net):
    bind(net)
    assert net.feed(with_type(request(), "DHCPDECLINE", o(50, "100.64.0.99"))) == []
    assert net.server.drops["decline_foreign"] == 1
    assert net.store.get(MAC).state is State.BOUND


# --- who is answered ----------------------------------------------------------------------

def test_unknown_mac_gets_nothing_and_is_logged_once(net):
    for data in [discover(UNKNOWN_MAC)] * 5 + [request(UNKNOWN_MAC, requested=VIP),
                                                request(UNKNOWN_MAC, ciaddr=VIP)]:
        assert net.feed(data) == []
    assert net.server.drops["unknown_mac"] == 7
    assert len([l for l in net.logs if UNKNOWN_MAC in l]) == 1
    assert net.store.leases() == []


def test_log_once_memory_is_bounded(net):
    for i in range(LOG_ONCE_MAX + 50):
        mac = "02:ee:" + ":".join(f"{b:02x}" for b in i.to_bytes(4, "big"))
        net.server.receive(discover(mac), net.now)
    assert len(net.server._logged) <= LOG_ONCE_MAX
    assert net.server.drops["unknown_mac"] == LOG_ONCE_MAX + 50


def test_binding_moved_to_another_mac_is_not_handed_out_twice(net):
    bind(net)
    net.table[OTHER_MAC] = Binding(OTHER_MAC, VIP, "gn-new")       # GNM moved the VIP
    assert net.feed(discover(OTHER_MAC)) == []
    assert net.server.drops["address_in_use"] == 1
    [nak] = net.feed(request(OTHER_MAC, requested=VIP))
    assert msg(nak) == 6 and net.server.counters["nak_in_use"] == 1
    assert len([l for l in net.logs if "still leased" in l]) == 1
    # the old holder releases: now the new MAC gets it, and the old one no longer can
    net.feed(with_type(request(), "DHCPRELEASE", ciaddr=VIP))
    [ack] = net.feed(request(OTHER_MAC, requested=VIP))
    assert msg(ack) == 5
    [nak] = net.feed(request(MAC, requested=VIP))
    assert msg(nak) == 6
    assert net.store.holder(VIP, net.now) == OTHER_MAC


def test_bindings_callback_failure_is_a_counted_drop(net):
    def broken(mac):
        raise RuntimeError("GNM down")
    net.server.bindings = broken
    assert net.feed(discover()) == [] and net.server.drops["bindings_error"] == 1


def test_lease_file_write_failure_sends_nothing(tmp_path):
    n = Net(str(tmp_path))
    n.store.path = str(tmp_path / "missing-dir" / "leases.json")
    assert n.feed(discover()) == [] and n.server.drops["store_error"] == 1
    assert n.store.get(MAC) is None                                  # memory == disk
    assert len([l for l in n.logs if "write failed" in l]) == 1


# --- where replies go (RFC 2131 4.1) -------------------------------------------------------

def test_reply_destinations(net):
    [r] = net.feed(discover(broadcast=True))
    assert (r.ip, r.port) == (BROADCAST, 68)
    [r] = net.feed(discover(broadcast=False))
    assert (r.ip, r.mac, r.link_unicast) == (VIP, MAC, True)
    [r] = net.feed(discover(relay="10.9.0.1"))
    assert (r.ip, r.port) == ("10.9.0.1", 67) and str(decode(r)[0].giaddr) == "10.9.0.1"
    [r] = net.feed(request(requested="100.64.0.99", relay="10.9.0.1"))
    assert msg(r) == 6 and r.ip == "10.9.0.1" and decode(r)[0].flags & 0x8000
    [r] = net.feed(request(ciaddr=VIP, broadcast=True))
    assert (r.ip, r.mac, r.port) == (VIP, MAC, 68)


# --- malformed input ----------------------------------------------------------------------

HEADER = golden("udhcpc", "discover")[0][:240]


@pytest.mark.parametrize("data,reason", [
    (b"", "malformed"),
    (b"\x01", "malformed"),
    (HEADER[:239], "malformed"),
    (b"\x02" + HEADER[1:] + b"\x35\x01\x01\xff", "not_request"),          # BOOTREPLY
    (HEADER[:1] + b"\x06" + HEADER[2:] + b"\x35\x01\x01\xff", "bad_hardware"),
    (HEADER[:2] + b"\x10" + HEADER[3:] + b"\x35\x01\x01\xff", "bad_hardware"),
    (HEADER[:236] + b"XXXX" + b"\x35\x01\x01\xff", "malformed"),          # magic cookie
    (HEADER + b"\x0c\x02gn\xff", "no_message_type"),
    (HEADER + b"\x35\x01\x02\xff", "bad_message_type"),                   # an OFFER, to us
    (HEADER + b"\x35\x01\x63\xff", "bad_message_type"),
    (HEADER + b"\x35\x02\x01\x01\xff", "bad_message_type"),
    (HEADER + b"\x35", "malformed"),                                      # dhcppython: IndexError
    (HEADER + b"\x35\x01\x01\x32\x04\x64", "bad_option"),                 # option 50 cut short
    (HEADER + b"\x35\x01\x01\x36\x02\x64\x40\xff", "bad_option"),         # server id of 2 bytes
])
def test_malformed_packets_are_counted_drops(net, data, reason):
    assert net.feed(data) == []
    assert net.server.drops[reason] == 1


def test_dhcppython_raises_index_error_and_we_do_not():
    """The FIELD-NOTES quirk: dhcppython's parser raises IndexError, not MalformedPacketError,
    for an option code without its length byte. Our boundary turns it into a counted drop."""
    with pytest.raises(IndexError):
        DHCPPacket.from_bytes(HEADER + b"\x35")


@pytest.mark.parametrize("client", CLIENTS)
def test_every_truncation_of_a_golden_discover(net, client):
    disc = golden(client, "discover")[0]
    for n in range(len(disc)):
        replies = net.feed(disc[:n], advance=0)
        if n < 243:                          # no complete option 53 (the first option of all three)
            assert replies == []
        for r in replies:                    # a cut after 53 may still be a usable DISCOVER
            assert msg(r) == 2 and str(decode(r)[0].yiaddr) == VIP
    assert net.server.drops["malformed"] >= 240


def test_bit_flips_of_every_golden_packet_exhaustive_header_and_options(net):
    """Every single-bit flip of the option area of each client's DISCOVER and REQUEST."""
    for client in CLIENTS:
        for data in (golden(client, "discover")[0], golden(client, "request_selecting")[0]):
            end = data.index(b"\xff", 240) + 1
            for bit in range(0, end * 8):
                flipped = bytearray(data)
                flipped[bit // 8] ^= 1 << (bit % 8)
                net.feed(bytes(flipped), advance=0)


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(net, data):
    net.feed(data, advance=0)


@FUZZ
@given(st.binary(max_size=120))
def test_random_options_after_a_valid_header_never_raise(net, tail):
    net.feed(HEADER + tail, advance=0)


@FUZZ
@given(st.sampled_from(all_golden()), st.lists(st.integers(0, 299 * 8), min_size=1, max_size=8))
def test_bit_flips_of_golden_packets_never_raise(net, data, bits):
    flipped = bytearray(data)
    for bit in bits:
        flipped[bit // 8 % len(flipped)] ^= 1 << (bit % 8)
    net.feed(bytes(flipped), advance=0)


# --- the lease store ----------------------------------------------------------------------

def test_transitions_table_is_the_only_way(tmp_path):
    s = LeaseStore(tmp_path / "l.json")
    with pytest.raises(InvalidTransition):
        s.release(MAC, VIP, T0)                          # (None, RELEASE) is not in the table
    assert (None, Event.RELEASE) not in TRANSITIONS
    s.offer(MAC, VIP, T0, OFFER_HOLD_S)
    s.bind(MAC, VIP, T0, 100)
    assert s.offer(MAC, VIP, T0 + 1, OFFER_HOLD_S).state is State.BOUND
    assert s.state(MAC, T0 + 100) is None                 # expired is "no lease"


def test_offer_storm_does_not_rewrite_the_file(tmp_path):
    s = LeaseStore(tmp_path / "l.json")
    s.offer(MAC, VIP, T0, OFFER_HOLD_S)
    writes = s.writes
    for i in range(20):
        s.offer(MAC, VIP, T0 + i, OFFER_HOLD_S)
    assert s.writes == writes


def test_no_two_macs_hold_one_address(tmp_path):
    s = LeaseStore(tmp_path / "l.json")
    s.bind(MAC, VIP, T0, 100)
    for op in (lambda: s.offer(OTHER_MAC, VIP, T0 + 1, 60), lambda: s.bind(OTHER_MAC, VIP, T0 + 1, 60)):
        with pytest.raises(AddressUnavailable) as e:
            op()
        assert (e.value.reason, e.value.holder) == ("in_use", MAC)
    s.bind(OTHER_MAC, VIP, T0 + 101, 60)                  # after expiry it is free ...
    assert s.get(MAC) is None                             # ... and the stale record is gone
    again = LeaseStore(tmp_path / "l.json")
    assert again.holder(VIP, T0 + 102) == OTHER_MAC and again.warnings == []


def _invariant(store: LeaseStore):
    held = [l.vip for l in store.leases() if l.state in (State.OFFERED, State.BOUND)]
    assert len(held) == len(set(held))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["offer", "bind", "release", "decline", "withdraw"]),
                          st.sampled_from([MAC, OTHER_MAC, UNKNOWN_MAC]),
                          st.sampled_from([VIP, OTHER_VIP]),
                          st.integers(0, 200)), max_size=25))
def test_store_keeps_the_invariant_under_any_sequence(ops):
    with tempfile.TemporaryDirectory() as d:
        s, now = LeaseStore(os.path.join(d, "l.json")), T0
        for op, mac, vip, dt in ops:
            now += dt
            try:
                {"offer": lambda: s.offer(mac, vip, now, 60), "bind": lambda: s.bind(mac, vip, now, 300),
                 "release": lambda: s.release(mac, vip, now), "decline": lambda: s.decline(mac, vip, now, 100),
                 "withdraw": lambda: s.withdraw(mac, now)}[op]()
            except (AddressUnavailable, InvalidTransition):
                pass
            _invariant(s)
            for v in (VIP, OTHER_VIP):
                holders = [l.mac for l in s.leases() if l.vip == v and l.active(now)]
                assert len(holders) <= 1
        again = LeaseStore(os.path.join(d, "l.json"))
        assert again.leases() == s.leases() and again.warnings == []


def test_crash_between_write_and_replace_keeps_the_old_file(tmp_path, monkeypatch):
    s = LeaseStore(tmp_path / "l.json")
    s.bind(MAC, VIP, T0, 100)
    old = (tmp_path / "l.json").read_bytes()

    def crash(*a):
        raise OSError("simulated crash before rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        s.release(MAC, VIP, T0 + 1)
    monkeypatch.undo()
    assert (tmp_path / "l.json").read_bytes() == old
    assert s.get(MAC).state is State.BOUND                # memory follows the disk
    assert LeaseStore(tmp_path / "l.json").get(MAC).state is State.BOUND


def test_crash_in_the_middle_of_the_write_keeps_the_old_file(tmp_path, monkeypatch):
    s = LeaseStore(tmp_path / "l.json")
    s.bind(MAC, VIP, T0, 100)
    old = (tmp_path / "l.json").read_bytes()
    real_write = os.write

    def half(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError("simulated crash mid-write")
    monkeypatch.setattr(os, "write", half)
    with pytest.raises(OSError):
        s.bind(OTHER_MAC, OTHER_VIP, T0 + 1, 100)
    monkeypatch.undo()
    # as after a real crash: a half-written temp file may be left next to the intact old file
    (tmp_path / "l.json.tmp.99999").write_bytes(b'{"format": "cyph')
    assert (tmp_path / "l.json").read_bytes() == old
    again = LeaseStore(tmp_path / "l.json")
    assert again.warnings == [] and again.get(OTHER_MAC) is None
    assert not list(tmp_path.glob("l.json.tmp.*"))        # leftovers cleaned at start


WRITER = r"""
import sys
from appliance.leases import LeaseStore, AddressUnavailable
path = sys.argv[1]
s = LeaseStore(path)
now, macs, vips = 1.8e9, ["02:00:00:00:00:%02x" % i for i in range(6)], ["100.64.0.%d" % i for i in range(1, 4)]
i = 0
print("ready", flush=True)
while True:
    i += 1
    mac, vip = macs[i % 6], vips[(i * 7) % 3]
    now += 7
    try:
        s.bind(mac, vip, now, 20) if i % 5 else s.release(mac, vip, now)
    except Exception:
        pass
"""


def test_kill_9_of_a_writer_at_random_moments_leaves_a_valid_file(tmp_path):
    path = str(tmp_path / "l.json")
    rng = random.Random(7)
    for _ in range(12):
        p = subprocess.Popen([sys.executable, "-c", WRITER, path], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.05))
        p.send_signal(signal.SIGKILL)
        p.wait(5)
        warnings: list[str] = []
        s = LeaseStore(path, log=warnings.append)
        assert warnings == [], warnings
        _invariant(s)
    assert os.path.exists(path) and LeaseStore(path).leases()


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe garbage", b"[]",
                                     b'{"format": "cyphonic-dhcp-leases", "version": 2}',
                                     b'{"format": "cyphonic-dhcp-leases", "version": 1, "leases": '
                                     b'[{"mac": "02:00:00:00:00:01", "vip": "100.64.0.7", "state": "bound", '
                                     b'"expires": 1}, {"mac": "02:00:00:00:00:02", "vip": "100.64.0.7", '
                                     b'"state": "offered", "expires": 2}], "declined": []}',
                                     b'{"format": "cyphonic-dhcp-leases", "version": 1, "leases": '
                                     b'[{"mac": "zz", "vip": "100.64.0.7", "state": "bound", "expires": 1}], '
                                     b'"declined": []}'])
def test_corrupt_lease_file_gives_no_lease_one_warning_and_is_kept(tmp_path, content):
    path = tmp_path / "l.json"
    path.write_bytes(content)
    warnings: list[str] = []
    s = LeaseStore(path, log=warnings.append)
    assert s.leases() == [] and len(warnings) == 1 and s.warnings == warnings
    assert (tmp_path / "l.json.corrupt").read_bytes() == content
    assert not path.exists()
    s.bind(MAC, VIP, T0, 100)                             # and it carries on
    assert LeaseStore(path).get(MAC).vip == VIP


def test_unreadable_lease_file_gives_no_lease_and_one_warning(tmp_path):
    (tmp_path / "l.json").mkdir()                         # reading it fails (EISDIR), even as root
    warnings: list[str] = []
    s = LeaseStore(tmp_path / "l.json", log=warnings.append)
    assert s.leases() == [] and len(warnings) == 1 and "unreadable" in warnings[0]
    assert (tmp_path / "l.json.corrupt").is_dir()


def test_server_on_a_corrupt_file_starts_and_serves(tmp_path):
    (tmp_path / "leases.json").write_bytes(b"\0\0\0")
    n = Net(str(tmp_path))
    assert len(n.logs) == 1 and "corrupt" in n.logs[0]
    assert n.server.stats()["warnings"]
    bind(n)


# --- real clients in namespaces (root) ----------------------------------------------------

PREFIX = "cyd"
CLIENT_MAC = "02:cd:00:00:01:07"
CLIENT_VIP = "100.64.0.7"
LAB_LEASE_S = 600

HAND_CLIENT = r"""
import json, select, socket, sys, time
from dhcppython import options
from dhcppython.packet import DHCPPacket
mode, mac, xid, vip, server = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, 25, b"eth0\0")
s.bind(("0.0.0.0", 68))
o = options.options.short_value_to_object
prl = o(55, [1, 3, 6, 15, 26, 51, 54, 58, 59])
if mode == "discover":
    pkt = DHCPPacket.Discover(mac, tx_id=xid, option_list=options.OptionList([prl]))
else:
    pkt = DHCPPacket.Request(mac, 0, xid, option_list=options.OptionList([o(50, vip), o(54, server), prl]))
s.sendto(pkt.asbytes, ("255.255.255.255", 67))
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    if select.select([s], [], [], 0.2)[0]:
        r = DHCPPacket.from_bytes(s.recv(4096))
        if r.xid == xid and r.op == "BOOTREPLY":
            print(json.dumps({"type": r.msg_type, "yiaddr": str(r.yiaddr)}))
            sys.exit(0)
print(json.dumps({"type": None}))
sys.exit(1)
"""


def _require_root_and_clients():
    if os.geteuid() != 0:
        pytest.fail("the real-client DHCP tests need root (network namespaces); CI runs as root")
    missing = [b for b in ("dhclient", "udhcpc", "dhcpcd", "unshare") if not shutil.which(b)]
    if missing:
        pytest.fail(f"DHCP clients missing: {missing}. Install them with `make setup` or "
                    "`apt-get install -y --no-install-recommends isc-dhcp-client udhcpc dhcpcd-base`")


@pytest.fixture(scope="module")
def lan():
    """A bare L2 segment "lan" (no addresses, no gateway), the adapter (eth0 100.64.0.254/24)
    and the general node "gn" (eth0 without any address, MAC CLIENT_MAC)."""
    _require_root_and_clients()
    from lab import Lab
    with Lab(prefix=PREFIX) as lab:
        seg = lab.switch("lan")
        adapter = lab.host("adapter", seg, v4=False, v6=False)
        gn = lab.host("gn", seg, v4=False, v6=False)
        lab.exec(adapter, ["ip", "addr", "add", f"{SERVER_IP}/24", "dev", "eth0"], check=True)
        lab.exec(gn, ["ip", "link", "set", "eth0", "address", CLIENT_MAC], check=True)
        yield SimpleNamespace(lab=lab, adapter=adapter, gn=gn,
                              exec=lambda argv, **kw: lab.exec(gn, argv, **kw))


class LabServer:
    """`python -m appliance.dhcp_server` in the adapter namespace."""

    def __init__(self, lan, work, binding=f"{CLIENT_MAC}={CLIENT_VIP}=gn"):
        self.lan, self.work, self.binding = lan, str(work), binding
        self.leases = os.path.join(self.work, "leases.json")
        self.log = os.path.join(self.work, "server.log")
        self.proc = None

    def start(self):
        mark = len(self.text())
        self.proc = self.lan.lab.spawn(self.lan.adapter, [
            sys.executable, "-m", "appliance.dhcp_server", "--iface", "eth0", "--server-ip", SERVER_IP,
            "--domain", "ov.example", "--lease", str(LAB_LEASE_S), "--leases", self.leases,
            "--binding", self.binding, "-v"], log=self.log, cwd=ROOT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if "dhcp: serving on" in self.text()[mark:]:
                return self
            assert self.proc.poll() is None, self.text()
            time.sleep(0.05)
        pytest.fail(f"the DHCP server did not start: {self.text()}")

    def text(self):
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def lab_server(lan, tmp_path):
    lan.exec(["ip", "addr", "flush", "dev", "eth0"])
    srv = LabServer(lan, tmp_path).start()
    yield srv
    srv.stop()
    lan.exec(["ip", "addr", "flush", "dev", "eth0"])


def _env_script(tmp_path) -> str:
    """The client's hook: records its environment, configures the address (never resolv.conf)."""
    script = tmp_path / "hook.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'env | sort > "{tmp_path}/env.${{reason:-$1}}"\n'
        'case "${reason:-$1}" in\n'
        '  BOUND|REBOOT) ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface";;\n'
        '  bound) ip addr replace "$ip/$mask" dev "$interface";;\n'
        "esac\nexit 0\n")
    script.chmod(0o755)
    return str(script)


def _env(path) -> dict[str, str]:
    with open(path) as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)


def _addresses(lan) -> list[str]:
    out = lan.exec(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    return [line.split()[3] for line in out.splitlines()]


def _bound_once(srv: LabServer):
    store = LeaseStore(srv.leases)
    assert store.warnings == []
    held = [l for l in store.leases() if l.state is State.BOUND]
    assert [(l.mac, l.vip) for l in held] == [(CLIENT_MAC, CLIENT_VIP)]


def run_dhclient(lan, tmp_path, hook):
    conf = tmp_path / "dhclient.conf"
    conf.write_text('send host-name "gn";\nrequest subnet-mask, broadcast-address, routers, '
                    "domain-name, domain-name-servers, interface-mtu;\ntimeout 8;\n")
    base = ["dhclient", "-4", "-v", "-sf", hook, "-cf", str(conf), "-lf", str(tmp_path / "dhclient.leases"),
            "-pf", str(tmp_path / "dhclient.pid")]
    p = lan.exec(base + ["-1", "eth0"], timeout=20)
    lan.exec(base + ["-x", "eth0"], timeout=10)                # it daemonized: stop it
    assert p.returncode == 0, p.stdout + p.stderr
    e = _env(tmp_path / "env.BOUND")
    return {"ip": e["new_ip_address"], "mask": e["new_subnet_mask"], "router": e["new_routers"],
            "dns": e["new_domain_name_servers"], "domain": e["new_domain_name"],
            "mtu": e["new_interface_mtu"], "lease": e["new_dhcp_lease_time"],
            "t1": e["new_dhcp_renewal_time"], "t2": e["new_dhcp_rebinding_time"]}


def run_udhcpc(lan, tmp_path, hook):
    p = lan.exec(["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "3", "-T", "1", "-s", hook],
                 timeout=20)
    assert p.returncode == 0, p.stdout + p.stderr
    e = _env(tmp_path / "env.bound")
    return {"ip": e["ip"], "mask": e["subnet"], "router": e["router"], "dns": e["dns"],
            "domain": e["domain"], "mtu": e["mtu"], "lease": e["lease"],
            "t1": str(int(e["opt58"], 16)), "t2": str(int(e["opt59"], 16))}


def _dhcpcd(tmp_path, args: str) -> list[str]:
    """dhcpcd in its own mount namespace: its /run/dhcpcd and /var/lib/dhcpcd (DUID, leases) are
    private, so it never touches the host's."""
    db = tmp_path / "dhcpcd-db"
    db.mkdir(exist_ok=True)
    return ["unshare", "-m", "sh", "-c",
            f"mount -t tmpfs tmpfs /run && mkdir -p /run/dhcpcd && mount --bind {db} /var/lib/dhcpcd "
            f"&& exec dhcpcd {args}"]


def run_dhcpcd(lan, tmp_path, hook):
    # -1 exit once bound, -4 IPv4 only, -B foreground, -A no ARP probe (saves ~5 s),
    # -c our hook instead of dhcpcd-run-hooks (which would write /etc/resolv.conf and set the MTU)
    p = lan.exec(_dhcpcd(tmp_path, f"-1 -4 -B -A -t 10 -c {hook} eth0"), timeout=20)
    assert p.returncode == 0, p.stdout + p.stderr
    e = _env(tmp_path / "env.BOUND")
    return {"ip": e["new_ip_address"], "mask": e["new_subnet_mask"], "router": e["new_routers"],
            "dns": e["new_domain_name_servers"], "domain": e["new_domain_name"],
            "mtu": e["new_interface_mtu"], "lease": e["new_dhcp_lease_time"],
            "t1": e["new_dhcp_renewal_time"], "t2": e["new_dhcp_rebinding_time"]}


@pytest.mark.root
@pytest.mark.parametrize("client", ["dhclient", "udhcpc", "dhcpcd"])
def test_real_client_gets_its_virtual_ip(lan, lab_server, tmp_path, client):
    hook = _env_script(tmp_path)
    got = {"dhclient": run_dhclient, "udhcpc": run_udhcpc, "dhcpcd": run_dhcpcd}[client](lan, tmp_path, hook)
    assert got == {"ip": CLIENT_VIP, "mask": "255.255.255.0", "router": SERVER_IP, "dns": SERVER_IP,
                   "domain": "ov.example", "mtu": str(advertised_mtu()), "lease": str(LAB_LEASE_S),
                   "t1": str(LAB_LEASE_S // 2), "t2": str(LAB_LEASE_S * 7 // 8)}
    assert f"{CLIENT_VIP}/24" in _addresses(lan)
    _bound_once(lab_server)
    assert "sent ACK" in lab_server.text()


@pytest.mark.root
def test_real_client_with_unknown_mac_gets_nothing(lan, tmp_path):
    lan.exec(["ip", "addr", "flush", "dev", "eth0"])
    srv = LabServer(lan, tmp_path, binding=f"{OTHER_MAC}={CLIENT_VIP}=someone-else").start()
    try:
        hook = _env_script(tmp_path)
        p = lan.exec(["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "2", "-T", "1", "-s", hook],
                     timeout=15)
        assert p.returncode != 0 and "no lease" in (p.stdout + p.stderr)
        assert _addresses(lan) == [] and not (tmp_path / "env.bound").exists()
        log = srv.text()
        assert log.count(f"no binding for {CLIENT_MAC}") == 1 and "sent " not in log
    finally:
        srv.stop()


@pytest.mark.root
def test_kill_9_between_offer_and_ack(lan, lab_server, tmp_path):
    hand = ["ip", "netns", "exec", lan.gn.name, sys.executable, "-c", HAND_CLIENT]
    xid = 0x5EED

    def step(mode):
        p = subprocess.run(hand + [mode, CLIENT_MAC, str(xid), CLIENT_VIP, SERVER_IP],
                           capture_output=True, text=True, timeout=15)
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(p.stdout)

    assert step("discover") == {"type": "DHCPOFFER", "yiaddr": CLIENT_VIP}
    lab_server.kill9()                                         # between OFFER and ACK
    store = LeaseStore(lab_server.leases)
    assert store.warnings == [] and store.get(CLIENT_MAC).state is State.OFFERED
    lab_server.start()                                         # same lease file
    assert step("request") == {"type": "DHCPACK", "yiaddr": CLIENT_VIP}
    _bound_once(lab_server)
    # and a real client on that MAC still gets that same single address
    hook = _env_script(tmp_path)
    assert run_udhcpc(lan, tmp_path, hook)["ip"] == CLIENT_VIP
    _bound_once(lab_server)
