"""Write the known-answer vectors ``cookie.json`` next to this file (docs/protocol.md 4.10).

Every input is fixed (the responder's static key, the cookie secret, the nonce, the
source address, the initiation), and every primitive is deterministic (BLAKE2b,
XChaCha20-Poly1305), so the outputs are exact bytes. ``tests/test_cookie.py``
recomputes them from the inputs, once through ``cyphonic.cookie`` and once straight
from the formulas of the specification, and compares byte for byte.

Run it only when the cookie format changes on purpose
(``python tests/vectors/make_cookie_vectors.py``), and say why in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

from cyphonic import crypto
from cyphonic.cookie import CookieJar, CookieResponder
from cyphonic.handshake import mac1_key
from cyphonic.wire import handshake as wire_hs

HERE = Path(__file__).resolve().parent

INPUTS = {
    "responder_static_public": crypto.x25519_public(bytes(range(0x40, 0x60))).hex(),
    "secret": bytes(range(0x80, 0xA0)).hex(),
    "nonce": bytes(range(0xC0, 0xD8)).hex(),
    "source": ["192.0.2.7", 51820],
    "sender_index": 0x01020304,
    "ephemeral": bytes(range(0x10, 0x30)).hex(),
    "encrypted_static": bytes(range(0x30, 0x60)).hex(),
    "encrypted_payload": bytes(range(0x60, 0x60 + wire_hs.INIT_MIN_PAYLOAD)).hex(),
    "now": 1_800_000_000.0,
}


def compute(inputs: dict) -> dict:
    static = bytes.fromhex(inputs["responder_static_public"])
    body = wire_hs.Initiation(inputs["sender_index"], bytes.fromhex(inputs["ephemeral"]),
                              bytes.fromhex(inputs["encrypted_static"]),
                              bytes.fromhex(inputs["encrypted_payload"]))
    mac1 = crypto.mac(mac1_key(static), body.body())
    initiation = wire_hs.Initiation(body.sender_index, body.ephemeral, body.encrypted_static,
                                    body.encrypted_payload, mac1).encode()
    randomness = [bytes.fromhex(inputs["secret"]), bytes.fromhex(inputs["nonce"])]
    responder = CookieResponder(static, random_bytes=lambda n: randomness.pop(0))
    source = tuple(inputs["source"])
    reply = responder.reply(initiation, inputs["sender_index"], source, inputs["now"])
    jar = CookieJar(static)
    jar.consume(reply, initiation, inputs["now"])
    stamped = jar.stamp(initiation, inputs["now"])
    return {"initiation": initiation.hex(), "cookie_reply": reply.hex(), "stamped_initiation": stamped.hex()}


def main() -> None:
    out = {"inputs": INPUTS, "outputs": compute(INPUTS)}
    (HERE / "cookie.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
