"""Cryptographic primitives of the core, all from libsodium through PyNaCl.

- X25519 (``crypto_scalarmult``) with low-order points refused: libsodium
  returns an error when the shared secret is all zeros, which is exactly the
  case of a low-order (or zero) public key; we raise ``AuthenticationError``.
- ChaCha20-Poly1305 IETF AEAD for the handshake (Noise nonce: 32 zero bits,
  then the 64-bit counter little-endian).
- BLAKE2b (RFC 7693) from ``hashlib``: the same function as libsodium's
  ``crypto_generichash``; ``tests/test_crypto.py`` checks the two agree. HMAC
  and HKDF as the Noise specification defines them over BLAKE2b (HASHLEN 64).
- XChaCha20-Poly1305 IETF AEAD (24-byte random nonce) for cookie replies.
- Ed25519 for certificates.

The data channel's per-packet path does not go through this module's
convenience functions: ``cyphonic.datachannel`` calls libsodium through the
cffi layer with preallocated buffers (about 4x less per-call overhead).

Never: compare secrets with ``==`` (use ``constant_time_eq``), or return a
DH result of a low-order point.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import struct

import nacl.bindings as _b
from nacl._sodium import ffi, lib

from .errors import AuthenticationError

HASH_BYTES = 64
KEY_BYTES = 32

_dh_out = None


def random_bytes(n: int) -> bytes:
    return _b.randombytes(n)


# --- X25519 -----------------------------------------------------------------

def x25519_keypair() -> tuple[bytes, bytes]:
    """Return (private, public). The private key is clamped by libsodium on use."""
    priv = _b.randombytes(32)
    return priv, x25519_public(priv)


def x25519_public(priv: bytes) -> bytes:
    return _b.crypto_scalarmult_base(priv)


def x25519(priv: bytes, pub: bytes) -> bytes:
    """Shared secret; raises AuthenticationError for a low-order or malformed public key."""
    if len(priv) != 32 or len(pub) != 32:
        raise AuthenticationError("X25519 key of wrong length", reason="bad_key")
    out = ffi.new("unsigned char[]", 32)
    if lib.crypto_scalarmult(out, priv, pub) != 0:
        raise AuthenticationError("low-order X25519 public key refused", reason="low_order_key")
    return bytes(ffi.buffer(out, 32))


# --- AEAD for the handshake ---------------------------------------------------

def _noise_nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + struct.pack("<Q", n)


def aead_encrypt(key: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    return _b.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _noise_nonce(n), key)


def aead_decrypt(key: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    try:
        return _b.crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _noise_nonce(n), key)
    except Exception as exc:  # nacl.exceptions.CryptoError and friends
        raise AuthenticationError("AEAD tag did not verify") from exc


_XOUT = ffi.new("unsigned char[]", 64 + 16)


def xaead_encrypt(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    """XChaCha20-Poly1305: a random 24-byte nonce is safe under one long-lived key. Straight
    through the cffi layer for short messages (a cookie reply under a flood: PyNaCl's
    argument checks cost more than the cipher)."""
    if len(plaintext) > 64 or len(key) != 32 or len(nonce) != 24:
        return _b.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)
    n = len(plaintext) + 16
    lib.crypto_aead_xchacha20poly1305_ietf_encrypt(_XOUT, ffi.NULL, plaintext, len(plaintext), ad, len(ad),
                                                   ffi.NULL, nonce, key)
    return bytes(ffi.buffer(_XOUT, n))


def xaead_decrypt(key: bytes, nonce: bytes, ad: bytes, ciphertext: bytes) -> bytes:
    try:
        return _b.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except Exception as exc:  # nacl.exceptions.CryptoError and friends
        raise AuthenticationError("AEAD tag did not verify") from exc


# --- BLAKE2b, HMAC, HKDF (Noise section 4.3) -----------------------------------

def hash_(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def mac(key: bytes, data: bytes, size: int = 16) -> bytes:
    """Keyed BLAKE2b (not HMAC): used for the cheap mac1 check on initiations."""
    return hashlib.blake2b(data, digest_size=size, key=key[:64]).digest()


def hmac_hash(key: bytes, data: bytes) -> bytes:
    return _hmac.new(key, data, hashlib.blake2b).digest()


def hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    """Noise HKDF: up to three HASH_BYTES outputs."""
    temp = hmac_hash(chaining_key, ikm)
    out1 = hmac_hash(temp, b"\x01")
    res = [out1]
    if outputs >= 2:
        res.append(hmac_hash(temp, out1 + b"\x02"))
    if outputs >= 3:
        res.append(hmac_hash(temp, res[1] + b"\x03"))
    return res


def constant_time_eq(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)


# --- Ed25519 --------------------------------------------------------------------

def ed25519_keypair(seed: bytes | None = None) -> tuple[bytes, bytes]:
    """Return (secret key 64 bytes, public key 32 bytes)."""
    if seed is None:
        seed = _b.randombytes(32)
    pk, sk = _b.crypto_sign_seed_keypair(seed)
    return sk, pk


def ed25519_sign(sk: bytes, message: bytes) -> bytes:
    return _b.crypto_sign(message, sk)[:64]


def ed25519_verify(pk: bytes, message: bytes, signature: bytes) -> bool:
    if len(pk) != 32 or len(signature) != 64:
        return False
    try:
        _b.crypto_sign_open(bytes(signature) + bytes(message), pk)
    except Exception:  # nacl.exceptions.BadSignatureError, ValueError
        return False
    return True
