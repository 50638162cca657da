"""The adapter's timers and limits, in one place (the protocol's own are in
``cyphonic.constants``, the busy-poll policy's in ``cyphonic.busy_poll``, the stream-id rule's in
``cyphonic.stream_ids``). Configuration keys and their defaults are in ``appliance.config``.
"""

# --- the controller's periodic work (appliance.controller) --------------------------------
SYNC_S = 0.25                   # how often sessions are synced into the workers, rekeys started, dead
                                # workers restarted and deadlines the way back moved fired: a worker
                                # that died is replaced within this (plus its start-up)
STATS_EVERY_S = 1.0             # the workers' counters are asked for, and the health conditions looked at, this often
CONFIG_GN_RETRY_S = 30.0        # general_nodes from the config that could not be enrolled: tried again

# --- general nodes (appliance.enrollment, appliance.signaling) -------------------------------
SELF_MAC = "02:00:00:00:00:00"  # the adapter's own identity is kept as this pseudo general node's
                                # (<state_dir>/gn/020000000000/): on disk since the first release
GN_PORTS = 1024                 # general node ports are taken from gn_port_base .. + GN_PORTS - 1
SOCKET_BUFFER_BYTES = 4 << 20   # SO_RCVBUF / SO_SNDBUF of each general node's WAN socket: the way back
                                # is drained by one process for all general nodes, so bursts wait here
INJECT_BATCH_DEFAULT = True     # the way back injects a drain's packets in batches (AF_PACKET with
                                # PACKET_VNET_HDR: one frame per merged TCP run); the config key inject_batch
DNS_HOLD_S = 8.0                # a general node's query for a peer is held this long for its tunnel

# --- the worker processes (appliance.worker_pool, appliance.packet_handling) ------------------
WORKER_STOP_WAIT_S = 2.0        # at shutdown: a worker told to stop is killed after this
WORKER_RESTART_WAIT_S = 1.0     # re-forking the whole pool (restart_all): the same, shorter
WORKER_SOCKET_WAIT_S = 1.0      # a worker told of a new general node waits this long for its socket (the
                                # controller sends it right after): none means the pipe is out of step
WORKER_BIND_ATTEMPTS = 20       # a restarted worker waits for its queue, still held by its dying
WORKER_BIND_RETRY_S = 0.1       # predecessor, up to attempts x retry
WORKER_MAX_SESSIONS = 4096      # send sessions one worker holds (general nodes x their peers)
MAX_WORKERS = 16                # a send key has 63 stream ids (cyphonic.stream_ids) and every worker
                                # takes one per installation: 16 leave room for three re-installs
                                # (restarts, endpoint moves) before a key must be rekeyed
MISS_REPORT_EVERY_S = 1.0       # a worker reports a packet with no session once per pair this often

# --- Address Configuration: DHCP (appliance.address_config) -----------------------------
DEFAULT_LEASE_S = 3600
OFFER_HOLD_S = 60                  # an OFFER reserves the address this long without a REQUEST
DECLINE_HOLD_S = 600               # a DECLINEd address is not offered again for this long
LOG_ONCE_MAX = 4096                # unknown MACs remembered for "log once"
UNKNOWN_MACS_KEPT = 16             # unknown MACs that asked for a lease, shown by cyadm status (appliance.unknown_macs)
UNKNOWN_MACS_WRITE_EVERY_S = 5.0   # their file is written at most this often (not per DHCP packet)
UNKNOWN_MACS_FILE_MAX_BYTES = 65536  # a larger file is not read (16 entries take about 2 KiB)

# --- the general node registry (appliance.general_nodes) --------------------------------
MAX_GENERAL_NODES = 256

# --- Interface Handling: proxy ARP (appliance.interface_handling) -----------------------
ARP_REPLY_RATE_PER_MAC_PER_S = 20.0   # a general node resolves each peer once, then re-checks
ARP_REPLY_BURST_PER_MAC = 50          # every ~30 s: far below this, even with many peers
ARP_RATELIMIT_TABLE_MAX = 1024        # sender MACs tracked at once (oldest evicted)
ARP_MAX_FRAMES_PER_WAKEUP = 64        # frames read per readiness callback (the loop stays fair)
ARP_RECV_BYTES = 2048

# --- the lease table (appliance.leases) -------------------------------------------------
EXPIRED_KEEP_S = 24 * 3600     # expired or released leases are forgotten this long after expiry
MAX_RECORDS = 65536            # leases + declined addresses kept at most (oldest forgotten first)

# --- the status LED (appliance.led) -----------------------------------------------------
LED_TICK_S = 0.25                 # the loop never sleeps longer (patterns change faster: it sleeps less)
LED_POLL_S = 2.0                  # state re-read from provision.json and the status socket
LED_ASK_TIMEOUT_S = 1.0
ADAPTER_DOWN_AFTER_S = 180.0  # provisioning ok, but the adapter has not answered for this long

# --- the packet filter (appliance.packet_filter) ----------------------------------------
NFT_CMD_TIMEOUT_S = 10

# --- a worker's NFQUEUE (appliance.packet_handling, issue 15) ------------------------------
NFQ_DRAIN_PACKETS = 256           # packets read per drain, then the runs go out and one verdict covers them
NFQ_SOCKET_BYTES = 8 << 20        # the queue's netlink receive buffer (SO_RCVBUFFORCE as root)
NFQ_RECV_BYTES = 8192             # one queued packet: the package copies at most 4016 bytes of it, plus metadata
NFQ_MAX_LEN = 4096                # packets the kernel holds for the queue (read or not, until their verdict)
NFQ_CONFIG_SEQ = 1                # our configuration request's sequence number (its ACK is taken out of the stream)
MIN_MTU = 576                     # the config key mtu's lowest value (every IPv4 host must take 576-byte packets)
# --- ... with F_GSO (issue 15, step 5: the config key nfq_gso) ---
NFQ_GSO_DEFAULT = True            # nfq_gso's default: queued super-packets, cut and sealed by the worker
NFQ_RECV_GSO_BYTES = 65536 + 4096  # one queued message then: up to 65,531 bytes of packet (the kernel's
                                  # NFQNL_MAX_COPY_RANGE) plus its attributes (well under 1 KiB)
NFQ_COPY_RANGE = 0xFFFF           # asked for; the kernel caps it at 65,531
NFQ_GSO_TOGGLE_SEQ = 2            # sequence numbers of F_GSO off/on around a hand-back, and of its REPEAT
NFQ_REPEAT_SEQ = 3                # verdict: a refusal comes back with them (no ACK asked)
NFQ_GSO_MAX_PIECES = 64           # a super-packet cut into more pieces is handed back to the kernel
NFQ_GSO_REPEATS_PER_DRAIN = 16    # super-packets handed back to the kernel per drain, and per second;
NFQ_GSO_REPEATS_PER_S = 1000      # beyond, dropped (counted): the guard against a hand-back loop

# --- first-boot provisioning (appliance.provision) --------------------------------------
PROVISION_WAIT_STEP_S = 0.5
PROVISION_NFT_TIMEOUT_S = 10

# --- signed A/B updates and the health gate (appliance.update, appliance.updater) --------
GATE_DEFAULT_S = 300              # the trial boot's health gate: [update] gate_s in cyphonic.toml
GATE_MIN_S = 30
GATE_MAX_S = 3600                 # cyphonic-update-gate.service's TimeoutStartSec is above this
GATE_POLL_S = 2.0                 # the adapter's status is asked this often during the gate
GATE_MAX_RESTARTS = 3             # the adapter's unit restarted this often in the trial: fail at once
GATE_ASK_TIMEOUT_S = 2.0
GATE_MARK_RETRIES = 3             # rauc mark-good tried again this often (GATE_POLL_S apart) before giving up
INSTALL_SAMPLE_GAP_S = 5.0        # two status samples at least this far apart tell which general
                                  # nodes carry data now (the others need only their tunnel back)
FETCH_CONNECT_TIMEOUT_S = 15.0    # a URL: connecting, and every read, give up after this
FETCH_TOTAL_S = 1800.0            # and the whole download (cyadm update install --timeout)
FETCH_CHUNK_BYTES = 1 << 20
DATA_RESERVE_BYTES = 64 << 20     # a bundle may fill /data only up to this much free space
UPDATE_FILE_MAX_BYTES = 1 << 20   # pending.json / last.json larger than this are not read
RAUC_INFO_TIMEOUT_S = 300         # checking a bundle's signature reads all of it (slow SD cards)
RAUC_INSTALL_TIMEOUT_S = 3600     # writing the other slot
UPDATE_CMD_TIMEOUT_S = 60         # rauc status / mark-*, fw_printenv, systemctl
