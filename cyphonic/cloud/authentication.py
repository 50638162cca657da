"""The Authentication Service (AS): enrollment tokens, logins, certificates.

- ``create_token`` makes a one-time (or reusable) enrollment token
  ``<id>.<secret>``; the store keeps the id and a BLAKE2b hash of the secret.
- ``login`` answers a ``LoginRequest`` that arrived over the control channel,
  whose handshake already proved the node holds the static key it claims:
  - a known identity logs in by that proof alone and gets a fresh certificate;
  - an unknown key must bring a valid token and becomes an identity with an
    FQDN and a virtual IPv4 that never change; the token is consumed in the
    same store transaction (``Store.enroll``), so a failed enrollment (no free
    address or name) leaves it usable;
  - revoked, unknown, replayed (used) and expired credentials are refused with
    an ``ErrorCode`` the node prints.
Sans-IO: the store is the only state, ``now`` is an argument.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass

from .. import crypto
from ..certs import CertificateAuthority
from ..errors import CyphonicError, ParseError
from ..wire import signaling as sig
from ..wire.common import validate_fqdn
from . import constants as CC
from .store import Identity, Store, StoreError, TokenError, TokenRecord


def _hash_secret(secret: bytes) -> bytes:
    return hashlib.blake2b(secret, digest_size=32, person=b"cyphonic-token").digest()


def validate_name(name: str) -> str:
    """A node name is one DNS label: lower-case letters, digits, hyphens, 1..63."""
    try:
        validate_fqdn(name)
    except ParseError as exc:
        raise CyphonicError(f"bad node name {name!r}: {exc}") from None
    if "." in name:
        raise CyphonicError(f"bad node name {name!r}: one label only (the domain is added)")
    return name


def create_token(store: Store, name: str, now: float, *, groups: tuple[str, ...] = ("default",),
                 reusable: bool = False, lifetime_s: float | None = None) -> str:
    validate_name(name)
    token_id = secrets.token_hex(CC.TOKEN_ID_BYTES)
    secret = secrets.token_bytes(CC.TOKEN_SECRET_BYTES)
    store.add_token(TokenRecord(token_id=token_id, secret_hash=_hash_secret(secret), name=name,
                                groups=tuple(groups), reusable=reusable,
                                expires_at=None if lifetime_s is None else now + lifetime_s,
                                created_at=now, used_at=None, uses=0))
    return f"{token_id}.{secret.hex()}"


def parse_token(token: bytes) -> tuple[str, bytes] | None:
    try:
        text = token.decode("ascii")
        token_id, _, secret_hex = text.partition(".")
        secret = bytes.fromhex(secret_hex)
    except (UnicodeDecodeError, ValueError):
        return None
    if len(token_id) != 2 * CC.TOKEN_ID_BYTES or len(secret) != CC.TOKEN_SECRET_BYTES:
        return None
    return token_id, secret


@dataclass
class LoginResult:
    reply: sig.Message
    log: str
    identity: Identity | None = None
    certificate: bytes = b""


class AuthenticationService:
    def __init__(self, store: Store, ca: CertificateAuthority, *, domain: str,
                 prefix: ipaddress.IPv4Network, cert_lifetime_s: float) -> None:
        self.store = store
        self.ca = ca
        self.domain = domain
        self.prefix = prefix
        self.cert_lifetime_s = cert_lifetime_s

    def login(self, msg: sig.LoginRequest, peer_static: bytes, now: float) -> LoginResult:
        def refuse(code: sig.ErrorCode, text: str, who: str = "?") -> LoginResult:
            return LoginResult(sig.Error(code=code, text=text), f"login refused node={who} code={code.name} {text}")

        if not crypto.constant_time_eq(msg.static_public, peer_static):
            return refuse(sig.ErrorCode.UNAUTHENTICATED, "static key differs from the channel's")
        identity = self.store.get_identity(peer_static)
        if identity is None:
            if not msg.token:
                return refuse(sig.ErrorCode.UNAUTHENTICATED, "unknown identity: enroll with a token")
            parsed = parse_token(msg.token)
            if parsed is None:
                return refuse(sig.ErrorCode.TOKEN_UNKNOWN, "malformed enrollment token")
            token_id, secret = parsed
            record = self.store.get_token(token_id)
            if record is None or not crypto.constant_time_eq(_hash_secret(secret), record.secret_hash):
                return refuse(sig.ErrorCode.TOKEN_UNKNOWN, "unknown enrollment token")
            names = self._candidate_names(record, msg.name_hint)
            try:
                identity, record = self.store.enroll(token_id, peer_static, names, self.domain, now,
                                                     self.prefix, set())
            except TokenError as exc:
                code = {"expired": sig.ErrorCode.TOKEN_EXPIRED, "used": sig.ErrorCode.TOKEN_USED}.get(
                    exc.reason, sig.ErrorCode.TOKEN_UNKNOWN)
                return refuse(code, f"enrollment token {exc.reason}", record.name)
            except StoreError as exc:
                return refuse(sig.ErrorCode.INTERNAL, str(exc), record.name)
            how = "enrolled"
        else:
            how = "login"
        if identity.revoked:
            return refuse(sig.ErrorCode.REVOKED, "identity revoked", identity.fqdn)
        not_after = int(now + self.cert_lifetime_s)
        serial = self.store.issue_serial(peer_static, not_after)     # one transaction
        cert = self.ca.issue(serial=serial, fqdn=identity.fqdn, vip4=identity.vip4,
                             static_public=peer_static, not_before=int(now) - CC.CERT_BACKDATE_S,
                             not_after=not_after, groups=identity.groups)
        encoded = cert.encode()
        reply = sig.LoginResponse(certificate=encoded, fqdn=identity.fqdn,
                                  vip4=ipaddress.IPv4Address(identity.vip4), vip6=None,
                                  prefix_len=self.prefix.prefixlen, overlay_domain=self.domain,
                                  cloud_time=int(now))
        return LoginResult(reply, f"{how} ok node={identity.fqdn} vip={identity.vip4} serial={serial}",
                           identity, encoded)

    @staticmethod
    def _candidate_names(record: TokenRecord, name_hint: str) -> list[str]:
        """The names to try, in order: the token's, or for a reusable token the node's
        hint (if valid) and then ``<name>-<n>`` numbered from this enrollment's use count."""
        if not record.reusable:
            return [record.name]
        hint_ok = False
        try:
            hint_ok = bool(name_hint) and validate_name(name_hint) == name_hint
        except CyphonicError:
            pass
        uses = record.uses + 1  # the count once this enrollment has consumed the token
        return ([name_hint] if hint_ok else []) + [f"{record.name}-{uses + i}" for i in range(0, 50)]
