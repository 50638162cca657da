"""Write the known-answer vectors ``handshake.json`` and ``cert.json`` next to this file.

Every input is fixed (private keys, ephemerals, clock, indexes, CA seed), and
every primitive involved is deterministic (X25519, BLAKE2b, ChaCha20-Poly1305,
Ed25519), so the outputs are exact bytes. The inputs are stored in the JSON
too; ``tests/test_handshake.py`` and ``tests/test_certs.py`` recompute the
outputs from them and compare byte for byte.

Run it only when the wire format or the handshake changes on purpose
(``python tests/vectors/make_handshake_vectors.py``), and say why in the commit:
a changed vector means old and new nodes no longer talk to each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from cyphonic import crypto
from cyphonic.certs import CertificateAuthority
from cyphonic.datachannel import SendStream
from cyphonic.handshake import (InitiatorHandshake, StaticIdentity, check_mac1, consume_initiation,
                                create_response)

HERE = Path(__file__).resolve().parent

# --- Certificate inputs ---------------------------------------------------------------
CERT_INPUTS = {
    "ca_seed": bytes(range(0xA0, 0xC0)).hex(),
    "serial": 4242,
    "fqdn": "node-a.example.cyphonic",
    "vip4": "10.77.0.5",
    "vip6": "fd00:77::5",
    "static_private": bytes(range(32)).hex(),   # static_public = X25519(static_private, 9)
    "not_before": 1_700_000_000,
    "not_after": 1_800_000_000,
    "groups": ["admins", "web"],
}

# --- Handshake inputs -----------------------------------------------------------------
HANDSHAKE_INPUTS = {
    "initiator_static_private": bytes(range(32)).hex(),
    "responder_static_private": bytes(range(32, 64)).hex(),
    "initiator_ephemeral_private": bytes(range(64, 96)).hex(),
    "responder_ephemeral_private": bytes(range(96, 128)).hex(),
    "wall_now": 1_750_000_000.25,
    "initiator_index": 0x11223344,
    "responder_index": 0x55667788,
    "data_stream_id": 1,
    "data_plaintext": b"CYPHONIC known-answer data packet".hex(),
}


def make_certificate(inp: dict) -> dict:
    ca = CertificateAuthority.generate(bytes.fromhex(inp["ca_seed"]))
    static_public = crypto.x25519_public(bytes.fromhex(inp["static_private"]))
    cert = ca.issue(serial=inp["serial"], fqdn=inp["fqdn"], vip4=inp["vip4"], vip6=inp["vip6"],
                    static_public=static_public, not_before=inp["not_before"],
                    not_after=inp["not_after"], groups=inp["groups"])
    return {
        "ca_public": ca.public.hex(),
        "ca_key_id": ca.key_id.hex(),
        "static_public": static_public.hex(),
        "encoded": cert.encode().hex(),
    }


def _keypair(priv_hex: str) -> tuple[bytes, bytes]:
    priv = bytes.fromhex(priv_hex)
    return priv, crypto.x25519_public(priv)


def make_handshake(inp: dict, certificate: bytes) -> dict:
    i_priv, i_pub = _keypair(inp["initiator_static_private"])
    r_priv, r_pub = _keypair(inp["responder_static_private"])
    initiator = StaticIdentity(i_priv, i_pub, certificate)
    responder = StaticIdentity(r_priv, r_pub)

    hs = InitiatorHandshake(initiator, r_pub, inp["initiator_index"])
    initiation = hs.create_initiation(inp["wall_now"],
                                      ephemeral=_keypair(inp["initiator_ephemeral_private"]))
    received = consume_initiation(responder, check_mac1(responder, initiation))
    response, r_keys = create_response(responder, received, inp["responder_index"],
                                       ephemeral=_keypair(inp["responder_ephemeral_private"]))
    i_keys = hs.consume_response(response)
    assert (i_keys.send_key, i_keys.receive_key) == (r_keys.receive_key, r_keys.send_key)

    stream = SendStream(i_keys.send_key, i_keys.remote_index, stream_id=inp["data_stream_id"])
    plaintext = bytes.fromhex(inp["data_plaintext"])
    packets = [stream.seal(plaintext).hex() for _ in range(2)]
    return {
        "initiator_static_public": i_pub.hex(),
        "responder_static_public": r_pub.hex(),
        "initiation": initiation.hex(),
        "response": response.hex(),
        "initiator_send_key": i_keys.send_key.hex(),
        "initiator_receive_key": i_keys.receive_key.hex(),
        "data_packets": packets,   # counters 0 and 1 of the stream
    }


def main() -> None:
    cert_out = make_certificate(CERT_INPUTS)
    (HERE / "cert.json").write_text(
        json.dumps({"inputs": CERT_INPUTS, "outputs": cert_out}, indent=2) + "\n")
    hs_inputs = dict(HANDSHAKE_INPUTS, certificate=cert_out["encoded"])
    hs_out = make_handshake(hs_inputs, bytes.fromhex(cert_out["encoded"]))
    (HERE / "handshake.json").write_text(
        json.dumps({"inputs": hs_inputs, "outputs": hs_out}, indent=2) + "\n")
    print("wrote", HERE / "cert.json", "and", HERE / "handshake.json")


if __name__ == "__main__":
    main()
