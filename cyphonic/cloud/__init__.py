"""The cloud: Authentication Service (AS), Node Management Service (NMS), Tunnel Relay Service (TRS)."""
