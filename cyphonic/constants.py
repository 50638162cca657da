"""Every timer and limit of the CYPHONIC protocol core, in one place.

Split as wireguard-go's ``device/constants.go`` does: values the protocol
specifies (changing them breaks interoperability or the security argument),
and implementation choices (tunable; they only change resource use).
Units are in the names: ``_S`` seconds, ``_BYTES``, ``_PACKETS``.
"""

# --- Specification values -------------------------------------------------

PROTOCOL_VERSION = 1

# Data channel (docs/protocol.md, "Data channel").
REKEY_AFTER_S = 120.0            # initiator starts a new handshake after this session age
REJECT_AFTER_S = 180.0           # no packet is sealed or opened with an older session
REKEY_ATTEMPT_S = 90.0           # give up retrying a handshake after this long
REKEY_TIMEOUT_S = 5.0            # retransmit an unanswered initiation at most this long after the last
HANDSHAKE_FIRST_RETRY_S = 1.0    # ... the first after 1 s; the wait doubles up to REKEY_TIMEOUT_S (handshake.retry_wait)
REKEY_TIMEOUT_JITTER_S = 0.333   # at most this much random jitter on retransmission
KEEPALIVE_S = 10.0               # passive keepalive: send an empty packet if we received but sent nothing
NAT_KEEPALIVE_S = 25.0           # persistent keepalive to hold NAT mappings (when behind NAT)
REKEY_AFTER_MESSAGES = 1 << 48   # per send stream (counter bits per stream, see datachannel)
REJECT_AFTER_MESSAGES = (1 << 56) - (1 << 13) - 1  # per stream: never wrap the stream counter

# Replay window (RFC 6479): a bitmap of 8192 bits, 8128 usable (one 64-bit block is
# the moving ring slack), so counters up to 8128 behind the highest are still judged.
REPLAY_BITMAP_BITS = 8192
REPLAY_WINDOW_PACKETS = REPLAY_BITMAP_BITS - 64  # 8128

# Multi-worker sending (docs/protocol.md, "Several workers, one session"):
# the 64-bit counter is split into an 8-bit stream id and a 56-bit per-stream counter.
STREAM_BITS = 8
STREAM_COUNTER_BITS = 64 - STREAM_BITS
MAX_STREAMS = 1 << STREAM_BITS   # 256 stream ids per session key, never reused for one key

# Handshake.
HANDSHAKE_INITIATION_MIN_INTERVAL_S = 0.02   # per peer: at most 50 initiations consumed a second
TIMESTAMP_BYTES = 12                          # TAI64N-like: 8-byte seconds, 4-byte nanoseconds
MAX_CLOCK_SKEW_S = 300.0                      # certificates: tolerated clock skew for validity checks

# Sizes.
KEY_BYTES = 32
AEAD_TAG_BYTES = 16
DATA_HEADER_BYTES = 16
DATA_OVERHEAD_BYTES = DATA_HEADER_BYTES + AEAD_TAG_BYTES  # 32, plus IP+UDP outside
UDP_IPV4_OVERHEAD_BYTES = 20 + 8
UDP_IPV6_OVERHEAD_BYTES = 40 + 8
RELAY_OVERHEAD_BYTES = 12       # relay framing (cyphonic.wire.relay) when the path goes through the TRS
# Inner MTU that fits a 1500-byte underlay over IPv6, relayed: 1500 - 48 - 12 - 32 = 1408.
DEFAULT_INNER_MTU = 1500 - UDP_IPV6_OVERHEAD_BYTES - RELAY_OVERHEAD_BYTES - DATA_OVERHEAD_BYTES
MAX_DATAGRAM_BYTES = 65535 - UDP_IPV4_OVERHEAD_BYTES
MAX_INNER_PACKET_BYTES = MAX_DATAGRAM_BYTES - DATA_OVERHEAD_BYTES  # 65475: sealed, it still fits one UDP datagram

# Certificates.
MAX_CERT_BYTES = 600
MAX_FQDN_BYTES = 253
MAX_GROUPS = 16
MAX_GROUP_BYTES = 63

# Signaling.
MAX_SIGNALING_BYTES = 1200       # whole plaintext message; fits in one unfragmented datagram
MAX_ENDPOINTS = 8                # addresses a node may report or the NMS may hand out
MAX_ERROR_TEXT_BYTES = 200
MAX_TOKEN_BYTES = 128

# --- Implementation choices -------------------------------------------------

HANDSHAKE_RATE_PER_SOURCE_PER_S = 20.0   # token bucket refill per source address
HANDSHAKE_BURST_PER_SOURCE = 40          # bucket size
RATELIMIT_TABLE_MAX = 4096               # source addresses tracked at once (oldest evicted)
# Cookie replies under load (docs/protocol.md 4.10): a responder does at most this many
# handshakes' Diffie-Hellman work a second (a token bucket, burst as large) before it
# answers initiations without a valid mac2 with a cookie reply instead.
HANDSHAKE_LOAD_PER_S = 100.0             # tunnel responders (node daemon, adapter links)
CONTROL_HANDSHAKE_LOAD_PER_S = 1000.0    # the cloud's control channel: every node logs in
UNDER_LOAD_HOLD_S = 1.0                  # "under load" lasts this long after the bucket last ran dry
COOKIE_SECRET_LIFETIME_S = 120.0         # the responder's cookie secret changes this often
COOKIE_USABLE_S = 110.0                  # an initiator uses a cookie this long after receiving it
COOKIE_RETRY_S = 0.5                     # ... and, holding one, retransmits a control initiation this often
# A day (or three) without the cloud (docs/protocol.md 11.6): while its own cloud link is down,
# a node keeps rekeying with the peers it already has when their certificates expire, for this long
# past the expiry; it learns no revocation meanwhile. Never for a peer it did not have.
OUTAGE_CERT_GRACE_S = 7 * 86400.0
MAX_PEER_RECORDS = 1024                  # peers a node keeps on disk for a restart without the cloud
MAX_PEERS = 4096                         # tunnels one device keeps
STAGED_PACKETS_PER_PEER = 128            # packets queued while a handshake is under way
MAX_EVENTS_QUEUED = 4096                 # events not yet pulled by the caller (oldest dropped, counted)
MAX_DATAGRAMS_QUEUED = 4096              # datagrams not yet pulled by the caller
MAX_RECEIVE_STREAMS_PER_SESSION = 64     # replay windows a session allocates: a sender uses at most
                                         # 64 of the 256 stream ids under one key, then rekeys
# Batched sending (cyphonic.udp_batch): datagrams in one UDP GSO send, at most the kernel's
# UDP_MAX_SEGMENTS (64; more is EMSGSIZE), and at most MAX_DATAGRAM_BYTES in all.
GSO_MAX_SEGMENTS = 64

# Control channel (node <-> cloud signaling), docs/protocol.md "Signaling".
CONTROL_RETRY_S = 1.0             # first retransmission of an unanswered request
CONTROL_RETRY_MAX_S = 8.0         # back-off doubles up to this
CONTROL_RETRIES = 5               # resent after 1, 3, 7, 15 and 23 s; times out at 31 s (event)
CONTROL_FAST_RETRY_MIN_S = 0.2    # plus one early resend at the measured RTO (RFC 6298), never sooner
CONTROL_MAX_PENDING = 256         # outstanding requests per peer
CONTROL_ANSWERED_CACHE = 64       # replies kept per peer to answer retransmitted requests
CONTROL_QUEUE_MAX = 64            # messages waiting for the control session to come up
MAX_CONTROL_PEERS = 100_000       # nodes one cloud process holds confirmed sessions for
MAX_CONTROL_UNCONFIRMED = 4096    # handshakes answered but not yet confirmed by a data packet
CONTROL_PEER_IDLE_S = 600.0       # a cloud forgets a node's channel after this much silence
CONTROL_SWEEP_S = 10.0            # how often the cloud looks for idle channels
SERVER_REQUEST_ID_BASE = 1 << 31  # request ids the cloud starts (client ids stay below)

# Getting back to the cloud (cyphonic.signaling): after a failure the signaling client tries
# again (a control handshake, and a login if none is out) after RECONNECT_MIN_S, the wait
# doubling up to a cap, and the control channel resends its initiation at least that often; a
# handshake the cloud answers sends the login at once. Each wait is drawn from
# [1 - RECONNECT_JITTER, 1] of its value, so links that failed together (an adapter's 16
# general nodes) reach a returning cloud spread over the cap, never all at one instant.
RECONNECT_MIN_S = 1.0             # the first try again after a failure (drawn in 0.5 .. 1 s)
RECONNECT_MAX_S = 2.5             # the cap once the node has a certificate: back within this of the cloud's return
ENROLL_RETRY_MAX_S = 30.0         # the cap while it has none (enrolling with a token): a wrong setup does not hammer
ENROLL_FAST_S = 30.0              # ... but for its first 30 s an enrolling node tries every
ENROLL_FAST_RETRY_S = 0.5         # 0.5 s: first contact through a flooded intake is a matter of tries
RECONNECT_JITTER = 0.5

# Several cloud instances (docs/node.md "Several cloud instances"): a node that knows more than
# one moves to the next instance as soon as the one it uses goes silent, so it must notice fast.
# With more than one instance its keepalive (a sig.Keepalive request, about 100 bytes on the wire
# with its answer of the same size) goes every FAILOVER_PROBE_S instead of the cloud's 25 s:
# per node 0.5 requests a second to the one instance it uses, none to the others. Any request to
# the instance in use (but a route request, which the cloud answers only once the peer did) that
# is unanswered for FAILOVER_SILENT_S means it went silent. Worst case from a kill to the move:
# one probe interval plus the silence, 3.5 s; the handshake, login and registration at the next
# instance are three round trips more. With one instance none of this applies.
FAILOVER_PROBE_S = 2.0            # keepalive interval while there are several instances
FAILOVER_SILENT_S = 1.5           # a request unanswered this long: the instance went silent

# Node engine (route execution).
PATH_ATTEMPT_S = 3.0             # a direct, local or punched path that has not handshaked by then has failed
ROUTE_ANSWER_S = 40.0            # a route asked of the cloud with no answer by then has failed (the request times out at 31 s)
PATH_RESEND_S = 0.5              # meanwhile the initiation is re-sent this often (a lost one costs 0.5 s, not 5)
PATH_RESEND_UNDER_LOAD_S = 0.1   # ... and every 0.1 s while the peer answers with cookies (it is under a flood)
RELAY_BIND_EVERY_S = 25.0        # re-send BIND to the relay (keepalive of the relay session and our NAT)
PUNCH_PACKETS = 3                # punch datagrams sent toward each peer endpoint
PUNCH_SPACING_S = 0.2            # between punch datagrams
MAX_PENDING_RESOLVES = 256       # peers being brought up at once
MSG_PUNCH = 9                    # a datagram that only opens a NAT mapping; receivers drop it silently
