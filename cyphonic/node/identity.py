"""A node's identity on disk: its X25519 key and its certificate, in one directory.

``<dir>/identity.key`` (hex, 0600) is made on first use and never changes: the cloud knows
the node by it, so the virtual IP and FQDN follow it. ``<dir>/certificate`` (hex, 0600) is
what the last login returned. The node daemon keeps one in its ``state_dir``; the adapter one
per general node under ``<state_dir>/gn/<mac>/``. Writes are durable (``cyphonic.atomic_file``).
"""

from __future__ import annotations

import os

from .. import crypto
from ..cloud.keys import read_secret, write_secret
from ..handshake import StaticIdentity

KEY_FILE = "identity.key"
CERT_FILE = "certificate"


def load_identity(directory: str) -> StaticIdentity:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key_path = os.path.join(directory, KEY_FILE)
    if not os.path.exists(key_path):
        write_secret(key_path, crypto.random_bytes(32))
    priv = read_secret(key_path, 32)
    cert = b""
    cert_path = os.path.join(directory, CERT_FILE)
    if os.path.exists(cert_path):
        with open(cert_path) as f:
            cert = bytes.fromhex(f.read().strip())
    return StaticIdentity(priv, crypto.x25519_public(priv), cert)


def save_certificate(directory: str, certificate: bytes) -> None:
    write_secret(os.path.join(directory, CERT_FILE), certificate)
