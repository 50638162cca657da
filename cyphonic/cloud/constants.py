"""Timers and limits of the cloud services, units in the names.

All values here are implementation choices (tunable; they change resource use
and how long state lives, not the wire format). Wire sizes of the relay live
in ``cyphonic.wire.relay``.
"""

# --- Tunnel Relay Service (TRS) ----------------------------------------------

RELAY_PORT = 47102                 # default UDP port of the TRS (IPv4 and IPv6 sockets share it)
RELAY_KEY_BYTES = 32               # key the NMS and the TRS share to mint and check relay tokens
RELAY_TOKEN_LIFETIME_S = 3600      # the NMS mints tokens valid this long; the node re-asks before
RELAY_MAX_SESSIONS = 10_000        # relay sessions held at once (table full: evict an idle one or refuse)
RELAY_IDLE_S = 120.0               # a session with no packet for this long is removed
RELAY_SWEEP_S = 5.0                # how often the TRS looks for idle and expired sessions
RELAY_RATE_PPS = 20_000.0          # per source IP: packets a second (token bucket refill)
RELAY_BURST = 40_000               # per source IP: bucket size
RELAY_RATELIMIT_SOURCES = 20_000   # source IPs the rate limiter tracks (least recently used evicted)
RELAY_ERROR_RATE_PER_S = 1.0       # ERROR answers per source IP a second
RELAY_ERROR_BURST = 1              # ... and their bucket size: at most one a second
RELAY_ERROR_SOURCES = 4096         # source IPs the ERROR limiter tracks
RELAY_ERRORS_TOTAL_PER_S = 1000.0  # ERROR answers a second in all: spoofed sources each get their own
                                   # one a second, so only a total bounds what unverified sources get back
RELAY_MAX_DATAGRAMS_QUEUED = 4096  # datagrams not yet pulled by the I/O edge (oldest dropped, counted)
RELAY_SOCKET_BUFFER_BYTES = 4 << 20  # SO_RCVBUF / SO_SNDBUF asked for on the TRS sockets (best effort)

# --- Authentication Service (AS) ------------------------------------------------

TOKEN_ID_BYTES = 6                 # public part of an enrollment token (hex in the token string)
TOKEN_SECRET_BYTES = 16            # secret part (128 bits); the store keeps only its BLAKE2b hash
CERT_BACKDATE_S = 60               # certificates start this much in the past (clock skew)

# --- Node Management Service (NMS) ------------------------------------------------

MAX_REGISTRATIONS = 100_000        # registered nodes one NMS holds
MAX_ROUTES = 50_000                # routes remembered (pending, or answered and awaiting RouteConfirm)
ROUTE_PENDING_S = 30.0             # a route waiting longer than this is answered PEER_UNREACHABLE
ROUTE_KEEP_S = 60.0                # an answered route is remembered this long (confirmations, relay fallback)
IDENTITY_CACHE_S = 5.0             # identities read from the store are reused this long (revocation applies within it)
IDENTITY_CACHE_MAX = 100_000
REGISTRATION_SWEEP_S = 5.0         # how often expired registrations are removed
SIGNALING_PORT = 47101             # default UDP port of the AS+NMS control channel
MAX_LOG_LINES_QUEUED = 10_000      # log lines not yet printed by the I/O edge

# The cloud's intake socket (initiations only, cyphonic.udp.steered_udp_sockets): read this many
# per callback, straight into the core with one flush, between asyncio's other callbacks.
INTAKE_BATCH = 32
RECV_BYTES = 2048                  # the largest initiation is 752 bytes; a longer datagram is still refused (oversize)
