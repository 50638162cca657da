"""cyphonic.crypto: the primitives agree with libsodium and the RFCs, and refuse what they must.

- BLAKE2b from ``hashlib`` is the same function as libsodium's ``crypto_generichash``.
- X25519 (RFC 7748 section 6.1 vector, agreement both ways) refuses every
  low-order public key with ``AuthenticationError``.
- HMAC and HKDF have the structure the Noise specification (section 4.3) gives,
  checked against an HMAC written out here from its definition (RFC 2104).
- Ed25519 (RFC 8032 test 1) and the handshake AEAD refuse tampering.
"""

from __future__ import annotations

import hashlib
import struct

import nacl.bindings
import nacl.encoding
import nacl.hash
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyphonic import crypto
from cyphonic.errors import AuthenticationError, RemoteProtocolError

FAST = settings(max_examples=200, deadline=None)


# --- BLAKE2b ----------------------------------------------------------------------

@FAST
@given(st.binary(max_size=1024))
def test_blake2b_hashlib_equals_libsodium(data):
    ours = crypto.hash_(data)
    assert len(ours) == 64
    assert ours == hashlib.blake2b(data, digest_size=64).digest()
    assert ours == nacl.hash.blake2b(data, digest_size=64, encoder=nacl.encoding.RawEncoder)
    assert ours == nacl.bindings.crypto_generichash_blake2b_salt_personal(data, digest_size=64)


@FAST
@given(st.binary(min_size=16, max_size=64), st.binary(max_size=512), st.sampled_from([16, 32, 64]))
def test_keyed_blake2b_mac_equals_libsodium(key, data, size):
    ours = crypto.mac(key, data, size)
    assert len(ours) == size
    assert ours == nacl.bindings.crypto_generichash_blake2b_salt_personal(data, digest_size=size, key=key)


def test_blake2b_known_answer_empty():
    # RFC 7693 BLAKE2b-512 of the empty string (as published in the BLAKE2 test vectors).
    assert crypto.hash_(b"").hex() == (
        "786a02f742015903c6c6fd852552d272912f4740e15847618a86e217f71f5419"
        "d25e1031afee585313896444934eb04b903a685b1448b755d56f701afe9be2ce")


# --- X25519 -------------------------------------------------------------------------

RFC7748_ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
RFC7748_BOB_PRIV = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
RFC7748_BOB_PUB = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
RFC7748_SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_vector():
    assert crypto.x25519_public(RFC7748_ALICE_PRIV) == RFC7748_ALICE_PUB
    assert crypto.x25519_public(RFC7748_BOB_PRIV) == RFC7748_BOB_PUB
    assert crypto.x25519(RFC7748_ALICE_PRIV, RFC7748_BOB_PUB) == RFC7748_SHARED
    assert crypto.x25519(RFC7748_BOB_PRIV, RFC7748_ALICE_PUB) == RFC7748_SHARED


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_x25519_agreement_both_ways(a_priv, b_priv):
    a_pub = crypto.x25519_public(a_priv)
    b_pub = crypto.x25519_public(b_priv)
    shared = crypto.x25519(a_priv, b_pub)
    assert shared == crypto.x25519(b_priv, a_pub)
    assert len(shared) == 32 and shared != bytes(32)


def test_x25519_keypair_agreement():
    a_priv, a_pub = crypto.x25519_keypair()
    b_priv, b_pub = crypto.x25519_keypair()
    assert a_priv != b_priv
    assert crypto.x25519(a_priv, b_pub) == crypto.x25519(b_priv, a_pub)


_P_MINUS_1 = "ec" + "ff" * 30 + "7f"
_P = "ed" + "ff" * 30 + "7f"
_P_PLUS_1 = "ee" + "ff" * 30 + "7f"
_ORDER8_A = "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"
_ORDER8_B = "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"

LOW_ORDER_POINTS = {
    "zero": "00" * 32,
    "one (order 1)": "01" + "00" * 31,
    "order 8 (a)": _ORDER8_A,
    "order 8 (b)": _ORDER8_B,
    "p - 1 (order 2)": _P_MINUS_1,
    "p (= 0)": _P,
    "p + 1 (= 1)": _P_PLUS_1,
}


def _with_high_bit(h: str) -> str:
    raw = bytearray.fromhex(h)
    raw[31] |= 0x80  # RFC 7748: the top bit is masked, so these are the same points
    return raw.hex()


@pytest.mark.parametrize("point", list(LOW_ORDER_POINTS.values()) +
                         [_with_high_bit(h) for h in LOW_ORDER_POINTS.values()],
                         ids=list(LOW_ORDER_POINTS) + [k + " +hibit" for k in LOW_ORDER_POINTS])
@pytest.mark.parametrize("priv", [bytes(range(32)), RFC7748_ALICE_PRIV, b"\xff" * 32])
def test_x25519_refuses_low_order_points(point, priv):
    with pytest.raises(AuthenticationError) as info:
        crypto.x25519(priv, bytes.fromhex(point))
    assert info.value.reason == "low_order_key"
    assert isinstance(info.value, RemoteProtocolError)


@pytest.mark.parametrize("priv_len,pub_len", [(31, 32), (32, 31), (33, 32), (32, 33), (0, 0)])
def test_x25519_refuses_wrong_lengths(priv_len, pub_len):
    with pytest.raises(AuthenticationError) as info:
        crypto.x25519(b"\x01" * priv_len, RFC7748_BOB_PUB[:pub_len].ljust(pub_len, b"\x09"))
    assert info.value.reason == "bad_key"


# --- HMAC and HKDF (Noise section 4.3, HASHLEN 64, BLOCKLEN 128) ----------------------

def _reference_hmac_blake2b(key: bytes, data: bytes) -> bytes:
    """HMAC written out from RFC 2104 with BLAKE2b-512 (block length 128)."""
    block = 128
    if len(key) > block:
        key = hashlib.blake2b(key).digest()
    key = key.ljust(block, b"\x00")
    ipad = bytes(b ^ 0x36 for b in key)
    opad = bytes(b ^ 0x5C for b in key)
    inner = hashlib.blake2b(ipad + data).digest()
    return hashlib.blake2b(opad + inner).digest()


def _reference_hkdf(ck: bytes, ikm: bytes) -> tuple[bytes, bytes, bytes]:
    temp = _reference_hmac_blake2b(ck, ikm)
    o1 = _reference_hmac_blake2b(temp, b"\x01")
    o2 = _reference_hmac_blake2b(temp, o1 + b"\x02")
    o3 = _reference_hmac_blake2b(temp, o2 + b"\x03")
    return o1, o2, o3


@FAST
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_hmac_hash_matches_rfc2104(key, data):
    assert crypto.hmac_hash(key, data) == _reference_hmac_blake2b(key, data)


@FAST
@given(st.binary(min_size=64, max_size=64), st.sampled_from([b"", b"\x00" * 32]) | st.binary(max_size=96))
def test_hkdf_structure(ck, ikm):
    ref = _reference_hkdf(ck, ikm)
    for n in (1, 2, 3):
        out = crypto.hkdf(ck, ikm, n)
        assert len(out) == n
        assert all(len(o) == crypto.HASH_BYTES for o in out)
        assert tuple(out) == ref[:n]
    # Outputs are distinct and each depends on the chaining key and the input.
    assert len(set(ref)) == 3
    assert crypto.hkdf(ck, ikm + b"x", 1)[0] != ref[0]
    assert crypto.hkdf(bytes(b ^ 1 for b in ck), ikm, 1)[0] != ref[0]


# --- Ed25519 ------------------------------------------------------------------------

# RFC 8032 section 7.1, TEST 1 (empty message).
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUB = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
    "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def test_ed25519_rfc8032_vector():
    sk, pk = crypto.ed25519_keypair(RFC8032_SEED)
    assert pk == RFC8032_PUB
    assert len(sk) == 64
    assert crypto.ed25519_sign(sk, b"") == RFC8032_SIG
    assert crypto.ed25519_verify(pk, b"", RFC8032_SIG)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_ed25519_sign_verify_and_tamper(message, data):
    sk, pk = crypto.ed25519_keypair()
    sig = crypto.ed25519_sign(sk, message)
    assert len(sig) == 64
    assert crypto.ed25519_verify(pk, message, sig)
    bit = data.draw(st.integers(0, 64 * 8 - 1))
    bad = bytearray(sig)
    bad[bit // 8] ^= 1 << (bit % 8)
    assert not crypto.ed25519_verify(pk, message, bytes(bad))
    assert not crypto.ed25519_verify(pk, message + b"\x00", sig)
    if message:
        m = bytearray(message)
        m[data.draw(st.integers(0, len(m) - 1))] ^= 0x01
        assert not crypto.ed25519_verify(pk, bytes(m), sig)
    _, other_pk = crypto.ed25519_keypair()
    assert not crypto.ed25519_verify(other_pk, message, sig)


def test_ed25519_verify_wrong_lengths_is_false_not_an_exception():
    sk, pk = crypto.ed25519_keypair(bytes(32))
    sig = crypto.ed25519_sign(sk, b"m")
    assert not crypto.ed25519_verify(pk[:31], b"m", sig)
    assert not crypto.ed25519_verify(pk, b"m", sig[:63])
    assert not crypto.ed25519_verify(pk, b"m", sig + b"\x00")
    assert not crypto.ed25519_verify(b"", b"m", b"")


def test_ed25519_seeded_keypair_is_deterministic():
    assert crypto.ed25519_keypair(bytes(range(32))) == crypto.ed25519_keypair(bytes(range(32)))
    assert crypto.ed25519_keypair() != crypto.ed25519_keypair()


# --- AEAD for the handshake -----------------------------------------------------------

@FAST
@given(st.binary(min_size=32, max_size=32), st.integers(0, 2**64 - 1), st.binary(max_size=64),
       st.binary(max_size=256))
def test_aead_round_trip_and_noise_nonce(key, n, ad, plaintext):
    ct = crypto.aead_encrypt(key, n, ad, plaintext)
    assert len(ct) == len(plaintext) + 16
    assert crypto.aead_decrypt(key, n, ad, ct) == plaintext
    # Noise nonce: 32 zero bits, then the counter little-endian.
    nonce = b"\x00" * 4 + struct.pack("<Q", n)
    assert ct == nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


@FAST
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=64), st.data())
def test_aead_refuses_wrong_key_nonce_ad_or_tampering(key, plaintext, data):
    ad = b"associated"
    ct = crypto.aead_encrypt(key, 7, ad, plaintext)
    other = bytes(b ^ 0x01 for b in key)
    with pytest.raises(AuthenticationError):
        crypto.aead_decrypt(other, 7, ad, ct)
    with pytest.raises(AuthenticationError):
        crypto.aead_decrypt(key, 8, ad, ct)
    with pytest.raises(AuthenticationError):
        crypto.aead_decrypt(key, 7, ad + b"!", ct)
    bit = data.draw(st.integers(0, len(ct) * 8 - 1))
    bad = bytearray(ct)
    bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationError):
        crypto.aead_decrypt(key, 7, ad, bytes(bad))
    with pytest.raises(AuthenticationError):
        crypto.aead_decrypt(key, 7, ad, ct[:data.draw(st.integers(0, len(ct) - 1))])


def test_aead_wrong_key_length_is_authentication_error():
    with pytest.raises(AuthenticationError):
        crypto.aead_decrypt(b"\x00" * 31, 0, b"", b"\x00" * 16)


def test_constant_time_eq():
    assert crypto.constant_time_eq(b"abc", b"abc")
    assert not crypto.constant_time_eq(b"abc", b"abd")
    assert not crypto.constant_time_eq(b"abc", b"ab")
    assert crypto.constant_time_eq(b"", b"")


def test_random_bytes():
    assert len(crypto.random_bytes(32)) == 32
    assert crypto.random_bytes(32) != crypto.random_bytes(32)
