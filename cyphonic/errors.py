"""Exception types of the protocol core.

Two families, as h11 splits them:
- ``LocalProtocolError``: we were asked to do something the protocol forbids
  (a caller bug, or a state that cannot send).
- ``RemoteProtocolError``: the peer's input is bad. It carries ``reason`` (a short
  machine-readable word used as a drop counter key) and, where the sender can be
  answered, the error code to answer with.

Every parser raises ``ParseError`` (a ``RemoteProtocolError``) for any malformed
input and never anything else; the fuzz tests hold it to that.
"""

from __future__ import annotations

import enum


class CyphonicError(Exception):
    """Base of every error the core raises on purpose."""


class LocalProtocolError(CyphonicError):
    """The caller asked for something the protocol or state does not allow."""


class RemoteProtocolError(CyphonicError):
    """Bad input from the network. ``reason`` is the drop-counter key."""

    reason: str = "remote"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ParseError(RemoteProtocolError):
    """Malformed bytes: wrong length, unknown type, wrong version, bad field."""

    reason = "malformed"


class AuthenticationError(RemoteProtocolError):
    """An AEAD tag, MAC or signature did not verify."""

    reason = "auth"


class ReplayError(RemoteProtocolError):
    """A counter or timestamp was seen before, or is too old."""

    reason = "replay"


class RateLimitedError(RemoteProtocolError):
    """Input dropped because its source exceeded its rate."""

    reason = "ratelimited"


class CertReason(enum.Enum):
    """Why a certificate was refused. The value is what ``cyadm`` and logs print."""

    MALFORMED = "malformed certificate"
    UNKNOWN_SIGNER = "signed by an unknown authority"
    BAD_SIGNATURE = "signature does not verify"
    NOT_YET_VALID = "not yet valid"
    EXPIRED = "expired"
    NAME_MISMATCH = "name does not match"
    REVOKED = "serial revoked"
    KEY_MISMATCH = "static key does not match the certificate"


class CertificateError(RemoteProtocolError):
    """A certificate was refused; ``cert_reason`` says precisely why."""

    reason = "cert"

    def __init__(self, cert_reason: CertReason, detail: str = "") -> None:
        self.cert_reason = cert_reason
        text = cert_reason.value + (f": {detail}" if detail else "")
        super().__init__(text, reason="cert_" + cert_reason.name.lower())
