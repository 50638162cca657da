"""Sealing and opening data-channel packets: the per-packet hot path.

One session key per direction, agreed by the handshake. The 64-bit counter in
the header is split into a **stream id** (top 8 bits) and a per-stream counter
(56 bits). Each sender of a session (a worker process of the adapter, or the
single data path of a node daemon) owns one stream id for as long as the key
lives and counts in it from 0; the session owner hands out stream ids and
never gives the same id twice for one key (a restarted worker gets a fresh
one). Hence (key, nonce) never repeats, without any coordination per packet.

The receiver keeps one RFC 6479 window per stream id (allocated on the first
authenticated packet of that stream, at most MAX_RECEIVE_STREAMS_PER_SESSION),
so a fast stream never pushes a slow stream's counters out of the window.
The reasoning is written down in docs/protocol.md, "Several workers, one session".

Performance: libsodium is called through PyNaCl's cffi layer with
preallocated (per process) buffers whose bytes 4..16 (receiver index, counter)
are the nonce, so sealing costs one struct pack, one C call and one copy (about
4x less than ``nacl.bindings``' wrapper; ``make bench`` measures it). The data
path of the node daemon goes further and copies nothing: it reads a packet from
the TUN straight into ``SEAL_STAGE`` and seals it there in place
(``SendStream.seal_staged``), sends from ``SEALED``, receives a datagram straight
into ``RECV_STAGE`` and opens it from there into ``OPENED``
(``ReceiveSession.open_staged``). ``seal`` and ``open`` stage their argument and
run the same code, so there is one implementation of each.

Never: seal with a counter that was used before, move a replay window before
the tag verified, or return a plaintext whose tag did not verify.
"""

from __future__ import annotations


from nacl._sodium import ffi, lib

from . import constants as C
from .errors import AuthenticationError, LocalProtocolError, ParseError, ReplayError
from .replay import ReplayWindow
from .wire.data import HEADER, MIN_DATA_BYTES, MSG_DATA

_HDR = C.DATA_HEADER_BYTES
_TAG = C.AEAD_TAG_BYTES
_STREAM_SHIFT = C.STREAM_COUNTER_BITS
_STREAM_COUNTER_MASK = (1 << C.STREAM_COUNTER_BITS) - 1
_NULL = ffi.NULL
# libsodium picks its SIMD implementations (ChaCha20 with SSSE3/AVX2, ...) in sodium_init;
# without it the portable ones run, about half as fast for a 1.3 KB packet. PyNaCl calls it
# when nacl.bindings is imported; the hot path must not depend on that import order.
if lib.sodium_init() < 0:
    raise ImportError("libsodium could not be initialised")
_encrypt = lib.crypto_aead_chacha20poly1305_ietf_encrypt
_decrypt = lib.crypto_aead_chacha20poly1305_ietf_decrypt
_pack_header = HEADER.pack_into
_unpack_header = HEADER.unpack_from
_BUF_BYTES = C.MAX_INNER_PACKET_BYTES + _HDR + _TAG
_MAX_INNER = C.MAX_INNER_PACKET_BYTES
_MAX_DATAGRAM = C.MAX_DATAGRAM_BYTES
_REJECT_AFTER_MESSAGES = C.REJECT_AFTER_MESSAGES

RECV_BUFFER_BYTES = 65536   # any UDP datagram fits (a larger one is refused as oversize)

# One buffer per process for sealing, one for receiving and one for opening, shared by
# every session: whoever stages bytes in one uses the result before the next packet, so
# sessions never see each other's bytes, and ten thousand sessions cost no more buffer
# memory than one. Not for use from several threads at once (the adapter's workers are
# processes).
_SEAL_OUT = ffi.new("unsigned char[]", _BUF_BYTES)   # header || plaintext, sealed in place
_SEAL_BUF = ffi.buffer(_SEAL_OUT)
_SEAL_NONCE = _SEAL_OUT + 4          # receiver index || counter, inside the header
_SEAL_CT = _SEAL_OUT + _HDR
_RECV_IN = ffi.new("unsigned char[]", RECV_BUFFER_BYTES)  # a received datagram
_RECV_BUF = ffi.buffer(_RECV_IN)
_RECV_NONCE = _RECV_IN + 4
_RECV_CT = _RECV_IN + _HDR
_OPEN_OUT = ffi.new("unsigned char[]", _BUF_BYTES)
_OPEN_BUF = ffi.buffer(_OPEN_OUT)

# The stages of the zero-copy path (memoryviews: for readv, recvfrom_into, sendto, write) ...
SEAL_STAGE = memoryview(_SEAL_BUF)[_HDR:_HDR + _MAX_INNER]  # write a plaintext packet here ...
SEALED = memoryview(_SEAL_BUF)      # ... and send SEALED[:seal_staged(size)]
RECV_STAGE = memoryview(_RECV_BUF)  # receive a datagram here (recvfrom_into) ...
OPENED = memoryview(_OPEN_BUF)      # ... and deliver OPENED[:plaintext length]
# ... and the same buffers as cffi buffers, whose slices are bytes (a header field, a copy)
SEAL_BUFFER, RECV_BUFFER, OPEN_BUFFER = _SEAL_BUF, _RECV_BUF, _OPEN_BUF


class SendStream:
    """Seals packets for one (session key, stream id). Owned by exactly one sender."""

    __slots__ = ("key", "receiver_index", "stream_id", "mtype", "_next", "_base", "_limit",
                 "bytes_sent", "packets_sent")

    def __init__(self, key: bytes, receiver_index: int, stream_id: int = 0, start: int = 0,
                 mtype: int = MSG_DATA) -> None:
        if len(key) != C.KEY_BYTES:
            raise LocalProtocolError("session key must be 32 bytes")
        if not 0 <= stream_id < C.MAX_STREAMS:
            raise LocalProtocolError(f"stream id {stream_id} out of range")
        self.key = bytes(key)
        self.receiver_index = receiver_index
        self.stream_id = stream_id
        self.mtype = mtype
        self._base = stream_id << _STREAM_SHIFT
        self._next = self._base + start
        self._limit = self._base + C.REJECT_AFTER_MESSAGES
        self.bytes_sent = 0
        self.packets_sent = 0

    @property
    def counter(self) -> int:
        """Packets sealed so far in this stream."""
        return self._next - self._base

    @property
    def exhausted(self) -> bool:
        return self._next >= self._limit

    def seal(self, plaintext: bytes) -> bytes:
        """Return header || ciphertext || tag for ``plaintext`` (bytes; empty = keepalive)."""
        size = len(plaintext)
        if size > _MAX_INNER:
            raise LocalProtocolError("inner packet too large")
        SEAL_STAGE[0:size] = plaintext
        return _SEAL_BUF[0:self.seal_staged(size)]

    def seal_staged(self, size: int) -> int:
        """Seal, in place, the ``size``-byte plaintext staged in ``SEAL_STAGE``; the datagram
        (header || ciphertext || tag) is ``SEALED[:returned length]`` until the next seal."""
        n = self._next
        if n >= self._limit:
            raise LocalProtocolError("stream counter exhausted: rekey required")
        if not 0 <= size <= _MAX_INNER:
            raise LocalProtocolError("inner packet too large")
        self._next = n + 1
        _pack_header(_SEAL_BUF, 0, self.mtype, self.receiver_index, n)
        _encrypt(_SEAL_CT, _NULL, _SEAL_CT, size, _SEAL_OUT, _HDR, _NULL, _SEAL_NONCE, self.key)
        self.bytes_sent += size
        self.packets_sent += 1
        return size + _HDR + _TAG


class ReceiveSession:
    """Opens packets of one session key; one replay window per sender stream."""

    __slots__ = ("key", "local_index", "mtype", "_windows",
                 "bytes_received", "packets_received", "max_streams")

    def __init__(self, key: bytes, local_index: int,
                 max_streams: int = C.MAX_RECEIVE_STREAMS_PER_SESSION, mtype: int = MSG_DATA) -> None:
        if len(key) != C.KEY_BYTES:
            raise LocalProtocolError("session key must be 32 bytes")
        self.key = bytes(key)
        self.local_index = local_index
        self.max_streams = max_streams
        self.mtype = mtype
        self._windows: dict[int, ReplayWindow] = {}
        self.bytes_received = 0
        self.packets_received = 0

    def open(self, datagram: bytes) -> tuple[bytes, int]:
        """Return (plaintext, counter) or raise ParseError / ReplayError / AuthenticationError."""
        if not isinstance(datagram, (bytes, bytearray, memoryview)):
            raise ParseError("data packet: expected bytes", reason="type")
        size = len(datagram)
        if size < MIN_DATA_BYTES:
            raise ParseError("data packet too short", reason="short")
        if size > _MAX_DATAGRAM:
            raise ParseError("data packet oversize", reason="oversize")
        RECV_STAGE[0:size] = datagram
        plen, counter = self.open_staged(size)
        return _OPEN_BUF[0:plen], counter

    def open_staged(self, size: int) -> tuple[int, int]:
        """Open the ``size``-byte datagram staged in ``RECV_STAGE``: returns (plaintext length,
        counter), the plaintext being ``OPENED[:length]`` until the next open; or raises
        ParseError / ReplayError / AuthenticationError (the window moves only after the tag
        verified)."""
        if size < MIN_DATA_BYTES:
            raise ParseError("data packet too short", reason="short")
        if size > _MAX_DATAGRAM:
            raise ParseError("data packet oversize", reason="oversize")
        mtype, idx, counter = _unpack_header(_RECV_BUF)
        if mtype != self.mtype or idx != self.local_index or _RECV_BUF[1:4] != b"\x00\x00\x00":
            raise ParseError("data packet for another session", reason="index")
        stream = counter >> _STREAM_SHIFT
        seq = counter & _STREAM_COUNTER_MASK
        if seq >= _REJECT_AFTER_MESSAGES:
            raise ReplayError("counter past the per-stream limit", reason="counter_limit")
        window = self._windows.get(stream)
        if window is not None and not window.check(seq):
            raise ReplayError("counter replayed or too old")
        if window is None and len(self._windows) >= self.max_streams:
            raise ReplayError("too many sender streams for one session", reason="streams")
        clen = size - _HDR
        if _decrypt(_OPEN_OUT, _NULL, _NULL, _RECV_CT, clen, _RECV_IN, _HDR, _RECV_NONCE, self.key) != 0:
            raise AuthenticationError("data packet failed authentication")
        if window is None:
            window = self._windows[stream] = ReplayWindow()
        if not window.update(seq):
            raise ReplayError("counter replayed")
        plen = clen - _TAG
        self.bytes_received += plen
        self.packets_received += 1
        return plen, counter


def ipv4_addresses(packet: bytes) -> tuple[bytes, bytes] | None:
    """(source, destination) of an IPv4 packet as 4-byte strings, or None if not IPv4."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    return packet[12:16], packet[16:20]


def crypto_route_ok(packet: bytes, peer_vip4: bytes, local_vip4s: "set[bytes] | frozenset[bytes] | bytes") -> bool:
    """Crypto routing: the inner source must be the peer's virtual IP and the destination ours."""
    addrs = ipv4_addresses(packet)
    if addrs is None:
        return False
    src, dst = addrs
    if src != peer_vip4:
        return False
    if isinstance(local_vip4s, bytes):
        return dst == local_vip4s
    return dst in local_vip4s
