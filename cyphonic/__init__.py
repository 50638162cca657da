"""CYPHONIC overlay: the sans-IO protocol core, the cloud services and the node daemon.

Layout (the paper's modules by name):
- ``cyphonic.constants``      every timer and limit of the protocol
- ``cyphonic.errors``         our exception types (parse errors say what to answer)
- ``cyphonic.crypto``         libsodium primitives (fast AEAD path, X25519, Ed25519, BLAKE2b KDF)
- ``cyphonic.wire``           one module per wire format (certificate, handshake, data, signaling)
- ``cyphonic.certs``          the Authentication Service's CA: issue and verify certificates
- ``cyphonic.handshake``      the Noise IK tunnel handshake state machine
- ``cyphonic.replay``         the RFC 6479 replay window
- ``cyphonic.ratelimit``      token buckets for handshake initiations
- ``cyphonic.datachannel``    sealing and opening data packets (multi-worker nonce scheme)
- ``cyphonic.tunnel``         one peer's tunnel: keypairs, timers, rekey, keepalives
- ``cyphonic.device``         one node identity with its peers: the sans-IO endpoint
"""

__version__ = "0.1.0"
