"""Address configuration: the adapter's DHCP server on its LAN port (RFC 2131, options RFC 2132).

Sans-IO, like h11: `DhcpServer.receive(data, now)` takes one UDP payload that arrived on port 67
and returns the replies to send as `Reply(data, ip, mac)`; no socket, no clock, no thread in
here (the edge is `appliance/dhcp_server.py`). dhcppython parses and builds the packets; the lease
logic is ours and the lease table is `appliance/leases.py`.

Who gets what: the general node behind the adapter gets its *virtual IP from the cloud* (the
`bindings` callback is General Node Management: MAC -> Binding). A MAC without a binding gets
nothing at all: no OFFER, no NAK (logged once per MAC, counted `unknown_mac`, and told to the
`on_no_binding(mac, now)` callback: the controller keeps the unknown ones for `cyadm status`).

Messages (RFC 2131 section 4.3):
  DISCOVER  -> OFFER of the binding's VIP (held in the lease table for OFFER_HOLD_S)
  REQUEST   SELECTING (server id = ours, option 50), INIT-REBOOT (option 50, no server id),
            RENEWING/REBINDING (ciaddr, no option 50): for the binding's VIP -> ACK, for any
            other address -> NAK. With another server's id: the client chose that server; we
            drop our pending offer and stay silent.
  INFORM    -> ACK with the options but no lease (yiaddr 0, no options 51/58/59).
  RELEASE   -> the lease is marked released. No reply.
  DECLINE   -> the VIP is in use by something else on the LAN. It is the node's own address, so
            this is logged loudly, and the address is not offered again for DECLINE_HOLD_S.
  Rapid commit (option 80, RFC 4039, sent by dhcpcd) is ignored on purpose: we answer with an
  OFFER and the client falls back to the four-message exchange, as RFC 4039 allows. A lease is
  then committed only when the client has chosen us (its REQUEST carries our server id), which
  matters on a LAN where the site's own DHCP server may still answer too.

Options in OFFER/ACK: 1 subnet mask, 3 router, 6 DNS, 15 domain, 26 interface MTU (the caller
passes the MTU with the overlay's encapsulation overhead already subtracted: `advertised_mtu()`),
51 lease time, 58 T1 = 50 %, 59 T2 = 87.5 %, 54 server identifier, and the client identifier
(61) echoed (RFC 6842). They follow the order of the client's parameter request list (55), except
that 53 and 54 come first and the subnet mask always precedes the router (RFC 2132 3.3); options
the client did not ask for follow. NAK carries 53, 54, 56 (message) and 61 only.

Where replies go (RFC 2131 section 4.1, `_destination`): giaddr set -> the relay (port 67);
NAK -> broadcast; ciaddr set -> unicast to ciaddr; broadcast flag -> broadcast; otherwise
"unicast to yiaddr and chaddr". That last case needs an ARP entry the kernel does not have for an
unconfigured client, so `Reply.link_unicast` marks it and the edge broadcasts instead (RFC 2131
allows broadcasting when unicast is not possible; every client we test listens on a raw socket).

No-throw boundary: every exception while parsing (dhcppython raises MalformedPacketError but
also IndexError, KeyError, struct.error ...), a BOOTREPLY, a wrong htype/hlen, a missing or
unknown message type, a broken option we need: the packet is dropped and counted in
`drops[reason]`; `receive()` never raises. A lease table write that fails (disk full) is a
counted drop too: the client retries, and nothing was promised that is not on disk.

Bounded: per-MAC state lives in the lease table (one lease per MAC with a binding); the
log-once set of unknown MACs keeps at most LOG_ONCE_MAX entries.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, NamedTuple

from dhcppython import options as dhcp_options
from dhcppython.packet import DHCPPacket

from cyphonic.constants import (DATA_OVERHEAD_BYTES, RELAY_OVERHEAD_BYTES,
                                UDP_IPV6_OVERHEAD_BYTES)

from .constants import DECLINE_HOLD_S, DEFAULT_LEASE_S, LOG_ONCE_MAX, OFFER_HOLD_S
from .leases import AddressUnavailable, InvalidTransition, LeaseStore

# --- constants: specification values ------------------------------------------------------------
SERVER_PORT = 67
CLIENT_PORT = 68
BROADCAST = "255.255.255.255"
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
BROADCAST_FLAG = 0x8000
BOOTREQUEST, BOOTREPLY = 1, 2
HTYPE_ETHERNET, HLEN_ETHERNET = 1, 6
MIN_PACKET_BYTES = 240             # fixed header + magic cookie
MIN_MTU = 68                       # RFC 2132 5.1
T1_FRACTION, T2_FRACTION = 0.5, 0.875

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE",
                 ACK: "ACK", NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM"}

OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_DOMAIN, OPT_MTU = 1, 3, 6, 15, 26
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_MESSAGE_TYPE, OPT_SERVER_ID = 50, 51, 53, 54
OPT_PARAMETER_LIST, OPT_MESSAGE, OPT_T1, OPT_T2, OPT_CLIENT_ID = 55, 56, 58, 59, 61
OPT_RAPID_COMMIT = 80
ALWAYS_OPTIONS = (OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_LEASE_TIME, OPT_SERVER_ID)

# (our choices: lease and hold times, in appliance/constants.py)


def advertised_mtu(underlay_mtu: int = 1500) -> int:
    """The interface MTU (option 26) to give the general node: the underlay MTU minus the worst
    case overlay encapsulation (IPv6 + UDP, relay framing, data header and AEAD tag)."""
    return underlay_mtu - UDP_IPV6_OVERHEAD_BYTES - RELAY_OVERHEAD_BYTES - DATA_OVERHEAD_BYTES


@dataclass(frozen=True)
class Binding:
    """What General Node Management knows: this MAC's node has this virtual IP (from the cloud)."""
    mac: str
    vip4: str
    name: str


class Reply(NamedTuple):
    """One datagram to send: DHCP payload, destination IP, destination MAC ("" for a relay)."""
    data: bytes
    ip: str
    mac: str

    @property
    def port(self) -> int:
        """67 when the reply goes to a relay agent (giaddr), else 68."""
        giaddr = str(ipaddress.IPv4Address(self.data[24:28]))
        return SERVER_PORT if giaddr != "0.0.0.0" and self.ip == giaddr else CLIENT_PORT

    @property
    def link_unicast(self) -> bool:
        """RFC 2131's "unicast to yiaddr and chaddr": needs an ARP entry for an address the client
        does not have yet. The edge broadcasts these (see the module docstring)."""
        return self.ip != BROADCAST and self.ip == str(ipaddress.IPv4Address(self.data[16:20])) \
            and self.data[12:16] == b"\0\0\0\0"

    @property
    def message_type(self) -> str:
        return MESSAGE_NAMES.get(self.data[242], "?") if len(self.data) > 242 else "?"


@dataclass(frozen=True)
class Request:
    """A parsed BOOTREQUEST: the fields the server logic reads, already checked."""
    msg: int
    xid: int
    flags: int
    ciaddr: str
    giaddr: str
    mac: str                         # lower case, colon separated, from chaddr
    requested_ip: str | None         # option 50
    server_id: str | None            # option 54
    parameters: tuple[int, ...]      # option 55
    client_id: bytes | None          # option 61 (echoed)
    rapid_commit: bool               # option 80 (ignored, counted)


class Drop(Exception):
    """A packet we do not answer; `reason` is the drops counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse(data: bytes) -> Request:
    """Parse one DHCP payload; raises Drop, never anything else."""
    if len(data) < MIN_PACKET_BYTES:
        raise Drop("malformed")
    if data[0] != BOOTREQUEST:
        raise Drop("not_request")
    if data[1] != HTYPE_ETHERNET or data[2] != HLEN_ETHERNET:
        raise Drop("bad_hardware")
    try:
        pkt = DHCPPacket.from_bytes(data)
    except Exception:                # MalformedPacketError, IndexError, KeyError, struct.error...
        raise Drop("malformed") from None
    opts = {}
    for opt in pkt.options:          # raw option bytes; the first of a repeated code wins
        code = getattr(opt, "code", None)
        if code not in (None, 0, 255) and code not in opts:
            if opt.length != len(opt.data):            # truncated in the packet
                if code in (OPT_MESSAGE_TYPE, OPT_REQUESTED_IP, OPT_SERVER_ID):
                    raise Drop("bad_option")
                continue
            opts[code] = opt.data
    mt = opts.get(OPT_MESSAGE_TYPE)
    if mt is None:
        raise Drop("no_message_type")
    if len(mt) != 1 or mt[0] not in MESSAGE_NAMES:
        raise Drop("bad_message_type")
    xid, flags = struct.unpack("!L2xH", data[4:12])
    return Request(
        msg=mt[0], xid=xid, flags=flags,
        ciaddr=str(ipaddress.IPv4Address(data[12:16])),
        giaddr=str(ipaddress.IPv4Address(data[24:28])),
        mac=":".join(f"{b:02x}" for b in data[28:34]),
        requested_ip=_ip_option(opts, OPT_REQUESTED_IP),
        server_id=_ip_option(opts, OPT_SERVER_ID),
        parameters=tuple(opts.get(OPT_PARAMETER_LIST, b"")),
        client_id=opts.get(OPT_CLIENT_ID) or None,
        rapid_commit=OPT_RAPID_COMMIT in opts,
    )


def _ip_option(opts: dict[int, bytes], code: int) -> str | None:
    raw = opts.get(code)
    if raw is None:
        return None
    if len(raw) != 4:
        raise Drop("bad_option")
    return str(ipaddress.IPv4Address(raw))


class DhcpServer:
    """The DHCP server logic for one LAN port. Feed it `receive(data, now)`; `now` is wall-clock
    seconds (leases are persisted and outlive the process)."""

    def __init__(self, *, server_ip: str, netmask: str, router: str, dns: str, domain: str,
                 mtu: int, lease_s: int = DEFAULT_LEASE_S,
                 bindings: Callable[[str], Binding | None], leases: LeaseStore,
                 log: Callable[[str], None] = print,
                 on_no_binding: Callable[[str, float], None] | None = None):
        self.server_ip = str(ipaddress.IPv4Address(server_ip))
        self.netmask = str(ipaddress.IPv4Network(f"0.0.0.0/{netmask}").netmask)
        self.router = str(ipaddress.IPv4Address(router))
        self.dns = str(ipaddress.IPv4Address(dns))
        if len(domain.encode()) > 255:
            raise ValueError("domain name longer than 255 bytes")
        self.domain = domain
        if not MIN_MTU <= mtu <= 0xFFFF:
            raise ValueError(f"interface MTU {mtu} not in {MIN_MTU}..65535")
        if not 1 <= lease_s <= 0xFFFFFFFE:
            raise ValueError(f"lease time {lease_s} s out of range")
        self.mtu, self.lease_s = mtu, int(lease_s)
        self.bindings, self.leases, self.log = bindings, leases, log
        self.on_no_binding = on_no_binding
        self.counters: Counter[str] = Counter()      # messages received and sent, by type
        self.drops: Counter[str] = Counter()         # packets not answered, by reason
        self._logged: OrderedDict[tuple, None] = OrderedDict()
        self._options = self._build_options()

    # --- the boundary ----------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Reply]:
        """Handle one datagram; returns the replies to send. Never raises."""
        try:
            req = parse(data)
            self.counters["rx_" + MESSAGE_NAMES[req.msg]] += 1
            replies = self._handle(req, now)
        except Drop as d:
            self.drops[d.reason] += 1
            return []
        except Exception as e:       # a bug of ours: count it, say it once, carry on
            self.drops["internal_error"] += 1
            self._log_once(("internal", type(e).__name__), f"dhcp: internal error {e!r}")
            return []
        for r in replies:
            self.counters["tx_" + r.message_type] += 1
        return replies

    def stats(self) -> dict:
        return {"counters": dict(self.counters), "drops": dict(self.drops),
                "leases": len(self.leases.leases()), "warnings": list(self.leases.warnings)}

    # --- the rules ---------------------------------------------------------------------------

    def _handle(self, req: Request, now: float) -> list[Reply]:
        if req.msg not in (DISCOVER, REQUEST, DECLINE, RELEASE, INFORM):
            raise Drop("bad_message_type")                  # a server message sent to us
        binding = self._binding(req.mac)
        if req.msg == REQUEST and req.server_id is not None and req.server_id != self.server_ip:
            if binding is not None:                        # it took another server's offer
                try:
                    self.leases.withdraw(req.mac, now)
                except (InvalidTransition, OSError):
                    pass
            raise Drop("other_server")
        if binding is None:
            self._log_once(("unknown", req.mac),
                           f"dhcp: no binding for {req.mac}: not answering it (logged once)")
            if self.on_no_binding is not None:
                self.on_no_binding(req.mac, now)
            raise Drop("unknown_mac")
        if req.rapid_commit:
            self.counters["rapid_commit_ignored"] += 1
        return {DISCOVER: self._discover, REQUEST: self._request, DECLINE: self._decline,
                RELEASE: self._release, INFORM: self._inform}[req.msg](req, binding, now)

    def _discover(self, req: Request, b: Binding, now: float) -> list[Reply]:
        try:
            self.leases.offer(req.mac, b.vip4, now, OFFER_HOLD_S)
        except AddressUnavailable as e:
            self._unavailable(req, e)
            raise Drop("address_" + e.reason)
        except OSError as e:
            self._store_error(e)
        return [self._reply(req, OFFER, yiaddr=b.vip4)]

    def _request(self, req: Request, b: Binding, now: float) -> list[Reply]:
        if req.server_id is not None:                      # SELECTING (server id is ours)
            wanted = req.requested_ip or (req.ciaddr if req.ciaddr != "0.0.0.0" else None)
        elif req.requested_ip is not None:                 # INIT-REBOOT
            wanted = req.requested_ip
        elif req.ciaddr != "0.0.0.0":                      # RENEWING (unicast) / REBINDING
            wanted = req.ciaddr
        else:
            wanted = None
        if wanted is None:
            raise Drop("bad_request")
        if wanted != b.vip4:
            return [self._nak(req, f"{wanted} is not yours", "wrong_address")]
        try:
            self.leases.bind(req.mac, b.vip4, now, self.lease_s)
        except AddressUnavailable as e:
            self._unavailable(req, e)
            return [self._nak(req, f"{wanted} is not available", e.reason)]
        except OSError as e:
            self._store_error(e)
        return [self._reply(req, ACK, yiaddr=b.vip4)]

    def _decline(self, req: Request, b: Binding, now: float) -> list[Reply]:
        if req.server_id is not None and req.server_id != self.server_ip:
            raise Drop("other_server")
        if req.requested_ip != b.vip4:
            raise Drop("decline_foreign")
        if self.leases.declined_until(b.vip4, now) is not None:
            raise Drop("decline_repeated")                 # already held back: no log, no write
        try:
            self.leases.decline(req.mac, b.vip4, now, DECLINE_HOLD_S)
        except InvalidTransition:
            raise Drop("decline_foreign")
        except OSError as e:
            self._store_error(e)
        self.counters["declined"] += 1
        self.log(f"dhcp: WARNING: {req.mac} ({b.name}) DECLINED its own virtual IP {b.vip4}: "
                 f"something else on the LAN uses that address; not offering it for "
                 f"{DECLINE_HOLD_S} s")
        return []

    def _release(self, req: Request, b: Binding, now: float) -> list[Reply]:
        if req.server_id is not None and req.server_id != self.server_ip:
            raise Drop("other_server")
        try:
            self.leases.release(req.mac, req.ciaddr, now)
        except InvalidTransition:
            raise Drop("release_unknown")
        except OSError as e:
            self._store_error(e)
        self.counters["released"] += 1
        return []

    def _inform(self, req: Request, b: Binding, now: float) -> list[Reply]:
        return [self._reply(req, ACK, yiaddr="0.0.0.0", lease=False)]

    def set_domain(self, domain: str) -> None:
        """The search domain (option 15) of every reply from now on (the overlay's, once the
        cloud has said it)."""
        if len(domain.encode()) > 255:
            raise ValueError("domain name longer than 255 bytes")
        self.domain = domain
        self._options = self._build_options()

    # --- building replies --------------------------------------------------------------------

    def _build_options(self) -> dict[int, object]:
        o = dhcp_options.options.short_value_to_object
        opts = {
            OPT_SUBNET_MASK: o(OPT_SUBNET_MASK, self.netmask),
            OPT_ROUTER: o(OPT_ROUTER, [self.router]),
            OPT_DNS: o(OPT_DNS, [self.dns]),
            OPT_DOMAIN: o(OPT_DOMAIN, self.domain),
            OPT_MTU: o(OPT_MTU, self.mtu),
            OPT_LEASE_TIME: o(OPT_LEASE_TIME, self.lease_s),
            OPT_T1: o(OPT_T1, int(self.lease_s * T1_FRACTION)),
            OPT_T2: o(OPT_T2, int(self.lease_s * T2_FRACTION)),
        }
        if not self.domain:                  # an option cannot be empty (RFC 2132 3.17: length >= 1)
            del opts[OPT_DOMAIN]
        return opts

    def option_order(self, parameters: tuple[int, ...], lease: bool = True) -> list[int]:
        """Codes to send after 53 and 54: the client's request order first, then the rest; the
        subnet mask before the router."""
        have = [c for c in self._options
                if lease or c not in (OPT_LEASE_TIME, OPT_T1, OPT_T2)]
        order = [c for c in dict.fromkeys(parameters) if c in have]
        order += [c for c in have if c not in order]
        if order.index(OPT_SUBNET_MASK) > order.index(OPT_ROUTER):
            order.remove(OPT_SUBNET_MASK)
            order.insert(order.index(OPT_ROUTER), OPT_SUBNET_MASK)
        return order

    def _reply(self, req: Request, msg: int, *, yiaddr: str, lease: bool = True) -> Reply:
        o = dhcp_options.options.short_value_to_object
        opts = dhcp_options.OptionList([o(OPT_MESSAGE_TYPE, "DHCP" + MESSAGE_NAMES[msg]),
                                        o(OPT_SERVER_ID, self.server_ip)])
        for code in self.option_order(req.parameters, lease):
            opts.append(self._options[code])
        self._client_id(req, opts)
        ciaddr = req.ciaddr if msg == ACK else "0.0.0.0"
        return self._packet(req, opts, ciaddr=ciaddr, yiaddr=yiaddr, flags=req.flags, msg=msg)

    def _nak(self, req: Request, why: str, kind: str) -> Reply:
        self.counters["nak_" + kind] += 1
        o = dhcp_options.options.short_value_to_object
        opts = dhcp_options.OptionList([o(OPT_MESSAGE_TYPE, "DHCPNAK"),
                                        o(OPT_SERVER_ID, self.server_ip),
                                        o(OPT_MESSAGE, why)])
        self._client_id(req, opts)
        flags = req.flags | (BROADCAST_FLAG if req.giaddr != "0.0.0.0" else 0)  # RFC 2131 4.3.2
        return self._packet(req, opts, ciaddr="0.0.0.0", yiaddr="0.0.0.0", flags=flags, msg=NAK)

    @staticmethod
    def _client_id(req: Request, opts) -> None:
        if req.client_id:
            opts.append(dhcp_options.ClientIdentifier(OPT_CLIENT_ID, len(req.client_id),
                                                      req.client_id))

    def _packet(self, req: Request, opts, *, ciaddr: str, yiaddr: str, flags: int,
                msg: int) -> Reply:
        pkt = DHCPPacket(
            op="BOOTREPLY", htype="ETHERNET", hlen=HLEN_ETHERNET, hops=0, xid=req.xid, secs=0,
            flags=flags, ciaddr=ipaddress.IPv4Address(ciaddr),
            yiaddr=ipaddress.IPv4Address(yiaddr), siaddr=ipaddress.IPv4Address(0),
            giaddr=ipaddress.IPv4Address(req.giaddr), chaddr=req.mac, sname=b"", file=b"",
            options=opts)
        ip, mac = _destination(req, msg, yiaddr, flags)
        return Reply(pkt.asbytes, ip, mac)

    # --- helpers -----------------------------------------------------------------------------

    def _binding(self, mac: str) -> Binding | None:
        try:
            b = self.bindings(mac)
            if b is None:
                return None
            return Binding(b.mac, str(ipaddress.IPv4Address(b.vip4)), b.name)
        except Exception as e:
            self._log_once(("bindings", type(e).__name__), f"dhcp: bindings lookup failed: {e!r}")
            raise Drop("bindings_error")

    def _unavailable(self, req: Request, e: AddressUnavailable) -> None:
        if e.reason == "in_use":
            self._log_once(("in_use", req.mac, e.vip),
                           f"dhcp: {e.vip} (binding of {req.mac}) is still leased to {e.holder}; "
                           f"not giving it to {req.mac} until that lease ends")

    def _store_error(self, e: OSError):
        self._log_once(("store", e.errno), f"dhcp: lease file write failed: {e}; not answering")
        raise Drop("store_error")

    def _log_once(self, key: tuple, msg: str) -> None:
        if key in self._logged:
            return
        self._logged[key] = None
        if len(self._logged) > LOG_ONCE_MAX:
            self._logged.popitem(last=False)
        self.log(msg)


def _destination(req: Request, msg: int, yiaddr: str, flags: int) -> tuple[str, str]:
    """RFC 2131 section 4.1, "the server ... sends": (ip, mac) of the reply."""
    if req.giaddr != "0.0.0.0":
        return req.giaddr, ""
    if msg == NAK:
        return BROADCAST, BROADCAST_MAC
    if req.ciaddr != "0.0.0.0":
        return req.ciaddr, req.mac
    if flags & BROADCAST_FLAG or yiaddr == "0.0.0.0":
        return BROADCAST, BROADCAST_MAC
    return yiaddr, req.mac


__all__ = ["Binding", "DhcpServer", "Drop", "Reply", "Request", "advertised_mtu", "parse",
           "DECLINE_HOLD_S", "OFFER_HOLD_S", "DEFAULT_LEASE_S"]
