"""Node certificate wire format (signed by the Authentication Service's Ed25519 key).

Layout (network byte order), ``docs/protocol.md`` "Certificates":

    0   1  version (1)
    1   1  flags (bit 0: an IPv6 virtual address follows vip4; other bits 0)
    2   8  serial
    10  8  not_before (Unix seconds)
    18  8  not_after  (Unix seconds)
    26  8  issuer key id (first 8 bytes of BLAKE2b-256 of the CA public key)
    34 32  node static X25519 public key
    66  4  virtual IPv4
    70 16  virtual IPv6 (only with flag bit 0)
    ..  1+n FQDN (length n <= MAX_FQDN_BYTES, lower-case LDH name)
    ..  1  group count (<= MAX_GROUPS), then each group: length (<= MAX_GROUP_BYTES) + UTF-8
    .. 64  Ed25519 signature over SIGNING_CONTEXT || every byte before it

A whole certificate is at most MAX_CERT_BYTES. Each of these maxima is accepted
and one more is refused: by ``decode`` with ``ParseError``, by ``encode`` with
``ValueError``.

Parsing checks structure only; ``cyphonic.certs`` verifies signature, validity,
name and revocation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property

from .. import constants as C
from ..errors import ParseError
from .common import Reader, Writer, validate_fqdn

CERT_VERSION = 1
SIGNING_CONTEXT = b"cyphonic certificate v1\x00"
FLAG_VIP6 = 0x01


@dataclass(frozen=True)
class Certificate:
    serial: int
    not_before: int
    not_after: int
    issuer_id: bytes
    static_public: bytes
    vip4: ipaddress.IPv4Address
    fqdn: str
    groups: tuple[str, ...] = ()
    vip6: ipaddress.IPv6Address | None = None
    signature: bytes = field(default=b"\x00" * 64, compare=True)

    @cached_property
    def vip4_packed(self) -> bytes:
        """``vip4`` as 4 bytes (what the packet paths compare), computed once."""
        return self.vip4.packed

    def tbs(self) -> bytes:
        """The bytes the signature covers (without the signing context)."""
        w = Writer()
        w.u8(CERT_VERSION).u8(FLAG_VIP6 if self.vip6 is not None else 0)
        w.u64(self.serial).u64(self.not_before).u64(self.not_after)
        if len(self.issuer_id) != 8 or len(self.static_public) != 32:
            raise ValueError("issuer_id must be 8 bytes and static_public 32")
        w.raw(self.issuer_id).raw(self.static_public).raw(self.vip4.packed)
        if self.vip6 is not None:
            w.raw(self.vip6.packed)
        w.text(self.fqdn, C.MAX_FQDN_BYTES, "fqdn")
        if len(self.groups) > C.MAX_GROUPS:
            raise ValueError(f"at most {C.MAX_GROUPS} groups")
        w.u8(len(self.groups))
        for g in self.groups:
            w.text(g, C.MAX_GROUP_BYTES, "group")
        return w.getvalue()

    def encode(self) -> bytes:
        if len(self.signature) != 64:
            raise ValueError("signature must be 64 bytes")
        out = self.tbs() + self.signature
        if len(out) > C.MAX_CERT_BYTES:
            raise ValueError("certificate too large")
        return out


def decode(data: bytes) -> Certificate:
    """Parse a certificate; raises ParseError for anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("certificate: expected bytes")
    if len(data) > C.MAX_CERT_BYTES:
        raise ParseError("certificate: too large", reason="oversize")
    r = Reader(data)
    version = r.u8("version")
    if version != CERT_VERSION:
        raise ParseError(f"certificate: version {version} unsupported", reason="version")
    flags = r.u8("flags")
    if flags & ~FLAG_VIP6:
        raise ParseError("certificate: unknown flags")
    serial = r.u64("serial")
    not_before = r.u64("not_before")
    not_after = r.u64("not_after")
    issuer_id = r.take(8, "issuer_id")
    static_public = r.take(32, "static_public")
    vip4 = ipaddress.IPv4Address(r.take(4, "vip4"))
    vip6 = ipaddress.IPv6Address(r.take(16, "vip6")) if flags & FLAG_VIP6 else None
    fqdn = validate_fqdn(r.text(C.MAX_FQDN_BYTES, "fqdn"))
    n_groups = r.u8("group count")
    if n_groups > C.MAX_GROUPS:
        raise ParseError(f"certificate: {n_groups} groups exceeds {C.MAX_GROUPS}")
    groups = tuple(r.text(C.MAX_GROUP_BYTES, "group") for _ in range(n_groups))
    signature = r.take(64, "signature")
    r.expect_end("certificate")
    if not_after < not_before:
        raise ParseError("certificate: not_after before not_before")
    return Certificate(serial, not_before, not_after, issuer_id, static_public, vip4,
                       fqdn, groups, vip6, signature)
