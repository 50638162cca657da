"""Wire formats: one module per format, each with ``encode``/``decode`` that are
exact inverses. Decoders check lengths first and raise only ``ParseError``.

- ``common``     bounded reader/writer helpers
- ``cert``       node certificates (signed by the Authentication Service)
- ``handshake``  tunnel handshake initiation and response
- ``data``       the data-channel header
- ``signaling``  control-plane messages between nodes and the cloud
"""
