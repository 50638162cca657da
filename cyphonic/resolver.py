"""The CYPHONIC Resolver Module, sans-IO: DNS queries in, DNS answers out.

The paper's trigger for communication is a DNS query for a peer's FQDN: the
resolver asks for route selection and tunnel establishment and answers with
the peer's virtual IP once the tunnel is up (adapter paper, 3.3 and 3.4;
docs/protocol.md and docs/adapter.md, "DNS"). Used by the node daemon (``cyphonic.dns_server``
is its asyncio edge) and, per general node, by the adapter.

Driven like the rest of the core: ``receive_query(data, client, now)``,
``tunnel_up`` / ``tunnel_failed`` from the engine, ``upstream_answer`` /
``upstream_failed`` from the forwarding socket, ``handle_timer(now)``; the
edge pulls ``answers_to_send()``, ``resolves_wanted()``, ``forwards_wanted()``
and arms a timer at ``get_timer()``.

Rules:
- Overlay names (``<name>.<domain>``, case-insensitive):
  A of one of our own names or of a peer whose tunnel is known up: answered at
  once (AA). Otherwise the query is held (at most ``hold_s``; several queries
  for one name wait together and cause one resolve) until ``tunnel_up`` (A
  record) or ``tunnel_failed`` (UNKNOWN_PEER -> NXDOMAIN, POLICY_DENIED ->
  REFUSED, anything else -> SERVFAIL); the hold timing out is SERVFAIL.
  Other types: NODATA (NOERROR, no answer). We cannot tell whether an unknown
  name exists without asking the cloud, and NXDOMAIN would deny the A record
  too, so NODATA it is. ``ipv6=True`` is accepted but AAAA is still NODATA
  (the engine reports IPv4 virtual addresses only).
  A name that cannot be a node FQDN (labels other than LDH) is NXDOMAIN at
  once. The overlay domain itself is NODATA for every type (it is a zone, not a
  node; NXDOMAIN there would deny every name under it, RFC 8020).
- PTR of an address in ``prefix``: the FQDN if known, else NXDOMAIN.
- Other names: forwarded upstream if ``passthrough``, else REFUSED. The
  upstream reply is relayed with the client's id restored. Zone transfers and
  classes other than IN are REFUSED.
- Malformed queries: FORMERR when the 12-byte header is readable, otherwise a
  counted drop; opcodes other than QUERY: NOTIMP; responses (QR set): dropped.

The module must never raise out of an input method (the no-throw boundary
counts ``drops["internal"]``), never block, and never hold more than its
bounds: ``max_pending`` held queries, ``max_forwards`` forwarded queries,
KNOWN_NAMES_MAX remembered tunnels, ANSWERS_QUEUED_MAX unsent answers.

``asker`` (hashable) says on whose behalf a query was asked. The node daemon
leaves it None; the adapter passes the general node, whose tunnels are its
own: waiters, resolves and remembered tunnels are keyed by (asker, fqdn), and
``tunnel_up`` / ``tunnel_failed`` take the same ``asker``.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import struct
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from .errors import ParseError
from .wire import signaling as sig

# --- Limits (implementation choices) -------------------------------------------------

HEADER_BYTES = 12
MAX_QUERY_BYTES = 4096          # a query (not an answer) is never larger; bigger ones are FORMERR
UDP_PLAIN_MAX_BYTES = 512       # answer size over UDP without EDNS (RFC 1035 4.2.1)
EDNS_PAYLOAD_BYTES = 1232       # what we advertise (DNS flag day 2020)
TCP_MAX_BYTES = 65535
KNOWN_NAMES_MAX = 4096          # (asker, fqdn) -> vip4 of tunnels seen up (LRU)
ANSWERS_QUEUED_MAX = 4096       # answers not yet pulled by the edge (oldest dropped, counted)
DEFAULT_MAX_FORWARDS = 1024     # queries waiting for the upstream resolver

# tunnel_failed code -> answer
FAILURE_RCODES: dict[sig.ErrorCode, int] = {
    sig.ErrorCode.UNKNOWN_PEER: dns.rcode.NXDOMAIN,
    sig.ErrorCode.POLICY_DENIED: dns.rcode.REFUSED,
}                                # everything else: SERVFAIL
RCODE_COUNTERS = {
    dns.rcode.NOERROR: "noerror", dns.rcode.NXDOMAIN: "nxdomain", dns.rcode.SERVFAIL: "servfail",
    dns.rcode.REFUSED: "refused", dns.rcode.FORMERR: "formerr", dns.rcode.NOTIMP: "notimp",
    dns.rcode.NOTAUTH: "notauth", dns.rcode.BADVERS: "badvers",
}
EDE_PROHIBITED = dns.edns.EDECode.PROHIBITED          # RFC 8914 extended DNS errors
EDE_NO_REACHABLE_AUTHORITY = dns.edns.EDECode.NO_REACHABLE_AUTHORITY
EDE_OTHER = dns.edns.EDECode.OTHER

_LDH = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
_IN_ADDR_ARPA = (b"in-addr", b"arpa", b"")


class DnsQueryError(ParseError):
    """A query we will not process. ``rcode`` is the answer to send (a header-only
    response), or None: drop silently (no readable header, or not a query)."""

    def __init__(self, message: str, rcode: int | None, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.rcode = rcode


@dataclass(eq=False)
class _Waiter:
    """One held overlay query."""
    key: tuple                   # (asker, fqdn)
    client: object
    tcp: bool
    query: dns.message.Message
    deadline: float
    done: bool = False


@dataclass(eq=False)
class _Forward:
    """One query forwarded upstream."""
    token: int
    client: object
    tcp: bool
    query: dns.message.Message
    question_wire: bytes         # the query's question section as received (name, type, class)
    dedup: tuple
    deadline: float
    done: bool = False


@dataclass(eq=False)
class _PendingName:
    waiters: list = field(default_factory=list)


def header_only_response(data: bytes, rcode: int) -> bytes:
    """A 12-byte response to the query whose header starts ``data``: same id,
    opcode and RD, QR and RA set, no sections."""
    qid, flags = struct.unpack_from("!HH", data)
    flags = (dns.flags.QR | dns.flags.RA | (flags & (0x7800 | dns.flags.RD)) | (rcode & 0xF))
    return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)


def parse_query(data: bytes) -> dns.message.Message:
    """Parse one DNS query; raises DnsQueryError, which says what to answer."""
    if len(data) < HEADER_BYTES:
        raise DnsQueryError("shorter than a DNS header", None, "short")
    qid, flags, qdcount = struct.unpack_from("!HHH", data)
    if flags & dns.flags.QR:
        raise DnsQueryError("a response, not a query", None, "not_query")
    if len(data) > MAX_QUERY_BYTES:
        raise DnsQueryError("query too large", dns.rcode.FORMERR, "oversize")
    if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        raise DnsQueryError("opcode not implemented", dns.rcode.NOTIMP, "opcode")
    if qdcount != 1:
        raise DnsQueryError("not exactly one question", dns.rcode.FORMERR, "qdcount")
    try:
        msg = dns.message.from_wire(data)
    except dns.message.UnknownTSIGKey:
        raise DnsQueryError("signed with a key we do not have", dns.rcode.NOTAUTH, "tsig") from None
    except Exception as exc:  # dnspython raises FormError and friends, and sometimes ValueError etc.
        raise DnsQueryError(f"malformed: {type(exc).__name__}", dns.rcode.FORMERR, "malformed") from None
    if len(msg.question) != 1:  # cannot happen with qdcount 1, but the rest relies on it
        raise DnsQueryError("not exactly one question", dns.rcode.FORMERR, "qdcount")
    if _question_length(data) is None:   # only a pointer into the header could be there: nonsense
        raise DnsQueryError("compressed question name", dns.rcode.FORMERR, "malformed")
    return msg


def _question_length(data: bytes) -> int | None:
    """Bytes of the first question from offset 12 (parsed by dnspython already), or None
    if its name is compressed."""
    i = HEADER_BYTES
    while data[i]:
        if data[i] >= 0x40:
            return None
        i += 1 + data[i]
    return i + 1 + 4 - HEADER_BYTES


def _ldh_name(labels) -> bool:
    return all(label and len(label) <= 63 and label[0] != 0x2D and label[-1] != 0x2D
               and all(c in _LDH for c in label) for label in labels)


class OverlayResolver:
    def __init__(self, domain: str, *, self_names: dict[str, str] | None = None,
                 prefix: str | None = None, hold_s: float = 5.0, ttl: int = 30,
                 max_pending: int = 256, passthrough: bool = True, ipv6: bool = False,
                 max_forwards: int = DEFAULT_MAX_FORWARDS) -> None:
        self.domain = dns.name.from_text(domain.strip(".").lower() + ".")
        self.self_names: dict[str, str] = {}
        self._reverse: OrderedDict[str, str] = OrderedDict()   # vip4 -> fqdn of tunnels seen up (LRU)
        self._self_reverse: dict[str, str] = {}
        for name, vip in (self_names or {}).items():
            fqdn = self._norm(name)
            vip = str(ipaddress.IPv4Address(vip))
            self.self_names[fqdn] = vip
            self._self_reverse[vip] = fqdn
        self.prefix = ipaddress.IPv4Network(prefix, strict=False) if prefix else None
        self.hold_s = float(hold_s)
        self.ttl = int(ttl)
        self.max_pending = int(max_pending)
        self.max_forwards = int(max_forwards)
        self.passthrough = passthrough
        self.ipv6 = ipv6  # accepted; AAAA of overlay names is NODATA for now (see module docstring)

        self._known: OrderedDict[tuple, str] = OrderedDict()   # (asker, fqdn) -> vip4
        self._pending: dict[tuple, _PendingName] = {}           # (asker, fqdn) -> waiters
        self._held = 0
        self._forwards: dict[int, _Forward] = {}
        self._forward_keys: dict[tuple, int] = {}               # (client, tcp, id, question) -> token
        self._tokens = itertools.count(1)
        self._timers: list = []                                 # heap of (deadline, seq, obj)
        self._seq = itertools.count()

        self._answers: deque = deque()
        self._resolves: list = []
        self._forward_out: list = []
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()

    # --- helpers -------------------------------------------------------------------------

    @staticmethod
    def _norm(fqdn: str) -> str:
        return fqdn.strip().rstrip(".").lower()

    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1

    def is_overlay(self, name: dns.name.Name) -> bool:
        return name.is_subdomain(self.domain)   # case-insensitive, the domain itself included

    def known_vip(self, fqdn: str, asker=None) -> str | None:
        fqdn = self._norm(fqdn)
        return self.self_names.get(fqdn) or self._known.get((asker, fqdn))

    def forward_pending(self, token) -> bool:
        """Whether the forwarded query ``token`` still waits for its upstream answer."""
        return token in self._forwards

    def pending_count(self) -> int:
        return self._held

    # --- input ---------------------------------------------------------------------------

    def receive_query(self, data: bytes, client, now: float, *, tcp: bool = False, asker=None) -> None:
        try:
            self._receive_query(bytes(data), client, now, tcp, asker)
        except Exception:  # no-throw boundary
            self._drop("internal")

    def _receive_query(self, data: bytes, client, now: float, tcp: bool, asker) -> None:
        self.counters["queries"] += 1
        try:
            query = parse_query(data)
        except DnsQueryError as exc:
            self._drop(exc.reason)
            if exc.rcode is not None:
                self._count_rcode(exc.rcode)
                self._queue(header_only_response(data, exc.rcode), client, tcp)
            return
        if query.edns > 0:   # RFC 6891 6.1.3: we speak EDNS version 0 only
            self._answer(query, client, tcp, dns.rcode.BADVERS)
            return
        q = query.question[0]
        if q.rdclass != dns.rdataclass.IN or q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            self._answer(query, client, tcp, dns.rcode.REFUSED)
            return
        if self.is_overlay(q.name):
            self._overlay_query(query, client, now, tcp, asker)
            return
        vip = self._overlay_address(q.name)
        if vip is not None:
            self._reverse_query(query, vip, client, tcp)
            return
        if not self.passthrough:
            self._answer(query, client, tcp, dns.rcode.REFUSED, ede=(EDE_PROHIBITED, "passthrough is off"))
            return
        self._forward(query, data, client, now, tcp)

    def _overlay_query(self, query: dns.message.Message, client, now: float, tcp: bool, asker) -> None:
        self.counters["overlay_queries"] += 1
        q = query.question[0]
        fqdn = q.name.to_text(omit_final_dot=True).lower() if _ldh_name(
            [label.lower() for label in q.name.labels[:-1]]) else None
        vip = None
        if fqdn is not None:
            vip = self.self_names.get(fqdn) or self._known.get((asker, fqdn))
            if vip is not None and (asker, fqdn) in self._known:
                self._known.move_to_end((asker, fqdn))
        if vip is not None or q.name == self.domain:
            if vip is not None and q.rdtype == dns.rdatatype.A:
                self._answer_a(query, client, tcp, vip)
            else:
                self._answer(query, client, tcp, dns.rcode.NOERROR, aa=True)   # NODATA
            return
        if fqdn is None:
            self._drop("bad_name")
            self._answer(query, client, tcp, dns.rcode.NXDOMAIN, aa=True)
            return
        if q.rdtype != dns.rdatatype.A:
            self._answer(query, client, tcp, dns.rcode.NOERROR, aa=True)       # NODATA, see docstring
            return
        self._hold(query, (asker, fqdn), client, now, tcp)

    def _hold(self, query: dns.message.Message, key: tuple, client, now: float, tcp: bool) -> None:
        pending = self._pending.get(key)
        if pending is not None:
            for w in pending.waiters:
                if w.client == client and w.tcp == tcp and w.query.id == query.id:
                    self._drop("duplicate_held")   # a retransmission: it is already waiting
                    return
        if self._held >= self.max_pending:
            self._drop("pending_full")
            self._answer(query, client, tcp, dns.rcode.SERVFAIL,
                         ede=(EDE_OTHER, "too many queries waiting for tunnels"))
            return
        waiter = _Waiter(key, client, tcp, query, now + self.hold_s)
        if pending is None:
            pending = self._pending[key] = _PendingName()
            self._resolves.append((key[1], key[0]))
            self.counters["resolves"] += 1
        pending.waiters.append(waiter)
        self._held += 1
        self._push_timer(waiter)

    def _overlay_address(self, name: dns.name.Name) -> str | None:
        """The IPv4 address named by a reverse name under in-addr.arpa, if it is in our prefix."""
        if self.prefix is None or len(name.labels) != 7:
            return None
        labels = [label.lower() for label in name.labels]
        if tuple(labels[4:]) != _IN_ADDR_ARPA:
            return None
        octets = []
        for label in reversed(labels[:4]):
            if not label.isdigit() or len(label) > 3 or (len(label) > 1 and label[0] == 0x30):
                return None
            octets.append(int(label))
        if max(octets) > 255:
            return None
        addr = ipaddress.IPv4Address(bytes(octets))
        return str(addr) if addr in self.prefix else None

    def _reverse_query(self, query: dns.message.Message, vip: str, client, tcp: bool) -> None:
        self.counters["ptr_queries"] += 1
        fqdn = self._self_reverse.get(vip) or self._reverse.get(vip)
        if fqdn is None:
            self._answer(query, client, tcp, dns.rcode.NXDOMAIN, aa=True)
            return
        q = query.question[0]
        if q.rdtype != dns.rdatatype.PTR:
            self._answer(query, client, tcp, dns.rcode.NOERROR, aa=True)
            return
        rrset = dns.rrset.from_text(q.name, self.ttl, "IN", "PTR", fqdn + ".")
        self._answer(query, client, tcp, dns.rcode.NOERROR, aa=True, answer=rrset)

    def _forward(self, query: dns.message.Message, data: bytes, client, now: float, tcp: bool) -> None:
        question_wire = data[HEADER_BYTES:HEADER_BYTES + _question_length(data)]
        dedup = (client, tcp, query.id, question_wire)
        token = self._forward_keys.get(dedup)
        if token is not None:          # the client retransmitted: send it upstream again, same token
            self._drop("duplicate_forward")
            self._forward_out.append((token, data))
            return
        if len(self._forwards) >= self.max_forwards:
            self._drop("forwards_full")
            self._answer(query, client, tcp, dns.rcode.SERVFAIL,
                         ede=(EDE_OTHER, "too many queries waiting for the upstream resolver"))
            return
        token = next(self._tokens)
        f = _Forward(token, client, tcp, query, question_wire, dedup, now + self.hold_s)
        self._forwards[token] = f
        self._forward_keys[dedup] = token
        self._forward_out.append((token, data))
        self.counters["forwarded"] += 1
        self._push_timer(f)

    # --- results from the engine ---------------------------------------------------------

    def tunnel_up(self, fqdn: str, vip4: str, now: float, *, asker=None) -> None:
        try:
            fqdn = self._norm(fqdn)
            vip4 = str(ipaddress.IPv4Address(vip4))
        except Exception:
            self._drop("bad_tunnel_up")
            return
        try:
            key = (asker, fqdn)
            self._known[key] = vip4
            self._known.move_to_end(key)
            while len(self._known) > KNOWN_NAMES_MAX:
                self._known.popitem(last=False)
            self._reverse[vip4] = fqdn
            self._reverse.move_to_end(vip4)
            while len(self._reverse) > KNOWN_NAMES_MAX:
                self._reverse.popitem(last=False)
            for w in self._take_waiters(key):
                self._answer_a(w.query, w.client, w.tcp, vip4)
        except Exception:
            self._drop("internal")

    def tunnel_failed(self, fqdn: str, code: sig.ErrorCode, now: float, *, asker=None) -> None:
        try:
            key = (asker, self._norm(fqdn))
            self._known.pop(key, None)
            try:
                code = sig.ErrorCode(code)
                text = code.describe()
            except ValueError:
                text = f"error {code}"
            rcode = FAILURE_RCODES.get(code, dns.rcode.SERVFAIL)
            ede = (EDE_PROHIBITED if rcode == dns.rcode.REFUSED else EDE_NO_REACHABLE_AUTHORITY, text)
            for w in self._take_waiters(key):
                self._answer(w.query, w.client, w.tcp, rcode, aa=True, ede=ede)
        except Exception:
            self._drop("internal")

    def forget(self, fqdn: str, *, asker=None) -> None:
        """The tunnel to ``fqdn`` went away: the next query resolves again."""
        self._known.pop((asker, self._norm(fqdn)), None)

    def _take_waiters(self, key: tuple) -> list:
        pending = self._pending.pop(key, None)
        if pending is None:
            return []
        for w in pending.waiters:
            w.done = True
        self._held -= len(pending.waiters)
        return pending.waiters

    # --- results from upstream -----------------------------------------------------------

    def upstream_answer(self, token, data: bytes, now) -> None:
        try:
            self._upstream_answer(token, bytes(data))
        except Exception:
            self._drop("internal")

    def _upstream_answer(self, token, data: bytes) -> None:
        f = self._forwards.get(token)
        if f is None:
            self._drop("upstream_unknown")
            return
        qlen = len(f.question_wire)
        if len(data) < HEADER_BYTES + qlen:
            self._drop("upstream_short")
            return
        flags, qdcount = struct.unpack_from("!HH", data, 2)
        got = data[HEADER_BYTES:HEADER_BYTES + qlen]
        if (not flags & dns.flags.QR or qdcount != 1 or got[:-4].lower() != f.question_wire[:-4].lower()
                or got[-4:] != f.question_wire[-4:]):
            self._drop("upstream_mismatch")   # keep waiting: the genuine answer may still come
            return
        self._finish_forward(f)
        reply = struct.pack("!H", f.query.id) + data[2:]
        limit = self._limit(f.query, f.tcp)
        if len(reply) > limit:   # the client cannot take it: header + question, TC set
            flags |= dns.flags.TC
            reply = struct.pack("!HHHHHH", f.query.id, flags, 1, 0, 0, 0) + f.question_wire
            self.counters["truncated"] += 1
        self.counters["relayed"] += 1
        self._queue(reply, f.client, f.tcp)

    def upstream_failed(self, token, now) -> None:
        try:
            f = self._forwards.get(token)
            if f is None:
                self._drop("upstream_unknown")
                return
            self._finish_forward(f)
            self._answer(f.query, f.client, f.tcp, dns.rcode.SERVFAIL,
                         ede=(EDE_NO_REACHABLE_AUTHORITY, "upstream resolver failed"))
        except Exception:
            self._drop("internal")

    def _finish_forward(self, f: _Forward) -> None:
        f.done = True
        self._forwards.pop(f.token, None)
        self._forward_keys.pop(f.dedup, None)

    # --- timers --------------------------------------------------------------------------

    def _push_timer(self, obj) -> None:
        heapq.heappush(self._timers, (obj.deadline, next(self._seq), obj))
        if len(self._timers) > 2 * (self._held + len(self._forwards)) + 64:
            self._timers = [t for t in self._timers if not t[2].done]
            heapq.heapify(self._timers)

    def get_timer(self) -> float | None:
        while self._timers and self._timers[0][2].done:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now) -> None:
        try:
            while self._timers and (self._timers[0][2].done or self._timers[0][0] <= now):
                _, _, obj = heapq.heappop(self._timers)
                if obj.done:
                    continue
                self.counters["timeouts"] += 1
                if isinstance(obj, _Waiter):
                    self._expire_waiter(obj)
                    self._answer(obj.query, obj.client, obj.tcp, dns.rcode.SERVFAIL, aa=True,
                                 ede=(EDE_NO_REACHABLE_AUTHORITY, "tunnel not up in time"))
                else:
                    self._finish_forward(obj)
                    self._answer(obj.query, obj.client, obj.tcp, dns.rcode.SERVFAIL,
                                 ede=(EDE_NO_REACHABLE_AUTHORITY, "upstream resolver did not answer"))
        except Exception:
            self._drop("internal")

    def _expire_waiter(self, w: _Waiter) -> None:
        w.done = True
        self._held -= 1
        pending = self._pending.get(w.key)
        if pending is None:
            return
        pending.waiters.remove(w)
        if not pending.waiters:   # nobody waits: a later query asks the engine again
            del self._pending[w.key]

    # --- output --------------------------------------------------------------------------

    def answers_to_send(self) -> list:
        out = list(self._answers)
        self._answers.clear()
        return out

    def resolves_wanted(self) -> list:
        out, self._resolves = self._resolves, []
        return out

    def forwards_wanted(self) -> list:
        out, self._forward_out = self._forward_out, []
        return out

    def _queue(self, data: bytes, client, tcp: bool) -> None:
        if len(self._answers) >= ANSWERS_QUEUED_MAX:
            self._answers.popleft()
            self._drop("answer_queue_full")
        self._answers.append((data, client, tcp))

    def _count_rcode(self, rcode: int) -> None:
        self.counters[RCODE_COUNTERS.get(rcode, f"rcode_{rcode}")] += 1

    @staticmethod
    def _limit(query: dns.message.Message, tcp: bool) -> int:
        if tcp:
            return TCP_MAX_BYTES
        if query.edns < 0:
            return UDP_PLAIN_MAX_BYTES
        return max(UDP_PLAIN_MAX_BYTES, min(query.payload, TCP_MAX_BYTES))

    def _answer_a(self, query: dns.message.Message, client, tcp: bool, vip4: str) -> None:
        q = query.question[0]
        rrset = dns.rrset.from_text(q.name, self.ttl, "IN", "A", vip4)
        self.counters["answered_a"] += 1
        self._answer(query, client, tcp, dns.rcode.NOERROR, aa=True, answer=rrset)

    def _answer(self, query: dns.message.Message, client, tcp: bool, rcode: int, *, aa: bool = False,
                answer: dns.rrset.RRset | None = None, ede: tuple[int, str] | None = None) -> None:
        r = dns.message.make_response(query, recursion_available=True, our_payload=EDNS_PAYLOAD_BYTES, pad=0)
        if aa:
            r.flags |= dns.flags.AA
        if ede is not None and query.edns >= 0:
            r.use_edns(0, 0, EDNS_PAYLOAD_BYTES, query.payload,
                       options=[dns.edns.EDEOption(ede[0], ede[1][:200])])
        r.set_rcode(rcode)
        if answer is not None:
            r.answer.append(answer)
        self._count_rcode(rcode)
        if rcode == dns.rcode.NOERROR and answer is None:
            self.counters["nodata"] += 1
        try:
            wire = r.to_wire(max_size=self._limit(query, tcp))
        except dns.exception.TooBig:   # only the question (at most 259 bytes) and OPT left: fits
            r.answer.clear()
            r.flags |= dns.flags.TC
            wire = r.to_wire()
            self.counters["truncated"] += 1
        self._queue(wire, client, tcp)
