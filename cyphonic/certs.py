"""The Authentication Service's certificate authority: issue and verify node certificates.

A certificate binds FQDN, virtual IPv4 (IPv6 optional), the node's static
X25519 public key, groups, a validity period and a serial, under the CA's
Ed25519 signature. Every node pins the CA public key at enrollment; a peer's
certificate is accepted only through ``TrustStore.verify``, which fails with a
precise ``CertReason`` (expired, unknown signer, name mismatch, revoked...).

Never: accept a certificate whose static key differs from the key that
actually took part in the handshake (``expected_static``).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field, replace
from typing import Iterable

from . import constants as C
from . import crypto
from .errors import CertificateError, CertReason, ParseError
from .wire import cert as wire_cert
from .wire.cert import Certificate

__all__ = ["Certificate", "CertificateAuthority", "TrustStore", "key_id"]


def key_id(ca_public: bytes) -> bytes:
    return hashlib.blake2b(ca_public, digest_size=32).digest()[:8]


@dataclass
class CertificateAuthority:
    """An Ed25519 signing key. ``secret`` is 64 bytes (libsodium format)."""

    secret: bytes
    public: bytes

    @classmethod
    def generate(cls, seed: bytes | None = None) -> "CertificateAuthority":
        sk, pk = crypto.ed25519_keypair(seed)
        return cls(sk, pk)

    @property
    def key_id(self) -> bytes:
        return key_id(self.public)

    def issue(self, *, serial: int, fqdn: str, vip4: str | ipaddress.IPv4Address,
              static_public: bytes, not_before: int, not_after: int,
              groups: Iterable[str] = (), vip6: str | None = None) -> Certificate:
        cert = Certificate(
            serial=serial, not_before=int(not_before), not_after=int(not_after),
            issuer_id=self.key_id, static_public=bytes(static_public),
            vip4=ipaddress.IPv4Address(vip4), fqdn=fqdn, groups=tuple(groups),
            vip6=ipaddress.IPv6Address(vip6) if vip6 else None)
        sig = crypto.ed25519_sign(self.secret, wire_cert.SIGNING_CONTEXT + cert.tbs())
        signed = replace(cert, signature=sig)
        signed.encode()  # size and field checks now, not at the peer
        return signed


@dataclass
class TrustStore:
    """The CA keys a node trusts and the serials the cloud has revoked."""

    ca_keys: dict[bytes, bytes] = field(default_factory=dict)  # key id -> Ed25519 public key
    revoked: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, *ca_publics: bytes, revoked: Iterable[int] = ()) -> "TrustStore":
        return cls({key_id(pk): pk for pk in ca_publics}, set(revoked))

    def verify(self, cert: bytes | Certificate, now: float, *,
               expected_fqdn: str | None = None,
               expected_static: bytes | None = None,
               skew_s: float = C.MAX_CLOCK_SKEW_S) -> Certificate:
        """Return the parsed certificate or raise ``CertificateError`` saying why not."""
        if not isinstance(cert, Certificate):
            try:
                cert = wire_cert.decode(cert)
            except ParseError as exc:
                raise CertificateError(CertReason.MALFORMED, str(exc)) from exc
        ca_public = self.ca_keys.get(cert.issuer_id)
        if ca_public is None:
            raise CertificateError(CertReason.UNKNOWN_SIGNER, cert.issuer_id.hex())
        if not crypto.ed25519_verify(ca_public, wire_cert.SIGNING_CONTEXT + cert.tbs(), cert.signature):
            raise CertificateError(CertReason.BAD_SIGNATURE, cert.fqdn)
        if now + skew_s < cert.not_before:
            raise CertificateError(CertReason.NOT_YET_VALID, f"{cert.fqdn} valid from {cert.not_before}")
        if now - skew_s > cert.not_after:
            raise CertificateError(CertReason.EXPIRED, f"{cert.fqdn} expired at {cert.not_after}")
        if cert.serial in self.revoked:
            raise CertificateError(CertReason.REVOKED, f"{cert.fqdn} serial {cert.serial}")
        if expected_fqdn is not None and cert.fqdn != expected_fqdn:
            raise CertificateError(CertReason.NAME_MISMATCH, f"expected {expected_fqdn}, got {cert.fqdn}")
        if expected_static is not None and not crypto.constant_time_eq(cert.static_public, expected_static):
            raise CertificateError(CertReason.KEY_MISMATCH, cert.fqdn)
        return cert
