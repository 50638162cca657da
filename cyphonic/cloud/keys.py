"""The cloud's keys, kept 0600 in its state directory.

- ``ca.key``: the Authentication Service's Ed25519 CA seed (signs certificates)
- ``signaling.key``: the X25519 static key of the control channel (nodes pin its public half)
- ``relay.key``: the key the NMS and the TRS share to mint and check relay tokens

The **cloud key** that nodes pin at enrollment is one string,
``cyk1:<CA public key hex>:<signaling public key hex>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import crypto
from ..atomic_file import write_atomic
from ..certs import CertificateAuthority
from ..errors import CyphonicError
from ..handshake import StaticIdentity

CLOUD_KEY_PREFIX = "cyk1"


class KeyError_(CyphonicError):
    pass


@dataclass(frozen=True)
class CloudKeys:
    ca: CertificateAuthority
    signaling: StaticIdentity
    relay_key: bytes

    @property
    def cloud_key(self) -> str:
        return f"{CLOUD_KEY_PREFIX}:{self.ca.public.hex()}:{self.signaling.public.hex()}"


def parse_cloud_key(text: str) -> tuple[bytes, bytes]:
    """(CA public key, signaling public key) from a cloud key string; raises CyphonicError."""
    parts = text.strip().split(":")
    try:
        if len(parts) != 3 or parts[0] != CLOUD_KEY_PREFIX:
            raise ValueError
        ca, sig = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
        if len(ca) != 32 or len(sig) != 32:
            raise ValueError
    except ValueError:
        raise CyphonicError(f"not a cloud key (expected {CLOUD_KEY_PREFIX}:<64 hex>:<64 hex>): {text[:80]!r}") from None
    return ca, sig


def write_secret(path: str, data: bytes) -> None:
    """A secret (key, certificate) as one hex line, mode 0600, atomically and durably."""
    write_atomic(path, data.hex().encode() + b"\n", mode=0o600)


def read_secret(path: str, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = bytes.fromhex(f.read().decode().strip())
    except FileNotFoundError:
        raise KeyError_(f"{path}: missing (run `cyphonic-cloud init`)") from None
    except (ValueError, UnicodeDecodeError):
        raise KeyError_(f"{path}: not a hex key") from None
    if len(data) != size:
        raise KeyError_(f"{path}: expected {size} bytes, found {len(data)}")
    return data


def create_keys(state_dir: str) -> CloudKeys:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    for name in ("ca.key", "signaling.key", "relay.key"):
        if os.path.exists(os.path.join(state_dir, name)):
            raise KeyError_(f"{os.path.join(state_dir, name)} exists: refusing to overwrite the cloud's keys")
    write_secret(os.path.join(state_dir, "ca.key"), crypto.random_bytes(32))
    write_secret(os.path.join(state_dir, "signaling.key"), crypto.random_bytes(32))
    write_secret(os.path.join(state_dir, "relay.key"), crypto.random_bytes(32))
    return load_keys(state_dir)


def load_keys(state_dir: str) -> CloudKeys:
    seed = read_secret(os.path.join(state_dir, "ca.key"), 32)
    sig_priv = read_secret(os.path.join(state_dir, "signaling.key"), 32)
    relay = read_secret(os.path.join(state_dir, "relay.key"), 32)
    return CloudKeys(CertificateAuthority.generate(seed=seed),
                     StaticIdentity(sig_priv, crypto.x25519_public(sig_priv)), relay)
